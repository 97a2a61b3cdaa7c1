"""ZeRO's optimizer state (fp32 master weights, Adam moments, step counts) in a form that does not
depend on the parallel layout, so that a checkpoint resumes in any layout (docs/design.md,
Parallelism).

Each rank saves, for every trainable parameter its ZeRO partition holds a piece of, that piece as a
*fragment*: elements `[start, start + n)` of the flattened (TP/EP-local) parameter, their fp32
master weights and Adam moments, the step count, the local shape and where the local parameter sits
in the full tensor (its `parallel.Shard`s). These are the pieces Megatron's distributed-optimizer
checkpoints address (a sharded tensor's global offset plus a flattened range). Saving needs no
communication and writes what the rank holds, no more.

- Same layout: a rank copies its own fragments back (`load_state_dict`), exactly.
- Another layout: a rank cuts the fragments it now holds out of the full tensors, which it
  assembles one parameter at a time from every saved fragment that reaches the rows it needs
  (`reshard_state`; files are memory-mapped, so the others are never read). Then it loads them the
  same way.
- Either way the model's trainable weights are set from the restored fp32 masters afterwards, as
  DeepSpeed does after every step (ZeRO-3 keeps its weights nowhere else).
- The converter rebuilds full weights of a ZeRO-3 checkpoint from the fp32 fragments (`fp32_fragments`).

Not DeepSpeed's tensor-fragment API (`safe_get_full_fp32_param`, ...): it all-reduces every full
tensor over the data-parallel group, a collective per parameter and the full tensor on every rank,
at every save. Not its universal checkpoint: an offline conversion of its own checkpoint format,
with TP slicing that assumes even splits (our vocabulary split is uneven). What this reads of a ZeRO
optimizer is what DeepSpeed's universal-checkpoint loaders read: stage 1-2 `bit16_groups`,
`single_partition_of_fp32_groups` (the bf16 optimizer: `bf16_groups`, `fp32_groups_flat_partition`)
and each parameter's `_hp_mapping` (the fragment's addresses in the parameter and in the flat
partition); stage 3 `fp16_groups`, `fp32_partitioned_groups_flat` and each
parameter's `ds_tensor` (its partition: DeepSpeed pads a parameter to a multiple of the data-parallel
size w and rank r holds elements [r * ceil(n / w), (r + 1) * ceil(n / w)), concatenated per sub-group).
Frozen parameters have no optimizer state: a resume in the same layout takes them from the model
files (ZeRO 1-2), one in another layout keeps the values the run builds (fine-tuning builds them from
`finetune.init_from` again; they never change in training).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
import torch.nn as nn

from molm_megatron.training.fragments import Fragment, Splits, assemble, element_rows, narrow

FORMAT = "fragments"
"""The key of a rank file's optimizer piece (older checkpoints hold DeepSpeed's partition state dict)."""


@dataclasses.dataclass
class HeldFragment:
    """The piece of one parameter that this rank's ZeRO partition holds."""

    name: str
    param: nn.Parameter
    start: int
    """First element of the flattened local parameter in the piece."""
    numel: int
    flat: torch.Tensor
    """The flat fp32 partition it lives in (the tensor the torch optimizer steps)."""
    offset: int
    """Where the piece starts in `flat`."""

    @property
    def shards(self) -> list[dict]:
        """Where the local parameter sits in the full tensor: its parallel.Shards, as saved."""
        return [dataclasses.asdict(s) for s in getattr(self.param, "shards", ())]

    @property
    def splits(self) -> Splits:
        return tuple((s.dim, s.start, s.length) for s in getattr(self.param, "shards", ()))

    @property
    def shape(self) -> tuple[int, ...]:
        # ZeRO-3 empties partitioned parameters; ds_shape keeps the (TP/EP-local) shape.
        return tuple(getattr(self.param, "ds_shape", self.param.shape))


def _zero3(optimizer) -> bool:
    return hasattr(optimizer, "fp32_partitioned_groups_flat")


def _groups(optimizer) -> list[tuple[list[nn.Parameter], torch.Tensor]]:
    """(trainable parameters, their flat fp32 partition) per parameter group of ZeRO stage 1-2 or of
    DeepSpeed's bf16 optimizer (bf16 weights with ZeRO-1), which keeps the same per-parameter
    fragment addresses under other names."""
    if hasattr(optimizer, "bf16_groups"):
        return list(zip(optimizer.bf16_groups, optimizer.fp32_groups_flat_partition))
    return list(zip(optimizer.bit16_groups, optimizer.single_partition_of_fp32_groups))


