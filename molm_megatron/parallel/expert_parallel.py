"""Expert parallelism (EP) for MoLM's MLP experts: each EP rank holds E/ep experts of every SMoE
layer and tokens travel to their experts by a dropless all-to-all with uneven splits (no capacity,
no token dropping), as in GShard (Lepikhin et al., 2020) without its capacity factor, and
MegaBlocks (Gale et al., 2022) for the dropless variable-size exchange.

`ExpertParallelDispatcher` wraps `MoE.expert_mlp` (torchtitan's `ExpertParallel` shape): it
permutes this rank's T*K assignments by destination rank, exchanges them, runs the unchanged
expert code on the received rows as if this rank's E/ep experts were all experts (one choice per
row, gate 1), sends the outputs back, and combines them with the gates on the source rank.
Autograd runs through both all-to-alls (the backward of an all-to-all is the reverse one), so every
EP rank must run every MoE layer forward and backward, also when it receives no token.

Inserted experts (continual learning) live in separate tensors (`new_weight`, after the E_old old
experts); each is split over the EP ranks on its own, so rank r holds its E_old/ep old experts and
its E_new/ep new ones, and computes with their concatenation (local experts 0..E_old/ep - 1 old,
then the new ones). The dispatcher therefore renumbers the router's global expert ids rank-major
(`rank * E_local + local index`) before sorting by destination; without inserted experts that
renumbering is the identity and is skipped.

Attention experts are never expert-parallel: attention sits between their two projections, so a
token's query would travel to the expert and the attention output back in the middle of MoA.

Expert parameters are tagged the way DeepSpeed's MoE layer tags its own (`deepspeed/moe/utils.py`
`is_moe_param`: `allreduce = False`; `group_name = 'ep_size_{ep}'` selects the expert-data-parallel
group for their gradient reduction), and `expert_param_groups` splits optimizer parameter groups
with DeepSpeed's own `split_params_into_different_moe_groups_for_optimizer`.

Legend: T tokens on this rank, K experts per token, N = T*K assignments sent, M assignments
received, D n_embd, E experts, E_local = E / ep.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn

import molm_kernels
from molm_megatron.model.model import MoE, Routed, RouterOutput
from molm_megatron.parallel.groups import ParallelGroups, check_divides
from molm_megatron.parallel.sharding import shard_parameter
from molm_megatron.parallel.tensor_parallel import model_plan

class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits, differentiable: the backward is the reverse exchange.

    (megatron-core's `all_to_all` allocates its output on the current CUDA device, so it cannot run
    on CPU/gloo.)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, output_splits: list[int], input_splits: list[int],
                group: dist.ProcessGroup) -> torch.Tensor:
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        out = x.new_empty((sum(output_splits),) + x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllToAll.apply(grad, ctx.input_splits, ctx.output_splits, ctx.group), None, None, None


class _ZeroGradsFor(torch.autograd.Function):
    """Identity on `y` that hands zero gradients to `others`.

    A rank that receives no token computes nothing, so without this its output would not depend
    on anything: autograd would skip the reverse all-to-all that its peers wait in (a hang), and
    its expert weights would get no gradient, which DeepSpeed's bucketed gradient reduction over the
    expert-data-parallel group needs on every rank.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
        ctx.others = [(t.shape, t.dtype, t.device) for t in others]
        return y.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (grad,) + tuple(torch.zeros(s, dtype=d, device=v) for s, d, v in ctx.others)


def _single_choice_routing(local_expert_M: torch.Tensor, num_local: int, dtype: torch.dtype) -> Routed:
    """A Routed for rows that each carry one assignment (K = 1) with gate 1, for `MoE.expert_mlp`.

    expert_mlp reads only the gates, the chosen experts and the sorted index; the probabilities,
    logits and validity belong to the source ranks' routers and are left empty here.
    """
    experts_M1 = local_expert_M.unsqueeze(1)
    empty = torch.empty(experts_M1.shape[0], 0, device=experts_M1.device)
    router = RouterOutput(gates_TK=torch.ones(experts_M1.shape, dtype=dtype, device=experts_M1.device),
                          experts_TK=experts_M1, probs_TE=empty, logits_TE=empty)
    return Routed(router, molm_kernels.route(experts_M1, num_local), None)


