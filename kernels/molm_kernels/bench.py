"""GPU checks and benchmarks of the Triton kernels (run on a CUDA machine; see BENCHMARKS.md).

Kernel level only: the model-level checks and benchmarks (the MoLM model and its layers on these
kernels) are `python -m benchmarks.model_bench`, which reuses this module's runner and helpers.

Checks (bf16 at product shapes, relative error ||out - ref|| / ||ref|| < 1e-2 against the PyTorch
references in fp32/fp64; outputs of the kernels poisoned with NaN beforehand; fresh random inputs):
stick-breaking forward and all gradients (head dims 64/128/256/1024, memory, GQA, key mask,
cu_seqlens, one-token decoding; truncated and untruncated; ordered and atomic dK/dV, the ordered
one bitwise reproducible), scattered expert matmuls (forward, dX, dW, gates; the fused gelu_new
MLP and the unfused composition; per-expert biases and the SwiGLU form on strided weights).

Benchmarks (median of CUDA-event timings after warm-up, bf16, random inputs); "graph" rows capture
the whole step in a CUDA graph and time its replays (no launch overhead):
1. stick-breaking fwd+bwd vs torch SDPA (default backend and flash) at B=4, H=12, D=128;
2. the attention core at MoLM's shape (D=1024, 2 query heads over one K/V, 512 queries over 1024
   keys, batch 8) vs the PyTorch reference;
3. SMoE experts fwd+bwd (E=32, k=2, d=1024, ffd=2048), fused and unfused, eager and graph, vs
   torch grouped mm and a dense MLP of the same active FLOPs, in TFLOP/s of active expert FLOPs;
plus a profile of the fused experts and, when named, block-shape sweeps.

Usage: python -m molm_kernels.bench [--out DIR] [--skip-check] [--skip-bench] [--only NAME ...]
       [--checks NAME ...] [--budget-s SECONDS]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback
from typing import Any, Callable

import torch
import torch.nn.functional as F

RESULTS: dict[str, object] = {}
LOG = None
DEADLINE = math.inf  # time.time() after which remaining sections are skipped (--budget-s)


def log(msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    if LOG:
        LOG.write(line + "\n")
        LOG.flush()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def bench(fn, warmup_ms: int = 50, rep_ms: int = 300) -> float:
    """Median milliseconds (CUDA events, triton.testing.do_bench)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def capture(fn: Callable[[], Any], warmup: int = 2) -> tuple[torch.cuda.CUDAGraph, Any]:
    """fn() captured in a CUDA graph: (graph, the captured call's static outputs).

    Warm-up runs on a side stream first (Triton compilation and autotuning, autograd's and the
    caching allocator's first-call work must stay out of the capture, as PyTorch's whole-network
    capture recipe does). fn must read only static tensors: refresh inputs with copy_ before
    replay. Capture fails on any host synchronisation inside fn.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def flat_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in out if isinstance(t, torch.Tensor)]


def check_graph_replay(name: str, fn: Callable[[], Any], refresh: Callable[[], Any], tol: float = 1e-2) -> bool:
    """Capture fn, refresh the static inputs with new random values, replay, and compare with an
    eager call on the same inputs (each output's relative error). Also proves fn never syncs."""
    graph, out = capture(fn)
    refresh()
    graph.replay()
    got = [t.clone() for t in flat_outputs(out)]
    ref = flat_outputs(fn())
    errs = [rel(a, b) for a, b in zip(got, ref)]
    ok = len(got) == len(ref) and all(e < tol for e in errs)
    RESULTS[f"check/graph_{name}"] = {"max_rel_error": max(errs) if errs else float("nan"), "ok": ok}
    log(f"check graph replay {name}: {len(errs)} outputs, max rel error {max(errs):.2e} -> {'OK' if ok else 'FAIL'}")
    del graph, out
    return ok


def check_no_sync(name: str, fn: Callable[[], Any]) -> bool:
    """fn() (already warmed up) under torch.cuda.set_sync_debug_mode('error'): any host
    synchronisation (.item(), .tolist(), nonzero, bincount's max) raises."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        ok, msg = True, ""
    except RuntimeError:
        ok, msg = False, traceback.format_exc()[-2000:]  # names the op that synchronised
    finally:
        torch.cuda.set_sync_debug_mode(0)
    RESULTS[f"check/no_sync_{name}"] = {"ok": ok, "error": msg}
    log(f"check no host sync in {name}: {'OK' if ok else 'FAIL ' + msg}")
    return ok


# ---------------------------------------------------------------- checks

def check_sb(name, B, H, G, T, S, D, dtype=torch.bfloat16, mask=False, cu=None, truncate=32.0,
             deterministic=True, ref_dtype=torch.float64, tol=1e-2):
    from molm_kernels.stickbreaking import stickbreaking_attention_triton
    from molm_kernels.stickbreaking_reference import stickbreaking_attention_reference

    dev = "cuda"
    q = torch.randn(B, H, T, D, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(B, G, S, D, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(B, G, S, D, device=dev, dtype=dtype, requires_grad=True)
    km = (torch.rand(B, S, device=dev) > 0.2) if mask else None
    cu_t = None if cu is None else torch.tensor(cu, device=dev, dtype=torch.int32)
    do = torch.randn(B, H, T, D, device=dev, dtype=dtype)
    o = stickbreaking_attention_triton(q, k, v, km, cu_t, truncate, deterministic)
    grads = torch.autograd.grad(o, (q, k, v), do)
    qr, kr, vr = (x.detach().to(ref_dtype).requires_grad_() for x in (q, k, v))
    o_ref = stickbreaking_attention_reference(qr, kr, vr, km, cu_seqlens=cu_t)
    grads_ref = torch.autograd.grad(o_ref, (qr, kr, vr), do.to(ref_dtype))
    errs = [rel(a, b) for a, b in zip((o, *grads), (o_ref, *grads_ref))]
    ok = all(e < tol for e in errs)
    RESULTS[f"check/{name}"] = {"errors(o,dq,dk,dv)": errs, "ok": ok}
    log(f"check {name}: o {errs[0]:.2e} dq {errs[1]:.2e} dk {errs[2]:.2e} dv {errs[3]:.2e} -> {'OK' if ok else 'FAIL'}")
    return ok


def check_sb_reproducible():
    """The ordered backward gives bitwise-identical dK/dV across runs."""
    from molm_kernels.stickbreaking import stickbreaking_attention_triton

    q = torch.randn(2, 4, 1024, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 2, 1024, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    do = torch.randn_like(q)
    outs = []
    for _ in range(3):
        o = stickbreaking_attention_triton(q, k, v, truncate=math.inf, deterministic=True)
        outs.append(torch.autograd.grad(o, (q, k, v), do))
    same = all(torch.equal(a, b) for run in outs[1:] for a, b in zip(run, outs[0]))
    RESULTS["check/sb_bitwise_reproducible"] = same
    log(f"check sb ordered backward bitwise reproducible over 3 runs: {same}")
    return same


def check_experts(N_tokens=8192, E=32, K=2, d=1024, ffd=2048, dtype=torch.bfloat16):
    """The SMoE expert MLP, fused (gelu_new in the epilogues) and unfused, and MoA's flat-order
    query projection, in bf16 against the fp32 references: output and every gradient."""
    import molm_kernels
    from molm_kernels.scattered_experts import parallel_linear_triton, scattered_mlp_triton

    dev = "cuda"
    x = torch.randn(N_tokens, d, device=dev, dtype=dtype, requires_grad=True)
    w1 = (torch.rand(E, d, ffd, device=dev, dtype=dtype) * 2 - 1).div_(math.sqrt(d) / 3).requires_grad_()
    w2 = (torch.rand(E, ffd, d, device=dev, dtype=dtype) * 2 - 1).div_(math.sqrt(ffd)).requires_grad_()
    probs = torch.softmax(torch.randn(N_tokens, E, device=dev), -1)
    gates, idx = probs.topk(K, -1)
    gates = gates.to(dtype).requires_grad_()
    routing = molm_kernels.route(idx, E)
    dy = torch.randn(N_tokens, d, device=dev, dtype=dtype)
    ref_in = [t.detach().float().requires_grad_() for t in (x, w1, w2, gates)]
    y_ref = molm_kernels.scattered_mlp_reference(ref_in[0], ref_in[1], ref_in[2], K, routing, ref_in[3])
    g_ref = torch.autograd.grad(y_ref, ref_in, dy.float())
    ok, row = True, {}
    for name, fn in (("fused", scattered_mlp_triton),
                     ("unfused", lambda *a: molm_kernels.scattered_mlp_reference(*a, linear=parallel_linear_triton))):
        y = fn(x, w1, w2, K, routing, gates)
        g = torch.autograd.grad(y, (x, w1, w2, gates), dy)
        errs = [rel(a, b) for a, b in zip((y, *g), (y_ref, *g_ref))]
        with torch.no_grad():
            errs.append(rel(fn(x, w1, w2, K, routing, gates), y_ref))  # inference path (nothing saved)
        row[f"mlp {name} errors(y,dx,dw1,dw2,dgates,y_nograd)"] = errs
        ok = ok and all(e < 1e-2 for e in errs)
    # Flat-order output with k fan-out (MoA's query projection): forward and both gradients.
    wq = w1[:, :, :1024].detach().contiguous().requires_grad_()
    yq = parallel_linear_triton(x, wq, K, routing)
    dyq = torch.randn_like(yq)
    gq = torch.autograd.grad(yq, (x, wq), dyq)
    xr, wr = x.detach().float().requires_grad_(), wq.detach().float().requires_grad_()
    yq_ref = molm_kernels.parallel_linear_reference(xr, wr, K, routing)
    gq_ref = torch.autograd.grad(yq_ref, (xr, wr), dyq.float())
    errs_q = [rel(a, b) for a, b in zip((yq, *gq), (yq_ref, *gq_ref))]
    ok = ok and all(e < 1e-2 for e in errs_q)
    row["flat errors(y,dx,dw)"] = errs_q
    row["ok"] = ok
    RESULTS["check/experts"] = row
    log(f"check experts: {row} -> {'OK' if ok else 'FAIL'}")
    return ok


def check_expert_forms(N_tokens=4096, E=64, K=16, d=1024, ffd=64, dtype=torch.bfloat16):
    """The expert MLP forms dense-model FFNs need (EMoE's shapes: 64 experts of ffd = d_ff / 64,
    k = 16), bf16 against the fp32 reference, output and every gradient: gelu_new with per-expert
    biases (GPT-2; fused), exact gelu with biases (GPT-NeoX; fused), SwiGLU (Llama; Triton composition:
    gate/up/down), each with the weights as transposed views of [E, out, in] storage, as EMoE
    passes an nn.Linear's weight."""
    import molm_kernels
    from molm_kernels.scattered_experts import scattered_mlp_triton

    dev = "cuda"
    probs = torch.softmax(torch.randn(N_tokens, E, device=dev), -1)
    idx = probs.topk(K, -1).indices
    routing = molm_kernels.route(idx, E)

    def view(I, O, scale):  # an [E, I, O] weight as a view of [E, O, I] storage
        return ((torch.rand(E, O, I, device=dev, dtype=dtype) * 2 - 1) * scale).transpose(1, 2).requires_grad_()

    ok, row = True, {}
    for form, activation, biases, glu in (("gpt2", "gelu_new", True, False), ("neox", "gelu", True, False),
                                          ("llama", "silu", False, True)):
        x = torch.randn(N_tokens, d, device=dev, dtype=dtype, requires_grad=True)
        gates = torch.ones(N_tokens, K, device=dev, dtype=dtype, requires_grad=True)
        w1, w2 = view(d, ffd, 3 / math.sqrt(d)), view(ffd, d, 1 / math.sqrt(ffd))
        opt = {}
        if biases:
            opt["b1_EF"] = torch.randn(E, ffd, device=dev, dtype=dtype, requires_grad=True)
            opt["b2_EO"] = (torch.randn(E, d, device=dev, dtype=dtype) / K).requires_grad_()
        if glu:
            opt["w3_EIF"] = view(d, ffd, 1 / math.sqrt(d))
        inputs = [x, w1, w2, gates, *opt.values()]
        dy = torch.randn(N_tokens, d, device=dev, dtype=dtype)
        ref_in = [t.detach().float().requires_grad_() for t in inputs]
        y_ref = molm_kernels.scattered_mlp_reference(*ref_in[:3], K, routing, ref_in[3], activation,
                                                **dict(zip(opt, ref_in[4:])))
        g_ref = torch.autograd.grad(y_ref, ref_in, dy.float())
        y = scattered_mlp_triton(x, w1, w2, K, routing, gates, activation, **opt)
        g = torch.autograd.grad(y, inputs, dy)
        errs = [rel(a, b) for a, b in zip((y, *g), (y_ref, *g_ref))]
        row[f"{form} errors(y,dx,dw1,dw2,dgates{',db1,db2' if biases else ''}{',dw3' if glu else ''})"] = errs
        ok = ok and all(e < 1e-2 for e in errs)
    row["ok"] = ok
    RESULTS["check/expert_forms"] = row
    log(f"check expert forms: {row} -> {'OK' if ok else 'FAIL'}")
    return ok


def check_expert_accumulate(N_tokens=4096, E=32, K=2, d=1024, ffd=2048, dtype=torch.bfloat16):
    """The expert weight gradients added into fp32 buffers by the gradient kernel
    (`accumulate_weight_grads`, the trainer's fused accumulation) at molm-350m-4b's SMoE and MoA
    shapes, bf16: each buffer's change against the fp32 reference gradient, and against the bf16
    gradient the kernel returns outside the context; every buffer holds earlier gradients."""
    import molm_kernels
    from molm_kernels.scattered_experts import parallel_linear_triton, scattered_mlp_triton

    dev = "cuda"
    probs = torch.softmax(torch.randn(N_tokens, E, device=dev), -1)
    gates_top, idx = probs.topk(K, -1)
    routing = molm_kernels.route(idx, E)
    x = torch.randn(N_tokens, d, device=dev, dtype=dtype)
    gates = gates_top.to(dtype)
    w1 = ((torch.rand(E, d, ffd, device=dev) * 2 - 1) / d).to(dtype).requires_grad_()
    w2 = ((torch.rand(E, ffd, d, device=dev) * 2 - 1) / ffd).to(dtype).requires_grad_()
    wq = ((torch.rand(E // 2, d, d, device=dev) * 2 - 1) / d).to(dtype).requires_grad_()
    weights = (w1, w2, wq)
    dy = torch.randn(N_tokens, d, device=dev, dtype=dtype)

    def loss(fn_mlp, fn_linear, ws, xx):
        q_routing = molm_kernels.route(idx % (E // 2), E // 2)
        y = fn_mlp(xx, ws[0], ws[1], K, routing, gates) + fn_linear(xx, ws[2], K, q_routing, gates_TK=gates)
        return (y.float() * dy.float()).sum()

    ref_in = [w.detach().float().requires_grad_() for w in weights]
    g_ref = torch.autograd.grad(loss(molm_kernels.scattered_mlp_reference, molm_kernels.parallel_linear_reference,
                                     ref_in, x.float()), ref_in)
    g_bf16 = torch.autograd.grad(loss(scattered_mlp_triton, parallel_linear_triton, weights, x), weights)
    before = [torch.randn(w.shape, device=dev) for w in weights]
    buffers = [b.clone() for b in before]
    with molm_kernels.accumulate_weight_grads(list(zip(weights, buffers))) as added:
        returned = torch.autograd.grad(loss(scattered_mlp_triton, parallel_linear_triton, weights, x), weights,
                                       allow_unused=True)
    deltas = [b - b0 for b, b0 in zip(buffers, before)]
    errs = [rel(dlt, r) for dlt, r in zip(deltas, g_ref)]
    errs_bf16 = [rel(g, r) for g, r in zip(g_bf16, g_ref)]
    ok = added == {0, 1, 2} and all(g is None for g in returned) and all(e < 1e-2 for e in errs)
    RESULTS["check/expert_accumulate"] = {"errors(dw1,dw2,dwq) accumulated": errs, "returned bf16": errs_bf16, "ok": ok}
    log(f"check expert accumulate: accumulated {errs}, returned bf16 {errs_bf16} -> {'OK' if ok else 'FAIL'}")
    return ok


SB_CHECKS = {
    "d128_T1024": dict(B=2, H=4, G=4, T=1024, S=1024, D=128),
    "d128_T1024_untruncated": dict(B=2, H=4, G=4, T=1024, S=1024, D=128, truncate=math.inf),
    "d128_atomic": dict(B=2, H=4, G=2, T=1000, S=1000, D=128, deterministic=False),
    "d64_memory_gqa_mask": dict(B=2, H=6, G=2, T=300, S=812, D=64, mask=True),
    "d256_cu_seqlens": dict(B=1, H=4, G=2, T=1500, S=1500, D=256, cu=[0, 100, 700, 701, 1500]),
    "d128_decode_T1": dict(B=3, H=4, G=2, T=1, S=777, D=128),
    "d1024_molm": dict(B=8, H=2, G=1, T=512, S=1024, D=1024),
    "d1024_molm_untruncated_mask": dict(B=2, H=2, G=1, T=512, S=1024, D=1024, mask=True, truncate=math.inf),
    "d128_fp16": dict(B=2, H=4, G=4, T=512, S=512, D=128, dtype=torch.float16),
    "d64_fp32": dict(B=1, H=2, G=1, T=256, S=300, D=64, dtype=torch.float32, tol=1e-4),
}


def _sb_check(name: str, kw: dict) -> Callable[[bool], bool]:
    def run(deterministic_ok: bool) -> bool:
        args = dict(kw)
        if not deterministic_ok:
            args.setdefault("deterministic", False)
        return check_sb(name, **args)
    return run


# Checks by name: each takes whether the ordered backward is usable and returns pass/fail, or None
# when it does not apply.
CHECKS: dict[str, Callable[[bool], bool | None]] = {
    **{name: _sb_check(name, kw) for name, kw in SB_CHECKS.items()},
    "sb_reproducible": lambda deterministic_ok: check_sb_reproducible() if deterministic_ok else None,
    "experts": lambda deterministic_ok: check_experts(),
    "expert_forms": lambda deterministic_ok: check_expert_forms(),
    "expert_accumulate": lambda deterministic_ok: check_expert_accumulate(),
}


def run_checks(checks: dict[str, Callable[[bool], bool | None]], deterministic_ok: bool,
               names: list[str] | None) -> None:
    """The checks named (default all of `checks`), each isolated: one that raises counts as failed."""
    results = []
    for name in names or checks:
        if time.time() > DEADLINE:
            log(f"check {name} skipped: time budget spent")
            continue
        try:
            ok = checks[name](deterministic_ok)
            if ok is not None:
                results.append(ok)
        except Exception:
            log(f"check {name} raised:\n{traceback.format_exc()}")
            results.append(False)
    RESULTS["checks_passed"] = f"{sum(results)}/{len(results)}"
    log(f"checks passed: {sum(results)}/{len(results)}")


# ---------------------------------------------------------------- benchmarks

def bench_sb_vs_sdpa(deterministic: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from molm_kernels.stickbreaking import stickbreaking_attention_triton

    B, H, D = 4, 12, 128
    for T in (2048, 4096, 8192):
        q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        row = {}

        def fb(fn):
            def step():
                o = fn()
                torch.autograd.grad(o, (q, k, v), do)
            return step

        row["sdpa_default_ms"] = bench(fb(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            row["sdpa_flash_ms"] = bench(fb(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)))
        row["sb_ms"] = bench(fb(lambda: stickbreaking_attention_triton(q, k, v, deterministic=deterministic)))
        row["sb_fwd_ms"] = bench(lambda: stickbreaking_attention_triton(q, k, v, deterministic=deterministic))
        row["sb_atomic_ms"] = bench(fb(lambda: stickbreaking_attention_triton(q, k, v, deterministic=False)))
        row["sb_untruncated_ms"] = bench(fb(lambda: stickbreaking_attention_triton(
            q, k, v, truncate=math.inf, deterministic=deterministic)), rep_ms=200)
        row["sb_untruncated_atomic_ms"] = bench(fb(lambda: stickbreaking_attention_triton(
            q, k, v, truncate=math.inf, deterministic=False)), rep_ms=200)
        row["ratio_vs_sdpa_default"] = row["sb_ms"] / row["sdpa_default_ms"]
        RESULTS[f"bench1/T{T}"] = row
        log(f"bench1 T={T}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()))


def bench_sb_plans():
    """Block-shape sweep for D=128, T=4096 (picks the defaults in kernels/molm_kernels/stickbreaking.py Plan)."""
    from molm_kernels.stickbreaking import Plan, sb_backward, sb_forward

    B, H, T, D = 4, 12, 4096, 128
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    do = torch.randn_like(q)
    for trunc in (32.0, math.inf):
        for bm, bn, w, s in ((128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 4, 2), (64, 32, 4, 3), (128, 128, 8, 2)):
            p = Plan(D, T, backward=False)
            p.block_m, p.block_n, p.num_warps, p.num_stages = bm, bn, w, s
            try:
                t = bench(lambda: sb_forward(q, k, v, truncate=trunc, plan=p), rep_ms=100)
                log(f"plan fwd trunc={trunc} bm={bm} bn={bn} warps={w} stages={s}: {t:.3f} ms")
            except Exception as e:
                log(f"plan fwd bm={bm} bn={bn} w={w}: failed {type(e).__name__}: {str(e)[:200]}")
        fp = Plan(D, T, backward=False)
        o, stop, total = sb_forward(q, k, v, truncate=trunc, plan=fp)
        for bm, bn, w, s in ((64, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2), (32, 64, 4, 2)):
            p = Plan(D, T, backward=True)
            p.block_m, p.block_n, p.num_warps, p.num_stages = bm, bn, w, s
            for det in (True, False):
                try:
                    t = bench(lambda: sb_backward(do, q, k, v, stop, total, deterministic=det, plan=p, fwd_plan=fp),
                              rep_ms=100)
                    log(f"plan bwd trunc={trunc} det={det} bm={bm} bn={bn} warps={w} stages={s}: {t:.3f} ms")
                except Exception as e:
                    log(f"plan bwd bm={bm} bn={bn} w={w} det={det}: failed {type(e).__name__}: {str(e)[:200]}")


def bench_molm_attention(deterministic: bool):
    """The attention core at MoLM's shape: ours (truncated, untruncated) vs the reference."""
    from molm_kernels.stickbreaking import stickbreaking_attention_triton
    from molm_kernels.stickbreaking_reference import stickbreaking_attention_reference

    B, H, G, T, S, D = 8, 2, 1, 512, 1024, 1024
    q = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    k = torch.randn(B, S, G, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    v = torch.randn(B, S, G, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    do = torch.randn_like(q)
    row = {}
    for name, fn in (("triton", lambda: stickbreaking_attention_triton(q, k, v, deterministic=deterministic)),
                     ("triton_untruncated", lambda: stickbreaking_attention_triton(
                         q, k, v, truncate=math.inf, deterministic=deterministic)),
                     ("reference", lambda: stickbreaking_attention_reference(q, k, v))):
        row[f"{name}_fwd_ms"] = bench(fn)
        row[f"{name}_fwdbwd_ms"] = bench(lambda: torch.autograd.grad(fn(), (q, k, v), do))
    RESULTS["bench2/attention"] = row
    log("bench2 attention core: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()))


def bench_experts(sizes=(8192, 32768)):
    """SMoE experts fwd+bwd: fused and unfused Triton, eager and graph, vs torch grouped mm and a
    dense MLP of the same active FLOPs."""
    import molm_kernels
    from molm_kernels.scattered_experts import parallel_linear_triton, scattered_mlp_triton

    E, K, d, ffd = 32, 2, 1024, 2048
    grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    for N in sizes:
        if time.time() > DEADLINE:
            log(f"bench3 N={N} skipped: time budget spent")
            continue
        flops = 3 * 2 * N * K * 2 * d * ffd  # fwd + bwd (2x fwd) of both expert matmuls
        x = torch.randn(N, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w1 = (torch.randn(E, d, ffd, device="cuda", dtype=torch.bfloat16) / 32).requires_grad_()
        w2 = (torch.randn(E, ffd, d, device="cuda", dtype=torch.bfloat16) / 45).requires_grad_()
        probs = torch.softmax(torch.randn(N, E, device="cuda"), -1)
        gates, idx = probs.topk(K, -1)
        gates = gates.to(torch.bfloat16).requires_grad_()
        dy = torch.randn(N, d, device="cuda", dtype=torch.bfloat16)
        params = (x, w1, w2, gates)

        def fused():
            return scattered_mlp_triton(x, w1, w2, K, molm_kernels.route(idx, E), gates)

        def unfused():
            return molm_kernels.scattered_mlp_reference(x, w1, w2, K, molm_kernels.route(idx, E), gates,
                                                   linear=parallel_linear_triton)

        def torch_grouped():
            routing = molm_kernels.route(idx, E)
            offs = routing.expert_offsets_E.to(torch.int32)
            xs = x[routing.sorted_flat_idx_N // K]
            h = F.gelu(grouped_mm(xs, w1, offs=offs), approximate="tanh")
            z_sorted = grouped_mm(h, w2, offs=offs)
            z = torch.empty_like(z_sorted).index_copy(0, routing.sorted_flat_idx_N, z_sorted)
            return torch.bmm(gates.unsqueeze(1), z.view(N, K, d)).squeeze(1)

        dense1 = torch.nn.Linear(d, 2 * ffd, bias=False, device="cuda", dtype=torch.bfloat16)
        dense2 = torch.nn.Linear(2 * ffd, d, bias=False, device="cuda", dtype=torch.bfloat16)

        def dense():
            return dense2(F.gelu(dense1(x), approximate="tanh"))

        row = {}
        for name, fn, ps in (("fused", fused, params), ("unfused", unfused, params),
                             ("torch_grouped_mm", torch_grouped, params),
                             ("dense_4096", dense, (x, dense1.weight, dense2.weight))):
            try:
                step = lambda: torch.autograd.grad(fn(), ps, dy)  # noqa: E731
                ms = bench(step)
                row[f"{name}_ms"], row[f"{name}_tflops"] = ms, flops / ms / 1e9
                if name in ("fused", "unfused"):
                    graph, _ = capture(step)
                    ms = bench(graph.replay)
                    row[f"{name}_graph_ms"], row[f"{name}_graph_tflops"] = ms, flops / ms / 1e9
                    del graph
            except Exception as e:
                log(f"bench3 {name} N={N} failed: {type(e).__name__}: {str(e)[:300]}")
        try:
            row["fused_fwd_ms"] = bench(fused)
        except Exception as e:
            log(f"bench3 fused fwd failed: {e}")
        RESULTS[f"bench3/N{N}"] = row
        log(f"bench3 N={N}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()))


def bench_sb1024_plans():
    """Forward block shapes for D=1024 at the inference shape (64 x 2 heads x 512, no memory):
    the default plan recomputes the scores per 256-wide output slice."""
    from molm_kernels.stickbreaking import Plan, sb_forward

    B, H, T, D = 64, 2, 512, 1024
    q = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    kv = torch.randn(B, T, 1, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    for bm, bn, dk, dv, w, st in ((64, 32, 128, 256, 8, 1), (64, 32, 128, 256, 8, 2), (64, 64, 64, 256, 8, 2),
                                  (32, 32, 128, 512, 8, 2), (128, 32, 64, 128, 8, 2)):
        if time.time() > DEADLINE:
            break
        p = Plan(D, T, backward=False, block_dk=dk, block_dv=dv)
        p.block_m, p.block_n, p.num_warps, p.num_stages = bm, bn, w, st
        try:
            ms = bench(lambda: sb_forward(q, kv, kv, plan=p), rep_ms=100)
            RESULTS[f"plan1024/bm{bm}_bn{bn}_dk{dk}_dv{dv}_w{w}_s{st}"] = ms
            log(f"plan D=1024 fwd bm={bm} bn={bn} dk={dk} dv={dv} warps={w} stages={st}: {ms:.3f} ms")
        except Exception as e:
            log(f"plan D=1024 bm={bm} bn={bn} dk={dk} dv={dv}: failed {type(e).__name__}: {str(e)[:200]}")


def profile_top(fn, name: str, rows: int = 12):
    """Where the time goes: the top CUDA kernels of one call (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows)
    log(f"profile {name}:\n{table}")


def det_probe() -> int:
    """Run in a child process: the ordered backward must finish (a hang would be a deadlock)."""
    from molm_kernels.stickbreaking import stickbreaking_attention_triton

    for T, trunc in ((4096, 32.0), (2048, math.inf)):
        q, k, v = (torch.randn(2, 4, T, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        o = stickbreaking_attention_triton(q, k, v, truncate=trunc, deterministic=True)
        torch.autograd.grad(o, (q, k, v), torch.randn_like(o))
    torch.cuda.synchronize()
    print("det_probe ok", flush=True)
    return 0


def main(argv: list[str] | None = None, *, prog: str = "python -m molm_kernels.bench", description: str = __doc__,
         checks: dict[str, Callable[[bool], bool | None]] = CHECKS,
         steps: dict[str, tuple[Callable, bool]] | None = None, sweeps: tuple[str, ...] | None = None,
         default_out: str = "outputs/kernel_bench") -> int:
    """The command line of a GPU check-and-benchmark program: the kernels' own (defaults), or the
    model's (benchmarks.model_bench passes its checks and benchmarks)."""
    global LOG, DEADLINE
    steps = STEPS if steps is None else steps
    sweeps = SWEEPS if sweeps is None else sweeps
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", default_out),
                        help=f"folder for bench.log and results.json (default $OUT, else {default_out})")
    parser.add_argument("--skip-check", action="store_true", help="skip the correctness checks")
    parser.add_argument("--skip-bench", action="store_true", help="skip the benchmarks")
    parser.add_argument("--checks", nargs="*", default=None,
                        help=f"checks to run (default all): {', '.join(checks)}")
    only_help = "benchmarks to run, in this order (default all" + (
        f" but the sweeps {', '.join(sweeps)}" if sweeps else "") + f"): {', '.join(steps)}"
    parser.add_argument("--only", nargs="*", default=None, help=only_help)
    parser.add_argument("--budget-s", type=float, default=math.inf,
                        help="wall-clock seconds after which remaining checks and benchmarks are skipped "
                             "(the summary table is still printed)")
    parser.add_argument("--no-det-probe", action="store_true",
                        help="skip the child-process probe that the ordered dK/dV backward terminates "
                             "(saves its compile time once it has passed on the device)")
    parser.add_argument("--det-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for flag, given, known in (("--checks", args.checks, checks), ("--only", args.only, steps)):
        unknown = [name for name in given or () if name not in known]
        if unknown:
            parser.error(f"{flag}: unknown {', '.join(unknown)}; known: {', '.join(known)}")
    if args.det_probe:
        return det_probe()
    if not torch.cuda.is_available():
        print(f"{prog} needs a CUDA GPU", file=sys.stderr)
        return 2
    DEADLINE = time.time() + args.budget_s
    os.makedirs(args.out, exist_ok=True)
    LOG = open(os.path.join(args.out, "bench.log"), "a")
    log(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"triton {__import__('triton').__version__}")
    torch.manual_seed(1234)
    # The ordered (deterministic) backward spins on counters: prove it terminates in a child first.
    det_ok = True
    try:
        if args.no_det_probe:
            raise StopIteration
        p = subprocess.run([sys.executable, "-m", "molm_kernels.bench", "--det-probe"], timeout=120,
                           capture_output=True, text=True)
        det_ok = p.returncode == 0
        log(f"deterministic probe rc={p.returncode} {p.stdout.strip()[-200:]} {p.stderr.strip()[-1500:]}")
    except subprocess.TimeoutExpired:
        det_ok = False
        log("deterministic probe TIMED OUT: using atomics for dK/dV")
    except StopIteration:
        log("deterministic probe skipped (--no-det-probe)")
    RESULTS["deterministic_backward_usable"] = det_ok
    if not args.skip_check:
        run_checks(checks, det_ok, args.checks)
        save_results(args.out)
    if not args.skip_bench:
        only = args.only if args.only else [name for name in steps if name not in sweeps]
        for name in only:
            if time.time() > DEADLINE:
                log(f"bench {name} skipped: time budget spent")
                continue
            fn, needs_det = steps[name]
            t0 = time.time()
            try:
                fn(det_ok) if needs_det else fn()
            except Exception:
                log(f"bench {name} raised:\n{traceback.format_exc()}")
            log(f"bench {name} took {time.time() - t0:.0f} s")
            save_results(args.out)
    save_results(args.out)
    print_table()
    return 0


def save_results(out: str) -> None:
    """results.json, written atomically (temp name, then rename) after every section."""
    with open(os.path.join(out, "results.json.tmp"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)
    os.replace(os.path.join(out, "results.json.tmp"), os.path.join(out, "results.json"))


def profile_experts():
    """Kernel time breakdown of the fused experts fwd+bwd at N=32768."""
    import molm_kernels
    from molm_kernels.scattered_experts import scattered_mlp_triton

    N, E, K = 32768, 32, 2
    x = torch.randn(N, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w1 = (torch.randn(E, 1024, 2048, device="cuda", dtype=torch.bfloat16) / 32).requires_grad_()
    w2 = (torch.randn(E, 2048, 1024, device="cuda", dtype=torch.bfloat16) / 45).requires_grad_()
    gates, idx = torch.softmax(torch.randn(N, E, device="cuda"), -1).topk(K, -1)
    gates = gates.to(torch.bfloat16).requires_grad_()
    dy = torch.randn(N, 1024, device="cuda", dtype=torch.bfloat16)
    profile_top(lambda: torch.autograd.grad(scattered_mlp_triton(x, w1, w2, K, molm_kernels.route(idx, E), gates),
                                            (x, w1, w2, gates), dy), "fused experts fwd+bwd N=32768")


# Benchmarks by name, in their default order: (function, whether it takes the deterministic-backward
# flag). The block-shape sweeps run only when named (--only).
STEPS = {
    "experts": (bench_experts, False),
    "profile": (profile_experts, False),
    "plans1024": (bench_sb1024_plans, False),
    "sb": (bench_sb_vs_sdpa, True),
    "molm_attn": (bench_molm_attention, True),
    "plans": (bench_sb_plans, False),
}
SWEEPS = ("plans", "plans1024")


def print_table():
    print("\n==== summary ====")
    for key, val in RESULTS.items():
        if isinstance(val, dict):
            print(f"{key}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in val.items() if not isinstance(v, list)))
            for k, v in val.items():
                if isinstance(v, list):
                    print(f"    {k}: " + " ".join(f"{e:.2e}" for e in v))
        else:
            print(f"{key}: {val}")


if __name__ == "__main__":
    sys.exit(main())
