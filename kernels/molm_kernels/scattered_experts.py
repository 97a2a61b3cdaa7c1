"""Triton scattered expert matmuls (the CUDA path of `molm_kernels.parallel_linear`).

Implements the gather + grouped matmul + scatter of scattermoe (Tan et al., "Scattered
Mixture-of-Experts Implementation", 2024) with our own kernels; `kernels/molm_kernels/scattered_experts_reference.py`
is the oracle and defines the routing index. No padding and no dropped tokens: every program
owns a run of at most BLOCK_M consecutive sorted assignments of one expert (each expert's run is
cut into blocks; the last block of a run is partial and masked), and finds its expert from the
per-expert offsets itself, so the block size can be autotuned without re-indexing on the host.

Two kernels:
- `_scatter_mm_kernel`: Y[out_row(n)] = scale_n * X[in_row(n)] @ W[e_n], where in_row is n
  (grouped input) or flat_n // div (gather; div = k fans a token out to its k choices) and
  out_row is n (grouped output) or flat_n (scatter back to token-major order). With W transposed
  (strides swapped, no copy) it is also the dX of the backward.
- `_expert_xty_kernel`: dW[e] = sum over n of expert e of X[x_row(n)]^T (scale_n * DY[dy_row(n)]):
  the weight gradient, each program a tile of one expert's [I, O] gradient (deterministic).

Gates: the forward writes the ungated per-choice outputs z in token-major order and sums
y_t = sum_j g_tj z_(t,j) in one bandwidth-bound pass (`gate_sum`); the backward never materialises g * dy: the
gate scaling is fused into the dX and dW kernels' row loads. Row offsets are computed in int64.

Legend: T tokens, K choices per token, N = T*K assignments, E experts, I input width, O output width.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from molm_kernels._triton_common import INTERPRET, dot_precision
from molm_kernels.grad_accumulation import gradient_buffer
from molm_kernels.scattered_experts_reference import Routing, scattered_mlp_reference


def _mm_configs() -> list[triton.Config]:
    if INTERPRET:  # the interpreter runs one config (autotune with more is broken there)
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        # Narrow outputs (EMoE's experts of 100-200 neurons): 64 columns waste less of a last tile.
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 256, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    ]


def _xty_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=5),
        # Narrow expert widths as I or O (EMoE's 100-200 neurons).
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    ]


def _prune_fp32(configs, named_args, **kwargs):
    """fp32 (tests, checks) gets the smallest tile: ieee fp32 dots on big tiles spill and compile
    for minutes, and speed in fp32 is not a goal."""
    first = next(iter(named_args.values()))
    if getattr(first, "dtype", None) == torch.float32:
        return [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]
    return configs


@triton.jit
def _find_block(OFFSETS, mblk, E, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """Expert e and its run [start, end) of sorted assignments for the mblk-th row block; e = -1
    for the spare programs past the last block (the grid holds cdiv(N, BLOCK_M) + E of them)."""
    offs_e = tl.arange(0, E_PAD)
    ends = tl.load(OFFSETS + offs_e, mask=offs_e < E, other=0).to(tl.int32)
    ends = tl.where(offs_e < E, ends, tl.max(ends, axis=0))
    starts = tl.where(offs_e == 0, 0, tl.load(OFFSETS + offs_e - 1, mask=(offs_e > 0) & (offs_e < E), other=0))
    starts = tl.where(offs_e < E, starts.to(tl.int32), ends)
    blocks_end = tl.cumsum(tl.cdiv(ends - starts, BLOCK_M), axis=0)  # inclusive count per expert
    e = tl.sum((blocks_end <= mblk).to(tl.int32), axis=0)
    valid = e < E
    blocks_before = tl.sum(tl.where(offs_e < e, tl.cdiv(ends - starts, BLOCK_M), 0), axis=0)
    start = tl.sum(tl.where(offs_e == e, starts, 0), axis=0) + (mblk - blocks_before) * BLOCK_M
    end = tl.sum(tl.where(offs_e == e, ends, 0), axis=0)
    return tl.where(valid, e, -1), start, end


# The activations fused into the first matmul's epilogue (constexpr ACT), by config name.
ACT_CODES = {"gelu_new": 0, "gelu": 1, "relu": 2, "silu": 3}


@triton.jit
def _activation(x, ACT: tl.constexpr):
    """act(x) on fp32 (ACT_CODES). gelu_new = 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3),
    written as x * sigmoid(2u) (the same function: (1 + tanh u) / 2 = sigmoid(2u)); gelu is the
    exact 0.5 x (1 + erf(x / sqrt 2)); silu = x * sigmoid(x)."""
    if ACT == 0:
        return x * tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))
    elif ACT == 1:
        return 0.5 * x * (1.0 + tl.math.erf(0.7071067811865476 * x))
    elif ACT == 2:
        return tl.where(x > 0, x, 0.0)
    else:
        return x * tl.sigmoid(x)


@triton.jit
def _activation_grad(x, ACT: tl.constexpr):
    """d act / dx on fp32. gelu_new: s + x s (1 - s) 2 u'(x), s = sigmoid(2u),
    u' = sqrt(2/pi) (1 + 3 * 0.044715 x^2); gelu: Phi(x) + x phi(x); relu: [x > 0] (torch's
    choice at 0); silu: s (1 + x (1 - s)), s = sigmoid(x)."""
    if ACT == 0:
        s = tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))
        return s + x * s * (1.0 - s) * (1.5957691216057308 * (1.0 + 0.134145 * x * x))
    elif ACT == 1:
        return 0.5 * (1.0 + tl.math.erf(0.7071067811865476 * x)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    elif ACT == 2:
        return tl.where(x > 0, 1.0, 0.0)
    else:
        s = tl.sigmoid(x)
        return s * (1.0 + x * (1.0 - s))


# Epilogues of `_scatter_mm_kernel` (constexpr EPILOGUE); with HAS_BIAS, acc includes BIAS[e].
EPI_PLAIN = 0  # Y = scale * acc
EPI_ACT = 1  # Y = act(acc); with SAVE_AUX also AUX = acc (pre-activation), AUX2 = scale * Y
EPI_ACT_GRAD = 2  # Y = scale * acc * act'(AUX[out_row]): the activation's backward


@triton.autotune(configs=_mm_configs(),
                 key=["I", "O", "stride_wk", "GATHER", "SCATTER", "HAS_SCALE", "HAS_BIAS", "EPILOGUE", "ACT",
                      "SAVE_AUX"],
                 prune_configs_by={"early_config_prune": _prune_fp32})
@triton.jit
def _scatter_mm_kernel(
    X, W, Y, SCALE, SORTED_FLAT, OFFSETS, AUX, AUX2, BIAS,
    stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_ym, stride_yn, stride_be, stride_bn,
    N, I, O, E, in_div,
    GATHER: tl.constexpr, SCATTER: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
    E_PAD: tl.constexpr,
    EPILOGUE: tl.constexpr, ACT: tl.constexpr, SAVE_AUX: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(O, BLOCK_N)
    # Column tiles of one row block are neighbours in launch order: the gathered rows stay in L2.
    mblk = pid // num_n
    nblk = pid % num_n
    e, start, end = _find_block(OFFSETS, mblk, E, E_PAD, BLOCK_M)
    if e < 0:
        return
    offs_m = start + tl.arange(0, BLOCK_M)
    row_ok = offs_m < end
    flat = tl.load(SORTED_FLAT + offs_m, mask=row_ok, other=0).to(tl.int64)
    if GATHER:
        in_row = flat // in_div
    else:
        in_row = offs_m.to(tl.int64)
    offs_n = nblk * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + in_row[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = W + e.to(tl.int64) * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kk in range(0, tl.cdiv(I, BLOCK_K)):
        k_ok = offs_k + kk * BLOCK_K < I
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < O), other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PREC)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        # The expert's bias joins the fp32 accumulator (before the activation and the scale).
        b = tl.load(BIAS + e.to(tl.int64) * stride_be + offs_n * stride_bn, mask=offs_n < O, other=0.0)
        acc += b.to(tl.float32)[None, :]
    if SCATTER:
        out_row = flat
    else:
        out_row = offs_m.to(tl.int64)
    # AUX and AUX2 share Y's shape and strides.
    out_off = out_row[:, None] * stride_ym + offs_n[None, :] * stride_yn
    out_ok = row_ok[:, None] & (offs_n[None, :] < O)
    if HAS_SCALE:
        scale = tl.load(SCALE + offs_m, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    if EPILOGUE == 1:
        # The activation on the fp32 accumulator (one rounding, no extra pass over memory).
        y = _activation(acc, ACT)
        if SAVE_AUX:
            tl.store(AUX + out_off, acc.to(AUX.dtype.element_ty), mask=out_ok)
            # scale * act: what the next matmul's weight gradient needs (sum_n (g_n h_n)^T dy_t),
            # so that kernel reads plain rows instead of scaling inside its main loop.
            tl.store(AUX2 + out_off, (y * scale).to(AUX2.dtype.element_ty), mask=out_ok)
    else:
        y = acc
        if HAS_SCALE:
            y = y * scale
        if EPILOGUE == 2:
            pre = tl.load(AUX + out_off, mask=out_ok, other=0.0).to(tl.float32)
            y = y * _activation_grad(pre, ACT)
    tl.store(Y + out_off, y.to(Y.dtype.element_ty), mask=out_ok)


@triton.jit
def _xty_step(acc, n, end, X, DY, SCALE, SORTED_FLAT, offs_i, offs_o, stride_xm, stride_xk, stride_dm, stride_dn,
              I, O, x_div, dy_div, X_GATHER: tl.constexpr, DY_GATHER: tl.constexpr, HAS_SCALE: tl.constexpr,
              DOT_PREC: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += X[rows n..n+BLOCK_K)^T @ (scale * DY[rows]) for one chunk of an expert's run."""
    offs_r = n + tl.arange(0, BLOCK_K)
    r_ok = offs_r < end
    flat = tl.load(SORTED_FLAT + offs_r, mask=r_ok, other=0).to(tl.int64)
    if X_GATHER:
        x_row = flat // x_div
    else:
        x_row = offs_r.to(tl.int64)
    if DY_GATHER:
        dy_row = flat // dy_div
    else:
        dy_row = offs_r.to(tl.int64)
    xt = tl.load(X + x_row[None, :] * stride_xm + offs_i[:, None] * stride_xk,
                 mask=r_ok[None, :] & (offs_i[:, None] < I), other=0.0)  # (BLOCK_M, BLOCK_K)
    dy = tl.load(DY + dy_row[:, None] * stride_dm + offs_o[None, :] * stride_dn,
                 mask=r_ok[:, None] & (offs_o[None, :] < O), other=0.0)  # (BLOCK_K, BLOCK_N)
    if HAS_SCALE:
        g = tl.load(SCALE + offs_r, mask=r_ok, other=0.0).to(tl.float32)
        dy = (dy.to(tl.float32) * g[:, None]).to(dy.dtype)
    return tl.dot(xt, dy, acc, input_precision=DOT_PREC)


