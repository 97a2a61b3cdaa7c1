"""Resuming a checkpoint in another parallel layout: world size, tensor-parallel (TP), expert-parallel
(EP) and data-parallel (DP) size, ZeRO stage, as Megatron's distributed checkpoints resume when the
GPU count changes. `resharded_state` turns the pieces that every rank of the saved layout wrote into
this rank's pieces; CheckpointManager.restore then loads them as on any resume.

What carries over, and how (README, "Checkpoints, resume, preemption", says it for users):
- Optimizer: fp32 master weights, Adam moments and step counts, cut from every rank's fragments
  (training/optimizer_state.py), exactly; the model's trainable weights follow the fp32 masters.
  Frozen tensors (fine-tuning) have no optimizer state: they keep the values the run builds.
- LR schedule, DeepSpeed's and the trainer's counters: equal on every rank, carried over.
- Data position: exact when DP size x micro-batch size, the number of Transformer-XL streams, is
  unchanged (the loader's `stream_origins`); refused otherwise, naming both.
- Transformer-XL memory: each row follows its stream.
- RNG: with the same DP size each DP rank continues its generators (its TP ranks share them). With
  another DP size the saved streams of random numbers belonged to other ranks: each rank keeps the
  generators the run seeded at build (train.seed + 1 + DP rank). Only dropout and sampled routing
  draw from them.
"""

from __future__ import annotations

from typing import Any

from molm_megatron.data.stream_loader import TransformerXLStreamLoader
from molm_megatron.training.memory import rows_state
from molm_megatron.training.optimizer_state import ZeroOptimizerState

CARRIED = ("scheduler", "engine", "trainer")
"""Pieces that are the same on every rank of any layout."""


def resharded_state(rank_states: list[dict[str, Any]], optimizer: ZeroOptimizerState,
                    loader: TransformerXLStreamLoader) -> dict[str, Any]:
    """This rank's state of each checkpoint piece, from `rank_states`: every rank file of a checkpoint
    of another layout, in global rank order. ValueError, naming the piece and field, for what cannot
    move to this layout."""
    loaders = [state["loader"] for state in rank_states]
    origins = loader.stream_origins(loaders)  # first: a refused data position costs no reading
    state = {name: rank_states[0][name] for name in CARRIED}
    state["optimizer"] = optimizer.reshard_state([s["optimizer"] for s in rank_states])
    state["loader"] = loader.reshard_state(loaders)
    state["memory"] = rows_state([s["memory"] for s in rank_states], origins)
    if loaders[0]["dp_size"] == loader.dp_size:  # same DP size and streams: origins[0] is this DP rank's file
        state["rng"] = rank_states[origins[0][0]]["rng"]
    return state
