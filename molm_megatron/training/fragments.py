"""Full tensors from the pieces a checkpoint's files hold, without process groups (and without
megatron-core or DeepSpeed: the converter runs where they are not installed).

A model file holds whole TP/EP-local shards of each tensor; a ZeRO partition holds a run of
consecutive elements of a flattened shard. Both are `Fragment`s: where the shard sits in the full
tensor (each split `(dim, start, length)` in the order it was applied, as parallel.Shard records
it), the shard's shape, and which of its flattened elements the fragment holds. `assemble` places
fragments into the full tensor and says which elements they covered.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

Splits = tuple[tuple[int, int, int], ...]
"""(dim, start, length) of each split applied to the full tensor, in order."""


@dataclass(frozen=True)
class Fragment:
    """Elements `[start, start + values.numel())` of the flattened shard of shape `shape` that
    `splits` cut from a tensor of shape `full_shape`."""

    splits: Splits
    full_shape: tuple[int, ...]
    shape: tuple[int, ...]
    start: int
    values: torch.Tensor
    """1-D."""

    @classmethod
    def saved(cls, shards: list[dict], shape: Iterable[int], start: int, values: torch.Tensor) -> Fragment:
        """From a file's record of the shard: `shards` are parallel.Shard fields as dicts."""
        shape = tuple(shape)
        full = list(shape)
        for s in reversed(shards):  # the first split of a dimension knows its full size
            full[s["dim"]] = s["full_size"]
        return cls(tuple((s["dim"], s["start"], s["length"]) for s in shards), tuple(full), shape, start,
                   values.reshape(-1))

    @property
    def rows(self) -> range:
        return element_rows(self.splits, self.shape, self.start, self.values.numel())


def element_rows(splits: Splits, shape: tuple[int, ...], start: int, numel: int) -> range:
    """The dimension-0 indices of the full tensor that elements [start, start + numel) of the
    flattened shard (shape `shape`, cut by `splits`) reach."""
    row = math.prod(shape[1:])
    offset = sum(s for dim, s, _ in splits if dim == 0)
    return range(offset + start // row, offset + (start + numel - 1) // row + 1)


def narrow(full: torch.Tensor, splits: Splits) -> torch.Tensor:
    """The shard `splits` cut from `full` (a view)."""
    for dim, start, length in splits:
        full = full.narrow(dim, start, length)
    return full


def assemble(fragments: Iterable[Fragment], rows: range | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The full tensor from fragments of its shards, and a bool mask of the elements they held (the
    caller decides whether a gap is an error). Elements no fragment held are zero.

    Only fragments that reach the dimension-0 indices `rows` are read (all when None): from
    memory-mapped files a rank then reads what it needs, not every shard. Replicas (a shard saved by
    several ranks) hold equal values; the last one read wins.
    """
    blocks: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (splits, shape) -> flat values, held
    first = None
    for f in fragments:
        if first is None:
            first = f
        if f.full_shape != first.full_shape:
            raise ValueError(f"fragments of one tensor disagree on its shape: {f.full_shape} and {first.full_shape}")
        if rows is not None and (f.rows.start >= rows.stop or rows.start >= f.rows.stop):
            continue
        numel = math.prod(f.shape)
        values, held = blocks.setdefault((f.splits, f.shape), (torch.zeros(numel, dtype=first.values.dtype),
                                                               torch.zeros(numel, dtype=torch.bool)))
        values[f.start:f.start + f.values.numel()] = f.values
        held[f.start:f.start + f.values.numel()] = True
    if first is None:
        raise ValueError("no fragments to assemble")
    full = torch.zeros(first.full_shape, dtype=first.values.dtype)
    held_full = torch.zeros(first.full_shape, dtype=torch.bool)
    # Shards of one layout never overlap, so each block's region is written once.
    for (splits, shape), (values, held) in blocks.items():
        narrow(full, splits).copy_(values.view(shape))
        narrow(held_full, splits).copy_(held.view(shape))
    return full, held_full