# restore_value: autotuning runs the kernel once per config, and an accumulating run adds to DW.
@triton.autotune(configs=_xty_configs(), key=["I", "O", "X_GATHER", "DY_GATHER", "HAS_SCALE", "ACCUMULATE"],
                 prune_configs_by={"early_config_prune": _prune_fp32}, restore_value=["DW"])
@triton.jit
def _expert_xty_kernel(
    X, DY, DW, SCALE, SORTED_FLAT, OFFSETS,
    stride_xm, stride_xk, stride_dm, stride_dn, stride_we, stride_wi, stride_wo,
    I, O, x_div, dy_div,
    X_GATHER: tl.constexpr, DY_GATHER: tl.constexpr, HAS_SCALE: tl.constexpr, ACCUMULATE: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    e = tl.program_id(1)
    num_o = tl.cdiv(O, BLOCK_N)
    offs_i = (pid // num_o) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_o = (pid % num_o) * BLOCK_N + tl.arange(0, BLOCK_N)
    end = tl.load(OFFSETS + e).to(tl.int32)
    start = tl.where(e > 0, tl.load(OFFSETS + e - 1, mask=e > 0, other=0), 0).to(tl.int32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for n in range(start, end, BLOCK_K):
        acc = _xty_step(acc, n, end, X, DY, SCALE, SORTED_FLAT, offs_i, offs_o, stride_xm, stride_xk,
                        stride_dm, stride_dn, I, O, x_div, dy_div, X_GATHER, DY_GATHER, HAS_SCALE,
                        DOT_PREC, BLOCK_K)
    dw_off = e.to(tl.int64) * stride_we + offs_i[:, None] * stride_wi + offs_o[None, :] * stride_wo
    dw_ok = (offs_i[:, None] < I) & (offs_o[None, :] < O)
    if ACCUMULATE:  # DW is an fp32 gradient buffer: add to it (grad_accumulation.py)
        acc += tl.load(DW + dw_off, mask=dw_ok, other=0.0)
    tl.store(DW + dw_off, acc.to(DW.dtype.element_ty), mask=dw_ok)


@triton.jit
def _gate_sum_kernel(Z, GATES, Y, O, K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_O: tl.constexpr):
    """y[t] = sum_j g[t, j] z[t*K + j] for one token and BLOCK_O columns (z, y contiguous)."""
    t = tl.program_id(0).to(tl.int64)
    offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_j = tl.arange(0, K_PAD)
    g = tl.load(GATES + t * K + offs_j, mask=offs_j < K, other=0.0).to(tl.float32)
    z = tl.load(Z + (t * K + offs_j[:, None]) * O + offs_o[None, :], mask=(offs_j[:, None] < K) & (offs_o[None, :] < O),
                other=0.0).to(tl.float32)
    tl.store(Y + t * O + offs_o, tl.sum(g[:, None] * z, axis=0).to(Y.dtype.element_ty), mask=offs_o < O)


@triton.jit
def _gate_grad_kernel(Z, DY, DGATES, O, K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_O: tl.constexpr):
    """dg[t, j] = dy[t] . z[t*K + j] (z, dy contiguous), fp32 accumulation."""
    t = tl.program_id(0).to(tl.int64)
    offs_j = tl.arange(0, K_PAD)
    acc = tl.zeros([K_PAD], dtype=tl.float32)
    for o0 in range(0, O, BLOCK_O):
        offs_o = o0 + tl.arange(0, BLOCK_O)
        dy = tl.load(DY + t * O + offs_o, mask=offs_o < O, other=0.0).to(tl.float32)
        z = tl.load(Z + (t * K + offs_j[:, None]) * O + offs_o[None, :],
                    mask=(offs_j[:, None] < K) & (offs_o[None, :] < O), other=0.0).to(tl.float32)
        acc += tl.sum(z * dy[None, :], axis=1)
    tl.store(DGATES + t * K + offs_j, acc.to(DGATES.dtype.element_ty), mask=offs_j < K)


def gate_sum(z_NO: torch.Tensor, gates_TK: torch.Tensor) -> torch.Tensor:
    """[T, O]: the gated sum of each token's K rows of z (token-major [T*K, O]). A bandwidth-bound
    pass; torch's bmm with one-row matrices runs as a slow batched gemv here."""
    T, K = gates_TK.shape
    O = z_NO.shape[1]
    z_NO, gates_TK = z_NO.contiguous(), gates_TK.contiguous()
    y = z_NO.new_empty(T, O)
    block = min(1024, triton.next_power_of_2(max(O, 16)))
    if T:
        _gate_sum_kernel[(T, triton.cdiv(O, block))](z_NO, gates_TK, y, O, K=K, K_PAD=triton.next_power_of_2(K),
                                                      BLOCK_O=block)
    return y


def gate_grad(z_NO: torch.Tensor, dy_TO: torch.Tensor, gates_TK: torch.Tensor) -> torch.Tensor:
    """d loss / d gates [T, K] = dy[t] . z[t*K + j]."""
    T, K = gates_TK.shape
    O = z_NO.shape[1]
    dg = torch.empty(T, K, dtype=gates_TK.dtype, device=gates_TK.device)
    if T:
        _gate_grad_kernel[(T,)](z_NO.contiguous(), dy_TO.contiguous(), dg, O, K=K,
                                K_PAD=triton.next_power_of_2(K), BLOCK_O=min(1024, triton.next_power_of_2(max(O, 16))))
    return dg


def scatter_mm(x: torch.Tensor, w_EIO: torch.Tensor, sorted_flat_N: torch.Tensor, expert_offsets_E: torch.Tensor,
               gather_div: int | None, scatter: bool, scale_N: torch.Tensor | None = None,
               transpose_w: bool = False, bias_EO: torch.Tensor | None = None) -> torch.Tensor:
    """Y[out_row(n)] = scale_n * (X[in_row(n)] @ W[e_n] + bias[e_n]) (W[e_n]^T with transpose_w)
    for the N sorted assignments. in_row = flat_n // gather_div, or n when gather_div is None;
    out_row = flat_n when scatter, else n. Returns Y [N, O]."""
    y = _check_mm(x, w_EIO, sorted_flat_N, expert_offsets_E, gather_div, transpose_w)
    _launch_mm(x, w_EIO, y, sorted_flat_N, expert_offsets_E, gather_div, scatter, scale_N, transpose_w, EPI_PLAIN,
               bias_EO=bias_EO)
    return y


def scatter_mm_act(x: torch.Tensor, w_EIF: torch.Tensor, sorted_flat_N: torch.Tensor, expert_offsets_E: torch.Tensor,
                   gather_div: int | None, scale_N: torch.Tensor, save: bool, bias_EF: torch.Tensor | None = None,
                   activation: str = "gelu_new") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first expert matmul with the activation (ACT_CODES) in its epilogue, output grouped
    (sorted order): h [N, F] = act(X[in_row(n)] @ W[e_n] + bias[e_n]); with `save` also z = the
    pre-activation and gh = scale_n * h (for the backward), else two empty [0, F] tensors."""
    h = _check_mm(x, w_EIF, sorted_flat_N, expert_offsets_E, gather_div, False)
    rows = h.shape[0] if save else 0
    z, gh = h.new_empty(rows, h.shape[1]), h.new_empty(rows, h.shape[1])
    _launch_mm(x, w_EIF, h, sorted_flat_N, expert_offsets_E, gather_div, False, scale_N, False, EPI_ACT,
               aux=(z, gh) if save else None, bias_EO=bias_EF, activation=activation)
    return h, z, gh


def scatter_mm_act_grad(dy: torch.Tensor, w_EFO: torch.Tensor, sorted_flat_N: torch.Tensor,
                        expert_offsets_E: torch.Tensor, gather_div: int | None, scale_N: torch.Tensor,
                        z_NF: torch.Tensor, activation: str = "gelu_new") -> torch.Tensor:
    """dz [N, F] (grouped) = act'(z_n) * scale_n * (DY[in_row(n)] @ W[e_n]^T): the second
    expert matmul's input gradient with the first one's activation backward in its epilogue."""
    dz = _check_mm(dy, w_EFO, sorted_flat_N, expert_offsets_E, gather_div, True)
    if z_NF.shape != dz.shape or not z_NF.is_contiguous():
        raise ValueError(f"pre-activations must be contiguous {tuple(dz.shape)}, got {tuple(z_NF.shape)}")
    _launch_mm(dy, w_EFO, dz, sorted_flat_N, expert_offsets_E, gather_div, False, scale_N, True, EPI_ACT_GRAD,
               aux=(z_NF, z_NF), activation=activation)
    return dz


def _check_mm(x: torch.Tensor, w_EIO: torch.Tensor, sorted_flat_N: torch.Tensor, expert_offsets_E: torch.Tensor,
              gather_div: int | None, transpose_w: bool) -> torch.Tensor:
    """Validate a scattered matmul's inputs; returns a new contiguous output [N, O]."""
    N = sorted_flat_N.numel()
    E = w_EIO.shape[0]
    I, O = (w_EIO.shape[2], w_EIO.shape[1]) if transpose_w else (w_EIO.shape[1], w_EIO.shape[2])
    if x.dim() != 2 or x.shape[1] != I:
        raise ValueError(f"x must be [rows, {I}] for weights {tuple(w_EIO.shape)} (transposed={transpose_w}), "
                         f"got {tuple(x.shape)}")
    if expert_offsets_E.numel() != E:
        raise ValueError(f"expert_offsets has {expert_offsets_E.numel()} entries for {E} experts")
    if gather_div is None and x.shape[0] != N:
        raise ValueError(f"grouped input must have one row per assignment ({N}), got {x.shape[0]}")
    if x.dtype != w_EIO.dtype:
        raise ValueError(f"x ({x.dtype}) and weights ({w_EIO.dtype}) must share a dtype")
    return x.new_empty(N, O)


def _launch_mm(x, w_EIO, y, sorted_flat_N, expert_offsets_E, gather_div, scatter, scale_N, transpose_w, epilogue,
               aux=None, bias_EO=None, activation="gelu_new") -> None:
    N, E = sorted_flat_N.numel(), w_EIO.shape[0]
    if N == 0:
        return
    I, O = x.shape[1], y.shape[1]
    sw = w_EIO.stride()
    stride_wk, stride_wn = (sw[2], sw[1]) if transpose_w else (sw[1], sw[2])
    scale = scale_N if scale_N is not None else x
    aux1, aux2 = aux if aux is not None else (y, y)  # dummies the kernel never touches
    if bias_EO is not None and (bias_EO.shape != (E, O) or bias_EO.dtype != y.dtype):
        raise ValueError(f"bias must be [{E}, {O}] of {y.dtype}, got {tuple(bias_EO.shape)} of {bias_EO.dtype}")
    bias = bias_EO if bias_EO is not None else y
    grid = lambda meta: ((triton.cdiv(N, meta["BLOCK_M"]) + E) * triton.cdiv(O, meta["BLOCK_N"]),)  # noqa: E731
    _scatter_mm_kernel[grid](
        x, w_EIO, y, scale, sorted_flat_N, expert_offsets_E, aux1, aux2, bias,
        x.stride(0), x.stride(1), sw[0], stride_wk, stride_wn, y.stride(0), y.stride(1), bias.stride(0), bias.stride(1),
        N, I, O, E, gather_div or 1,
        GATHER=gather_div is not None, SCATTER=scatter, HAS_SCALE=scale_N is not None, HAS_BIAS=bias_EO is not None,
        E_PAD=triton.next_power_of_2(E), EPILOGUE=epilogue, ACT=ACT_CODES[activation],
        SAVE_AUX=epilogue == EPI_ACT and aux is not None,
        DOT_PREC=dot_precision(x.dtype),
    )


def expert_xty(x: torch.Tensor, dy: torch.Tensor, sorted_flat_N: torch.Tensor, expert_offsets_E: torch.Tensor,
               x_div: int | None, dy_div: int | None, scale_N: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """dW [E, I, O]: dW[e] = sum over expert e's sorted assignments n of
    X[x_row(n)]^T (scale_n * DY[dy_row(n)]), rows gathered like `scatter_mm`'s in_row. With `out`
    (fp32 [E, I, O], any strides) dW is added to it in fp32 and `out` returned."""
    E, I, O = expert_offsets_E.numel(), x.shape[1], dy.shape[1]
    if out is None:
        dw = torch.empty(E, I, O, dtype=x.dtype, device=x.device)
    elif out.dtype != torch.float32 or tuple(out.shape) != (E, I, O):
        raise ValueError(f"out must be fp32 of shape {(E, I, O)}, got {out.dtype} {tuple(out.shape)}")
    else:
        dw = out
    if E == 0:
        return dw
    scale = scale_N if scale_N is not None else x
    grid = lambda meta: (triton.cdiv(I, meta["BLOCK_M"]) * triton.cdiv(O, meta["BLOCK_N"]), E)  # noqa: E731
    _expert_xty_kernel[grid](
        x, dy, dw, scale, sorted_flat_N, expert_offsets_E,
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), *dw.stride(),
        I, O, x_div or 1, dy_div or 1,
        X_GATHER=x_div is not None, DY_GATHER=dy_div is not None, HAS_SCALE=scale_N is not None,
        ACCUMULATE=out is not None, DOT_PREC=dot_precision(x.dtype),
    )
    return dw


def expert_row_sum(dy: torch.Tensor, sorted_flat_N: torch.Tensor, expert_offsets_E: torch.Tensor,
                   dy_div: int | None, scale_N: torch.Tensor | None = None) -> torch.Tensor:
    """[E, O]: sum over expert e's sorted assignments n of scale_n * DY[dy_row(n)], the gradient
    of a per-expert bias. `expert_xty` with X a column of ones (a stride-0 view, nothing
    allocated): deterministic, unlike an index_add with atomics."""
    ones = dy.new_ones(1, 1).expand(sorted_flat_N.numel(), 1)
    return _expert_xty_op(ones, dy, sorted_flat_N, expert_offsets_E, 0, dy_div or 0, scale_N).squeeze(1)


# torch.library ops: opaque to torch.compile (the fakes give it shapes).
@torch.library.custom_op("molm_kernels::scatter_mm", mutates_args=())
def _scatter_mm_op(x: torch.Tensor, w: torch.Tensor, sorted_flat: torch.Tensor, offsets: torch.Tensor,
                   gather_div: int, scatter: bool, scale: torch.Tensor | None, transpose_w: bool,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    return scatter_mm(x, w, sorted_flat, offsets, gather_div or None, scatter, scale, transpose_w, bias)


@_scatter_mm_op.register_fake
def _(x, w, sorted_flat, offsets, gather_div, scatter, scale, transpose_w, bias=None):
    return x.new_empty(sorted_flat.numel(), w.shape[1] if transpose_w else w.shape[2])


@torch.library.custom_op("molm_kernels::expert_xty", mutates_args=())
def _expert_xty_op(x: torch.Tensor, dy: torch.Tensor, sorted_flat: torch.Tensor, offsets: torch.Tensor,
                   x_div: int, dy_div: int, scale: torch.Tensor | None) -> torch.Tensor:
    return expert_xty(x, dy, sorted_flat, offsets, x_div or None, dy_div or None, scale)


@_expert_xty_op.register_fake
def _(x, dy, sorted_flat, offsets, x_div, dy_div, scale):
    return x.new_empty(offsets.numel(), x.shape[1], dy.shape[1])


@torch.library.custom_op("molm_kernels::expert_xty_accumulate", mutates_args=("out",))
def _expert_xty_accumulate_op(x: torch.Tensor, dy: torch.Tensor, sorted_flat: torch.Tensor, offsets: torch.Tensor,
                              x_div: int, dy_div: int, scale: torch.Tensor | None, out: torch.Tensor) -> None:
    expert_xty(x, dy, sorted_flat, offsets, x_div or None, dy_div or None, scale, out)


@_expert_xty_accumulate_op.register_fake
def _(x, dy, sorted_flat, offsets, x_div, dy_div, scale, out):
    return None


def weight_grad(w: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, sorted_flat: torch.Tensor, offsets: torch.Tensor,
                x_div: int, dy_div: int, scale: torch.Tensor | None) -> torch.Tensor | None:
    """An expert weight's gradient (`expert_xty`), or None once added to the weight's fp32 buffer
    (inside `grad_accumulation.accumulate_weight_grads`)."""
    buffer = gradient_buffer(w)
    if buffer is None:
        return _expert_xty_op(x, dy, sorted_flat, offsets, x_div, dy_div, scale)
    _expert_xty_accumulate_op(x, dy, sorted_flat, offsets, x_div, dy_div, scale, buffer)
    return None


@torch.library.custom_op("molm_kernels::scatter_mm_act", mutates_args=())
def _scatter_mm_act_op(x: torch.Tensor, w: torch.Tensor, sorted_flat: torch.Tensor, offsets: torch.Tensor,
                       gather_div: int, scale: torch.Tensor, save: bool, bias: torch.Tensor | None,
                       activation: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return scatter_mm_act(x, w, sorted_flat, offsets, gather_div or None, scale, save, bias, activation)


@_scatter_mm_act_op.register_fake
def _(x, w, sorted_flat, offsets, gather_div, scale, save, bias, activation):
    h = x.new_empty(sorted_flat.numel(), w.shape[2])
    saved = sorted_flat.numel() if save else 0
    return h, x.new_empty(saved, w.shape[2]), x.new_empty(saved, w.shape[2])


@torch.library.custom_op("molm_kernels::scatter_mm_act_grad", mutates_args=())
def _scatter_mm_act_grad_op(dy: torch.Tensor, w: torch.Tensor, sorted_flat: torch.Tensor, offsets: torch.Tensor,
                            gather_div: int, scale: torch.Tensor, z: torch.Tensor, activation: str) -> torch.Tensor:
    return scatter_mm_act_grad(dy, w, sorted_flat, offsets, gather_div or None, scale, z, activation)


@_scatter_mm_act_grad_op.register_fake
def _(dy, w, sorted_flat, offsets, gather_div, scale, z, activation):
    return torch.empty_like(z)


class _ParallelLinear(torch.autograd.Function):
    # gather_div 0 means "grouped" (no gather) in the ops' integer arguments.
    @staticmethod
    def forward(ctx, x, w_EIO, k, sorted_flat, offsets, grouped_in, grouped_out, gates_TK, bias_EO):
        in_div = 0 if grouped_in else k
        z = _scatter_mm_op(x, w_EIO, sorted_flat, offsets, in_div, not grouped_out, None, False, bias_EO)
        ctx.k, ctx.in_div, ctx.grouped_out = k, in_div, grouped_out
        ctx.x_rows = x.shape[0]
        if gates_TK is None:
            ctx.save_for_backward(x, w_EIO, sorted_flat, offsets)
            return z
        y = gate_sum(z, gates_TK.to(z.dtype))  # (T, O)
        ctx.save_for_backward(x, w_EIO, sorted_flat, offsets, gates_TK, z)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w_EIO, sorted_flat, offsets, *gated = ctx.saved_tensors
        dy = dy.contiguous()
        dgates = dx = dw = db = None
        if gated:
            gates_TK, z = gated
            T, K = gates_TK.shape
            if ctx.needs_input_grad[7]:  # not for fixed gates (EMoE's unit weights)
                dgates = gate_grad(z, dy.to(z.dtype), gates_TK)
            # dz_n = g_n * dy[token(n)]: gathered and scaled inside the kernels, never stored.
            dz_div, scale = K, gates_TK.reshape(-1)[sorted_flat].to(dy.dtype)
        else:
            scale = None
            dz_div = 0 if ctx.grouped_out else 1  # dy in sorted order, or token-major (row = flat)
        if ctx.needs_input_grad[0]:
            # dx_n = dz_n W[e_n]^T, written where x_n was read from (flat order when gathered).
            dx = _scatter_mm_op(dy, w_EIO, sorted_flat, offsets, dz_div, ctx.in_div != 0, scale, True)
            if ctx.in_div > 1:
                dx = dx.view(ctx.x_rows, ctx.in_div, -1).sum(1)  # a token's k choices read one row
        if ctx.needs_input_grad[1]:
            dw = weight_grad(w_EIO, x, dy, sorted_flat, offsets, ctx.in_div, dz_div, scale)
        if ctx.needs_input_grad[8]:
            db = expert_row_sum(dy, sorted_flat, offsets, dz_div or None, scale)  # sum_n dz_n
        return dx, dw, None, None, None, None, None, dgates, db


def parallel_linear_triton(
    x: torch.Tensor,
    w_EIO: torch.Tensor,
    k: int,
    routing: Routing,
    grouped_in: bool = False,
    grouped_out: bool = False,
    gates_TK: torch.Tensor | None = None,
    bias_EO: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scattered expert matmul with the Triton kernels; semantics of
    `molm_kernels.scattered_experts_reference.parallel_linear_reference` (same arguments and shapes).
    The bias joins the fp32 accumulator; its gradient is a deterministic per-expert row sum."""
    if gates_TK is not None and grouped_out:
        raise ValueError("gates need flat-order output (grouped_out=False)")
    _, sorted_flat, offsets = routing
    return _ParallelLinear.apply(x, w_EIO, k, sorted_flat, offsets, grouped_in, grouped_out, gates_TK, bias_EO)


class _ScatteredMLP(torch.autograd.Function):
    """y_t = sum_j g_tj (W2[e_tj] act(W1[e_tj] x_t + b1[e_tj]) + b2[e_tj]) in four launches
    (matmul + bias + activation epilogue, matmul + bias with scatter, gated sum), and its backward
    in five (gate dot products, one matmul whose epilogue applies the gate and the activation's
    derivative, two weight gradients, one input gradient), plus one reduction per bias. Saves x,
    z = W1 x + b1 (pre-activation), g*h and the per-choice outputs: the same memory as the unfused
    composition (which saves z for the activation, h for the second matmul)."""

    @staticmethod
    def forward(ctx, x, w1_EIF, w2_EFO, b1_EF, b2_EO, k, sorted_flat, offsets, gates_TK, save, activation):
        # gather_div 0 means "grouped" (no gather) in the ops' integer arguments. save: whether a
        # backward can follow (else z and g*h are neither written nor kept).
        g_sorted = gates_TK.reshape(-1)[sorted_flat].to(x.dtype)  # gate of each sorted assignment
        h, z, gh = _scatter_mm_act_op(x, w1_EIF, sorted_flat, offsets, k, g_sorted, save, b1_EF,
                                      activation)  # (N, F) sorted
        out_N = _scatter_mm_op(h, w2_EFO, sorted_flat, offsets, 0, True, None, False, b2_EO)  # (N, O) flat order
        y = gate_sum(out_N, gates_TK.to(out_N.dtype))  # (T, O)
        ctx.k, ctx.x_rows, ctx.activation = k, x.shape[0], activation
        ctx.save_for_backward(x, w1_EIF, w2_EFO, sorted_flat, offsets, gates_TK, g_sorted, z, gh, out_N)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w1_EIF, w2_EFO, sorted_flat, offsets, gates_TK, g_sorted, z, gh, out_N = ctx.saved_tensors
        K = gates_TK.shape[1]
        dy = dy.contiguous().to(out_N.dtype)
        dgates = gate_grad(out_N, dy, gates_TK) if ctx.needs_input_grad[8] else None
        # dz_n = act'(z_n) * g_n * dy[token(n)] W2[e_n]^T, in sorted order: never stores dh.
        dz = _scatter_mm_act_grad_op(dy, w2_EFO, sorted_flat, offsets, K, g_sorted, z, ctx.activation)
        dx = dw1 = dw2 = db1 = db2 = None
        if ctx.needs_input_grad[2]:
            dw2 = weight_grad(w2_EFO, gh, dy, sorted_flat, offsets, 0, K, None)  # sum_n (g_n h_n)^T dy_t
        if ctx.needs_input_grad[1]:
            dw1 = weight_grad(w1_EIF, x, dz, sorted_flat, offsets, ctx.k, 0, None)
        if ctx.needs_input_grad[3]:
            db1 = expert_row_sum(dz, sorted_flat, offsets, None)  # sum_n dz_n
        if ctx.needs_input_grad[4]:
            db2 = expert_row_sum(dy, sorted_flat, offsets, K, g_sorted)  # sum_n g_n dy_t
        if ctx.needs_input_grad[0]:
            dx = _scatter_mm_op(dz, w1_EIF, sorted_flat, offsets, 0, True, None, True)  # (N, I) flat order
            if ctx.k > 1:
                dx = dx.view(ctx.x_rows, ctx.k, -1).sum(1)  # a token's k choices read one row
        return dx, dw1, dw2, db1, db2, None, None, None, dgates, None, None


def scattered_mlp_triton(
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
    """SMoE experts with the Triton kernels; semantics of
    `molm_kernels.scattered_experts_reference.scattered_mlp_reference` (same arguments). The
    activation (ACT_CODES) and the biases are fused into the matmuls' epilogues; the GLU form runs
    the composition of Triton matmuls."""
    if w3_EIF is not None:
        return scattered_mlp_reference(x_TI, w1_EIF, w2_EFO, k, routing, gates_TK, activation, b1_EF, b2_EO, w3_EIF,
                                       linear=parallel_linear_triton)
    if gates_TK.shape[0] * gates_TK.shape[1] != routing.sorted_flat_idx_N.numel():
        raise ValueError(f"gates {tuple(gates_TK.shape)} must hold one gate per assignment "
                         f"({routing.sorted_flat_idx_N.numel()})")
    _, sorted_flat, offsets = routing
    # Decided out here: inside Function.forward grad mode is always off.
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (x_TI, w1_EIF, w2_EFO, b1_EF, b2_EO, gates_TK))
    return _ScatteredMLP.apply(x_TI, w1_EIF, w2_EFO, b1_EF, b2_EO, k, sorted_flat, offsets, gates_TK, save, activation)
