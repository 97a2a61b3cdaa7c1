"""`python -m molm_megatron.training.benchmark` on CPU: `--profile-steps 0` trains and reports
without profiling (it used to divide by zero after training), a negative count is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_profile_steps_zero_trains_and_writes_the_result(small_data, tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "molm_megatron.training.benchmark", "--out", str(out), "--profile-steps", "0", "--",
           "--config", "launch/configs/tiny_cpu.yaml", "--data.prefixes", small_data, "--data.split", "80,20,0",
           "--train.steps", "2", "--train.micro_batch_size", "2", "--train.global_batch_tokens", "128",
           "--schedule.warmup_steps", "1", "--schedule.decay_steps", "2", "--train.eval_interval", "1000",
           "--checkpoint.dir", "", "--metrics.dir", str(tmp_path / "metrics"), "--metrics.tensorboard", "false"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "profiling skipped (--profile-steps 0)" in proc.stdout
    result = json.loads((out / "breakdown.json").read_text())
    assert result["exit_code"] == 0 and result["job"]["train"]["steps"] == 2
    assert "share" not in result and not (out / "kernels.txt").exists()

    bad = subprocess.run(cmd[:6] + ["-1"] + cmd[7:], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--profile-steps must be >= 0, got -1" in bad.stderr


def test_finetune_benchmark_reports_the_trainable_share_and_throughput(small_data, tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "molm_megatron.training.benchmark", "--out", str(out), "--finetune", "--",
           "--config", "launch/configs/finetune_continual.yaml", "--finetune.init_from", "preset:demo",
           "--finetune.insert_mlp_experts", "2", "--data.prefixes", small_data, "--data.weights", "1",
           "--data.split", "80,20,0", "--train.steps", "1", "--train.micro_batch_size", "2",
           "--train.global_batch_tokens", "128", "--train.eval_interval", "0", "--checkpoint.dir", "",
           "--metrics.dir", str(tmp_path / "metrics"), "--metrics.tensorboard", "false"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "breakdown.json").read_text())
    # demo: 4 layers, 2 new MLP experts of 2 x 128 x 256 weights each plus their router rows (gating 32).
    assert result["trainable_params"] == 4 * 2 * (2 * 128 * 256 + 32)
    assert result["trainable_share"] == result["trainable_params"] / result["total_params"]
    assert result["tokens_per_s"] > 0 and "tokens/s" in proc.stdout
