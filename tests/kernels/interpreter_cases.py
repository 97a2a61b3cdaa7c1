"""Kernel cases run under the Triton CPU interpreter, in a child process of the tests.

`python -m tests.kernels.interpreter_cases` sets TRITON_INTERPRET=1 before Triton is imported
(so the setting never leaks into the rest of the test session), runs every case in fp32 against
the float64 references, and prints one JSON line of {case: [relative errors]} (or an error string).
Every buffer the launchers allocate is filled with NaN first (`poisoned_allocations`), so an
element a kernel fails to write shows up as NaN; inputs are fresh random draws.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import traceback

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from molm_kernels.grad_accumulation import accumulate_weight_grads  # noqa: E402
from molm_kernels.scattered_experts import parallel_linear_triton, scattered_mlp_triton  # noqa: E402
from molm_kernels.scattered_experts_reference import parallel_linear_reference, route, scattered_mlp_reference  # noqa: E402
from molm_kernels.stickbreaking import Plan, sb_backward, sb_forward, stickbreaking_attention_triton  # noqa: E402
from molm_kernels.stickbreaking_reference import stickbreaking_attention_reference  # noqa: E402


@contextlib.contextmanager
def poisoned_allocations():
    """torch.empty / empty_like / new_empty return NaN-filled floating tensors inside the block."""
    originals = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    torch.empty = lambda *a, **k: poison(originals[0](*a, **k))
    torch.empty_like = lambda *a, **k: poison(originals[1](*a, **k))
    torch.Tensor.new_empty = lambda self, *a, **k: poison(originals[2](self, *a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.Tensor.new_empty = originals


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - b).norm() / b.norm().clamp(min=1e-300)).item()


def sb_case(B, H, G, T, S, D, mask=False, cu=None, truncate=32.0, deterministic=True, scale=1.0):
    q = torch.randn(B, H, T, D, dtype=torch.float32) * scale
    k = torch.randn(B, G, S, D, dtype=torch.float32) * scale
    v = torch.randn(B, G, S, D, dtype=torch.float32)
    km = torch.rand(B, S) > 0.3 if mask else None
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    do = torch.randn(B, H, T, D)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    with poisoned_allocations():
        o = stickbreaking_attention_triton(q, k, v, km, cu_t, truncate, deterministic)
        grads = torch.autograd.grad(o, (q, k, v), do)
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    o_ref = stickbreaking_attention_reference(*ref_in, km, cu_seqlens=cu_t)
    grads_ref = torch.autograd.grad(o_ref, ref_in, do.double())
    return [rel(a, b) for a, b in zip((o, *grads), (o_ref, *grads_ref))]


def sb_head_slices():
    """Heads cut into slices (the path of 1024-wide heads), at a size the interpreter affords."""
    B, H, G, T, S, D = 1, 2, 1, 33, 45, 48
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, G, S, D), torch.randn(B, G, S, D)
    do = torch.randn(B, H, T, D)
    fwd = Plan(D, T, backward=False, block_dk=16, block_dv=16)
    bwd = Plan(D, T, backward=True, block_dk=16, block_dv=32)
    with poisoned_allocations():
        o, stop, total = sb_forward(q, k, v, plan=fwd)
        grads = sb_backward(do, q, k, v, stop, total, plan=bwd, fwd_plan=fwd)
    ref_in = [x.double().requires_grad_() for x in (q, k, v)]
    o_ref = stickbreaking_attention_reference(*ref_in)
    grads_ref = torch.autograd.grad(o_ref, ref_in, do.double())
    return [rel(a, b) for a, b in zip((o, *grads), (o_ref, *grads_ref))]


def sb_truncated_exact_gradient():
    """With a tiny truncation the sweep stops early; the backward must be the exact gradient of
    that truncated forward. Oracle: a naive loop over keys, each row limited to keys >= its
    block's stop. Returns [errors..., fraction of rows truncated]."""
    B, H, T, D = 1, 2, 64, 16
    q, k, v = torch.randn(B, H, T, D) * 2, torch.randn(B, H, T, D) * 2, torch.randn(B, H, T, D)
    do = torch.randn(B, H, T, D)
    plan = Plan(D, T, backward=False)
    o, stop, total = sb_forward(q, k, v, truncate=2.0, plan=plan)
    grads = sb_backward(do, q, k, v, stop, total, plan=Plan(D, T, backward=True), fwd_plan=plan)
    lo = stop.repeat_interleave(plan.block_m, dim=-1)[..., :T]  # (B, H, T) first key each row sees
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    rows = []
    for h in range(H):
        for i in range(T):
            stick = torch.zeros((), dtype=torch.float64)
            acc = torch.zeros(D, dtype=torch.float64)
            for j in range(i, int(lo[0, h, i]) - 1, -1):  # nearest key first
                logit = qd[0, h, i] @ kd[0, h, j] / math.sqrt(D)
                acc = acc + torch.exp(torch.nn.functional.logsigmoid(logit) + stick) * vd[0, h, j]
                stick = stick + torch.nn.functional.logsigmoid(-logit)
            rows.append(acc)
    o_ref = torch.stack(rows).view(B, H, T, D)
    grads_ref = torch.autograd.grad(o_ref, (qd, kd, vd), do.double())
    truncated = (lo > 0).double().mean().item()
    return [rel(a, b) for a, b in zip((o, *grads), (o_ref, *grads_ref))] + [truncated]


