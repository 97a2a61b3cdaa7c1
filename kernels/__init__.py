"""Triton kernels with their PyTorch references, and the one dispatch point the model uses.

`stickbreaking_attention` and `parallel_linear` run the Triton kernels on CUDA tensors
(`kernels/stickbreaking.py`, `kernels/scattered_experts.py`) and the PyTorch references
elsewhere (CPU, and the oracle in tests).
"""

from __future__ import annotations

import torch

from kernels.scattered_experts_reference import Routing, parallel_linear_reference, route
from kernels.stickbreaking_reference import stickbreaking_attention_reference

__all__ = ["Routing", "route", "parallel_linear", "stickbreaking_attention",
           "parallel_linear_reference", "stickbreaking_attention_reference"]


def stickbreaking_attention(
    q_BHTD: torch.Tensor,
    k_BGSD: torch.Tensor,
    v_BGSD: torch.Tensor,
    key_mask_BS: torch.Tensor | None = None,
    attn_dropout: float = 0.0,
    training: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stick-breaking attention; see kernels.stickbreaking_reference for semantics and shapes.

    CUDA tensors run the Triton kernels, except with attention dropout in training (the kernels
    have no dropout; that case falls back to the reference, O(T * S) memory).
    """
    if q_BHTD.is_cuda and not (attn_dropout and training):
        from kernels.stickbreaking import stickbreaking_attention_triton

        return stickbreaking_attention_triton(q_BHTD, k_BGSD, v_BGSD, key_mask_BS, cu_seqlens)
    return stickbreaking_attention_reference(q_BHTD, k_BGSD, v_BGSD, key_mask_BS, attn_dropout, training,
                                             cu_seqlens)


def parallel_linear(
    x: torch.Tensor,
    w_EIO: torch.Tensor,
    k: int,
    routing: Routing,
    grouped_in: bool = False,
    grouped_out: bool = False,
    gates_TK: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scattered expert matmul; see kernels.scattered_experts_reference for semantics and shapes.
    CUDA tensors run the Triton kernels."""
    if x.is_cuda:
        from kernels.scattered_experts import parallel_linear_triton

        return parallel_linear_triton(x, w_EIO, k, routing, grouped_in, grouped_out, gates_TK)
    return parallel_linear_reference(x, w_EIO, k, routing, grouped_in, grouped_out, gates_TK)
