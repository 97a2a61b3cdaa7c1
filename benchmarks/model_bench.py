"""GPU checks and benchmarks of the MoLM model on the Triton kernels (run on a CUDA machine; see
BENCHMARKS.md). The kernel-level ones are `python -m molm_kernels.bench`; this program uses its runner
(the same flags, bench.log and results.json in --out) and its timing helpers.

Checks: the padded-vocabulary output layer, the MoLM model's logits and gradients with the kernels
against the same model on the references (fp32 and bf16), no host synchronisation in a MoA layer's
or the model's training step, and CUDA-graph replays equal to eager runs on fresh inputs.

Benchmarks (median of CUDA-event timings after warm-up, bf16, random inputs); "graph" rows capture
the whole step in a CUDA graph and time its replays:
1. the whole MoA layer of molm-350m-4b fwd+bwd, eager, graph and on the references;
2. whole-model forward tokens/s of molm-350m-4b (eager with and without the padded head, graph)
   vs a Pythia-1.4B-shaped GPT-NeoX (transformers; eager, and as a graph last), and a training
   step (forward + backward, no optimizer) eager and graph;
plus a profile of the model's forward.

Usage: python -m benchmarks.model_bench [--out DIR] [--skip-check] [--skip-bench] [--only NAME ...]
       [--checks NAME ...] [--budget-s SECONDS]
"""

from __future__ import annotations

import sys
from typing import Callable

import torch
import torch.nn.functional as F

from molm_kernels.bench import RESULTS, bench, capture, check_graph_replay, check_no_sync, log, profile_top, rel
from molm_kernels.bench import main as run_bench_main


def check_lm_head(rows=4096, d=1024, V=50295):
    """The model's output layer on GPU (padded vocabulary, a strided view of the logits) against
    F.linear in fp32: logits and both gradients through the model's cross entropy."""
    from molm_megatron.model.model import LMHead

    head = LMHead(d, V).cuda().to(torch.bfloat16)
    h = torch.randn(rows, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, V, (rows,), device="cuda")
    logits = head(h)
    loss = F.cross_entropy(logits.float().view(-1, V), labels, reduction="sum")
    grads = torch.autograd.grad(loss, (h, head.weight))
    hr, wr = h.detach().float().requires_grad_(), head.weight.detach().float().requires_grad_()
    logits_ref = F.linear(hr, wr)
    grads_ref = torch.autograd.grad(F.cross_entropy(logits_ref, labels, reduction="sum"), (hr, wr))
    errs = [rel(logits, logits_ref)] + [rel(a, b) for a, b in zip(grads, grads_ref)]
    ok = all(e < 1e-2 for e in errs) and logits.stride(0) == 50304
    RESULTS["check/lm_head_padded"] = {"errors(logits,dh,dw)": errs, "row_stride": logits.stride(0), "ok": ok}
    log(f"check lm_head padded: {' '.join(f'{e:.2e}' for e in errs)} stride {logits.stride(0)} -> "
        f"{'OK' if ok else 'FAIL'}")
    return ok


def use_references():
    """Context: the model's kernel dispatch points swapped for the PyTorch references."""
    import contextlib

    import molm_kernels

    @contextlib.contextmanager
    def swapped():
        names = ("stickbreaking_attention", "parallel_linear", "scattered_mlp")
        saved = [getattr(molm_kernels, n) for n in names]
        for n in names:
            setattr(molm_kernels, n, getattr(molm_kernels, f"{n}_reference"))
        try:
            yield
        finally:
            for n, f in zip(names, saved):
                setattr(molm_kernels, n, f)
    return swapped()


def check_model(preset="tiny", dtype=torch.float32, tol=1e-4, vocab_size=509):
    """MoLM logits and gradients with the kernels equal the same model on the references (vocab
    509 so the padded output layer runs)."""
    import dataclasses

    from molm_megatron.config import model_preset
    from molm_megatron.model import MoLM

    torch.manual_seed(0)
    cfg = dataclasses.replace(model_preset(preset), vocab_size=vocab_size, bos_token_id=0, eos_token_id=0)
    model = MoLM(cfg).cuda().to(dtype)
    ids = torch.randint(0, cfg.vocab_size, (2, 48), device="cuda")
    mask = torch.ones(2, 48, device="cuda", dtype=torch.long)
    mask[1, :5] = 0

    def run():
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids, attention_mask=mask)
        out2 = model(ids, labels=ids, memory=out.memory)  # Transformer-XL memory path
        (out.loss + out2.loss).backward()
        grads = torch.cat([p.grad.float().reshape(-1) for p in model.parameters() if p.grad is not None])
        return torch.cat([out.logits.float().reshape(-1), out2.logits.float().reshape(-1)]), grads

    logits, grads = run()
    with use_references():
        logits_ref, grads_ref = run()
    errs = [rel(logits, logits_ref), rel(grads, grads_ref)]
    ok = all(e < tol for e in errs)
    RESULTS[f"check/model_{preset}_{dtype}"] = {"errors(logits,grads)": errs, "ok": ok}
    log(f"check model {preset} {dtype}: logits {errs[0]:.2e} grads {errs[1]:.2e} -> {'OK' if ok else 'FAIL'}")
    return ok


