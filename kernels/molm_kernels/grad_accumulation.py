"""Weight gradients added into fp32 buffers inside the weight-gradient kernel (Megatron-LM's
"gradient accumulation fusion", for the expert tensors).

A trainer that accumulates micro-batches in fp32 would otherwise receive each expert tensor's
gradient in bf16 from autograd and add it to its fp32 buffer in a second pass: the kernel writes
2 bytes per parameter, the pass reads them back with the buffer's 4 and writes 4. Inside
`accumulate_weight_grads`, the backward of an expert weight listed there instead loads the
buffer's fp32 tile, adds its fp32 accumulator and stores it (8 bytes per parameter, and the
gradient never rounded to bf16), and returns no gradient for that weight. A weight is recognised
by its storage, shape and strides, so an alias of a parameter (same storage) is found too.
Only the Triton path accumulates; the references return gradients as usual, so callers must take
both: a returned gradient, or the weight's index in the set the context yields.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# (storage address, shape, strides) of a weight -> (its index in the caller's list, fp32 buffer).
# Module-level, not thread-local: autograd runs CUDA backward functions on its own device threads.
_BUFFERS: dict[tuple, tuple[int, torch.Tensor]] = {}
_ACCUMULATED: set[int] = set()


def _key(weight: torch.Tensor) -> tuple:
    return weight.data_ptr(), tuple(weight.shape), weight.stride()


@contextlib.contextmanager
def accumulate_weight_grads(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[set[int]]:
    """While active, the Triton backward of an expert weight `pairs[i][0]` adds its gradient to the
    fp32 buffer `pairs[i][1]` (same shape) and returns None for it; yields the set of indices i
    whose gradients were accumulated so."""
    if _BUFFERS:
        raise RuntimeError("accumulate_weight_grads is already active")
    for i, (weight, buffer) in enumerate(pairs):
        if buffer.dtype != torch.float32 or buffer.shape != weight.shape:
            raise ValueError(f"gradient buffer {i}: fp32 of shape {tuple(weight.shape)} expected, got "
                             f"{buffer.dtype} {tuple(buffer.shape)}")
        _BUFFERS[_key(weight)] = (i, buffer)
    _ACCUMULATED.clear()
    accumulated: set[int] = set()
    try:
        yield accumulated
    finally:
        accumulated.update(_ACCUMULATED)
        _BUFFERS.clear()
        _ACCUMULATED.clear()


def gradient_buffer(weight: torch.Tensor) -> torch.Tensor | None:
    """The fp32 buffer `weight`'s gradient is to be added to (marking it accumulated), or None."""
    entry = _BUFFERS.get(_key(weight)) if _BUFFERS else None
    if entry is None:
        return None
    _ACCUMULATED.add(entry[0])
    return entry[1]
