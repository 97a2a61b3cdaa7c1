"""Full weights from a ZeRO-3 checkpoint's own files: the fp32 partitions in the rank files.

ZeRO-3 writes no model files (each rank holds a slice of every parameter), so each rank file
records, beside its optimizer state, what a converter needs to reassemble the weights without
process groups (the `Zero3Record` checkpoint piece, saved under the "zero3" key and never loaded):

- the parameters of each of DeepSpeed's sub-groups in partition order, with their (TP-local)
  shapes, from `engine._get_zero_param_shapes()`, the table DeepSpeed's own zero_to_fp32.py reads;
- the rank's tensor-parallel and data-parallel coordinates, and each TP-sharded tensor's shards.

DeepSpeed's layout (deepspeed/runtime/zero/partition_parameters.py, utils/zero_to_fp32.py): each
parameter of numel n is padded to a multiple of the data-parallel size w and split evenly, rank r
holding elements [r * ceil(n / w), (r + 1) * ceil(n / w)); a rank's flat fp32 group of a sub-group
is its slices of that sub-group's parameters, concatenated in order.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable

import torch


def zero3_record(engine, groups) -> dict[str, Any]:
    """The "zero3" entry of this rank's checkpoint file (plain lists, strings and ints: safe to load)."""
    shards = {name: [dataclasses.asdict(s) for s in p.shards]
              for name, p in engine.module.named_parameters() if getattr(p, "shards", ())}
    return {"tp_rank": groups.tp_rank, "dp_rank": groups.dp_rank, "dp_size": groups.dp_size,
            "params": [[[name, list(shape)] for name, shape in group.items()]
                       for group in engine._get_zero_param_shapes()],
            "shards": shards}


class Zero3Record:
    """The "zero3" piece of a ZeRO-3 rank file (training/checkpoint.py's Stateful): written at every
    save; resume restores the weights from the optimizer piece, so loading it does nothing."""

    def __init__(self, engine, groups):
        self.engine, self.groups = engine, groups

    def state_dict(self) -> dict[str, Any]:
        return zero3_record(self.engine, self.groups)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def zero3_model_shards(rank_states: Iterable[tuple[str, dict]]) -> list[dict[str, Any]]:
    """One `{"model": {name: tensor}, "shards": {name: [shard dicts]}}` per tensor-parallel rank
    (the form of a ZeRO-1/2 model file), from every rank file's (path, loaded state).

    Raises ValueError naming the file when a rank file lacks the record or its partitions do not
    add up to the recorded parameters.
    """
    by_tp: dict[int, dict[int, tuple[str, dict, list[torch.Tensor]]]] = {}
    for path, state in rank_states:
        record = state.get("zero3")
        if record is None:
            raise ValueError(f"{path}: a ZeRO-3 rank file without its 'zero3' parameter record (written by "
                             "a version that could not be consolidated); resume it and save again")
        flat = state["optimizer"]["fp32_flat_groups"]
        by_tp.setdefault(record["tp_rank"], {})[record["dp_rank"]] = (path, record, flat)
    out = []
    for tp_rank in sorted(by_tp):
        ranks = by_tp[tp_rank]
        path0, record, _ = ranks[min(ranks)]
        world = record["dp_size"]
        if sorted(ranks) != list(range(world)):
            raise ValueError(f"ZeRO-3 checkpoint of {path0}: tensor-parallel rank {tp_rank} has rank files for "
                             f"data-parallel ranks {sorted(ranks)}, expected 0..{world - 1}")
        # Each rank's sub-groups in order form one flat vector; parameters follow each other in it.
        flats = [torch.cat([g.reshape(-1) for g in ranks[r][2]]) for r in range(world)]
        model, offset = {}, 0
        for name, shape in (entry for group in record["params"] for entry in group):
            numel = math.prod(shape)
            part = math.ceil(numel / world)
            pieces = [flat[offset:offset + part] for flat in flats]
            model[name] = torch.cat(pieces)[:numel].view(shape).clone()
            offset += part
        if any(offset != flat.numel() for flat in flats):
            raise ValueError(f"ZeRO-3 checkpoint of {path0}: the recorded parameters take {offset} elements per "
                             f"rank but the fp32 partitions hold {[f.numel() for f in flats]}")
        out.append({"model": model, "shards": record["shards"]})
    return out
