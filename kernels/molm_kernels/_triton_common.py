"""What both Triton kernel modules share: interpreter detection, its work-around, dot precision.

Work-around for Triton 3.6's CPU interpreter (TRITON_INTERPRET=1) under NumPy >= 2.4: the
interpreter holds every scalar as a one-element array and turns it into a Python int with
`int(array)`, which NumPy 2.4 refuses for arrays of one dimension: any loop bound computed at
run time (`range(0, tl.cdiv(I, BLOCK_K))`) then raises TypeError. Newer Triton (>= 3.8) converts
with `.item()`; this installs the same conversion. It only runs under the interpreter, so the GPU
path is untouched, and the kernels keep the for loops the GPU compiler software-pipelines.
"""

from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def patch_interpreter_index() -> None:
    """Make the interpreter's tensor.__index__ accept one-element arrays (idempotent)."""
    from triton.runtime import interpreter

    if getattr(interpreter, "_molm_index_patched", False):
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    interpreter._molm_index_patched = True


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 inputs get full-precision dots (tf32 would cost 1e-3 relative
    error); 16-bit inputs ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


if INTERPRET:
    patch_interpreter_index()
