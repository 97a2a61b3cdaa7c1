"""Multi-GPU runs: parallel layouts against one device, then throughput per GPU.

Phase `equivalence`: the same data, weights and global batch under every layout that fits the
process count (DP, EP = 2/4/8, TP = 2, EP x DP, TP x EP) must give the first steps' LM losses of a
one-process run. The one-process run takes the whole global batch as one micro-batch: the stream
loader gives data-parallel rank r rows [r*m, (r+1)*m) of the wider batch, so the rows are the same.
The load-balancing loss is switched off there, since each rank computes it over its own rows.

Phase `throughput`: tokens/s per process, MFU and peak memory of `pretrain.py` at 1, 2, 4, ...
processes for the given presets (EP = processes, ZeRO-1 and ZeRO-2), and the measured time of one
expert-parallel all-to-all of a layer's dispatch volume, from which the all-to-all share of a step
is estimated.

Everything runs through the real entry point (`torchrun ... pretrain.py`). On a CPU machine the
same script runs over gloo (`--device cpu`), which is how the test suite checks it.

    python launch/multigpu_runs.py --data data/stdlib --out runs/multigpu            # all GPUs here
    python launch/multigpu_runs.py --device cpu --nproc 2 --preset tiny --phases equivalence ...
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Layout:
    nproc: int
    tp: int = 1
    ep: int = 1
    zero: int = 1

    @property
    def name(self) -> str:
        dp = self.nproc // self.tp
        return f"n{self.nproc}_tp{self.tp}_ep{self.ep}_dp{dp}_zero{self.zero}"


def equivalence_layouts(nproc: int) -> list[Layout]:
    """Every layout of the multi-GPU programme (README) that fits `nproc` processes (powers of two up to 8)."""
    out = [Layout(nproc)]
    ep = 2
    while ep <= nproc:
        out.append(Layout(nproc, ep=ep))
        ep *= 2
    if nproc >= 2:
        out.append(Layout(nproc, tp=2))
    if nproc >= 4:
        out.append(Layout(nproc, tp=2, ep=2, zero=2))
        out.append(Layout(nproc, ep=2, zero=2))  # EP 2 x expert-data-parallel nproc/2
    return out


def run_pretrain(layout: Layout, args: argparse.Namespace, out: Path, extra: list[str]) -> list[dict]:
    """Run pretrain.py under torchrun (plain python for one process); return its metrics lines."""
    out.mkdir(parents=True, exist_ok=True)
    flags = ["--parallel.tensor_parallel_size", str(layout.tp), "--parallel.expert_parallel_size", str(layout.ep),
             "--parallel.zero_stage", str(layout.zero), "--train.device", args.device,
             "--metrics.dir", str(out), "--metrics.tensorboard", "false", "--checkpoint.dir", "",
             "--data.prefixes", *args.data, *extra]
    if layout.nproc == 1:
        cmd = [sys.executable, str(ROOT / "pretrain.py"), *flags]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={layout.nproc}",
               str(ROOT / "pretrain.py"), *flags]
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    started = time.time()
    with open(out / "log.txt", "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    print(f"  {layout.name}: exit {rc} in {time.time() - started:.0f}s (log {out / 'log.txt'})", flush=True)
    if rc != 0:
        raise RuntimeError(f"{layout.name} failed with exit code {rc}; see {out / 'log.txt'}")
    metrics = out / "metrics.jsonl"
    return [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []


def lm_losses(lines: list[dict]) -> dict[int, float]:
    return {d["step"]: d["loss/lm"] for d in lines if "loss/lm" in d}


def model_flags(preset: str, args: argparse.Namespace) -> list[str]:
    # The data is in the CodeGen vocabulary whatever the preset (the tiny test preset has 512 ids).
    flags = ["--model.preset", preset, "--model.vocab_size", "50295", "--model.block_size", str(args.seq),
             "--model.history_length", str(args.seq)]
    if args.n_layer:
        flags += ["--model.n_layer", str(args.n_layer)]
    return flags


def equivalence(args: argparse.Namespace) -> list[dict]:
    """LM losses of the first steps under each layout vs one process; returns result rows."""
    micro = args.micro_batch
    global_tokens = args.nproc * micro * args.seq
    common = model_flags(args.preset, args) + ["--model.aux_loss_weight", "0", "--train.steps", str(args.steps),
                                  "--schedule.warmup_steps", "1",
                                  "--train.global_batch_tokens", str(global_tokens), "--metrics.log_interval", "1",
                                  "--train.eval_interval", "0", "--data.split", "100,0,0"]
    # One process: the whole global batch as one micro-batch (same rows as the data-parallel ranks).
    ref = lm_losses(run_pretrain(Layout(1), args, args.out / "equivalence" / "single",
                                 common + ["--train.micro_batch_size", str(args.nproc * micro)]))
    rows = []
    for layout in equivalence_layouts(args.nproc):
        dp = layout.nproc // layout.tp
        got = lm_losses(run_pretrain(layout, args, args.out / "equivalence" / layout.name,
                                     common + ["--train.micro_batch_size", str(args.nproc * micro // dp)]))
        worst = max(abs(got[s] - ref[s]) / abs(ref[s]) for s in ref)
        rows.append({"layout": layout.name, "steps": len(ref), "max_rel_diff": worst,
                     "ok": worst <= args.tolerance and set(got) == set(ref)})
    return rows


def throughput(args: argparse.Namespace) -> list[dict]:
    """tokens/s per process, MFU and memory at 1, 2, 4, ... processes, EP = processes."""
    rows = []
    for preset in args.throughput_presets:
        n = 1
        while n <= args.nproc:
            for zero in (1, 2):
                layout = Layout(n, ep=n, zero=zero)
                flags = model_flags(preset, args) + [
                    "--train.steps", str(args.throughput_steps), "--schedule.warmup_steps", "5",
                    "--train.micro_batch_size", str(args.micro_batch),
                    "--train.global_batch_tokens", str(n * args.micro_batch * args.seq * args.accumulation),
                    "--metrics.log_interval", "5", "--train.eval_interval", "0", "--data.split", "100,0,0"]
                lines = run_pretrain(layout, args, args.out / "throughput" / f"{preset}_{layout.name}", flags)
                last = [d for d in lines if "throughput/tokens_per_s" in d][-1]
                rows.append({"preset": preset, "layout": layout.name, "gpus": n, "zero": zero,
                             "tokens_per_s_per_gpu": last["throughput/tokens_per_s"] / n,
                             "mfu": last.get("mfu"),
                             # GPU: peak allocated by torch; CPU: the process's peak resident memory.
                             "peak_memory_gib": last.get("memory/max_allocated_gib", last.get("memory/max_rss_gib"))})
            n *= 2
    for row in rows:  # scaling efficiency against the one-process run of the same preset and stage
        base = next(r for r in rows if (r["preset"], r["zero"], r["gpus"]) == (row["preset"], row["zero"], 1))
        row["kept_vs_1gpu"] = row["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"]
    return rows


def all_to_all_time(args: argparse.Namespace) -> dict:
    """Measured time of one all-to-all of a layer's dispatch volume at EP = nproc."""
    out = args.out / "all_to_all"
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           __file__, "--worker-all-to-all", "--device", args.device, "--micro-batch", str(args.micro_batch),
           "--seq", str(args.seq), "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, env=dict(os.environ, NCCL_NVLS_ENABLE="0"))
    return json.loads((out / "all_to_all.json").read_text())


