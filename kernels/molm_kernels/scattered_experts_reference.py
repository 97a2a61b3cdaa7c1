"""PyTorch reference of scattered expert matmuls: the oracle for the Triton kernels and the CPU path.

The routing index follows scattermoe (Tan et al., "Scattered Mixture-of-Experts Implementation",
2024): each of the T*k (token, choice) assignments is named by its flat index t*k + j; sorting the
flat indices by expert gives every expert a contiguous run, so a grouped matmul needs no padding
and drops no token.

Legend: T tokens, K experts per token, N = T*K assignments, E experts, I input width, O output width,
F expert hidden width.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

# Expert activations by config name (`model.activation_function`); the Triton path fuses each of them.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's tanh approximation
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


class Routing(NamedTuple):
    """Assignments sorted by expert."""

    sorted_expert_idx_N: torch.Tensor  # expert of the n-th assignment in sorted order
    sorted_flat_idx_N: torch.Tensor  # its flat (token * K + choice) index
    expert_offsets_E: torch.Tensor  # end of each expert's run (inclusive cumsum of counts)


def route(expert_idx_TK: torch.Tensor, num_experts: int) -> Routing:
    """Sort the T*K assignments by expert (stable, so ties keep token order)."""
    flat = expert_idx_TK.reshape(-1)
    sorted_expert, sorted_flat = torch.sort(flat, stable=True)
    # The end of expert e's run is the number of sorted entries <= e. searchsorted rather than
    # bincount + cumsum: CUDA bincount reads the maximum back to the host (a sync that forbids
    # CUDA-graph capture and stalls the launch queue once per router).
    experts_E = torch.arange(num_experts, device=flat.device, dtype=sorted_expert.dtype)
    offsets = torch.searchsorted(sorted_expert, experts_E, right=True)
    return Routing(sorted_expert, sorted_flat, offsets)


def parallel_linear_reference(
    x: torch.Tensor,
    w_EIO: torch.Tensor,
    k: int,
    routing: Routing,
    grouped_in: bool = False,
    grouped_out: bool = False,
    gates_TK: torch.Tensor | None = None,
    bias_EO: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-assignment expert matmul y_n = x_n @ W[e_n] (+ bias[e_n]), optionally combined with gates.

    x: [T, I] rows read as x[flat // k] (k > 1 fans a token out to its K choices; k = 1 reads one
    row per assignment), or, with grouped_in, [N, I] already in sorted order.
    Returns [N, O] in flat order, or in sorted order with grouped_out; with gates_TK the K rows of
    each token are summed with its gates into [T, O] (grouped_out must be False then).
    """
    sorted_expert, sorted_flat, offsets = routing
    N = sorted_flat.numel()
    x_sorted = x if grouped_in else x[sorted_flat // k]  # (N, I)
    y_sorted = x.new_empty(N, w_EIO.shape[2])
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            y_sorted[start:end] = x_sorted[start:end] @ w_EIO[e]
            if bias_EO is not None:
                # Added per expert block: the bias gradient is one sum per expert (fp32 inside
                # torch's reduction), not an index backward over N duplicate rows.
                y_sorted[start:end] += bias_EO[e]
        start = end
    if grouped_out:
        if gates_TK is not None:
            raise ValueError("gates need flat-order output (grouped_out=False)")
        return y_sorted
    y = torch.empty_like(y_sorted).index_copy(0, sorted_flat, y_sorted)  # (N, O) flat order
    if gates_TK is None:
        return y
    T, K = gates_TK.shape
    return torch.bmm(gates_TK.unsqueeze(1).to(y.dtype), y.view(T, K, -1)).squeeze(1)  # (T, O)


def expert_of_flat(routing: Routing) -> torch.Tensor:
    """[N]: the expert of each assignment in flat (token * K + choice) order."""
    sorted_expert, sorted_flat, _ = routing
    return torch.empty_like(sorted_expert).index_copy(0, sorted_flat, sorted_expert)


def _upcast(b: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> fp32; fp32/fp64 unchanged (fp64 is the tests' oracle precision)."""
    return b.float() if b.element_size() < 4 else b


def scattered_mlp_reference(
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
    linear: Callable[..., torch.Tensor] = parallel_linear_reference,
) -> torch.Tensor:
    """SMoE experts, [T, O] (F: expert hidden width):
    y_t = sum_j g_tj (W2[e] h_e(x_t) + b2[e]) with e = e_tj, and
    h_e(x) = act(W1[e] x + b1[e]), or in the GLU form (w3 given; Llama's SwiGLU with silu)
    h_e(x) = act(W1[e] x + b1[e]) * (W3[e] x): W1 is the gate projection, W3 the up projection
    (Mixtral's w1/w3/w2 names). The biases are optional (GPT-2 and GPT-NeoX have them).

    x_TI is read as x[flat // k]; k = 1 with T*K rows is the expert-parallel form (one assignment
    per received row). `linear` is the scattered matmul the composition uses (this reference, or
    the unfused Triton one: the Triton path's fallback for the forms it does not fuse)."""
    pre_NF = linear(x_TI, w1_EIF, k, routing, grouped_out=True, bias_EO=b1_EF)  # sorted order
    h_NF = ACTIVATIONS[activation](pre_NF)
    if w3_EIF is not None:
        h_NF = h_NF * linear(x_TI, w3_EIF, k, routing, grouped_out=True)
    y_TO = linear(h_NF, w2_EFO, 1, routing, grouped_in=True, gates_TK=gates_TK)
    if b2_EO is None:
        return y_TO
    T, K = gates_TK.shape
    # The gated sum of each token's chosen biases: sum_j g_tj b2[e_tj].
    # Gathered from an fp32 copy: the gather's backward sums ~N/E rows into each bias, which in
    # bf16 loses about 3% (measured on the GPU at 16k rows over 64 experts).
    b_TKO = _upcast(b2_EO)[expert_of_flat(routing)].view(T, K, -1)
    return y_TO + torch.bmm(gates_TK.unsqueeze(1).to(b_TKO.dtype), b_TKO).squeeze(1).to(y_TO.dtype)
