"""How a parameter is split across ranks, recorded on the parameter itself, and the two inverse
operations: slice a full tensor to this rank's shard, gather the shards back to the full tensor.

Tensor and expert parallelism slice parameters of the plain model in place. Each sliced parameter
carries `param.shards`, a tuple of `Shard`s in the order they were applied, so that checkpoint
conversion (any layout -> full -> any other layout) and the multi-rank tests need nothing but the
parameter and the process groups. Tensor-parallel shards also carry megatron-core's attribute names
(`tensor_model_parallel`, `partition_dim`, `partition_stride`), which DeepSpeed reads to count a
sharded gradient in the global grad norm on every tensor-parallel rank (a replicated one only on
tensor-parallel rank 0).

Splits are balanced and may be uneven (the published vocabulary, 50295, is odd): rank r of w ranks
holds `size // w` rows, plus one if r < size % w.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from molm_megatron.parallel.groups import ParallelGroups

AXES = ("tp", "ep")


@dataclass(frozen=True)
class Shard:
    """One split of a tensor: dimension `dim` of size `full_size`, this rank holds
    `[start, start + length)`, split over the process-group axis `axis` ('tp' or 'ep')."""

    axis: str
    dim: int
    full_size: int
    start: int
    length: int


def shard_range(size: int, rank: int, world: int) -> tuple[int, int]:
    """(start, length) of rank's balanced share of `size` rows among `world` ranks."""
    base, extra = divmod(size, world)
    return rank * base + min(rank, extra), base + (1 if rank < extra else 0)


def shard_parameter(module: nn.Module, name: str, axis: str, dim: int, groups: ParallelGroups) -> nn.Parameter:
    """Replace `module.<name>` by this rank's slice along `dim` over `axis`; returns the new parameter.

    The slice is cloned so the full tensor's storage can be freed; attributes set earlier (other
    shards, DeepSpeed's expert tags) carry over.
    """
    assert axis in AXES, axis
    old = getattr(module, name)
    rank, world = groups.axis_rank(axis), groups.axis_size(axis)
    start, length = shard_range(old.shape[dim], rank, world)
    new = nn.Parameter(old.detach().narrow(dim, start, length).clone(), requires_grad=old.requires_grad)
    new.__dict__.update({k: v for k, v in old.__dict__.items() if not k.startswith("_")})
    new.shards = getattr(old, "shards", ()) + (Shard(axis, dim, old.shape[dim], start, length),)
    if axis == "tp":
        # megatron-core / DeepSpeed names: DeepSpeed's grad norm counts this gradient on every TP rank.
        new.tensor_model_parallel, new.partition_dim, new.partition_stride = True, dim, 1
    setattr(module, name, new)
    return new


def shard_tensor(full: torch.Tensor, shards: tuple[Shard, ...]) -> torch.Tensor:
    """This rank's shard of a full tensor (the inverse of `gather_full`), e.g. to load a checkpoint
    written with another layout."""
    for s in shards:
        if full.shape[s.dim] != s.full_size:
            raise ValueError(f"tensor has size {full.shape[s.dim]} along dim {s.dim}; the parameter was "
                             f"split from size {s.full_size}")
        full = full.narrow(s.dim, s.start, s.length)
    return full.contiguous()


def gather_full(local: torch.Tensor, shards: tuple[Shard, ...], groups: ParallelGroups) -> torch.Tensor:
    """The full tensor from every rank's shard (a collective over each shard's axis group).

    Shards are undone in reverse order of application. Uneven shards are padded to the largest
    share for the all-gather (gloo cannot all-gather different sizes) and trimmed after.
    """
    out = local.detach()
    for s in reversed(shards):
        group, world = groups.axis_group(s.axis), groups.axis_size(s.axis)
        max_len = shard_range(s.full_size, 0, world)[1]  # rank 0 holds the largest share
        pad = [0, 0] * (out.dim() - 1 - s.dim) + [0, max_len - out.shape[s.dim]]
        padded = torch.nn.functional.pad(out, pad).contiguous()
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        out = torch.cat([p.narrow(s.dim, 0, shard_range(s.full_size, r, world)[1]) for r, p in enumerate(parts)],
                        dim=s.dim)
    return out


def full_state_dict(model: nn.Module, groups: ParallelGroups) -> dict[str, torch.Tensor]:
    """Every parameter and buffer at full size, on every rank (a collective: call on all ranks).

    Keys are the plain model's (the published HF keys), so the result loads into an unsharded MoLM.
    """
    params = dict(model.named_parameters())
    return {name: gather_full(t, getattr(params.get(name), "shards", ()), groups) if name in params else t.detach()
            for name, t in model.state_dict(keep_vars=True).items()}


def load_full_state_dict(model: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Copy full-size tensors into a parallelised model, each sliced to this rank's shard."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if name not in full:
                raise ValueError(f"full state dict has no entry {name!r}")
            t.copy_(shard_tensor(full[name], getattr(params.get(name), "shards", ())))
