"""Tensor parallelism (TP) for MoLM, stated as data: the model class's `tp_plan` maps module paths
to the styles defined here (`STYLES`) and `apply_tensor_parallel` reads it. Megatron-LM's scheme (Shoeybi et al., "Megatron-LM", 2019,
sec. 3): an input that enters a split computation passes a *copy* region (identity forward,
all-reduce of its gradient backward); a partial output leaves through a *reduce* region
(all-reduce forward, identity backward). We use megatron-core's two mapping functions for these.

The layout (docs/design.md, "Parallelism"):
- `transformer.wte`, `lm_head`: split over the vocabulary (balanced, uneven allowed: 50295 is odd).
  The embedding looks up its own rows, zeros the others and all-reduces; the head yields this
  rank's logits [B, T, V_local] and the model's cross entropy is replaced by a vocab-parallel one,
  so full logits [B, T, V] are never materialised (with V = 50295 they are the largest activation).
- MLP experts: each expert's hidden width F split; `experts.weight` [E, D, F] -> [E, D, F/tp]
  (column), `output_experts.weight` [E, F, D] -> [E, F/tp, D] (row). The expert computation is
  wrapped: x and the gates enter copy regions, the gated sum [T, D] leaves a reduce region.
  Reducing after the gate weighting is exact and moves T*D numbers rather than T*K*D: the gates'
  gradient, sum_r <partial_r, dy>, is made whole by the copy region's backward all-reduce on the
  gates ([T, K] numbers), so the replicated routers get the single-process gradient.
- Attention experts, routers, layer norms: replicated (attention experts stay whole, one head of
  1024; every TP rank routes identically because routers and their inputs are replicated).

Legend: T tokens, K experts per token, D n_embd, F ffd_hidden, E experts, V vocabulary,
V_local this rank's vocabulary rows, N = T*K assignments.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)

from molm_megatron.model.model import Routed, at_least_fp32
from molm_megatron.parallel.groups import ParallelGroups, check_divides
from molm_megatron.parallel.sharding import shard_parameter

class VocabParallelEmbedding(nn.Module):
    """nn.Embedding with its rows (vocabulary) split over TP ranks: weight [V_local, D].

    Each rank looks up the ids inside its range, writes zeros for the others, and the all-reduce
    sums the one non-zero contribution per token (megatron-core's VocabParallelEmbedding, written
    here because that one needs V divisible by tp).
    """

    def __init__(self, dense: nn.Embedding, groups: ParallelGroups):
        super().__init__()
        if dense.padding_idx is not None or dense.max_norm is not None:
            raise ValueError("vocab-parallel embedding supports neither padding_idx nor max_norm")
        self.num_embeddings, self.embedding_dim = dense.num_embeddings, dense.embedding_dim
        self.weight = dense.weight
        shard = shard_parameter(self, "weight", "tp", 0, groups).shards[-1]
        self.vocab_start, self.vocab_end = shard.start, shard.start + shard.length
        self.group = groups.tp_group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)  # (..., D)
        return reduce_from_tensor_model_parallel_region(out, group=self.group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross entropy of vocab-split logits: loss_n = log sum_v exp(l_nv) - l_n,target.

    Forward all-reduces the row max (MAX) and [sum of exponentials, target logit] (SUM) over the TP
    group; backward is (softmax - onehot) * dloss on the local shard, without communication.
    """

    @staticmethod
    def forward(ctx, logits_NV: torch.Tensor, target_N: torch.Tensor, vocab_start: int,
                group: dist.ProcessGroup) -> torch.Tensor:
        ctx.dtype = logits_NV.dtype
        num_local = logits_NV.shape[1]
        logits = at_least_fp32(logits_NV)  # a 50k-way softmax loses small probabilities in bf16
        max_N = logits.max(dim=1).values
        dist.all_reduce(max_N, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - max_N.unsqueeze(1)  # a new buffer: the caller's logits stay untouched
        local_N = target_N - vocab_start
        in_shard_N = (local_N >= 0) & (local_N < num_local)
        local_N = local_N.masked_fill(~in_shard_N, 0)
        target_logit_N = shifted.gather(1, local_N.unsqueeze(1)).squeeze(1).masked_fill(~in_shard_N, 0.0)
        exp = shifted.exp_()  # becomes the softmax kept for backward
        sums_2N = torch.stack([exp.sum(dim=1), target_logit_N])
        dist.all_reduce(sums_2N, group=group)  # one call for both sums
        sum_exp_N, target_logit_N = sums_2N
        ctx.save_for_backward(exp.div_(sum_exp_N.unsqueeze(1)), local_N, in_shard_N)
        return sum_exp_N.log() - target_logit_N

    @staticmethod
    def backward(ctx, grad_N: torch.Tensor):
        softmax, local_N, in_shard_N = ctx.saved_tensors
        grad = softmax * grad_N.unsqueeze(1)
        grad.scatter_add_(1, local_N.unsqueeze(1), -(grad_N * in_shard_N).unsqueeze(1))
        return grad.to(ctx.dtype), None, None, None


class VocabParallelCrossEntropy:
    """Replaces `MoLM.cross_entropy_sum`: sum over labels != -100 of the cross entropy of this
    rank's logit shard [B, T, V_local] against labels [B, T] (the same value on every TP rank)."""

    def __init__(self, vocab_start: int, group: dist.ProcessGroup):
        self.vocab_start, self.group = vocab_start, group

    def __call__(self, logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
        valid_N = labels_BT.reshape(-1) != -100
        target_N = labels_BT.reshape(-1).masked_fill(~valid_N, 0)  # any id: these rows are dropped below
        loss_N = _VocabParallelCrossEntropy.apply(logits_BTV.reshape(-1, logits_BTV.shape[-1]), target_N,
                                                  self.vocab_start, self.group)
        return torch.where(valid_N, loss_N, 0.0).sum()


class TensorParallelExpertRegions:
    """Wraps `MoE.expert_mlp(x_TD, routed) -> y_TD` for experts whose hidden width is TP-split.

    x_TD and the gates enter copy regions, the gated partial sum leaves a reduce region (see the
    module docstring for why reducing after the gate weighting is exact). The wrapped computation
    may itself be the expert-parallel dispatcher: its all-to-alls then run inside each TP lane.
    """

    def __init__(self, inner: Callable[[torch.Tensor, Routed], torch.Tensor], group: dist.ProcessGroup):
        self.inner, self.group = inner, group

    def __call__(self, x_TD: torch.Tensor, routed: Routed) -> torch.Tensor:
        gates_TK = copy_to_tensor_model_parallel_region(routed.router.gates_TK, group=self.group)
        routed = dataclasses.replace(routed, router=dataclasses.replace(routed.router, gates_TK=gates_TK))
        y_TD = self.inner(copy_to_tensor_model_parallel_region(x_TD, group=self.group), routed)
        return reduce_from_tensor_model_parallel_region(y_TD, group=self.group)


def _vocab(model: nn.Module, path: str, module: nn.Module, groups: ParallelGroups) -> None:
    if isinstance(module, nn.Embedding):
        model.set_submodule(path, VocabParallelEmbedding(module, groups))
    elif isinstance(module, nn.Linear):
        # The head stays the model's own module (its GPU path pads odd vocabulary widths for cuBLAS),
        # holding rows [V_local, D] of the weight and returning logits [..., V_local]. Its input
        # enters a copy region: each rank's rows contribute a partial input gradient.
        if module.bias is not None:
            raise ValueError(f"{path}: the vocab-parallel head expects no bias (MoLM's lm_head has none)")
        shard = shard_parameter(module, "weight", "tp", 0, groups).shards[-1]
        module.out_features = shard.length
        group = groups.tp_group
        module.register_forward_pre_hook(lambda _, args: (copy_to_tensor_model_parallel_region(args[0], group),)
                                         + args[1:])
        # The model's loss hook: logits stay split, so its cross entropy must be the vocab-parallel one.
        model.cross_entropy_sum = VocabParallelCrossEntropy(shard.start, group)
    else:
        raise TypeError(f"{path}: style 'vocab' applies to nn.Embedding or nn.Linear, not {type(module).__name__}")


def _expert_split(dim: int) -> Callable[[nn.Module, str, nn.Module, ParallelGroups], None]:
    def apply(model: nn.Module, path: str, module: nn.Module, groups: ParallelGroups) -> None:
        # Even widths, as megatron-core requires: an uneven split would idle the narrower ranks.
        check_divides("parallel.tensor_parallel_size", groups.tp_size, "model.ffd_hidden", module.weight.shape[dim],
                      where=f"{path}: ")
        # Inserted experts (`new_weight`) split the same way, so `full_weight()` concatenates shards.
        for name in ("weight", "new_weight"):
            if getattr(module, name, None) is not None:
                shard_parameter(module, name, "tp", dim, groups)
    return apply


def _expert_regions(model: nn.Module, path: str, module: nn.Module, groups: ParallelGroups) -> None:
    module.expert_mlp = TensorParallelExpertRegions(module.expert_mlp, groups.tp_group)


STYLES: dict[str, Callable[[nn.Module, str, nn.Module, ParallelGroups], None]] = {
    "replicate": lambda model, path, module, groups: None,
    "vocab": _vocab,
    "expert_column": _expert_split(2),  # [E, D, F]: split the output (hidden) dim
    "expert_row": _expert_split(1),  # [E, F, D]: split the input (hidden) dim
    "expert_regions": _expert_regions,
}


def plan_style(plan: dict[str, str], path: str) -> str | None:
    """The style of the entry matching `path` itself, or None."""
    matches = [style for pattern, style in plan.items() if fnmatch.fnmatchcase(path, pattern)]
    assert len(matches) <= 1, f"{path} matches several plan entries: {matches}"
    return matches[0] if matches else None


def model_plan(model: nn.Module, attribute: str) -> dict[str, str]:
    """The model class's parallel plan table (`tp_plan` or `ep_plan`); TypeError if it has none."""
    plan = getattr(model, attribute, None)
    if not isinstance(plan, dict):
        raise TypeError(f"{type(model).__name__} has no {attribute} table (module path pattern -> style)")
    return plan


def check_plan_covers(model: nn.Module, plan: dict[str, str]) -> None:
    """ValueError naming the first parameter that no plan entry (on its module or an ancestor) covers."""
    for name, _ in model.named_parameters():
        parts = name.split(".")[:-1]
        if not any(plan_style(plan, ".".join(parts[:i])) for i in range(len(parts), 0, -1)):
            raise ValueError(f"the parallel plan has no entry for parameter {name!r}; add its module to the plan")


def apply_tensor_parallel(model: nn.Module, groups: ParallelGroups) -> nn.Module:
    """Split `model` (a plain MoLM, same initial weights on every rank) in place by its `tp_plan`.

    Afterwards `model(...)` on each TP rank takes the same inputs as the plain model and returns
    the same loss and aux losses; `out.logits` is this rank's vocabulary shard [B, T, V_local].
    Sharded parameters carry `shards` (see sharding.py). A no-op when tp == 1.
    """
    if groups.tp_size == 1:
        return model
    plan = model_plan(model, "tp_plan")
    check_plan_covers(model, plan)
    for path, module in list(model.named_modules()):
        style = plan_style(plan, path)
        if style is not None:
            STYLES[style](model, path, module, groups)
    return model
