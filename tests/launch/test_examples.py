"""The commands README.md and `launch/local.sh --help` show run as written: every one that starts
pretrain.py has settings that parse and validate, and the CPU ones train (2 steps with 1 warmup
step on the test data, outputs in a temporary folder: flags given later override the example's).
A bad setting under torchrun reaches the user as pretrain.py's one-line error with exit code 2,
not a traceback."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path


from molm_megatron.cli import parse_job_config

REPO = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    """Command lines of README's bash blocks that run pretrain.py (continuations joined)."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if "pretrain.py" in line and not line.lstrip().startswith("#"):
                commands.append(line.strip())
    return commands


def help_commands() -> list[str]:
    out = subprocess.run(["bash", "launch/local.sh", "--help"], cwd=REPO, capture_output=True, text=True, check=True)
    return [line.strip() for line in out.stdout.splitlines() if line.strip().startswith("bash launch/local.sh")]


def pretrain_args(command: str) -> list[str]:
    """The arguments that reach pretrain.py (after it, or after local.sh's own options)."""
    words = shlex.split(command)
    if "pretrain.py" in words:
        return words[words.index("pretrain.py") + 1:]
    words = words[words.index("launch/local.sh") + 1:]
    while words and words[0] in ("-n", "-l"):
        words = words[2:]
    return words


def test_every_example_parses_and_the_cpu_ones_train(stdlib_data, tmp_path):
    commands = readme_commands() + help_commands()
    assert len(commands) >= 4, commands
    for command in commands:
        parse_job_config(pretrain_args(command))  # raises with the field's message on a broken example
    cpu = [c for c in commands if "--nproc_per_node 8" not in c and "-n 8" not in c]
    assert [c.split()[0] for c in cpu] == [".venv/bin/python", "bash"], cpu
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for i, command in enumerate(cpu):
        out = tmp_path / str(i)
        extra = ["--data.prefixes", stdlib_data, "--train.steps", "2", "--schedule.warmup_steps", "1",
                 "--checkpoint.dir", str(out / "ckpt"),
                 "--metrics.dir", str(out), "--metrics.log_interval", "1"]
        run = subprocess.run(shlex.split(command) + extra, cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, command + "\n" + run.stdout[-2000:] + run.stderr[-2000:]
        assert "step 2/2 " in run.stdout and (out / "ckpt" / "step_00000002" / "COMPLETE").exists(), command


def test_a_bad_setting_under_torchrun_is_one_line_and_exit_2():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    run = subprocess.run(["bash", "launch/local.sh", "-n", "2", "--config", "launch/configs/pretrain.yaml",
                          "--train.steps", "50"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    message = "pretrain.py: error: schedule.decay_steps (50, 0 = train.steps) is shorter than schedule.warmup_steps (954)"
    assert run.returncode == 2, run.stderr[-3000:]
    # Each rank that gets to say it says it (torchrun stops the others once one has exited).
    assert message in run.stderr and "Traceback" not in run.stderr, run.stderr[-3000:]
