"""All-or-nothing output folders of the module-manipulation commands."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def check_new_folder(out: str | Path, overwrite: bool) -> None:
    """ValueError if `out` exists and not `overwrite` (checked first, before any slow work)."""
    if Path(out).exists() and not overwrite:
        raise ValueError(f"{out} exists; choose a new folder or pass --overwrite")


@contextlib.contextmanager
def atomic_folder(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder to write into; on success it replaces `out` in one rename,
    on any error it is deleted, so `out` is complete or untouched. ValueError if `out` exists and
    not `overwrite` (nothing is deleted that this did not create unless asked)."""
    out = Path(out)
    check_new_folder(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
