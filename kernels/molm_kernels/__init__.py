"""Triton kernels with their PyTorch references, and the one dispatch point the model uses.

`stickbreaking_attention`, `parallel_linear` and `scattered_mlp` run the Triton kernels on CUDA
tensors (`kernels/molm_kernels/stickbreaking.py`, `kernels/molm_kernels/scattered_experts.py`) and the PyTorch references
elsewhere (CPU, and the oracle in tests). `linear_padded_out` is the output layer's cuBLAS
alignment fix. `accumulate_weight_grads` lets the expert weights' gradient kernel add into a
trainer's fp32 buffers (molm_kernels/grad_accumulation.py). Nothing on the CUDA path reads a value back to the host, so a layer or the whole
model can be captured in a CUDA graph (`molm_kernels.bench.capture`; benchmarks/model_bench.py captures
the model).
"""

from __future__ import annotations

import torch

import torch.nn.functional as F

from molm_kernels.grad_accumulation import accumulate_weight_grads
from molm_kernels.scattered_experts_reference import (
    ACTIVATIONS,
    Routing,
    parallel_linear_reference,
    route,
    scattered_mlp_reference,
)
from molm_kernels.stickbreaking_reference import stickbreaking_attention_reference

__all__ = ["ACTIVATIONS", "Routing", "accumulate_weight_grads", "route", "parallel_linear", "scattered_mlp",
           "stickbreaking_attention", "linear_padded_out", "parallel_linear_reference", "scattered_mlp_reference",
           "stickbreaking_attention_reference"]


def stickbreaking_attention(
    q_BHTD: torch.Tensor,
    k_BGSD: torch.Tensor,
    v_BGSD: torch.Tensor,
    key_mask_BS: torch.Tensor | None = None,
    attn_dropout: float = 0.0,
    training: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stick-breaking attention; see molm_kernels.stickbreaking_reference for semantics and shapes.

    CUDA tensors run the Triton kernels, except with attention dropout in training (the kernels
    have no dropout; that case falls back to the reference, O(T * S) memory).
    """
    if q_BHTD.is_cuda and not (attn_dropout and training):
        from molm_kernels.stickbreaking import stickbreaking_attention_triton

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
    bias_EO: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scattered expert matmul; see molm_kernels.scattered_experts_reference for semantics and shapes.
    CUDA tensors run the Triton kernels."""
    if x.is_cuda:
        from molm_kernels.scattered_experts import parallel_linear_triton

        return parallel_linear_triton(x, w_EIO, k, routing, grouped_in, grouped_out, gates_TK, bias_EO)
    return parallel_linear_reference(x, w_EIO, k, routing, grouped_in, grouped_out, gates_TK, bias_EO)


def scattered_mlp(
    x_TI: torch.Tensor,
    w1_EIF: torch.Tensor,
    w2_EFO: torch.Tensor,
    k: int,
    routing: Routing,
    gates_TK: torch.Tensor,
    activation: str = "gelu_new",
    b1_EF: torch.Tensor | None = None,
    b2_EO: torch.Tensor | None = None,
    w3_EIF: torch.Tensor | None = None,
) -> torch.Tensor:
    """SMoE experts y_t = sum_j g_tj (W2[e] h_e(x_t) + b2[e]), e = e_tj, with
    h_e(x) = act(W1[e] x + b1[e]), or act(W1[e] x + b1[e]) * (W3[e] x) in the GLU form (w3 given:
    Llama's SwiGLU); biases optional. See
    molm_kernels.scattered_experts_reference.scattered_mlp_reference. CUDA tensors run the Triton
    kernels (the activation and the biases fused into the matmuls; the GLU form composes them)."""
    if x_TI.is_cuda:
        from molm_kernels.scattered_experts import scattered_mlp_triton

        return scattered_mlp_triton(x_TI, w1_EIF, w2_EFO, k, routing, gates_TK, activation, b1_EF, b2_EO, w3_EIF)
    return scattered_mlp_reference(x_TI, w1_EIF, w2_EFO, k, routing, gates_TK, activation, b1_EF, b2_EO, w3_EIF)


def linear_padded_out(x: torch.Tensor, weight_VD: torch.Tensor, multiple: int = 64) -> torch.Tensor:
    """x @ weight^T computed into an output padded to a multiple of `multiple` columns, returned
    as a view of the first V columns (row stride V rounded up).

    Same values as F.linear(x, weight). Why: with V = 50295 a bf16 output row is not 16-byte
    aligned, and cuBLAS then falls back to an old (sm75) kernel for the whole matmul (28% of
    MoLM's forward on H100, BENCHMARKS.md). The zero rows appended to the weight cost one copy of
    it; their output columns are never read. The backward runs on padded shapes as well.
    """
    V = weight_VD.shape[0]
    pad = -V % multiple
    if pad == 0:
        return F.linear(x, weight_VD)
    return F.linear(x, F.pad(weight_VD, (0, 0, 0, pad)))[..., :V]
