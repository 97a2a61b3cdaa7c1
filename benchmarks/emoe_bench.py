"""EMoE benchmark: conversion time per layer, and the sparse EMoE FFN against the dense FFN.

1. Balanced k-means of one FFN layer's keys (64 experts, random weights; the clustering is the
   conversion's cost, the permutation is a copy) at GPT-2-XL (d 1600, d_ff 6400), Pythia-1.4B
   (d 2048, d_ff 8192) and Llama-7B (d 4096, d_ff 11008) shapes. CPU-bound (k-means-constrained).
2. Forward + backward of one FFN of those shapes over `--tokens` tokens: the dense Hugging Face
   MLP, the EMoE layer's sparse computation (only the chosen experts, scattered-expert kernels) and
   its masked computation (the reference), at k = N/4 (and a sparse-vs-masked check of the output
   and every gradient). bf16 on CUDA, CUDA-event timings (median after warm-up), eager and as a
   CUDA-graph replay (the same work without the host's launch overhead, which the sparse path's
   ~20 launches make visible in an FFN timed alone); on CPU fp32 and wall-clock (smoke test).

The clustering is CPU work (about 40 s per GPT-2-XL-shaped layer on one busy core); on a GPU
machine run the FFN part alone (`--skip-cluster`) when its time is short.

Usage: python -m benchmarks.emoe_bench [--tiny] [--shapes NAME ...] [--tokens N] [--n-init N]
       [--max-iter N] [--skip-cluster] [--skip-ffn] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

# name: (d_model, d_ff, architecture)
SHAPES = {"gpt2-xl": (1600, 6400, "gpt2"), "pythia-1.4b": (2048, 8192, "gpt_neox"),
          "llama-7b": (4096, 11008, "llama")}
TINY = {"gpt2-tiny": (32, 64, "gpt2"), "neox-tiny": (32, 64, "gpt_neox"), "llama-tiny": (32, 64, "llama")}


def dense_mlp(arch: str, d: int, d_ff: int) -> torch.nn.Module:
    """The architecture's own Hugging Face MLP module at the given sizes (random weights; one
    attention head only so that any width passes the config's checks)."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXMLP
    from transformers.models.llama.modeling_llama import LlamaMLP

    if arch == "gpt2":
        return GPT2MLP(d_ff, GPT2Config(n_embd=d, resid_pdrop=0.0))
    if arch == "gpt_neox":
        return GPTNeoXMLP(GPTNeoXConfig(hidden_size=d, intermediate_size=d_ff, num_attention_heads=1))
    return LlamaMLP(LlamaConfig(hidden_size=d, intermediate_size=d_ff, num_attention_heads=1))