def _flat_partitions(optimizer) -> list[torch.Tensor]:
    """The flat fp32 tensors the torch optimizer steps, one per (sub-)group."""
    if _zero3(optimizer):
        return list(optimizer.fp32_partitioned_groups_flat)
    return [flat for _, flat in _groups(optimizer)]


def _zero3_partitions(optimizer) -> Iterable[tuple[nn.Parameter, int, torch.Tensor, int]]:
    """(parameter, its partition's first element, flat partition, offset in it) of every trainable parameter."""
    for params, flat in zip(optimizer.fp16_groups, optimizer.fp32_partitioned_groups_flat):
        offset = 0
        for p in params:
            size = p.ds_tensor.ds_numel
            yield p, optimizer._get_param_partition_rank(p) * size, flat, offset
            offset += size


def held_fragments(engine) -> list[HeldFragment]:
    """The pieces of trainable parameters that this rank's ZeRO partition holds."""
    optimizer = engine.optimizer
    names = {p: name for name, p in engine.module.named_parameters()}
    held = []
    if _zero3(optimizer):
        for p, start, flat, offset in _zero3_partitions(optimizer):
            numel = min(p.ds_tensor.ds_numel, p.ds_numel - start)  # the last ranks hold padding only
            if numel > 0:
                held.append(HeldFragment(names[p], p, start, numel, flat, offset))
    else:
        for params, flat in _groups(optimizer):
            for p in params:
                mapping = p._hp_mapping  # None: no element of p in this rank's partition
                if mapping is not None:
                    held.append(HeldFragment(names[p], p, mapping.lp_fragment_address.start,
                                             mapping.lp_fragment_address.numel, flat, mapping.hp_fragment_address.start))
    return held


def _copy_out(t: torch.Tensor) -> torch.Tensor:
    # A copy of the elements only: torch.save of a view would write its whole storage.
    return t.detach().to("cpu", copy=True)


