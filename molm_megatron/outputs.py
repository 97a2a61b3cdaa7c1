"""Writing a command's output folder or file without ever destroying what the command did not write.

Every command that writes a folder (a Hugging Face export, a tokenizer folder) or a single file
(a consolidated model file) goes through `write_folder` / `write_file`:

- The output is written under a fresh hidden name beside its final place and renamed into place
  once complete, so the final name holds either the old output or the complete new one.
- An existing output is replaced only with `overwrite=True`, and only if it looks like an earlier
  output of the same command: a folder must hold nothing but files that command writes (an export
  folder that someone put a checkpoint into is refused). An empty folder counts as absent.
- A path the command reads from (`protect`) is never replaced, nor is any folder that contains one
  (`to-hf --checkpoint R/ckpt --out R` would otherwise delete the checkpoint it converts).
- The old output stays where it is until the new one is complete; it is moved aside, the new one
  renamed in, and only then is the old one deleted.
- New folders and files get the permissions a plain `mkdir` / `open` gives (the umask), not the
  0700 of `tempfile.mkdtemp`, so colleagues on a shared file system can read them.
"""

from __future__ import annotations

import fnmatch
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterable, Sequence


def _sibling(path: Path, tag: str) -> Path:
    """A fresh hidden name beside `path` (never an existing one)."""
    while True:
        candidate = path.with_name(f".{path.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}")
        if not os.path.lexists(candidate):
            return candidate


def _check_not_protected(out: Path, protect: Iterable[str | Path], what: str) -> None:
    target = out.resolve()
    for source in protect:
        source = Path(source).resolve()
        if source == target or target in source.parents:
            raise ValueError(f"{out}: refusing to write the {what} there: it holds {source}, which this "
                             "command reads; choose another output path")


def check_folder_target(out_dir: str | Path, what: str, owned_files: Sequence[str], overwrite: bool,
                        protect: Iterable[str | Path] = ()) -> None:
    """Raise ValueError unless `out_dir` may receive a new `what` folder (see the module docstring).

    owned_files: glob patterns of the files this kind of folder holds; an existing folder with
    anything else in it (any other file, any subfolder) is never replaced.
    """
    out_dir = Path(out_dir)
    _check_not_protected(out_dir, protect, what)
    if not os.path.lexists(out_dir):
        return
    if out_dir.is_symlink() or not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a folder; refusing to replace it with the {what}")
    entries = sorted(os.listdir(out_dir))
    if not entries:
        return
    foreign = [name for name in entries
               if not (out_dir / name).is_file() or not any(fnmatch.fnmatch(name, p) for p in owned_files)]
    if foreign:
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(f"{out_dir} exists and is not a {what} (it holds {listed}); refusing to replace it, "
                         "even with --overwrite: choose a new or empty output folder")
    if not overwrite:
        raise ValueError(f"{out_dir} already holds a {what}; pass --overwrite to replace it")


def write_folder(out_dir: str | Path, write: Callable[[Path], None], what: str, owned_files: Sequence[str],
                 overwrite: bool = False, protect: Iterable[str | Path] = ()) -> Path:
    """Create the folder `out_dir` by calling `write(tmp)` on an empty temporary folder beside it.

    The checks of `check_folder_target` come first; a failing `write` leaves `out_dir` untouched.
    """
    out_dir = Path(out_dir)
    protect = list(protect)
    check_folder_target(out_dir, what, owned_files, overwrite, protect)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out_dir, "tmp")
    os.mkdir(tmp)  # mode 0777 minus the umask, like any mkdir
    try:
        write(tmp)
        _plain_permissions(tmp)
        # Check again: the folder may have changed while the output was being written.
        check_folder_target(out_dir, what, owned_files, overwrite, protect)
        _move_into_place(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)  # our own temporary folder, never anything else
    return out_dir


def _umask() -> int:
    # The only portable way to read the umask is to set it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _plain_permissions(folder: Path) -> None:
    """Give everything in `folder` the mode a plain mkdir / open would: writers such as
    transformers' safetensors saving go through mkstemp (0600) and a rename."""
    mask = _umask()
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    if not os.path.lexists(out_dir):
        os.rename(tmp, out_dir)
        return
    if not any(out_dir.iterdir()):
        os.rename(tmp, out_dir)  # POSIX: a folder may be renamed over an empty one
        return
    # A folder cannot be renamed over a non-empty one: move the old one aside first. Between the
    # two renames the final name is briefly absent; a crash there leaves the old output under
    # the hidden `.old-` name, never lost.
    old = _sibling(out_dir, "old")
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old)


def check_file_target(path: str | Path, what: str, overwrite: bool, protect: Iterable[str | Path] = ()) -> None:
    """Raise ValueError unless `path` may receive a new `what` file (see write_file)."""
    path = Path(path)
    _check_not_protected(path, protect, what)
    if os.path.lexists(path):
        if path.is_dir():
            raise ValueError(f"{path} is a folder; refusing to replace it with the {what}")
        if not overwrite:
            raise ValueError(f"{path} already exists; pass --overwrite to replace it with the {what}")


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Create or replace the file `path` by calling `write(tmp)` on a fresh name beside it, then
    renaming: readers see the old file or the complete new one, and a failed write leaves no
    temporary behind. No overwrite policy: for a command's own bookkeeping files (results,
    caches); a user-named output goes through `write_file`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_file(path: str | Path, write: Callable[[Path], None], what: str, overwrite: bool = False,
               protect: Iterable[str | Path] = ()) -> Path:
    """Create the file `path` by calling `write(tmp)` with a temporary name beside it, then rename.

    An existing file is replaced only with `overwrite=True`, never a folder and never a file the
    command reads (`protect`).
    """
    check_file_target(path, what, overwrite, protect)
    return atomic_write(path, write)
