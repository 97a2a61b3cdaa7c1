"""Run every experiment at one scale, each in its own process with its own time budget; a failure in
one does not stop the others. Then write the result tables (python -m experiments.report).

    python -m experiments.run_all --scale gpu --data build/experiments_data --out OUT [--budget-s 480]
    bash experiments/run_all.sh gpu build/experiments_data OUT          # the same

Lanes (experiments.common.Scale.parallel_lanes: at once on a GPU, one after the other on a CPU):
attention then modularity (which reuses attention's checkpoints), continual, pruning, emoe. Each gets
its share of the budget; a command still running at its experiment's deadline is stopped (the
trainers save a checkpoint first) and the results say so. `--archive FILE` packs everything but
the weights into one .tar.gz (results, plots, logs, metrics).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

from experiments.common import REPO, SCALES, product_env

# Experiments in lanes; a lane runs its experiments in order. Budget shares of the whole run.
LANES = (("attention", "modularity"), ("continual",), ("pruning",), ("emoe",))
BUDGET_SHARE = {"attention": 0.75, "modularity": 0.25, "continual": 1.0, "pruning": 1.0, "emoe": 1.0}
WEIGHT_SUFFIXES = (".pt", ".safetensors", ".bin", ".idx")


def run_experiment(name: str, args: argparse.Namespace, budget_s: float, results: dict) -> None:
    out = args.out / name
    cmd = [sys.executable, "-m", f"experiments.{name}", "--data", str(args.data), "--out", str(out), "--scale",
           args.scale, "--budget-s", f"{budget_s:.0f}"]
    if name == "modularity":
        cmd += ["--models-from", str(args.out / "attention")]
    start = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    print(f"[run_all] {name}: budget {budget_s:.0f}s", flush=True)
    with open(out / "experiment.log", "w") as log:
        rc = subprocess.call(cmd, cwd=REPO, env=product_env(), stdout=log, stderr=subprocess.STDOUT)
    results[name] = {"rc": rc, "seconds": round(time.monotonic() - start, 1), "budget_s": round(budget_s)}
    print(f"[run_all] {name}: exit {rc} after {results[name]['seconds']:.0f}s", flush=True)


def run_lane(lane: tuple[str, ...], args: argparse.Namespace, deadline: float, results: dict) -> None:
    for name in lane:
        if args.only and name not in args.only:
            continue
        left = deadline - time.monotonic()
        # The last experiment of a lane gets whatever the lane has left.
        share = BUDGET_SHARE[name] if name != lane[-1] else 1.0
        run_experiment(name, args, max(0.0, share * left), results)


def archive(out: Path, path: Path) -> None:
    """Everything under `out` but weights, checkpoints and datasets, as one .tar.gz."""
    def keep(info: tarfile.TarInfo):
        parts = Path(info.name).parts
        if "checkpoints" in parts or info.name.endswith(WEIGHT_SUFFIXES):
            return None
        return info

    with tarfile.open(path, "w:gz") as tar:
        tar.add(out, arcname=out.name, filter=keep)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.run_all", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), required=True)
    p.add_argument("--data", required=True, type=Path, help="folder written by python -m experiments.data")
    p.add_argument("--out", required=True, type=Path, help="output folder (one subfolder per experiment)")
    p.add_argument("--budget-s", type=float, default=None, help="wall-clock seconds for all experiments "
                   "(default: the scale's)")
    p.add_argument("--only", nargs="+", choices=[n for lane in LANES for n in lane], default=None,
                   help="run only these experiments")
    p.add_argument("--archive", type=Path, default=None, help="also pack the results (no weights) into this .tar.gz")
    args = p.parse_args(argv)
    scale = SCALES[args.scale]
    budget = scale.budget_s if args.budget_s is None else args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.data / "manifest.json", args.out / "data.json")  # the report's data table
    start = time.monotonic()
    deadline = start + budget
    results: dict = {}
    if scale.parallel_lanes:
        threads = [threading.Thread(target=run_lane, args=(lane, args, deadline, results)) for lane in LANES]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        # One lane after the other, each with an equal share of what is left.
        for i, lane in enumerate(LANES):
            run_lane(lane, args, time.monotonic() + (deadline - time.monotonic()) / (len(LANES) - i), results)
    report = subprocess.call([sys.executable, "-m", "experiments.report", "--out", str(args.out)], cwd=REPO,
                             env=product_env())
    summary = {"scale": args.scale, "budget_s": budget, "seconds": round(time.monotonic() - start, 1),
               "experiments": results, "report_rc": report}
    (args.out / "run_all.json").write_text(json.dumps(summary, indent=1) + "\n")
    if args.archive:
        archive(args.out, args.archive)
        print(f"[run_all] packed {args.archive}")
    failed = [n for n, r in results.items() if r["rc"] != 0]
    print(f"[run_all] done in {summary['seconds']:.0f}s; " + (f"failed: {', '.join(failed)}" if failed else "all ok"))
    return 1 if failed or report else 0


if __name__ == "__main__":
    sys.exit(main())
