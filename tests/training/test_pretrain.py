"""pretrain.py end to end on CPU: preemption, kills, exact resume, non-finite steps.

Two ranks (data-parallel 2, expert-parallel 2, ZeRO-2, 2 accumulation steps, validation every 4
steps) on real text whose Transformer-XL streams restart every 2.5 steps, launched three ways:
plain processes with RANK/WORLD_SIZE, torchrun and the deepspeed launcher. The uninterrupted
torchrun run is the reference: a run preempted by SIGUSR1 (sent to one rank only) and resumed
through the deepspeed launcher, and a run SIGKILLed while it saves every step and then resumed,
must log exactly (==) the same losses, gradient norms, learning rates and validation losses.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path

import torch

from molm_megatron.config import model_preset
from molm_megatron.model import MoLM
from tests.training.procs import run, start, wait

COMPARED = ("loss/lm", "loss/mi", "grad_norm", "lr", "valid/loss", "train/skipped_steps")


def common(data: str) -> list[str]:
    return ["pretrain.py", "--config", "launch/configs/tiny_cpu.yaml", "--data.prefixes", data, "--data.split", "80,20,0",
            "--parallel.expert_parallel_size", "2", "--train.micro_batch_size", "2", "--train.global_batch_tokens", "512",
            "--schedule.warmup_steps", "3", "--schedule.decay_steps", "40", "--train.eval_interval", "4",
            "--train.eval_steps", "2", "--metrics.log_interval", "1", "--metrics.tensorboard", "false",
            "--checkpoint.dir", "", "--checkpoint.interval", "1000"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_plain(args: list[str], logs: Path, world: int = 2) -> list:
    """`world` plain `python pretrain.py` processes with the launcher variables set by hand."""
    port = str(free_port())
    return [start([sys.executable, *args], logs / f"rank{r}.log", RANK=str(r), WORLD_SIZE=str(world),
                  LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port) for r in range(world)]


def rows(metrics_dir: Path) -> dict[int, dict]:
    path = metrics_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}


def wait_for_step(metrics_dir: Path, step: int, procs: list, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while max(rows(metrics_dir), default=0) < step:
        assert all(p.poll() is None for p in procs), f"a rank exited early: {[p.poll() for p in procs]}"
        assert time.monotonic() < deadline, f"no step {step} in {timeout} s"
        time.sleep(0.02)


def same(a: dict[int, dict], b: dict[int, dict], steps: range) -> None:
    for step in steps:
        got = {k: a[step].get(k) for k in COMPARED}
        want = {k: b[step].get(k) for k in COMPARED}
        assert got == want, f"step {step}: {got} != {want}"


def test_preemption_and_kill_resume_exactly(small_data, tmp_path):
    base = common(small_data)

    # 1. Preemption: SIGUSR1 to rank 1 only; the flag all-reduce stops both after a checkpoint.
    ckpt_p, out_p = tmp_path / "ckpt_p", tmp_path / "p"
    out_p.mkdir()
    procs = launch_plain(base + ["--train.steps", "200", "--checkpoint.dir", str(ckpt_p), "--metrics.dir", str(out_p)], out_p)
    wait_for_step(out_p, 3, procs)
    os.kill(procs[1].pid, signal.SIGUSR1)
    codes = [wait(p, 120) for p in procs]
    log = (out_p / "rank0.log").read_text()
    assert codes == [75, 75], log[-3000:]
    k = int(re.search(r"preempted: checkpoint saved at step (\d+)", log).group(1))
    assert (ckpt_p / "latest").read_text() == f"step_{k:08d}" and max(rows(out_p)) == k

    # 2. SIGKILL (no handler can run) at some point of a run that saves after every step.
    ckpt_k, out_k = tmp_path / "ckpt_k", tmp_path / "k"
    out_k.mkdir()
    procs = launch_plain(base + ["--train.steps", "200", "--checkpoint.dir", str(ckpt_k), "--checkpoint.interval", "1",
                                 "--checkpoint.keep_last", "2", "--metrics.dir", str(out_k)], out_k)
    wait_for_step(out_k, 4, procs)
    for p in procs:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    latest = (ckpt_k / "latest").read_text()
    assert (ckpt_k / latest / "COMPLETE").exists()
    killed_at = int(latest.split("_")[1])
    assert killed_at >= 3

    total = max(k, killed_at) + 3
    assert total <= 40  # inside the schedule's decay_steps, as the runs were configured

    # 3. The uninterrupted reference, under torchrun.
    out_u = tmp_path / "u"
    out_u.mkdir()
    code = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                *base, "--train.steps", str(total), "--metrics.dir", str(out_u)], out_u / "log.txt")
    assert code == 0, (out_u / "log.txt").read_text()[-3000:]
    reference = rows(out_u)
    assert sorted(reference) == list(range(1, total + 1))
    assert "valid/loss" in reference[4] and reference[4]["train/skipped_steps"] == 0

    # 4. Resume the preempted run under the deepspeed launcher.
    out_r = tmp_path / "r"
    out_r.mkdir()
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    code = run([deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), *base, "--train.steps", str(total),
                "--checkpoint.dir", str(ckpt_p), "--metrics.dir", str(out_r)], out_r / "log.txt")
    log = (out_r / "log.txt").read_text()
    assert code == 0, log[-3000:]
    assert f"resumed from {ckpt_p} at step {k}" in log
    same(rows(out_p), reference, range(1, k + 1))
    same(rows(out_r), reference, range(k + 1, total + 1))

    # 5. Resume the killed run (plain processes).
    out_k2 = tmp_path / "k2"
    out_k2.mkdir()
    procs = launch_plain(base + ["--train.steps", str(total), "--checkpoint.dir", str(ckpt_k), "--checkpoint.interval",
                                 "1", "--checkpoint.keep_last", "2", "--metrics.dir", str(out_k2)], out_k2)
    assert [wait(p, 180) for p in procs] == [0, 0], (out_k2 / "rank0.log").read_text()[-3000:]
    same(rows(out_k2), reference, range(killed_at + 1, total + 1))
    assert sorted(os.listdir(ckpt_k)) == ["latest", f"step_{total - 1:08d}", f"step_{total:08d}"]


def test_non_finite_steps_are_skipped_then_stop_with_a_checkpoint(small_data, tmp_path):
    # An infinite z-loss weight makes every loss and gradient non-finite.
    ckpt = tmp_path / "ckpt"
    code = run([sys.executable, *common(small_data), "--parallel.expert_parallel_size", "1", "--train.eval_interval", "0",
                "--model.z_loss_weight", "inf", "--train.max_nonfinite_steps", "2", "--train.steps", "10",
                "--checkpoint.dir", str(ckpt), "--metrics.dir", str(tmp_path)], tmp_path / "log.txt")
    log = (tmp_path / "log.txt").read_text()
    assert code == 3, log[-3000:]
    assert ("stopping: 2 consecutive steps with non-finite loss or gradients (train.max_nonfinite_steps = 2); "
            "checkpoint saved at step 2") in log
    first = rows(tmp_path)[1]
    assert first["grad_norm"] == float("inf") and first["train/skipped_steps"] == 1
    # Skipped steps leave the weights untouched: the checkpoint holds the seeded initial model.
    torch.manual_seed(1234)
    initial = MoLM(model_preset("tiny", vocab_size=50295, block_size=64, history_length=64, z_loss_weight=float("inf")))
    saved = torch.load(ckpt / "step_00000002" / "model_tp00_ep000.pt", weights_only=True)["model"]
    for key, value in initial.state_dict().items():
        assert torch.equal(saved[key], value), key
