"""Activation recomputation (`train.activation_checkpoint`): keep a layer's inputs, recompute its
activations in the backward.

Applied from outside the model, after parallelism, by replacing the `forward` of each chosen
module instance with a checkpointed call, so parameter names (and checkpoints, exports) are
unchanged. Non-reentrant `torch.utils.checkpoint`: it works with the Triton kernels' autograd
Functions and inside a CUDA-graph capture. The recomputed forward must route exactly as the first
one did; it does, as routing is deterministic given the inputs, and for a model with dropout or
sampled routing the random state is saved and restored around the recomputation (only then: reading
the CUDA random state is not allowed during a CUDA-graph capture).

- moa: each layer's mixture of attention heads (router, expert query and output projections,
  stick-breaking attention over memory plus window): a partial extra forward.
- full: each whole block: only the block inputs stay, one extra forward in all.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from molm_megatron.model.model import Block, MoA


def apply_activation_checkpoint(model: torch.nn.Module, mode: str) -> None:
    """Checkpoint every MoA sublayer ('moa') or block ('full') of a MoLM, in place; 'none' does nothing."""
    if mode == "none":
        return
    kinds = {"moa": MoA, "full": Block}
    if mode not in kinds:
        raise ValueError(f"train.activation_checkpoint must be one of none, {', '.join(kinds)}; got {mode!r}")
    modules = [m for m in model.modules() if isinstance(m, kinds[mode])]
    if not modules:
        raise ValueError(f"train.activation_checkpoint {mode!r} found no {kinds[mode].__name__} layer in "
                         f"{type(model).__name__}")
    random = any((isinstance(m, torch.nn.Dropout) and m.p > 0) or getattr(m, "sample_topk", 0) > 0
                 for m in model.modules())
    for module in modules:
        module.forward = functools.partial(_checkpointed, module.forward, random)


def _checkpointed(forward, random: bool, *args, **kwargs):
    if not torch.is_grad_enabled():  # inference keeps nothing anyway
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=random, **kwargs)