def _all_to_all_worker(args: argparse.Namespace) -> None:
    """One rank: all_to_all_single of micro_batch x seq tokens x k=2 rows of d=1024 (bf16 on GPU)."""
    import torch
    import torch.distributed as dist
    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    rows = args.micro_batch * args.seq * 2
    x = torch.randn(rows, 1024, device=device, dtype=torch.bfloat16 if cuda else torch.float32)
    y = torch.empty_like(x)
    for _ in range(3):
        dist.all_to_all_single(y, x)
    times = []
    for _ in range(20):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        dist.all_to_all_single(y, x)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if rank == 0:
        times.sort()
        (Path(args.out) / "all_to_all.json").write_text(json.dumps(
            {"world": world, "rows": rows, "bytes_per_rank": x.numel() * x.element_size(),
             "median_ms": 1000 * times[len(times) // 2]}))
    dist.destroy_process_group()


def table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
                     + ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", default=["data/stdlib"], help="data_prep prefixes (default data/stdlib)")
    parser.add_argument("--out", type=Path, default=Path("runs/multigpu"), help="logs, metrics and results.json")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cuda (NCCL) or cpu (gloo)")
    parser.add_argument("--nproc", type=int, default=0, help="processes (default: the GPUs here)")
    parser.add_argument("--phases", nargs="+", default=["equivalence", "throughput"],
                        choices=("equivalence", "throughput"), help="what to run")
    parser.add_argument("--preset", default="molm-350m-4b", help="model preset of the equivalence phase")
    parser.add_argument("--n-layer", type=int, default=4, help="layers (fewer than the preset's so it fits; 0 = "
                        "the preset's)")
    parser.add_argument("--seq", type=int, default=512, help="segment length (and memory length)")
    parser.add_argument("--steps", type=int, default=5, help="steps compared in the equivalence phase")
    parser.add_argument("--micro-batch", type=int, default=4, help="micro-batch per data-parallel rank")
    parser.add_argument("--tolerance", type=float, default=2e-2,
                        help="max relative LM-loss difference (bf16 default; use 1e-5 for fp32 on CPU)")
    parser.add_argument("--throughput-presets", nargs="+", default=["molm-350m-4b", "molm-700m-8b"])
    parser.add_argument("--throughput-steps", type=int, default=30)
    parser.add_argument("--accumulation", type=int, default=4, help="micro-batches per step in throughput runs")
    parser.add_argument("--worker-all-to-all", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker_all_to_all:
        _all_to_all_worker(args)
        return 0
    if not args.nproc:
        import torch
        args.nproc = torch.cuda.device_count() if args.device == "cuda" else 2
    if args.nproc < 2 or args.nproc & (args.nproc - 1):
        parser.error(f"--nproc ({args.nproc}) must be a power of two >= 2")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"nproc": args.nproc, "device": args.device}
    ok = True
    if "equivalence" in args.phases:
        print(f"equivalence: {args.preset}, {args.nproc} processes", flush=True)
        results["equivalence"] = equivalence(args)
        ok = all(r["ok"] for r in results["equivalence"])
    if "throughput" in args.phases:
        print(f"throughput: {', '.join(args.throughput_presets)} at 1..{args.nproc} processes", flush=True)
        results["throughput"] = throughput(args)
        a2a = results["all_to_all"] = all_to_all_time(args)
        for row in results["throughput"]:
            if row["gpus"] == args.nproc:
                # Per step: dispatch and combine, forward and backward, in every MoE layer of every
                # micro-batch; the step time follows from the measured tokens/s.
                step_s = args.micro_batch * args.seq * args.accumulation / row["tokens_per_s_per_gpu"]
                layers = args.n_layer or (48 if "8b" in row["preset"] else 24)
                row["all_to_all_share"] = 4 * layers * args.accumulation * a2a["median_ms"] / 1000 / step_s
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    for name in ("equivalence", "throughput"):
        if name in results:
            print(f"\n{name}\n{table(results[name])}")
    if "all_to_all" in results:
        print(f"\nall_to_all: {results['all_to_all']}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