class ZeroOptimizerState:
    """This rank's ZeRO optimizer state as a checkpoint piece, in fragments (module docstring)."""

    def __init__(self, engine, dp_rank: int, dp_size: int):
        self.engine, self.dp_rank, self.dp_size = engine, dp_rank, dp_size
        self.held = held_fragments(engine)

    @property
    def _torch_state(self) -> dict:
        return self.engine.optimizer.optimizer.state

    def state_dict(self) -> dict:
        fragments = {}
        for h in self.held:
            state = self._torch_state.get(h.flat, {})  # empty before the first step
            fragments[h.name] = {
                "shards": h.shards, "shape": list(h.shape), "start": h.start,
                "fp32": _copy_out(h.flat.narrow(0, h.offset, h.numel)),
                "moments": {key: _copy_out(value.narrow(0, h.offset, h.numel)) for key, value in state.items()
                            if torch.is_tensor(value) and value.shape == h.flat.shape},
                "step": _copy_out(state["step"]) if "step" in state else None}
        return {FORMAT: fragments}

    @torch.no_grad()  # the flat partitions are leaf tensors that require grad
    def load_state_dict(self, state: dict) -> None:
        if FORMAT not in state:
            self._load_partition_state(state)
            return
        saved = state[FORMAT]
        for h in self.held:
            entry = saved.get(h.name)
            if entry is None or (entry["start"], entry["fp32"].numel()) != (h.start, h.numel):
                where = "none" if entry is None else f"[{entry['start']}, {entry['start'] + entry['fp32'].numel()})"
                raise ValueError(f"optimizer state of {h.name}: this rank holds elements [{h.start}, "
                                 f"{h.start + h.numel}) but the checkpoint gives it {where}")
        steps = {float(e["step"]) for e in saved.values() if e["step"] is not None}
        assert len(steps) <= 1, f"parameters at different optimizer steps: {sorted(steps)}"
        if steps:  # saved after the first step: moments exist
            self._create_torch_state(next(e for e in saved.values() if e["step"] is not None))
        for h in self.held:
            entry = saved[h.name]
            h.flat.narrow(0, h.offset, h.numel).copy_(entry["fp32"])
            for key, value in entry["moments"].items():
                self._torch_state[h.flat][key].narrow(0, h.offset, h.numel).copy_(value)
        self._weights_from_masters()

    def _create_torch_state(self, entry: dict) -> None:
        """The torch optimizer's per-partition state before its first step, as its lazy init makes it
        (every partition at the saved step; the moments filled in afterwards)."""
        torch_optimizer = self.engine.optimizer.optimizer
        # torch.optim.AdamW keeps `step` on the CPU unless fused or capturable.
        on_device = torch_optimizer.defaults.get("fused") or torch_optimizer.defaults.get("capturable")
        for flat in _flat_partitions(self.engine.optimizer):
            state = torch_optimizer.state[flat]
            state["step"] = entry["step"].to(flat.device if on_device else "cpu", copy=True)
            for key in entry["moments"]:
                state.setdefault(key, torch.zeros_like(flat))

    def _weights_from_masters(self) -> None:
        """The model's trainable weights from the fp32 masters (DeepSpeed's own post-step copy)."""
        optimizer = self.engine.optimizer
        if not _zero3(optimizer):
            optimizer.update_lp_params()  # each rank casts its partition, then an all-gather
            return
        for p, _, flat, offset in _zero3_partitions(optimizer):
            p.ds_tensor.data.copy_(flat.narrow(0, offset, p.ds_tensor.ds_numel))
        if optimizer.persistent_parameters:
            # Small parameters stay gathered between steps: drop the stale copies; the next forward
            # gathers the new partitions (what DeepSpeed's own load does).
            optimizer.persistent_parameters[0].partition(optimizer.persistent_parameters)

    def _load_partition_state(self, state: dict) -> None:
        # Checkpoints written before the fragment format hold DeepSpeed's state dict of this rank's
        # partition; they resume in their own layout only (reshard_state refuses them). ZeRO indexes
        # the list by this rank's position in its data-parallel group.
        partitions = [None] * self.dp_size
        partitions[self.dp_rank] = state
        self.engine.optimizer.load_state_dict(partitions, load_optimizer_states=True, load_from_fp32_weights=True)

    def reshard_state(self, saved: list[dict]) -> dict:
        """This rank's `state_dict` in this layout, cut from the optimizer pieces every rank of another
        layout saved. ValueError naming the parameter when the checkpoint does not hold all of it."""
        if any(FORMAT not in state for state in saved):
            raise ValueError("the checkpoint's optimizer state is DeepSpeed's per-partition form (written by an "
                             "older version), which resumes in its own layout only: resume it there, let it save "
                             "once, then change the layout")
        by_name: dict[str, list[dict]] = {}
        for state in saved:
            for name, entry in state[FORMAT].items():
                by_name.setdefault(name, []).append(entry)
        fragments = {}
        for h in self.held:
            entries = by_name.get(h.name, [])
            keys = {tuple(sorted(e["moments"])) for e in entries}
            if not entries or len(keys) != 1:
                raise ValueError(f"optimizer state of {h.name}: the checkpoint holds "
                                 f"{'none' if not entries else 'fragments with different moments'}")
            rows = element_rows(h.splits, h.shape, h.start, h.numel)
            cut = {key: self._cut(h, [_fragment(e, e["fp32"] if key == "fp32" else e["moments"][key])
                                      for e in entries], rows, key)
                   for key in ("fp32", *keys.pop())}
            fragments[h.name] = {"shards": h.shards, "shape": list(h.shape),
                                 "start": h.start, "fp32": cut.pop("fp32"), "moments": cut, "step": entries[0]["step"]}
        return {FORMAT: fragments}

    @staticmethod
    def _cut(h: HeldFragment, fragments: list[Fragment], rows: range, key: str) -> torch.Tensor:
        full, held = assemble(fragments, rows)  # the model check of the resume made the shapes agree
        local, local_held = narrow(full, h.splits), narrow(held, h.splits)
        if not local_held.reshape(-1)[h.start:h.start + h.numel].all():
            raise ValueError(f"optimizer state of {h.name} ({key}): the checkpoint's fragments do not hold "
                             f"elements [{h.start}, {h.start + h.numel}) of this rank's shard")
        return local.reshape(-1)[h.start:h.start + h.numel].clone()


def _fragment(entry: dict, values: torch.Tensor) -> Fragment:
    return Fragment.saved(entry["shards"], entry["shape"], entry["start"], values)


def fp32_fragments(rank_states: Iterable[tuple[str, dict]]) -> dict[str, list[Fragment]]:
    """Every parameter's fp32 master-weight fragments from the rank files' (path, state) of a
    checkpoint: what rebuilds the weights of a ZeRO-3 checkpoint, which writes no model files."""
    out: dict[str, list[Fragment]] = {}
    for path, state in rank_states:
        optimizer = state.get("optimizer", {})
        if FORMAT not in optimizer:
            raise ValueError(f"{path}: no fp32 fragments in its optimizer state (a ZeRO-3 checkpoint written by an "
                             "older version); resume it with this version and let it save once")
        for name, entry in optimizer[FORMAT].items():
            out.setdefault(name, []).append(_fragment(entry, entry["fp32"]))
    return out
