"""A real SLURM cluster on loopback for the launch tests (Debian's slurm 22.05 and munge).

Owns installing the packages when they are missing (CI runs as root on a fresh machine), writing
a slurm.conf, starting munged, slurmctld and one or more slurmd in the foreground as children of
the test process (so every daemon is stopped by pid, never by name), and tearing it all down.

Two shapes, as the launch tests need them:
- single node: one plain `slurmd` whose node is this host (`hostname -s`), the way a real
  compute node registers;
- fake multi-node: several `slurmd -N name` on this host, each on its own port. Their node names
  do not resolve, so jobs on it must be given MASTER_ADDR=127.0.0.1.

Everything (munge key and socket, state, spool, logs) lives in one temporary folder; the cluster
talks to its own munged through `AuthInfo=socket=...`, so a munged or slurm already running on
the machine is neither used nor disturbed.
"""

from __future__ import annotations

import os
import pwd
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
# Job states after which a job never runs again (a requeued job passes through REQUEUED/PENDING).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sinfo", "scancel")


def _which(name: str) -> str | None:
    # The daemons live in /usr/sbin, which a non-login PATH may leave out.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")


def ensure_installed() -> str | None:
    """Install slurm and munge with apt when missing. Returns a skip reason, or None when ready.

    Only a machine without apt (or without root to run it) is a reason to skip; an apt that is
    there but fails raises, since CI must never silently lose these tests.
    """
    if all(_which(b) for b in BINARIES):
        return None
    if not shutil.which("apt-get"):
        return f"SLURM is not installed and apt-get is unavailable to install {' '.join(PACKAGES)}"
    if os.geteuid() != 0:
        return f"SLURM is not installed and installing {' '.join(PACKAGES)} with apt-get needs root"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *PACKAGES]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    missing = [b for b in BINARIES if not _which(b)]
    if missing:
        raise RuntimeError(f"apt-get installed {PACKAGES} but these are still missing: {missing}")
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """One SLURM cluster on this host. `nodes=None`: a single node named after the host.

    Use as a context manager, or call `start()` then `stop()` (stop is safe to call twice and
    after a failed start).
    """

    def __init__(self, nodes: list[str] | None = None, cpus_per_node: int = 2) -> None:
        self.host = socket.gethostname().split(".")[0]
        self.multi = nodes is not None
        self.nodes = list(nodes) if nodes else [self.host]
        self.cpus_per_node = cpus_per_node
        # Not pytest's tmp_path: that sits under a 0700 folder the munge user cannot traverse.
        self.root = Path(tempfile.mkdtemp(prefix="molm-slurm-"))
        self.root.chmod(0o755)
        self.conf = self.root / "slurm.conf"
        self.user = pwd.getpwuid(os.geteuid()).pw_name
        self._procs: list[tuple[str, subprocess.Popen]] = []

    # ---- life cycle -----------------------------------------------------------------------
    def __enter__(self) -> SlurmCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> None:
        """Start munged, slurmctld and the slurmd(s); return once every node is idle."""
        self._start_munge()
        self._write_conf()
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        for node in self.nodes:
            (self.root / "spool" / node).mkdir(parents=True, exist_ok=True)
            name_args = ["-N", node] if self.multi else []
            self._spawn(f"slurmd-{node}", [_which("slurmd"), "-D", "-f", str(self.conf), *name_args])
        self._wait_idle(timeout)

    def stop(self) -> None:
        """Cancel every job, wait for them to leave the nodes, then stop the daemons (newest first)."""
        if any(name == "slurmctld" and p.poll() is None for name, p in self._procs):
            self.run("scancel", "--user", self.user, check=False)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and self.run("squeue", "-h", "-o", "%i", check=False).stdout.strip():
                time.sleep(0.5)
        for _, proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._procs.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    # ---- using it -------------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """The environment for client commands (sbatch, squeue, ...) that talk to this cluster."""
        env = dict(os.environ, SLURM_CONF=str(self.conf))
        env["PATH"] = env.get("PATH", "") + ":/usr/sbin"
        # Settings a surrounding SLURM job (or a developer's shell) may carry would leak into sbatch.
        for key in [k for k in env if k.startswith(("SBATCH_", "SLURM_")) and k != "SLURM_CONF"]:
            del env[key]
        return env

    def run(self, *cmd: str, check: bool = True, cwd: str | Path | None = None,
            env: dict[str, str] | None = None, timeout: float | None = 600) -> subprocess.CompletedProcess:
        """Run a client command against this cluster and capture its output."""
        done = subprocess.run(list(cmd), env={**self.env, **(env or {})}, cwd=cwd, capture_output=True,
                              text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done

    def job_state(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, StdOut, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(tok.split("=", 1) for tok in out.split() if "=" in tok)

    def wait(self, job_id: str, timeout: float) -> dict[str, str]:
        """Poll until the job has ended for good (a requeued job goes on), return `job_state`.

        Not `sbatch --wait`: that polls with a back-off growing to ~30 s, so a 12 s job returns
        after 42 s; here the answer comes within a second of the end.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state["JobState"] in FINAL_STATES:
                return state
            time.sleep(0.3)
        raise TimeoutError(f"job {job_id} still {state['JobState']} after {timeout:.0f} s\n{self.daemon_logs()}")

    def daemon_logs(self) -> str:
        """The tail of every daemon log, for assertion messages."""
        parts = []
        for log in sorted((self.root / "log").glob("*.log")):
            parts.append(f"==> {log.name} <==\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(parts)

    # ---- internals ------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str], **kwargs) -> None:
        log = (self.root / "log" / f"{name}.out").open("w")
        self._procs.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, **kwargs)))

    def _start_munge(self) -> None:
        munge = self.root / "munge"
        (self.root / "log").mkdir()
        munge.mkdir()
        # munged insists on: a socket folder everyone may traverse, a key only its user can read,
        # and (as root) running as the unprivileged `munge` user.
        munge.chmod(0o755)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        as_user = {}
        if os.geteuid() == 0:
            entry = pwd.getpwnam("munge")
            os.chown(munge, entry.pw_uid, entry.pw_gid)
            os.chown(key, entry.pw_uid, entry.pw_gid)
            as_user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        self.munge_socket = munge / "munge.socket"
        self._spawn("munged", [_which("munged"), "-F", f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--pid-file={munge / 'munged.pid'}", f"--log-file={munge / 'munged.log'}",
                               f"--seed-file={munge / 'munged.seed'}"], **as_user)
        deadline = time.monotonic() + 20
        while not self.munge_socket.exists():
            if self._procs[-1][1].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start:\n{(munge / 'munged.log').read_text(errors='replace')}")
            time.sleep(0.1)

    def _write_conf(self) -> None:
        r = self.root
        (r / "state").mkdir()
        lines = [
            "ClusterName=molmci",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmUser={self.user}",
            f"SlurmdUser={self.user}",
            # cred_expire also sets how long a requeued job waits before it may start again
            # (default 120 s); 10 s keeps the preemption test short.
            f"AuthType=auth/munge\nCredType=cred/munge\nAuthInfo=socket={self.munge_socket},cred_expire=10",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool' / '%n'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd-%n.log'}",
            # No cgroups in containers or CI: track processes by parentage, bind nothing.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            # Trust the CPU counts below even where the fake nodes share the host's cores.
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "JobRequeue=1",
            "SchedulerParameters=sched_interval=1",
            # The launcher derives its rendezvous port from the job id; a random first id keeps two
            # test sessions on one machine (each starting at job 1) off the same port.
            f"FirstJobId={random.randrange(1, 20000)}",
        ]
        if self.multi:
            for node in self.nodes:
                lines.append(f"NodeName={node} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={_free_port()} "
                             f"CPUs={self.cpus_per_node} State=UNKNOWN")
        else:
            lines.append(f"SlurmdPort={_free_port()}")
            lines.append(f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus_per_node} State=UNKNOWN")
        lines.append("PartitionName=ci Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states = ""
        while time.monotonic() < deadline:
            for name, proc in self._procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while starting\n{self.daemon_logs()}")
            done = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False)
            states = done.stdout.strip()
            rows = dict(line.split() for line in states.splitlines() if len(line.split()) == 2)
            if done.returncode == 0 and all(rows.get(n) == "idle" for n in self.nodes):
                return
            time.sleep(0.3)
        raise RuntimeError(f"nodes not idle after {timeout:.0f} s: {states!r}\n{self.daemon_logs()}")
