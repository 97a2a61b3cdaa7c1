"""Atomic, resumable checkpoints: files written by every rank into one folder per step.

Layout of `checkpoint.dir`:

    step_00000100/                  one complete checkpoint
        rank_00000.pt ...           per global rank: ZeRO optimizer partition (fp32 master weights,
                                    Adam moments), LR scheduler, engine counters, trainer counters,
                                    data-stream positions, Transformer-XL memory, RNG states
        model_tp00_ep000.pt ...     model weights, one file per distinct (TP rank, EP rank) shard
                                    (ZeRO stages 1-2; stage 3 restores them from the fp32 partitions)
        meta.json                   step, parallel layout, resolved config
        COMPLETE                    the completion marker, written last
    latest                          name of the newest complete checkpoint

Why not `engine.save_checkpoint`: DeepSpeed recognises experts only inside its own `MoE` layer
class and drops every parameter whose name contains "expert" from its model file otherwise; our
expert tensors (tagged by molm_megatron.parallel) would be lost. The files above hold the same
pieces through the engine's public state_dict methods.

A save writes everything into `step_N.tmp/`, writes the marker, renames the folder to `step_N`
(one atomic rename on a POSIX file system), then replaces `latest` through a temporary file. A
process killed at any point leaves the previous checkpoint complete and `latest` naming it; the
half-written `.tmp` folder is ignored and deleted by the next save. Only folders holding the
marker count (torchtitan's `_find_load_step` trusts only folders with their metadata file).
All ranks must see one shared file system.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    """Every random generator a step can draw from (dropout, sampled routing, data shuffles)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync_write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


class CheckpointManager:
    """Save and find checkpoints in one folder; `layout` (parallel sizes) must match on load.

    `save` and `load` are collective: every rank calls them with the same step.
    """

    def __init__(self, directory: str, keep_last: int, layout: dict[str, int], rank: int | None = None,
                 barrier: Callable[[], None] | None = None):
        """`rank` and `barrier` default to torch.distributed's (given explicitly for one process)."""
        self.directory, self.keep_last, self.layout = directory, keep_last, layout
        self.rank = dist.get_rank() if rank is None else rank
        self.barrier = dist.barrier if barrier is None else barrier

    # ---- finding -----------------------------------------------------------------------------
    def complete_steps(self) -> list[int]:
        """Steps of the complete checkpoints in the folder, ascending."""
        if not os.path.isdir(self.directory):
            return []
        steps = []
        for name in os.listdir(self.directory):
            match = _STEP_DIR.match(name)
            if match and os.path.exists(os.path.join(self.directory, name, MARKER)):
                steps.append(int(match.group(1)))
        return sorted(steps)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint. The folders' markers decide, not the `latest` file: a kill
        between the rename and the pointer update leaves a complete, newer folder."""
        steps = self.complete_steps()
        return steps[-1] if steps else None

    # ---- saving ------------------------------------------------------------------------------
    def save(self, step: int, files: dict[str, Any], config: dict) -> None:
        """Write checkpoint `step` atomically (collective): each rank passes the files it owns
        (name -> object for torch.save). Skips a step that is already complete."""
        final = os.path.join(self.directory, step_dir_name(step))
        tmp = final + ".tmp"
        if os.path.exists(os.path.join(final, MARKER)):
            return  # a resumed run that stops before its first step: this state is on disk already
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
            os.makedirs(tmp)
        self.barrier()
        for name, obj in files.items():
            torch.save(obj, os.path.join(tmp, name))
        self.barrier()  # every rank's files are written before rank 0 commits
        if self.rank == 0:
            meta = {"step": step, "layout": self.layout, "config": config}
            _fsync_write(os.path.join(tmp, "meta.json"), json.dumps(meta, indent=1))
            _fsync_write(os.path.join(tmp, MARKER), f"{step}\n")
            os.rename(tmp, final)
            self._point_latest(step)
            self._prune()
        self.barrier()  # nobody looks for checkpoints before the commit
        if self.rank == 0:
            logger.info("checkpoint saved at step %d in %s", step, final)

    def _point_latest(self, step: int) -> None:
        tmp = os.path.join(self.directory, "latest.tmp")
        _fsync_write(tmp, step_dir_name(step))
        os.replace(tmp, os.path.join(self.directory, "latest"))

    def _prune(self) -> None:
        """Delete complete checkpoints beyond the newest keep_last, and stale .tmp folders."""
        steps = self.complete_steps()
        for old in steps[:-self.keep_last]:
            # Rename first (atomic): a kill during the deletion leaves a `.tmp` folder, which is
            # ignored and swept, never a half-deleted folder that still looks complete.
            folder = os.path.join(self.directory, step_dir_name(old))
            os.rename(folder, folder + ".tmp")
            shutil.rmtree(folder + ".tmp", ignore_errors=True)
        for name in os.listdir(self.directory):
            if name.endswith(".tmp") and name.startswith("step_"):
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    # ---- loading -----------------------------------------------------------------------------
    def read_meta(self, step: int) -> dict:
        with open(os.path.join(self.directory, step_dir_name(step), "meta.json")) as f:
            return json.load(f)

    def check_layout(self, step: int) -> None:
        """Refuse a checkpoint written with another parallel layout, naming both layouts."""
        saved = self.read_meta(step)["layout"]
        if saved != self.layout:
            fmt = lambda d: ", ".join(f"{k}={v}" for k, v in sorted(d.items()))  # noqa: E731
            raise ValueError(
                f"checkpoint {os.path.join(self.directory, step_dir_name(step))} was saved with parallel layout "
                f"({fmt(saved)}) but this run has ({fmt(self.layout)}); ZeRO and expert shards are not "
                f"converted: restart with the saved layout, or point checkpoint.dir to a new folder")

    def load(self, step: int, names: list[str], map_location: torch.device) -> dict[str, Any]:
        """Read this rank's files of checkpoint `step` after checking the layout."""
        self.check_layout(step)
        folder = os.path.join(self.directory, step_dir_name(step))
        # weights_only=False: the files hold numpy/python RNG states and DeepSpeed's optimizer
        # state, all written by this code.
        return {name: torch.load(os.path.join(folder, name), map_location=map_location, weights_only=False)
                for name in names}
