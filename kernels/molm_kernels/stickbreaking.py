"""Triton stick-breaking attention, forward and backward (the CUDA path of `molm_kernels.stickbreaking_attention`).

Implements the attention of docs/design.md, "Model semantics" (Tan et al., "Scaling Stick-Breaking Attention",
2024; ModuleFormer, Shen et al. 2023); `kernels/molm_kernels/stickbreaking_reference.py` is the oracle. For query
i (at key position p_i) and visible key j <= p_i, with l_ij = q_i . k_j / sqrt(D):

    log A_ij = l_ij - sum_{j <= m <= p_i, m visible} softplus(l_im),    o_i = sum_j A_ij v_j

Forward: one program per (query block, output-column chunk, batch x head) sweeps key blocks from
the diagonal leftwards, carrying per row the softplus sum of the keys already passed (`acc`, fp32,
log2 units); inside a block the reverse cumulative sum gives the rest. Rows are done once
acc > `truncate` nats: everything further left has total weight below exp(-acc) (the stick left
over), far below fp32 rounding at the default 32 nats, so the sweep stops there and the backward
reuses the same stopping block (it differentiates exactly the function the forward computed).
`truncate=inf` gives the untruncated sweep.

Backward, per row i, with dA_ij = do_i . v_j:

    dl_ij = A_ij dA_ij - sigmoid(l_ij) * sum_{j' <= j} A_ij' dA_ij'

One program per query block sweeps the same key blocks left to right, carrying the prefix sums of
softplus and of A * dA; A_ij comes from the forward's per-row softplus total (`total`, fp32) minus
the prefix. (Right to left it would need R_i = do_i . o_i, which bf16 rounding of o corrupts by
cancellation.) No O(T^2) storage. dq stays in registers; dK and dV are summed over query blocks
(and over the query heads sharing a K/V head) in fp32 buffers, either with atomics or,
`deterministic=True` (default), in a fixed order: the programs touching a key block add their
tile one after another in program order, waiting on a per-block counter (each waits only on
programs launched before it, so it cannot deadlock).

Heads wider than 256 (MoLM: one 1024-wide head) do not fit shared memory whole (about 227 KB per
block on H100): scores are accumulated over BLOCK_DK-wide slices of the head, and each program
owns a BLOCK_DV-wide slice of the output columns (recomputing the scores per slice).

Legend: B batch, H query heads, G key/value heads (query head h reads kv head h // (H // G)),
T queries (the last T of the S key positions), S keys, D head size.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from molm_kernels._triton_common import INTERPRET, dot_precision

LOG2E = 1.4426950408889634
DEFAULT_TRUNCATE_NATS = 32.0  # exp(-32) = 1.3e-14: dropped weight is far under fp32 rounding


@triton.jit
def _softplus2(s):
    """log2(1 + 2^s) for logits in log2 units, without overflow; 0 at s = -inf."""
    return tl.maximum(s, 0.0) + tl.math.log2(1.0 + tl.math.exp2(-tl.abs(s)))


@triton.jit
def _scores(q_pre, q_base, k_base, offs_m, offs_n, T, S, stride_qt, stride_qd, stride_ks, stride_kd,
            D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
            NUM_DK: tl.constexpr, DOT_PREC: tl.constexpr):
    """q_i . k_j for a [BLOCK_M, BLOCK_N] tile, fp32; q_pre is the whole q tile when NUM_DK == 1."""
    offs_d = tl.arange(0, BLOCK_DK)
    if NUM_DK == 1:
        kt = tl.load(k_base + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                     mask=(offs_n[None, :] < S) & (offs_d[:, None] < D), other=0.0)
        s = tl.dot(q_pre, kt, input_precision=DOT_PREC)
    else:
        s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for c in range(NUM_DK):
            d = c * BLOCK_DK + offs_d
            q = tl.load(q_base + offs_m[:, None] * stride_qt + d[None, :] * stride_qd,
                        mask=(offs_m[:, None] < T) & (d[None, :] < D), other=0.0)
            kt = tl.load(k_base + offs_n[None, :] * stride_ks + d[:, None] * stride_kd,
                         mask=(offs_n[None, :] < S) & (d[:, None] < D), other=0.0)
            s = tl.dot(q, kt, s, input_precision=DOT_PREC)
    return s


@triton.jit
def _load_rows(base, offs_m, offs_d, row_ok, stride_t, stride_d, D: tl.constexpr, NUM_DK: tl.constexpr):
    """The whole [BLOCK_M, BLOCK_DK] row tile when the head fits one slice (else an unused stub)."""
    if NUM_DK == 1:
        x = tl.load(base + offs_m[:, None] * stride_t + offs_d[None, :] * stride_d,
                    mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    else:
        x = tl.zeros([offs_m.shape[0], offs_d.shape[0]], dtype=base.dtype.element_ty)
    return x


@triton.jit
def _visible(offs_n, pos_m, row_lo, km_base, stride_ms, S, HAS_KEY_MASK: tl.constexpr):
    """[BLOCK_M, BLOCK_N] bool: key j is causal for row i, inside its document, and not masked."""
    vis = (offs_n[None, :] <= pos_m[:, None]) & (offs_n[None, :] >= row_lo[:, None]) & (offs_n[None, :] < S)
    if HAS_KEY_MASK:
        km = tl.load(km_base + offs_n * stride_ms, mask=offs_n < S, other=0) != 0
        vis = vis & km[None, :]
    return vis


@triton.jit
def _row_setup(mb, b, T, S, doc_base, stride_ds, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_DOC: tl.constexpr):
    """Rows of query block mb: indices, key positions, lowest visible key, and the first key block."""
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < T
    pos_m = offs_m + (S - T)  # queries are the last T key positions (memory / KV cache)
    if HAS_DOC:
        row_lo = tl.load(doc_base + pos_m * stride_ds, mask=row_ok, other=S)
    else:
        row_lo = tl.where(row_ok, 0, S)  # padded rows see nothing and never hold the sweep back
    last_row = tl.minimum(mb * BLOCK_M + BLOCK_M, T) - 1
    n_start = ((last_row + S - T) // BLOCK_N) * BLOCK_N
    return offs_m, row_ok, pos_m, row_lo, n_start


@triton.jit
def _sb_fwd_kernel(
    Q, K, V, O, KEY_MASK, DOC_START, STOP, TOTAL,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kg, stride_ks, stride_kd,
    stride_vb, stride_vg, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_mb, stride_ms, stride_db, stride_ds,
    H, T, S, num_rep, qk_scale2, stop2,
    D: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_DOC: tl.constexpr, TRUNCATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, NUM_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr, NUM_DV: tl.constexpr, DOT_PREC: tl.constexpr,
):
    num_mb = tl.cdiv(T, BLOCK_M)
    pid = tl.program_id(0)
    mb = num_mb - 1 - pid // NUM_DV  # the longest sweeps start first: fewer stragglers at the end
    dv0 = (pid % NUM_DV) * BLOCK_DV
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    g = h // num_rep
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + g.to(tl.int64) * stride_kg
    v_base = V + b.to(tl.int64) * stride_vb + g.to(tl.int64) * stride_vg
    km_base = KEY_MASK + b.to(tl.int64) * stride_mb
    doc_base = DOC_START + b.to(tl.int64) * stride_db
    offs_m, row_ok, pos_m, row_lo, n_start = _row_setup(mb, b, T, S, doc_base, stride_ds, BLOCK_M, BLOCK_N,
                                                        HAS_DOC)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = dv0 + tl.arange(0, BLOCK_DV)
    q_pre = _load_rows(q_base, offs_m, offs_dk, row_ok, stride_qt, stride_qd, D, NUM_DK)

    acc = tl.zeros([BLOCK_M], dtype=tl.float32)  # softplus sum (log2 units) of the keys passed
    o = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    n = n_start
    go = n_start >= 0
    while go:
        offs_n = n + tl.arange(0, BLOCK_N)
        s = _scores(q_pre, q_base, k_base, offs_m, offs_n, T, S, stride_qt, stride_qd, stride_ks, stride_kd,
                    D, BLOCK_M, BLOCK_N, BLOCK_DK, NUM_DK, DOT_PREC) * qk_scale2
        vis = _visible(offs_n, pos_m, row_lo, km_base, stride_ms, S, HAS_KEY_MASK)
        s = tl.where(vis, s, float("-inf"))  # invisible keys: softplus 0, weight 0 (transparent)
        sp = _softplus2(s)
        # log2 A_ij = s_ij - acc_i - sum_{j' >= j in this block} softplus(s_ij')
        a = tl.math.exp2(s - acc[:, None] - tl.cumsum(sp, axis=1, reverse=True))
        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_dv[None, :] * stride_vd,
                    mask=(offs_n[:, None] < S) & (offs_dv[None, :] < D), other=0.0)
        o = tl.dot(a.to(v.dtype), v, o, input_precision=DOT_PREC)
        acc += tl.sum(sp, axis=1)
        n -= BLOCK_N
        # The next block [n, n + BLOCK_N) is needed by rows that see a key in it and whose
        # leftover stick is still above exp(-truncate).
        need = row_ok & (row_lo < n + BLOCK_N)
        if TRUNCATE:
            need = need & (acc < stop2)
        go = (n >= 0) & (tl.sum(need.to(tl.int32), axis=0) > 0)

    tl.store(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
             + offs_m[:, None] * stride_ot + offs_dv[None, :] * stride_od,
             o.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < D))
    if pid % NUM_DV == 0:
        tl.store(STOP + bh * num_mb + mb, n + BLOCK_N)  # the leftmost key block swept
        tl.store(TOTAL + bh.to(tl.int64) * T + offs_m, acc, mask=row_ok)  # for the backward


@triton.jit
def _sb_bwd_kernel(
    Q, K, V, DO, TOTAL, STOP, LOOP_LO, KEY_MASK, DOC_START, DQ, DK, DV, RANK, COUNT,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kg, stride_ks, stride_kd,
    stride_vb, stride_vg, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    stride_mb, stride_ms, stride_db, stride_ds,
    H, G, T, S, num_rep, qk_scale2, scale,
    D: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_DOC: tl.constexpr, DETERMINISTIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, NUM_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr, NUM_DV: tl.constexpr, DOT_PREC: tl.constexpr, FWD_BLOCK_M: tl.constexpr,
):
    num_mb = tl.cdiv(T, BLOCK_M)
    num_nb = tl.cdiv(S, BLOCK_N)
    pid = tl.program_id(0)
    # Program order within one kv head: query block (last first), then query head of the group,
    # then output slice. The sweeps run left to right, so a later query block reaches each key
    # block one step after the block before it in this order: the ordered adds rarely wait.
    dvc = pid % NUM_DV
    rep = (pid // NUM_DV) % num_rep
    mb = num_mb - 1 - pid // (NUM_DV * num_rep)
    dv0 = dvc * BLOCK_DV
    bg = tl.program_id(1)
    b = bg // G
    g = bg % G
    h = g * num_rep + rep
    bh = b * H + h
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    k_base = K + b.to(tl.int64) * stride_kb + g.to(tl.int64) * stride_kg
    v_base = V + b.to(tl.int64) * stride_vb + g.to(tl.int64) * stride_vg
    dkv_off = bg.to(tl.int64) * S * D  # dK and dV buffers are contiguous fp32 [B, G, S, D]
    km_base = KEY_MASK + b.to(tl.int64) * stride_mb
    doc_base = DOC_START + b.to(tl.int64) * stride_db
    offs_m, row_ok, pos_m, row_lo, n_start = _row_setup(mb, b, T, S, doc_base, stride_ds, BLOCK_M, BLOCK_N,
                                                        HAS_DOC)
    # Each row sees exactly the keys its forward block swept: none left of that block's stop.
    row_stop = tl.load(STOP + bh * tl.cdiv(T, FWD_BLOCK_M) + offs_m // FWD_BLOCK_M, mask=row_ok, other=S)
    row_lo = tl.maximum(row_lo, row_stop)
    n_lo = tl.load(LOOP_LO + bh * num_mb + mb)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = dv0 + tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < D
    q_pre = _load_rows(q_base, offs_m, offs_dk, row_ok, stride_qt, stride_qd, D, NUM_DK)
    do_pre = _load_rows(do_base, offs_m, offs_dk, row_ok, stride_dot, stride_dod, D, NUM_DK)
    if NUM_DK == 1:
        q_dv = q_pre
        do_dv = do_pre
    else:
        q_dv = tl.load(q_base + offs_m[:, None] * stride_qt + offs_dv[None, :] * stride_qd,
                       mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
        do_dv = tl.load(do_base + offs_m[:, None] * stride_dot + offs_dv[None, :] * stride_dod,
                        mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
    # The forward's softplus total per row: sum_{m >= j} sp = total - sum_{m < j} sp, so the
    # sweep can run left to right and carry the prefix sum of A * dA that dl needs directly
    # (a right-to-left sweep would need R = do . o and lose it to cancellation in bf16).
    total = tl.load(TOTAL + bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)

    pre_sp = tl.zeros([BLOCK_M], dtype=tl.float32)  # softplus sum (log2 units) left of the block
    pre_ada = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum of A * dA left of the block
    dq = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for it in range(0, (n_start - n_lo) // BLOCK_N + 1):
        n = n_lo + it * BLOCK_N
        offs_n = n + tl.arange(0, BLOCK_N)
        s = _scores(q_pre, q_base, k_base, offs_m, offs_n, T, S, stride_qt, stride_qd, stride_ks, stride_kd,
                    D, BLOCK_M, BLOCK_N, BLOCK_DK, NUM_DK, DOT_PREC) * qk_scale2
        da = _scores(do_pre, do_base, v_base, offs_m, offs_n, T, S, stride_dot, stride_dod, stride_vs, stride_vd,
                     D, BLOCK_M, BLOCK_N, BLOCK_DK, NUM_DK, DOT_PREC)  # dA_ij = do_i . v_j
        vis = _visible(offs_n, pos_m, row_lo, km_base, stride_ms, S, HAS_KEY_MASK)
        s = tl.where(vis, s, float("-inf"))
        sp = _softplus2(s)
        # log2 A_ij = s_ij - sum_{m >= j} sp_im = s_ij - (total_i - pre_sp_i - sum_{j' < j in block} sp)
        a = tl.math.exp2(s - (total - pre_sp)[:, None] + (tl.cumsum(sp, axis=1) - sp))
        # The forward multiplied V by A rounded to V's dtype: differentiate that A.
        a = a.to(v_base.dtype.element_ty).to(tl.float32)
        ada = a * da
        prefix = pre_ada[:, None] + tl.cumsum(ada, axis=1)  # sum_{j' <= j} A_ij' dA_ij'
        sig = tl.math.exp2(s - sp)  # sigmoid(l) = exp(l - softplus(l))
        ds = (ada - sig * prefix) * scale  # d loss / d (q . k)
        pre_sp += tl.sum(sp, axis=1)
        pre_ada += tl.sum(ada, axis=1)

        kv_ok = (offs_n[:, None] < S) & dv_ok[None, :]
        k_dv = tl.load(k_base + offs_n[:, None] * stride_ks + offs_dv[None, :] * stride_kd, mask=kv_ok, other=0.0)
        dq = tl.dot(ds.to(k_dv.dtype), k_dv, dq, input_precision=DOT_PREC)
        dk_tile = tl.dot(tl.trans(ds.to(q_dv.dtype)), q_dv, input_precision=DOT_PREC)
        dv_tile = tl.dot(tl.trans(a.to(do_dv.dtype)), do_dv, input_precision=DOT_PREC)
        dkv_ptrs = dkv_off + offs_n[:, None] * D + offs_dv[None, :]
        if DETERMINISTIC:
            # Wait for our turn on this key block (RANK: how many programs before us add to it).
            cnt = COUNT + (bg * NUM_DV + dvc) * num_nb + n // BLOCK_N
            my_rank = tl.load(RANK + (bh * num_mb + mb) * num_nb + n // BLOCK_N)
            while tl.atomic_add(cnt, 0, sem="acquire") != my_rank:
                pass
            tl.debug_barrier()
            # .cg: read through L2, never a stale L1 line from an earlier program on this SM.
            dk_old = tl.load(DK + dkv_ptrs, mask=kv_ok, other=0.0, cache_modifier=".cg")
            dv_old = tl.load(DV + dkv_ptrs, mask=kv_ok, other=0.0, cache_modifier=".cg")
            tl.store(DK + dkv_ptrs, dk_old + dk_tile, mask=kv_ok)
            tl.store(DV + dkv_ptrs, dv_old + dv_tile, mask=kv_ok)
            tl.debug_barrier()
            tl.atomic_add(cnt, 1, sem="release")
        else:
            tl.atomic_add(DK + dkv_ptrs, dk_tile, mask=kv_ok, sem="relaxed")
            tl.atomic_add(DV + dkv_ptrs, dv_tile, mask=kv_ok, sem="relaxed")

    dq_base = DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
    tl.store(dq_base + offs_m[:, None] * stride_dqt + offs_dv[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])


class Plan:
    """Block shapes for one head size and query count; GPU values picked on H100 (BENCHMARKS.md).

    Heads wider than 256 are cut into BLOCK_DK-wide slices for the scores and BLOCK_DV-wide
    slices of the output columns; narrower heads use one slice (block_dk == block_dv).
    """

    def __init__(self, D: int, T: int, backward: bool, block_dk: int | None = None, block_dv: int | None = None):
        d_pad = max(16, triton.next_power_of_2(D))
        if INTERPRET:
            # The interpreter pays per program iteration: few, large blocks.
            bm, bn, warps, stages = 32, 16, 4, 1
        elif d_pad <= 64:
            bm, bn, warps, stages = 64, 64, 4, 2
        elif d_pad <= 128:
            # H100 sweep at B=4, H=12, T=4096 (BENCHMARKS.md): 64 x 32 with 4 warps was fastest
            # for both directions, truncated; 128 x 64 / 8 warps wins the untruncated backward.
            bm, bn, warps, stages = (64, 32, 4, 2) if backward else (64, 32, 4, 3)
        elif d_pad <= 256:
            bm, bn, warps, stages = 64, 32, 8, 2
        else:
            bm, bn, warps, stages = 64, 32, 8, 1
        if T <= 16:
            bm = 16  # decoding: one query row; the smallest tile tl.dot takes
        self.block_m, self.block_n, self.num_warps, self.num_stages = bm, bn, warps, stages
        self.block_dk = block_dk or (d_pad if d_pad <= 256 else 128)
        self.block_dv = block_dv or (d_pad if d_pad <= 256 else 256)
        self.num_dk = triton.cdiv(D, self.block_dk)
        self.num_dv = triton.cdiv(D, self.block_dv)
        if (self.num_dk == 1) != (self.num_dv == 1) or (self.num_dk == 1 and self.block_dk != self.block_dv):
            raise ValueError(f"head slices must be both whole or both split: D={D}, block_dk={self.block_dk}, "
                             f"block_dv={self.block_dv}")


def _check(q_BHTD, k_BGSD, v_BGSD, key_mask_BS, doc_start_BS):
    if q_BHTD.dim() != 4 or k_BGSD.dim() != 4 or v_BGSD.shape != k_BGSD.shape:
        raise ValueError(f"q [B,H,T,D] and k, v [B,G,S,D] expected, got q {tuple(q_BHTD.shape)}, "
                         f"k {tuple(k_BGSD.shape)}, v {tuple(v_BGSD.shape)}")
    B, H, T, D = q_BHTD.shape
    Bk, G, S, Dk = k_BGSD.shape
    if Bk != B or Dk != D:
        raise ValueError(f"q {tuple(q_BHTD.shape)} and k {tuple(k_BGSD.shape)} disagree on batch or head size")
    if G == 0 or H % G:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({G})")
    if S < T:
        raise ValueError(f"keys ({S}) must be at least as many as queries ({T})")
    if not (q_BHTD.dtype == k_BGSD.dtype == v_BGSD.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q_BHTD.dtype}, {k_BGSD.dtype}, {v_BGSD.dtype}")
    for name, m in (("key_mask_BS", key_mask_BS), ("doc_start_BS", doc_start_BS)):
        if m is not None and tuple(m.shape) != (B, S):
            raise ValueError(f"{name} must be [B, S] = {(B, S)}, got {tuple(m.shape)}")
    return B, H, T, D, G, S


def _optional(t: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """A tensor and its two strides, or a dummy pointer the kernel never reads."""
    if t is None:
        return like, 0, 0
    return t, t.stride(0), t.stride(1)


def sb_forward(q_BHTD: torch.Tensor, k_BGSD: torch.Tensor, v_BGSD: torch.Tensor,
               key_mask_BS: torch.Tensor | None = None, doc_start_BS: torch.Tensor | None = None,
               truncate: float = DEFAULT_TRUNCATE_NATS,
               plan: Plan | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward. Returns o [B, H, T, D] (q's dtype; memory laid out [B, T, H, D], so the
    model's [B*T*K, D] view of it is free), stop [B, H, ceil(T / block_m)] int32, the first key
    of the leftmost block each query block swept, and total [B, H, T] fp32, each row's softplus
    sum (log2 units) over the keys swept. doc_start_BS: int32 first key of each position's
    document (packed sequences), or None."""
    B, H, T, D, G, S = _check(q_BHTD, k_BGSD, v_BGSD, key_mask_BS, doc_start_BS)
    plan = plan or Plan(D, T, backward=False)
    o = torch.empty(B, T, H, D, dtype=q_BHTD.dtype, device=q_BHTD.device).transpose(1, 2)
    num_mb = triton.cdiv(T, plan.block_m)
    stop = torch.zeros(B, H, num_mb, dtype=torch.int32, device=q_BHTD.device)
    total = torch.zeros(B, H, T, dtype=torch.float32, device=q_BHTD.device)
    if B * H * T == 0:
        return o, stop, total
    km, smb, sms = _optional(None if key_mask_BS is None else key_mask_BS.to(torch.int8), q_BHTD)
    ds, sdb, sds = _optional(doc_start_BS, q_BHTD)
    _sb_fwd_kernel[(num_mb * plan.num_dv, B * H)](
        q_BHTD, k_BGSD, v_BGSD, o, km, ds, stop, total,
        *q_BHTD.stride(), *k_BGSD.stride(), *v_BGSD.stride(), *o.stride(), smb, sms, sdb, sds,
        H, T, S, H // G, LOG2E / math.sqrt(D), truncate * LOG2E if math.isfinite(truncate) else 0.0,
        D=D, HAS_KEY_MASK=key_mask_BS is not None, HAS_DOC=doc_start_BS is not None,
        TRUNCATE=math.isfinite(truncate), BLOCK_M=plan.block_m, BLOCK_N=plan.block_n,
        BLOCK_DK=plan.block_dk, NUM_DK=plan.num_dk, BLOCK_DV=plan.block_dv, NUM_DV=plan.num_dv,
        DOT_PREC=dot_precision(q_BHTD.dtype), num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    return o, stop, total


def _loop_lo(stop: torch.Tensor, T: int, fwd_block_m: int, block_m: int, block_n: int) -> torch.Tensor:
    """Leftmost key block (its first key) each backward query block must visit: the lowest stop of
    the forward blocks its rows belong to, aligned down to the backward's key blocks."""
    B, H, _ = stop.shape
    num_mb = triton.cdiv(T, block_m)
    rows = torch.arange(num_mb * block_m, device=stop.device).clamp(max=T - 1)
    lo = stop[:, :, rows // fwd_block_m].view(B, H, num_mb, block_m).amin(-1)
    return (lo // block_n * block_n).to(torch.int32).contiguous()


def _contribution_rank(loop_lo: torch.Tensor, G: int, T: int, S: int, block_m: int, block_n: int) -> torch.Tensor:
    """For the deterministic backward: rank[b, h, mb, nb] = how many programs before (mb, h) in
    program order (query block major, last block first; query head of the kv group minor) add to
    key block nb."""
    B, H, num_mb = loop_lo.shape
    r = H // G
    num_nb = triton.cdiv(S, block_n)
    last_row = torch.clamp(torch.arange(num_mb, device=loop_lo.device) * block_m + block_m, max=T) - 1
    diag = (last_row + S - T) // block_n  # the diagonal key block of each query block
    nb = torch.arange(num_nb, device=loop_lo.device)
    touches = (nb >= (loop_lo // block_n)[..., None]) & (nb <= diag[:, None])  # (B, H, num_mb, num_nb)
    t = touches.to(torch.int32).view(B, G, r, num_mb, num_nb).flip(3).transpose(2, 3)
    t = t.reshape(B, G, num_mb * r, num_nb)  # program order
    rank = t.cumsum(2) - t  # exclusive count along program order
    rank = rank.view(B, G, num_mb, r, num_nb).transpose(2, 3).flip(3)
    return rank.reshape(B, H, num_mb, num_nb).contiguous()


def sb_backward(do_BHTD: torch.Tensor, q_BHTD: torch.Tensor, k_BGSD: torch.Tensor, v_BGSD: torch.Tensor,
                stop: torch.Tensor, total: torch.Tensor, key_mask_BS: torch.Tensor | None = None,
                doc_start_BS: torch.Tensor | None = None, deterministic: bool = True,
                plan: Plan | None = None, fwd_plan: Plan | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward of `sb_forward` (same inputs, its stop and total). Returns
    dq [B, H, T, D] and dk, dv [B, G, S, D] in the inputs' dtypes."""
    B, H, T, D, G, S = _check(q_BHTD, k_BGSD, v_BGSD, key_mask_BS, doc_start_BS)
    if do_BHTD.shape != q_BHTD.shape:
        raise ValueError(f"do {tuple(do_BHTD.shape)} must have q's shape {tuple(q_BHTD.shape)}")
    plan = plan or Plan(D, T, backward=True)
    fwd_plan = fwd_plan or Plan(D, T, backward=False)
    dq = torch.empty_like(q_BHTD)
    dk = torch.zeros(B, G, S, D, dtype=torch.float32, device=q_BHTD.device)
    dv = torch.zeros_like(dk)
    if B * H * T == 0:
        return dq.zero_(), dk.to(k_BGSD.dtype), dv.to(v_BGSD.dtype)
    loop_lo = _loop_lo(stop, T, fwd_plan.block_m, plan.block_m, plan.block_n)
    num_mb, num_nb = triton.cdiv(T, plan.block_m), triton.cdiv(S, plan.block_n)
    if deterministic:
        rank = _contribution_rank(loop_lo, G, T, S, plan.block_m, plan.block_n)
        count = torch.zeros(B * G * plan.num_dv * num_nb, dtype=torch.int32, device=q_BHTD.device)
    else:
        rank = count = loop_lo  # unused
    km, smb, sms = _optional(None if key_mask_BS is None else key_mask_BS.to(torch.int8), q_BHTD)
    ds, sdb, sds = _optional(doc_start_BS, q_BHTD)
    _sb_bwd_kernel[(num_mb * (H // G) * plan.num_dv, B * G)](
        q_BHTD, k_BGSD, v_BGSD, do_BHTD, total, stop, loop_lo, km, ds, dq, dk, dv, rank, count,
        *q_BHTD.stride(), *k_BGSD.stride(), *v_BGSD.stride(), *do_BHTD.stride(), *dq.stride(),
        smb, sms, sdb, sds, H, G, T, S, H // G, LOG2E / math.sqrt(D), 1.0 / math.sqrt(D),
        D=D, HAS_KEY_MASK=key_mask_BS is not None, HAS_DOC=doc_start_BS is not None,
        DETERMINISTIC=deterministic, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n,
        BLOCK_DK=plan.block_dk, NUM_DK=plan.num_dk, BLOCK_DV=plan.block_dv, NUM_DV=plan.num_dv,
        DOT_PREC=dot_precision(q_BHTD.dtype), FWD_BLOCK_M=fwd_plan.block_m,
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    return dq, dk.to(k_BGSD.dtype), dv.to(v_BGSD.dtype)


def doc_start_from_cu_seqlens(cu_seqlens: torch.Tensor, B: int, S: int) -> torch.Tensor:
    """[B, S] int32: the first key position of each position's document (the same for every row)."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != S:
        raise ValueError(f"cu_seqlens must run from 0 to S={S}, got {cu_seqlens.tolist()}")
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    if (lengths < 0).any():
        raise ValueError(f"cu_seqlens must not decrease, got {cu_seqlens.tolist()}")
    starts = torch.repeat_interleave(cu[:-1], lengths)  # (S,)
    return starts.to(torch.int32).expand(B, S)


# torch.library ops: opaque to torch.compile (the fakes give it shapes), callable like any aten op.
@torch.library.custom_op("molm_kernels::sb_fwd", mutates_args=())
def _sb_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
               doc_start: torch.Tensor | None, truncate: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return sb_forward(q, k, v, key_mask, doc_start, truncate)


@_sb_fwd_op.register_fake
def _(q, k, v, key_mask, doc_start, truncate):
    B, H, T, D = q.shape
    o = q.new_empty(B, T, H, D).transpose(1, 2)
    stop = q.new_empty(B, H, triton.cdiv(T, Plan(D, T, backward=False).block_m), dtype=torch.int32)
    return o, stop, q.new_empty(B, H, T, dtype=torch.float32)


@torch.library.custom_op("molm_kernels::sb_bwd", mutates_args=())
def _sb_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stop: torch.Tensor,
               total: torch.Tensor, key_mask: torch.Tensor | None, doc_start: torch.Tensor | None,
               deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return sb_backward(do, q, k, v, stop, total, key_mask, doc_start, deterministic)


@_sb_bwd_op.register_fake
def _(do, q, k, v, stop, total, key_mask, doc_start, deterministic):
    return torch.empty_like(q), torch.empty_like(k, memory_format=torch.contiguous_format), \
        torch.empty_like(v, memory_format=torch.contiguous_format)


class _StickBreaking(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_mask, doc_start, truncate, deterministic):
        o, stop, total = _sb_fwd_op(q, k, v, key_mask, doc_start, truncate)
        ctx.save_for_backward(q, k, v, stop, total, key_mask, doc_start)
        ctx.deterministic = deterministic
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, stop, total, key_mask, doc_start = ctx.saved_tensors
        dq, dk, dv = _sb_bwd_op(do, q, k, v, stop, total, key_mask, doc_start, ctx.deterministic)
        return dq, dk, dv, None, None, None, None


def stickbreaking_attention_triton(
    q_BHTD: torch.Tensor,
    k_BGSD: torch.Tensor,
    v_BGSD: torch.Tensor,
    key_mask_BS: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    truncate: float = DEFAULT_TRUNCATE_NATS,
    deterministic: bool = True,
) -> torch.Tensor:
    """Stick-breaking attention with the Triton kernels; semantics of
    `molm_kernels.stickbreaking_reference.stickbreaking_attention_reference`.

    q [B, H, T, D], k, v [B, G, S, D] (any strides); key_mask_BS bool [B, S] (False keys are
    transparent); cu_seqlens [num_docs + 1] document boundaries over the S key positions;
    truncate: nats of spent stick after which a row's sweep stops (inf: never);
    deterministic: dK/dV summed in a fixed order (else with fp32 atomics).
    Returns o [B, H, T, D] in q's dtype.
    """
    B, S = k_BGSD.shape[0], k_BGSD.shape[2]
    doc_start = None if cu_seqlens is None else doc_start_from_cu_seqlens(cu_seqlens.to(k_BGSD.device), B, S)
    return _StickBreaking.apply(q_BHTD, k_BGSD, v_BGSD, key_mask_BS, doc_start, float(truncate), deterministic)