def experts_case(T, K, E, I, O, grouped_in=False, grouped_out=False, gated=False, k_in=None, bias=False,
                 fixed_gates=False):
    """parallel_linear against the float64 reference: y and the gradients of x, w, the gates
    (unless fixed_gates: gates without a gradient, EMoE's unit weights) and the bias."""
    k_in = K if k_in is None else k_in
    expert_idx = torch.randint(0, E - 1, (T, K))  # expert E-1 gets no token: an empty run
    routing = route(expert_idx, E)
    x = torch.randn(T * K if (grouped_in or k_in == 1) else T, I, requires_grad=True)
    w = (torch.randn(E, I, O) / math.sqrt(I)).requires_grad_()
    gates = torch.rand(T, K, requires_grad=not fixed_gates) if gated else None
    b_EO = torch.randn(E, O, requires_grad=True) if bias else None
    inputs = [x, w] + ([gates] if gated and not fixed_gates else []) + ([b_EO] if bias else [])
    with poisoned_allocations():
        y = parallel_linear_triton(x, w, k_in, routing, grouped_in, grouped_out, gates, b_EO)
        dy = torch.randn(y.shape)
        grads = torch.autograd.grad(y, inputs, dy)
    ref_in = {id(t): t.detach().double().requires_grad_() for t in inputs}
    ref = [ref_in.get(id(t), t.double() if t is not None else None) for t in (x, w, gates, b_EO)]
    y_ref = parallel_linear_reference(ref[0], ref[1], k_in, routing, grouped_in, grouped_out, ref[2], ref[3])
    grads_ref = torch.autograd.grad(y_ref, list(ref_in.values()), dy.double())
    return [rel(a, b) for a, b in zip((y, *grads), (y_ref, *grads_ref))]


def mlp_case(T, K, E, I, F, O, activation="gelu_new", k_in=None, grad=True, bias=False, glu=False, strided=False):
    """The expert MLP (fused: the activation and the biases in the matmul epilogues; the GLU form
    is the Triton composition) against the float64 composition of reference matmuls: y and the gradients of
    x, every weight, the biases (bias=True: b1 and b2) and the gates. glu=True adds the up
    projection W3 (SwiGLU with activation "silu"). k_in = 1 with T*K rows of x is the
    expert-parallel form; grad=False runs the inference path (nothing saved). strided=True passes
    the weights as transposed views (how EMoE reads a dense model's nn.Linear weights)."""
    k_in = K if k_in is None else k_in
    routing = route(torch.randint(0, E - 1, (T, K)), E)  # expert E-1 gets no token: an empty run
    x = torch.randn(T * K if k_in == 1 else T, I)
    # Pre-activations of order 1-3 so gelu's curved part (and its derivative) is exercised.
    w1 = torch.randn(E, I, F) * 2 / math.sqrt(I)
    w2 = torch.randn(E, F, O) / math.sqrt(F)
    gates = torch.rand(T, K)
    optional = {}
    if bias:
        optional["b1_EF"], optional["b2_EO"] = torch.randn(E, F), torch.randn(E, O)
    if glu:
        optional["w3_EIF"] = torch.randn(E, I, F) / math.sqrt(I)
    inputs = [t.requires_grad_(grad) for t in (x, w1, w2, gates, *optional.values())]

    def call(fn, ts):
        ts = list(ts)
        if strided:  # [E, a, b] weights as views of [E, b, a] storage
            for i in [1, 2] + ([len(ts) - 1] if glu else []):
                ts[i] = ts[i].transpose(1, 2).contiguous().transpose(1, 2)
        return fn(*ts[:3], k_in, routing, ts[3], activation, **dict(zip(optional, ts[4:])))

    with poisoned_allocations():
        y = call(scattered_mlp_triton, inputs)
        dy = torch.randn(y.shape)
        grads = torch.autograd.grad(y, inputs, dy) if grad else ()
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    y_ref = call(scattered_mlp_reference, ref_in)
    grads_ref = torch.autograd.grad(y_ref, ref_in, dy.double()) if grad else ()
    return [rel(a, b) for a, b in zip((y, *grads), (y_ref, *grads_ref))]