def check_graphs_and_syncs():
    """A MoA layer's fwd+bwd and a whole model's training step (forward, losses, backward): no
    host sync, and their CUDA-graph replays equal eager runs on fresh inputs."""
    import dataclasses

    from molm_megatron.config import model_preset
    from molm_megatron.model import MoA, MoLM

    results = []
    cfg = model_preset("molm-350m-4b")
    with torch.device("cuda"):
        layer = MoA(cfg).to(torch.bfloat16)
    x = torch.randn(8, 512, cfg.n_embd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    mem = tuple(torch.randn(8, 512, 1, 1024, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    dy = torch.randn_like(x)
    params = [x] + list(layer.parameters())

    def moa_step():
        return torch.autograd.grad(layer(x, None, None, mem, 512)[0], params, dy)

    moa_step()
    results.append(check_no_sync("moa_layer_fwd_bwd", moa_step))
    results.append(check_graph_replay("moa_layer_fwd_bwd", moa_step, lambda: x.data.copy_(torch.randn_like(x))))
    del layer, params

    # The tiny model in fp32 (its kernels are compiled by check_model already), vocab 509 so the
    # padded head runs: every path of the big model, loss and aux losses included.
    small = dataclasses.replace(model_preset("tiny"), vocab_size=509, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(1)
    with torch.device("cuda"):
        model = MoLM(small)
    ids = torch.randint(0, small.vocab_size, (4, 256), device="cuda")
    mask = torch.ones(4, 256, device="cuda", dtype=torch.long)
    mask[1, :7] = 0
    mparams = list(model.parameters())

    def train_step():
        out = model(ids, labels=ids, attention_mask=mask)
        return (out.loss.detach(), *torch.autograd.grad(out.loss, mparams))

    def refresh():
        ids.copy_(torch.randint_like(ids, small.vocab_size))

    train_step()
    results.append(check_no_sync("model_train_step", train_step))
    results.append(check_graph_replay("model_train_step", train_step, refresh, tol=1e-4))
    return all(results)


def bench_moa_layer():
    """The whole MoA layer of molm-350m-4b (router, 16 query/output experts top-2, attention over
    512 queries + 512 memory keys, batch 8): eager, CUDA graph, and eager on the references."""
    from molm_megatron.config import model_preset
    from molm_megatron.model import MoA

    B, T = 8, 512
    cfg = model_preset("molm-350m-4b")
    with torch.device("cuda"):
        layer = MoA(cfg).to(torch.bfloat16)
    x = torch.randn(B, T, cfg.n_embd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    mem = tuple(torch.randn(B, 512, 1, 1024, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    dy = torch.randn(B, T, cfg.n_embd, device="cuda", dtype=torch.bfloat16)
    params = [x] + list(layer.parameters())

    def fwd():
        return layer(x, None, None, mem, 512)[0]

    def step():
        return torch.autograd.grad(fwd(), params, dy)

    row = {"moa_fwd_ms": bench(fwd), "moa_fwdbwd_ms": bench(step)}
    graph, _ = capture(step)
    row["moa_fwdbwd_graph_ms"] = bench(graph.replay)
    del graph
    graph, _ = capture(fwd)
    row["moa_fwd_graph_ms"] = bench(graph.replay)
    del graph
    with use_references():
        row["moa_references_fwdbwd_ms"] = bench(step, rep_ms=100)
    RESULTS["bench2/moa_layer"] = row
    log("bench2 MoA layer: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()))


def bench_model():
    """Whole-model forward (inference) tokens/s, batch 64 x 512: molm-350m-4b eager with the
    padded head, eager with the plain nn.Linear head, and as a CUDA graph; Pythia-1.4B shape eager
    (as a graph in bench_pythia_graph)."""
    from molm_megatron.config import model_preset
    from molm_megatron.model import MoLM
    from molm_megatron.model.model import LMHead

    B, T = 64, 512
    ids = torch.randint(0, 50000, (B, T), device="cuda")
    row = {}
    cfg = model_preset("molm-350m-4b")
    with torch.device("cuda"):
        model = MoLM(cfg).to(torch.bfloat16).eval()
    with torch.inference_mode():
        row["molm_tokens_per_s"] = B * T / bench(lambda: model(ids), warmup_ms=200, rep_ms=600) * 1e3
        padded_forward = LMHead.forward
        LMHead.forward = torch.nn.Linear.forward
        try:
            row["molm_unpadded_head_tokens_per_s"] = B * T / bench(lambda: model(ids), rep_ms=600) * 1e3
        finally:
            LMHead.forward = padded_forward
        try:
            graph, _ = capture(lambda: model(ids).logits)
            row["molm_graph_tokens_per_s"] = B * T / bench(graph.replay, rep_ms=600) * 1e3
            del graph
        except Exception as e:
            log(f"bench4 molm graph failed: {type(e).__name__}: {str(e)[:300]}")
    del model
    torch.cuda.empty_cache()
    neox = _pythia_shape()
    with torch.inference_mode():
        row["pythia_tokens_per_s"] = B * T / bench(lambda: neox(ids, use_cache=False), warmup_ms=200,
                                                   rep_ms=600) * 1e3
    del neox
    torch.cuda.empty_cache()
    row["ratio_eager"] = row["molm_tokens_per_s"] / row["pythia_tokens_per_s"]
    if "molm_graph_tokens_per_s" in row:
        row["ratio_molm_graph_vs_pythia_eager"] = row["molm_graph_tokens_per_s"] / row["pythia_tokens_per_s"]
    RESULTS["bench4/model_forward"] = row
    log("bench4: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()))


def _pythia_shape():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    ncfg = GPTNeoXConfig(vocab_size=50304, hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                         intermediate_size=8192, rotary_pct=0.25, max_position_embeddings=2048,
                         use_parallel_residual=True)
    ncfg._attn_implementation = "sdpa"
    with torch.device("cuda"):
        return GPTNeoXForCausalLM(ncfg).to(torch.bfloat16).eval()


def bench_pythia_graph(B: int = 64, T: int = 512):
    """The Pythia-1.4B-shaped baseline captured in a CUDA graph too (fairness of the ratio). Last
    in the default order: a failed capture of third-party code must not disturb the rest."""
    neox = _pythia_shape()
    ids = torch.randint(0, 50000, (B, T), device="cuda")
    with torch.inference_mode():
        graph, _ = capture(lambda: neox(ids, use_cache=False).logits)
        tps = B * T / bench(graph.replay, rep_ms=600) * 1e3
    row = RESULTS.setdefault("bench4/model_forward", {})
    row["pythia_graph_tokens_per_s"] = tps
    if "molm_graph_tokens_per_s" in row:
        row["ratio_both_graph"] = row["molm_graph_tokens_per_s"] / tps
    log(f"bench4 pythia graph: {tps:.0f} tokens/s")


def bench_train_step(B: int = 8, T: int = 512):
    """molm-350m-4b training step without the optimizer (forward with losses, backward to every
    parameter), batch 8 x 512 with 512 memory tokens: eager and as a CUDA graph."""
    from molm_megatron.config import model_preset
    from molm_megatron.model import MoLM

    cfg = model_preset("molm-350m-4b")
    with torch.device("cuda"):
        model = MoLM(cfg).to(torch.bfloat16)
    ids = torch.randint(0, 50000, (B, T), device="cuda")
    with torch.no_grad():
        memory = model(ids).memory
    params = list(model.parameters())

    def step():
        out = model(ids, labels=ids, memory=memory)
        return (out.loss.detach(), *torch.autograd.grad(out.loss, params))

    row = {"eager_ms": bench(step, rep_ms=500)}
    row["eager_tokens_per_s"] = B * T / row["eager_ms"] * 1e3
    RESULTS["bench4/train_step"] = row
    graph, _ = capture(step)
    row["graph_ms"] = bench(graph.replay, rep_ms=500)
    del graph
    row["graph_tokens_per_s"] = B * T / row["graph_ms"] * 1e3
    log("bench4 train step: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()))


def profile_model():
    """Kernel time breakdown of molm-350m-4b's forward, batch 64 x 512."""
    from molm_megatron.config import model_preset
    from molm_megatron.model import MoLM

    with torch.device("cuda"):
        model = MoLM(model_preset("molm-350m-4b")).to(torch.bfloat16).eval()
    ids = torch.randint(0, 50000, (64, 512), device="cuda")
    with torch.inference_mode():
        profile_top(lambda: model(ids), "molm-350m-4b forward, batch 64 x 512", rows=20)


# Checks by name (see molm_kernels.bench.CHECKS): each takes whether the ordered backward is usable.
CHECKS: dict[str, Callable[[bool], bool | None]] = {
    "lm_head": lambda deterministic_ok: check_lm_head(),
    "model_fp32": lambda deterministic_ok: check_model("tiny", torch.float32),
    "model_bf16": lambda deterministic_ok: check_model("tiny", torch.bfloat16, 2e-2),
    "graphs": lambda deterministic_ok: check_graphs_and_syncs(),
}

# Benchmarks by name, in their default order: (function, whether it takes the deterministic flag).
# The Pythia graph is last: a failed capture of third-party code must not disturb the rest.
STEPS = {
    "moa_layer": (bench_moa_layer, False),
    "model": (bench_model, False),
    "train": (bench_train_step, False),
    "profile": (profile_model, False),
    "pythia_graph": (bench_pythia_graph, False),
}


def main(argv: list[str] | None = None) -> int:
    return run_bench_main(argv, prog="python -m benchmarks.model_bench", description=__doc__, checks=CHECKS,
                          steps=STEPS, sweeps=(), default_out="outputs/model_bench")


if __name__ == "__main__":
    sys.exit(main())
