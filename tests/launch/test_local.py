"""launch/local.sh: two CPU processes under torchrun; USR1 to the launcher's pid makes torchrun
forward it to its workers (under SLURM, srun signals every process itself, so only this test
covers torchrun's forwarding), they checkpoint and stop, and the same command resumes there."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STEPS = 30


def test_usr1_to_local_launcher_checkpoints_and_the_rerun_resumes(stdlib_data, tmp_path):
    ckpt = tmp_path / "ckpt"
    cmd = ["bash", "launch/local.sh", "-n", "2", "--config", "launch/configs/pretrain.yaml", "--model.preset", "tiny",
           "--model.vocab_size", "50295", "--train.steps", str(STEPS), "--train.global_batch_tokens", "128",
           "--train.micro_batch_size", "2", "--schedule.warmup_steps", "4", "--train.eval_interval", "0",
           "--data.prefixes", stdlib_data, "--data.split", "100,0,0", "--checkpoint.dir", str(ckpt),
           "--checkpoint.interval", "1000", "--metrics.dir", str(tmp_path / "metrics"), "--metrics.log_interval", "1",
           "--metrics.tensorboard", "false"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    log = tmp_path / "first.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while not re.search(rf"^step 3/{STEPS} ", log.read_text(), re.M):
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            proc.send_signal(signal.SIGUSR1)  # local.sh exec's torchrun: same pid
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    first = log.read_text()
    saved = re.findall(r"preempted: checkpoint saved at step (\d+)", first)
    assert len(saved) == 1, first
    step = int(saved[0])
    assert 3 <= step < STEPS
    # The launcher exits with the workers' 75, not torchrun's SignalException traceback.
    assert proc.returncode == 75, first
    assert "Traceback" not in first
    assert (ckpt / f"step_{step:08d}" / "COMPLETE").exists()

    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert re.findall(r"resumed from \S+ at step (\d+)", second.stdout) == [str(step)]
    logged = [int(s) for s in re.findall(rf"^step (\d+)/{STEPS} ", second.stdout, re.M)]
    assert logged == list(range(step + 1, STEPS + 1))