def timed(fn, device: torch.device, reps: int) -> float:
    """Median milliseconds of fn() over reps runs after two warm-ups."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def graph_timed(module: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, device: torch.device,
                reps: int) -> float:
    """Median milliseconds of replaying one captured forward + backward (input and parameter
    gradients) of module."""
    from molm_kernels.bench import capture

    inputs = [x, *module.parameters()]
    graph, _ = capture(lambda: torch.autograd.grad(module(x), inputs, dy))
    ms = timed(graph.replay, device, reps)
    del graph
    return ms


def bench_cluster(shapes: dict, experts: int, n_init: int, max_iter: int) -> list[dict]:
    from molm_megatron.emoe.cluster import balanced_kmeans

    rows = []
    for name, (d, d_ff, _) in shapes.items():
        keys = torch.randn(d_ff, d, generator=torch.Generator().manual_seed(0)) / d ** 0.5
        t = time.perf_counter()
        labels = balanced_kmeans(keys, experts, seed=0, n_init=n_init, max_iter=max_iter)
        seconds = time.perf_counter() - t
        assert (torch.bincount(torch.from_numpy(labels)) == d_ff // experts).all()
        rows.append(dict(shape=name, d=d, d_ff=d_ff, experts=experts, n_init=n_init, max_iter=max_iter,
                         seconds_per_layer=round(seconds, 2)))
        print(f"cluster {name}: d_ff {d_ff} x d {d} -> {experts} experts, n_init {n_init}: {seconds:.1f}s",
              flush=True)
    return rows


def bench_ffn(shapes: dict, experts: int, tokens: int, device: torch.device, reps: int) -> list[dict]:
    from molm_megatron.emoe.layer import ARCHITECTURES, EMoEMLP

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    k = max(1, experts // 4)
    rows = []
    for name, (d, d_ff, arch) in shapes.items():
        spec = ARCHITECTURES[arch]
        dense = dense_mlp(arch, d, d_ff).to(device, dtype)
        act = {"gpt2": "gelu_new", "gpt_neox": "gelu", "llama": "silu"}[arch]
        emoe = EMoEMLP(dense_mlp(arch, d, d_ff), spec, act, experts, k).to(device, dtype)
        emoe.load_state_dict(dense.state_dict())
        x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(tokens, d, device=device, dtype=dtype)

        def step(module) -> torch.Tensor:
            module.zero_grad(set_to_none=True)
            x.grad = None
            y = module(x)
            y.backward(dy)
            return y.detach()

        row = dict(shape=name, arch=arch, d=d, d_ff=d_ff, experts=experts, k=k, tokens=tokens, dtype=str(dtype))
        row["dense_ms"] = timed(lambda: step(dense), device, reps)
        if device.type == "cuda":
            row["dense_graph_ms"] = graph_timed(dense, x, dy, device, reps)
        for computation in ("sparse", "masked"):
            emoe.set_routing(k, computation)
            row[f"{computation}_ms"] = timed(lambda: step(emoe), device, reps)
            if device.type == "cuda":
                row[f"{computation}_graph_ms"] = graph_timed(emoe, x, dy, device, reps)
        outputs = {}
        for computation in ("masked", "sparse"):
            emoe.set_routing(k, computation)
            outputs[computation] = [step(emoe), x.grad] + [p.grad for p in emoe.parameters()]
        # The worst relative error over the output and every gradient (input, weights, biases).
        row["sparse_vs_masked_rel_err"] = max(((a.float() - b.float()).norm() / b.float().norm()).item()
                                              for a, b in zip(outputs["sparse"], outputs["masked"], strict=True))
        row["sparse_speedup_vs_dense"] = round(row["dense_ms"] / row["sparse_ms"], 2)
        graphs = ""
        if device.type == "cuda":
            row["sparse_graph_speedup_vs_dense_graph"] = round(row["dense_graph_ms"] / row["sparse_graph_ms"], 2)
            graphs = (f"; CUDA-graph replay: dense {row['dense_graph_ms']:.2f}, sparse {row['sparse_graph_ms']:.2f}, "
                      f"masked {row['masked_graph_ms']:.2f} ms")
        rows.append(row)
        print(f"ffn {name}: dense {row['dense_ms']:.2f} ms, sparse {row['sparse_ms']:.2f} ms, masked "
              f"{row['masked_ms']:.2f} ms (k={k}/{experts}, {tokens} tokens, fwd+bwd){graphs}; sparse/masked worst "
              f"rel err {row['sparse_vs_masked_rel_err']:.1e}", flush=True)
        del dense, emoe, x, dy
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def print_table(results: dict) -> None:
    if results.get("cluster"):
        print("\n| FFN shape | d_ff x d | experts | n_init | k-means s/layer |\n|---|---|---|---|---|")
        for r in results["cluster"]:
            print(f"| {r['shape']} | {r['d_ff']} x {r['d']} | {r['experts']} | {r['n_init']} | "
                  f"{r['seconds_per_layer']} |")
    if results.get("ffn"):
        print("\n| FFN shape | tokens | k / N | dense ms | EMoE sparse ms | EMoE masked ms | sparse speed-up "
              "| graph replay: dense / sparse / masked ms | speed-up | sparse vs masked |\n"
              "|---|---|---|---|---|---|---|---|---|---|")
        for r in results["ffn"]:
            graphs = (f"{r['dense_graph_ms']:.2f} / {r['sparse_graph_ms']:.2f} / {r['masked_graph_ms']:.2f} | "
                      f"{r['sparse_graph_speedup_vs_dense_graph']}x" if "dense_graph_ms" in r else "- | -")
            print(f"| {r['shape']} | {r['tokens']} | {r['k']} / {r['experts']} | {r['dense_ms']:.2f} | "
                  f"{r['sparse_ms']:.2f} | {r['masked_ms']:.2f} | {r['sparse_speedup_vs_dense']}x | {graphs} | "
                  f"{r['sparse_vs_masked_rel_err']:.1e} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.emoe_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU smoke test)")
    p.add_argument("--shapes", nargs="+", choices=[*SHAPES, *TINY], default=None,
                   help=f"FFN shapes to run (default: all of {', '.join(SHAPES)}; with --tiny the tiny ones)")
    p.add_argument("--experts", type=int, default=None, help="experts per FFN (default 64, EMoE's; 8 with --tiny)")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per FFN call in the timing")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions (median reported)")
    p.add_argument("--n-init", type=int, default=1, help="k-means restarts in the timing (time scales with it)")
    p.add_argument("--max-iter", type=int, default=300, help="k-means iterations per restart")
    p.add_argument("--skip-cluster", action="store_true", help="skip the clustering timings")
    p.add_argument("--skip-ffn", action="store_true", help="skip the FFN timings")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    shapes = TINY if args.tiny else SHAPES
    if args.shapes:
        shapes = {name: {**SHAPES, **TINY}[name] for name in args.shapes}
    experts = args.experts or (8 if args.tiny else 64)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "date": time.strftime("%Y-%m-%d", time.gmtime())}
    if not args.skip_cluster:
        results["cluster"] = bench_cluster(shapes, experts, args.n_init, args.max_iter)
    if not args.skip_ffn:
        results["ffn"] = bench_ffn(shapes, experts, args.tokens, device, args.reps)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