class ExpertParallelDispatcher:
    """Replaces `moe.expert_mlp(x_TD, routed) -> y_TD` on a layer whose experts are EP-sharded.

    `inner` is the unsharded-semantics computation (the model's own `expert_mlp`); it must not
    communicate, because it is skipped on a rank that receives no token (tensor parallelism wraps
    this dispatcher from outside, see parallel/__init__.py).
    """

    def __init__(self, inner: Callable[[torch.Tensor, Routed], torch.Tensor], moe: MoE, num_experts: int,
                 num_new: int, groups: ParallelGroups):
        self.inner = inner
        # The layer, not its weights: tensor parallelism replaces the weight tensors after this.
        self.moe = moe
        ep = groups.ep_size
        self.num_experts, self.ep_size, self.group = num_experts, ep, groups.ep_group
        self.num_local = num_experts // ep
        # Global expert id -> rank-major id (owner rank * E_local + index among its local experts).
        self.rank_major_E: torch.Tensor | None = None
        if num_new:
            old_local, new_local = (num_experts - num_new) // ep, num_new // ep
            e = torch.arange(num_experts)
            old = e < num_experts - num_new
            rank = torch.where(old, e // old_local, (e - (num_experts - num_new)) // new_local)
            local = torch.where(old, e % old_local, old_local + (e - (num_experts - num_new)) % new_local)
            self.rank_major_E = rank * self.num_local + local

    def __call__(self, x_TD: torch.Tensor, routed: Routed) -> torch.Tensor:
        T, D = x_TD.shape
        K = routed.router.experts_TK.shape[1]
        ep, E_local = self.ep_size, self.num_local
        # Sorted by rank-major expert id, assignments are grouped by destination rank: the send buffer
        # is a gather in that order. Without inserted experts rank r owns experts [r*E_local,
        # (r+1)*E_local), so the router's own expert-sorted order is that order already.
        experts_TK, index = routed.router.experts_TK, routed.index
        if self.rank_major_E is not None:
            experts_TK = self.rank_major_E.to(experts_TK.device)[experts_TK]
            index = molm_kernels.route(experts_TK, self.num_experts)
        sorted_flat_N = index.sorted_flat_idx_N
        send_counts_E = torch.bincount(experts_TK.reshape(-1), minlength=self.num_experts)
        recv_counts_E = torch.empty_like(send_counts_E)  # (ep sources x E_local) counts for my experts
        dist.all_to_all_single(recv_counts_E, send_counts_E, group=self.group)
        # One host sync per layer: the split sizes must be Python ints for the uneven exchange.
        input_splits = send_counts_E.view(ep, E_local).sum(1).tolist()
        output_splits = recv_counts_E.view(ep, E_local).sum(1).tolist()

        x_recv_MD = _AllToAll.apply(x_TD[sorted_flat_N // K], output_splits, input_splits, self.group)
        # Received rows come source-major, and within a source by local expert.
        local_expert_M = torch.arange(E_local, device=x_TD.device).repeat(ep).repeat_interleave(recv_counts_E)
        if x_recv_MD.shape[0]:
            y_recv_MD = self.inner(x_recv_MD, _single_choice_routing(local_expert_M, E_local, x_TD.dtype))
        else:
            y_recv_MD = x_recv_MD.new_zeros(0, D)
            if torch.is_grad_enabled():
                weights = [p for experts in (self.moe.experts, self.moe.output_experts)
                           for p in (experts.weight, experts.new_weight) if p is not None]
                y_recv_MD = _ZeroGradsFor.apply(y_recv_MD, x_recv_MD, *weights)
        y_back_ND = _AllToAll.apply(y_recv_MD, input_splits, output_splits, self.group)  # expert-sorted

        # Combine on the source rank, as the model's reduce does: back to token-major (t*K + j) order,
        # then y_t = sum_j gate_tj * y_(t, j).
        y_flat_ND = torch.empty_like(y_back_ND).index_copy(0, sorted_flat_N, y_back_ND)
        gates_TK = routed.router.gates_TK.to(y_flat_ND.dtype)
        return torch.bmm(gates_TK.unsqueeze(1), y_flat_ND.view(T, K, -1)).squeeze(1)


def apply_expert_parallel(model: nn.Module, groups: ParallelGroups) -> nn.Module:
    """Keep this rank's E/ep MLP experts of every layer its `ep_plan` marks 'dispatch' and route
    tokens to the others.

    Slices `mlpf.experts.weight` and `mlpf.output_experts.weight` (and their inserted experts'
    `new_weight`, each on its own) along the expert dim, tags them for DeepSpeed (`allreduce = False`, `group_name`) and wraps `mlpf.expert_mlp` with the
    dispatcher. A no-op when ep == 1 (experts are then ordinary data-parallel parameters).
    """
    if groups.ep_size == 1:
        return model
    plan = model_plan(model, "ep_plan")
    for path, module in list(model.named_modules()):
        styles = {style for pattern, style in plan.items() if fnmatch.fnmatchcase(path, pattern)}
        if not styles:
            continue
        if styles != {"dispatch"}:
            raise ValueError(f"{path}: unknown expert-parallel style(s) {sorted(styles)}; known: 'dispatch'")
        if not isinstance(module, MoE):
            raise TypeError(f"{path}: expert parallelism applies to MoE layers, not {type(module).__name__}")
        num_experts, num_new = module.gate.num_experts, module.gate.num_new_experts
        check_divides("parallel.expert_parallel_size", groups.ep_size, "model.n_mlp_experts", num_experts,
                      where=f"{path}: ")
        check_divides("parallel.expert_parallel_size", groups.ep_size, "model.n_new_mlp_experts", num_new,
                      where=f"{path}: ")
        for experts in (module.experts, module.output_experts):
            for name in ("weight", "new_weight"):
                if getattr(experts, name) is None:
                    continue
                param = shard_parameter(experts, name, "ep", 0, groups)
                param.allreduce = False  # DeepSpeed: not reduced over the data-parallel group ...
                param.group_name = groups.ep_group_name  # ... but over this expert-data-parallel group
        module.expert_mlp = ExpertParallelDispatcher(module.expert_mlp, module, num_experts, num_new, groups)
    return model


def expert_param_groups(param_groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Optimizer parameter groups with expert parameters moved into DeepSpeed MoE groups.

    Each input group (e.g. decay / no-decay) keeps its non-expert parameters; its expert parameters
    go to a copy of it marked `moe: True` and named by their `group_name`, which is how DeepSpeed's
    ZeRO finds the expert-data-parallel group to reduce and partition them over. Groups without a
    'name' get 'group{i}' (DeepSpeed's split needs names).
    """
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    named = [{"name": f"group{i}", **group} for i, group in enumerate(param_groups)]
    return [g for g in split_params_into_different_moe_groups_for_optimizer(named) if g["params"]]
