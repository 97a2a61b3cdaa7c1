"""launch/multigpu_runs.py run end to end over gloo: every parallel layout that
fits 2 processes gives the one-process LM losses, and the throughput phase reports per-process
tokens/s, scaling against one process and the all-to-all share."""

import json
import subprocess
import sys
from pathlib import Path

from data_prep import prepare_text_files, stdlib_sources

ROOT = Path(__file__).resolve().parents[2]


def test_layouts_match_one_process_and_throughput_is_reported(tmp_path):
    prepare_text_files(stdlib_sources(1_000_000), tmp_path / "stdlib")
    cmd = [sys.executable, str(ROOT / "launch" / "multigpu_runs.py"), "--device", "cpu", "--nproc", "2",
           "--preset", "tiny", "--n-layer", "0", "--seq", "32", "--steps", "3", "--micro-batch", "2",
           "--tolerance", "1e-5", "--throughput-presets", "tiny", "--throughput-steps", "6", "--accumulation", "1",
           "--data", str(tmp_path / "stdlib"), "--out", str(tmp_path / "out")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    layouts = {r["layout"]: r for r in results["equivalence"]}
    assert set(layouts) == {"n2_tp1_ep1_dp2_zero1", "n2_tp1_ep2_dp2_zero1", "n2_tp2_ep1_dp1_zero1"}
    for row in layouts.values():
        assert row["ok"] and row["steps"] == 3 and row["max_rel_diff"] < 1e-5, row
    rows = results["throughput"]
    assert [(r["gpus"], r["zero"]) for r in rows] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    for r in rows:
        assert r["tokens_per_s_per_gpu"] > 0 and r["peak_memory_gib"] > 0
        if r["gpus"] == 2:
            assert 0 < r["all_to_all_share"] < 1
    assert results["all_to_all"]["world"] == 2 and results["all_to_all"]["median_ms"] > 0
    assert "| layout | steps | max_rel_diff | ok |" in run.stdout
