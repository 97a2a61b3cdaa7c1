"""Triton kernels with their PyTorch references, and the one dispatch point the model uses.

`stickbreaking_attention` and `parallel_linear` run the Triton kernels on CUDA tensors and the
PyTorch references elsewhere (CPU, and the oracle in tests).
"""

from kernels.scattered_experts_reference import Routing, parallel_linear_reference, route
from kernels.stickbreaking_reference import stickbreaking_attention_reference

__all__ = ["Routing", "route", "parallel_linear", "stickbreaking_attention",
           "parallel_linear_reference", "stickbreaking_attention_reference"]


def stickbreaking_attention(q_BHTD, k_BGSD, v_BGSD, key_mask_BS=None, attn_dropout=0.0, training=False):
    """Stick-breaking attention; see kernels.stickbreaking_reference for semantics and shapes."""
    return stickbreaking_attention_reference(q_BHTD, k_BGSD, v_BGSD, key_mask_BS, attn_dropout, training)


def parallel_linear(x, w_EIO, k, routing, grouped_in=False, grouped_out=False, gates_TK=None):
    """Scattered expert matmul; see kernels.scattered_experts_reference for semantics and shapes."""
    return parallel_linear_reference(x, w_EIO, k, routing, grouped_in, grouped_out, gates_TK)
