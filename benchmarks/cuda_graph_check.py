"""GPU check and benchmark of `train.cuda_graph`: the captured training step against the eager one.

    python -m benchmarks.cuda_graph_check --data PREFIX --out DIR [--layers 24] [--micro-batch 8]
        [--accum 24] [--steps 6] [--skip-equivalence] [--skip-throughput]

1. Equivalence: the same short run (molm-350m-4b shape with 2 layers, bf16, ZeRO-1, memory, MI
   loss) eager and with CUDA graphs, compared per step (LM loss, MI loss, gradient norm, expert
   counts) and on every parameter after the last step (consolidated checkpoints).
2. Throughput: the paper recipe's per-GPU shape (all layers, micro-batch 8 x 512 with 512 memory
   tokens, 24 accumulation steps), eager and captured: tokens/s, MFU and peak memory from each
   run's metrics.jsonl (the median over the steps after the first, which holds the capture).

Each run is its own `pretrain.py` process. A table is printed last; `DIR/results.json` holds it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

COMMON = ["--model.preset", "molm-350m-4b", "--data.split", "100,0,0", "--parallel.zero_stage", "1",
          "--metrics.log_interval", "1", "--metrics.tensorboard", "false", "--train.device", "cuda"]


def _run(name: str, flags: list[str], out: Path) -> list[dict]:
    """One pretrain.py run in its own process; its metrics rows."""
    metrics = out / name
    cmd = [sys.executable, "pretrain.py", *COMMON, *flags, "--metrics.dir", str(metrics)]
    with open(out / f"{name}.log", "w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"{name} exited {code}; see {out / f'{name}.log'}")
    return [json.loads(line) for line in (metrics / "metrics.jsonl").read_text().splitlines()]


def equivalence(data: str, out: Path) -> dict:
    from molm_megatron.hf.convert import consolidate_checkpoint

    flags = ["--model.n_layer", "2", "--data.prefixes", data, "--train.steps", "4", "--train.micro_batch_size", "4",
             "--train.global_batch_tokens", str(4 * 512 * 4), "--schedule.warmup_steps", "1"]
    runs, weights = {}, {}
    for name, graph in (("eager", "false"), ("graph", "true")):
        ckpt = out / f"{name}_ckpt"
        runs[name] = _run(name, flags + ["--train.cuda_graph", graph, "--checkpoint.dir", str(ckpt)], out)
        weights[name] = consolidate_checkpoint(ckpt).state_dict()
    per_step = []
    for e, g in zip(runs["eager"], runs["graph"]):
        counts = [k for k in e if k.startswith("experts/")]
        per_step.append({"step": e["step"], **{k: abs(e[k] - g[k]) for k in ("loss/lm", "loss/mi", "grad_norm")},
                         "expert_metrics_max_diff": max((abs(e[k] - g[k]) for k in counts), default=0.0)})
    param_diff = max((weights["eager"][k].float() - weights["graph"][k].float()).abs().max().item()
                     for k in weights["eager"])
    bitwise = all(weights["eager"][k].equal(weights["graph"][k]) for k in weights["eager"])
    return {"per_step_abs_diff": per_step, "param_max_abs_diff": param_diff, "params_bitwise_equal": bitwise}


def throughput(data: str, out: Path, layers: int, micro: int, accum: int, steps: int) -> dict:
    flags = ["--model.n_layer", str(layers), "--data.prefixes", data, "--train.steps", str(steps),
             "--train.micro_batch_size", str(micro), "--train.global_batch_tokens", str(micro * 512 * accum),
             "--schedule.warmup_steps", "2"]
    result = {}
    for name, graph in (("tput_eager", "false"), ("tput_graph", "true")):
        rows = _run(name, flags + ["--train.cuda_graph", graph], out)[1:]  # the first step holds the capture
        result[name] = {"tokens_per_s": statistics.median(r["throughput/tokens_per_s"] for r in rows),
                        "mfu": statistics.median(r["mfu"] for r in rows),
                        "max_allocated_gib": max(r["memory/max_allocated_gib"] for r in rows)}
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cuda_graph_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="indexed dataset prefix (data_prep output, no .bin/.idx)")
    parser.add_argument("--out", required=True, help="folder for the runs' logs and results.json")
    parser.add_argument("--layers", type=int, default=24, help="layers of the throughput runs")
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per micro-batch (throughput runs)")
    parser.add_argument("--accum", type=int, default=24, help="accumulation steps per optimizer step (throughput)")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps of each throughput run")
    parser.add_argument("--skip-equivalence", action="store_true", help="skip the eager/graph comparison")
    parser.add_argument("--skip-throughput", action="store_true", help="skip the throughput runs")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    if not args.skip_equivalence:
        results["equivalence"] = equivalence(args.data, out)
    if not args.skip_throughput:
        results["throughput"] = throughput(args.data, out, args.layers, args.micro_batch, args.accum, args.steps)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if "equivalence" in results:
        eq = results["equivalence"]
        print("step | |d loss/lm| | |d loss/mi| | |d grad_norm| | |d expert metrics|")
        for row in eq["per_step_abs_diff"]:
            print(f"{row['step']} | {row['loss/lm']:.3g} | {row['loss/mi']:.3g} | {row['grad_norm']:.3g} | "
                  f"{row['expert_metrics_max_diff']:.3g}")
        print(f"parameters after the run: max |diff| {eq['param_max_abs_diff']:.3g}, "
              f"bitwise equal: {eq['params_bitwise_equal']}")
    for name, r in results.get("throughput", {}).items():
        print(f"{name}: {r['tokens_per_s']:.0f} tokens/s, MFU {100 * r['mfu']:.1f}%, "
              f"peak {r['max_allocated_gib']:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
