"""GPU check: training with `train.cuda_graph` equals training eagerly.

    python -m benchmarks.train_graph_check --out DIR [-- extra pretrain.py flags]

Runs pretrain.py twice on the same data and seed, eager and with every micro-batch replayed as a
CUDA graph (logging steps and the others are separate graphs: both kinds run), and compares per
logged step the LM loss, MI loss, gradient norm and learning rate, and the weights of the final
checkpoint. Prints whether they are bitwise equal and the largest relative differences; exits 1
when a difference exceeds bf16 rounding (1e-3 relative on losses and norms, 1e-2 on a weight).
Default shape: molm-350m-4b cut to 2 layers, micro-batch 8 x 512 with 512 memory tokens,
4 accumulation steps, bf16 with ZeRO-1, 4 steps.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from molm_megatron.training.checkpoint import read_model_shards

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ["--model.preset", "molm-350m-4b", "--model.n_layer", "2", "--data.prefixes", "build/bench_data/stdlib",
           "--data.split", "100,0,0", "--train.micro_batch_size", "8", "--train.global_batch_tokens", "16384",
           "--train.steps", "4", "--train.eval_interval", "0", "--schedule.warmup_steps", "1",
           "--parallel.zero_stage", "1", "--train.precision", "bf16", "--metrics.log_interval", "2",
           "--metrics.tensorboard", "false", "--checkpoint.interval", "1000"]
COMPARED = ("loss/lm", "loss/mi", "grad_norm", "lr")


def train(out: Path, flags: list[str]) -> tuple[dict[int, dict], dict[str, torch.Tensor]]:
    out.mkdir(parents=True)
    cmd = [sys.executable, "pretrain.py", *flags, "--metrics.dir", str(out), "--checkpoint.dir", str(out / "ckpt")]
    with open(out / "log.txt", "w") as log:
        code = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    if code:
        raise SystemExit(f"{' '.join(cmd)} exited {code}; see {out / 'log.txt'}")
    rows = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    (_, state), = read_model_shards(out / "ckpt")  # one process: one model file, the newest checkpoint's
    return rows, state["model"]


def rel(a: float | torch.Tensor, b: float | torch.Tensor) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_graph_check", description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s --out DIR [-- pretrain.py flags ...]")
    parser.add_argument("--out", required=True, help="folder for both runs and result.json (must not exist)")
    args, rest = parser.parse_known_args(argv)
    flags = DEFAULT + [a for a in rest if a != "--"]
    out = Path(args.out)
    eager_rows, eager_w = train(out / "eager", flags)
    graph_rows, graph_w = train(out / "graph", flags + ["--train.cuda_graph", "true"])
    if sorted(eager_rows) != sorted(graph_rows):
        raise SystemExit(f"logged steps differ: {sorted(eager_rows)} vs {sorted(graph_rows)}")
    worst = {key: max(rel(graph_rows[s][key], eager_rows[s][key]) for s in eager_rows) for key in COMPARED}
    worst["weights"] = max(rel(graph_w[k].float(), eager_w[k].float()) for k in eager_w)
    bitwise = all(graph_rows[s][k] == eager_rows[s][k] for s in eager_rows for k in COMPARED) and \
        all(torch.equal(graph_w[k], eager_w[k]) for k in eager_w)
    ok = all(v <= 1e-3 for k, v in worst.items() if k != "weights") and worst["weights"] <= 1e-2
    result = {"bitwise_equal": bitwise, "max_relative_difference": worst, "ok": ok, "steps": sorted(eager_rows),
              "eager": eager_rows, "graph": graph_rows}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(f"graph vs eager over steps {sorted(eager_rows)}: bitwise equal {bitwise}; largest relative difference "
          + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()) + ("" if ok else "  FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
