"""Launching training processes from tests: own process group, killed whole on timeout, so a hung
collective cannot leave orphaned ranks behind."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def launch_env(**extra: str) -> dict[str, str]:
    """The environment of a launched rank: repo on the path, one thread per rank (2 CPU cores)."""
    # The repository and its kernels/ folder first, so a worktree tests its own packages.
    path = os.pathsep.join([str(ROOT), str(ROOT / "kernels")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", **extra}


def start(cmd: list[str], log: Path, **extra_env: str) -> subprocess.Popen:
    """Start `cmd` in a new session writing stdout+stderr to `log`."""
    out = open(log, "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=launch_env(**extra_env), stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait(proc: subprocess.Popen, timeout: float) -> int:
    """Exit code of `proc`; on timeout its whole process group is killed and TimeoutError raised."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise TimeoutError(f"{proc.args} did not finish in {timeout} s") from None


def run(cmd: list[str], log: Path, timeout: float = 300, **extra_env: str) -> int:
    return wait(start(cmd, log, **extra_env), timeout)