def accumulated_weight_grads():
    """Inside accumulate_weight_grads the expert weights' gradients (a MoA-style projection and both
    MLP weights) are added to fp32 buffers holding earlier gradients, and none is returned; the
    input and gate gradients are returned as usual. Errors: buffers after minus before against the
    float64 reference gradients, then x and gates."""
    T, K, E, I, F, O = 29, 2, 4, 24, 40, 20
    routing = route(torch.randint(0, E - 1, (T, K)), E)
    x = torch.randn(T, I, requires_grad=True)
    gates = torch.rand(T, K, requires_grad=True)
    wq = (torch.randn(E, I, F) / math.sqrt(I)).requires_grad_()
    w1 = (torch.randn(E, I, F) * 2 / math.sqrt(I)).requires_grad_()
    w2 = (torch.randn(E, F, O) / math.sqrt(F)).requires_grad_()
    before = [torch.randn(w.shape) for w in (wq, w1, w2)]
    buffers = [b.clone() for b in before]

    def forward(fn_linear, fn_mlp, ts):
        x_, g_, wq_, w1_, w2_ = ts
        return fn_linear(x_, wq_, K, routing).sum(0) @ torch.ones(F, O, dtype=x_.dtype) + \
            fn_mlp(x_, w1_, w2_, K, routing, g_).sum(0)

    with poisoned_allocations():
        with accumulate_weight_grads(list(zip((wq, w1, w2), buffers))) as accumulated:
            y = forward(parallel_linear_triton, scattered_mlp_triton, (x, gates, wq, w1, w2))
            dy = torch.randn(y.shape)
            grads = torch.autograd.grad(y, (x, gates, wq, w1, w2), dy, allow_unused=True)
    assert accumulated == {0, 1, 2} and all(g is None for g in grads[2:]), (accumulated, grads[2:])
    ref_in = [t.detach().double().requires_grad_() for t in (x, gates, wq, w1, w2)]
    y_ref = forward(parallel_linear_reference, scattered_mlp_reference, ref_in)
    ref = torch.autograd.grad(y_ref, ref_in, dy.double())
    return [rel(b - b0, r) for b, b0, r in zip(buffers, before, ref[2:])] + [rel(grads[0], ref[0]),
                                                                              rel(grads[1], ref[1])]


CASES = {
    "sb_causal": lambda: sb_case(1, 2, 1, 40, 40, 16),
    "sb_memory_gqa_keymask": lambda: sb_case(2, 4, 2, 37, 70, 32, mask=True),
    "sb_decode_one_token": lambda: sb_case(1, 2, 2, 1, 50, 16),
    "sb_cu_seqlens": lambda: sb_case(1, 2, 1, 50, 50, 16, cu=[0, 7, 30, 31, 50]),
    "sb_untruncated_atomic": lambda: sb_case(1, 2, 1, 40, 40, 16, truncate=math.inf, deterministic=False),
    "sb_head_slices": sb_head_slices,
    "sb_truncated_exact_gradient": sb_truncated_exact_gradient,
    "experts_gather_scatter_k2": lambda: experts_case(37, 2, 4, 40, 24),
    "experts_grouped_out_k3": lambda: experts_case(29, 3, 5, 40, 24, grouped_out=True),
    "experts_grouped_in_gated": lambda: experts_case(37, 3, 5, 24, 40, grouped_in=True, gated=True, k_in=1),
    "experts_flat_in_gated": lambda: experts_case(30, 2, 4, 24, 40, gated=True, k_in=1),
    "experts_k1": lambda: experts_case(20, 1, 3, 24, 40),
    "experts_grouped_out_bias": lambda: experts_case(29, 3, 5, 40, 24, grouped_out=True, bias=True),
    "experts_fixed_gates_bias": lambda: experts_case(25, 2, 4, 24, 40, gated=True, bias=True, fixed_gates=True),
    "mlp_gelu_fused_k2": lambda: mlp_case(37, 2, 4, 24, 40, 20),
    "mlp_gelu_fused_k3_expert_parallel_form": lambda: mlp_case(21, 3, 5, 20, 36, 24, k_in=1),
    "mlp_gelu_fused_inference": lambda: mlp_case(30, 2, 4, 24, 40, 20, grad=False),
    "mlp_relu_fused": lambda: mlp_case(25, 2, 3, 24, 40, 20, activation="relu"),
    "mlp_silu_fused": lambda: mlp_case(22, 2, 3, 24, 40, 20, activation="silu"),
    "mlp_gelu_fused_biases_k2": lambda: mlp_case(29, 2, 4, 24, 40, 20, bias=True),
    "mlp_gelu_fused_biases_inference": lambda: mlp_case(17, 3, 4, 24, 40, 20, bias=True, grad=False),
    "mlp_gelu_exact_biases_fused": lambda: mlp_case(19, 2, 3, 24, 36, 20, activation="gelu", bias=True),
    "mlp_swiglu_k2": lambda: mlp_case(23, 2, 4, 24, 40, 20, activation="silu", glu=True),
    "mlp_swiglu_biases_composed": lambda: mlp_case(21, 2, 3, 24, 40, 20, activation="silu", glu=True, bias=True),
    "mlp_gelu_fused_biases_strided_weights": lambda: mlp_case(21, 2, 3, 24, 40, 20, bias=True, strided=True),
    "accumulated_weight_grads": accumulated_weight_grads,
}


def main() -> int:
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))  # fresh inputs every run
    results = {}
    for name, fn in CASES.items():
        try:
            results[name] = fn()
        except Exception:
            results[name] = traceback.format_exc()
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
