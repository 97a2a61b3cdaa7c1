"""Parallelism applied from outside the plain model: process groups, tensor parallelism, expert
parallelism, and how parameters are split (torchtitan's `parallelize_*` shape).

The engine calls, on every rank, after `torch.distributed` is initialised:

    groups = init_parallel(tp, ep)           # megatron-core TP/DP + DeepSpeed-layout EP/EDP groups
    model = parallelize(MoLM(cfg), groups)   # same seed on every rank: identical initial weights
    ...deepspeed.initialize(model=model, mpu=groups,
                            model_parameters=expert_param_groups(param_groups), ...)
    destroy_parallel(groups)                 # at the end
"""

from torch import nn

from molm_megatron.parallel.expert_parallel import ExpertParallelDispatcher, apply_expert_parallel, expert_param_groups
from molm_megatron.parallel.groups import ParallelGroups, destroy_parallel, init_parallel, validate_layout
from molm_megatron.parallel.sharding import Shard, full_state_dict, gather_full, load_full_state_dict, shard_tensor
from molm_megatron.parallel.tensor_parallel import apply_tensor_parallel

__all__ = [
    "ExpertParallelDispatcher", "ParallelGroups", "Shard", "apply_expert_parallel",
    "apply_tensor_parallel", "destroy_parallel", "expert_param_groups", "full_state_dict", "gather_full",
    "init_parallel", "load_full_state_dict", "parallelize", "shard_tensor", "validate_layout",
]


def parallelize(model: nn.Module, groups: ParallelGroups) -> nn.Module:
    """Apply expert then tensor parallelism to a plain MoLM, in place; returns it.

    The order is fixed: expert parallelism first, so that tensor parallelism wraps the dispatcher.
    Each TP rank then exchanges tokens with the same TP rank of the other EP ranks (its "lane"),
    all-to-alls carry D-wide rows for this lane's hidden slice, and TP's single all-reduce runs on
    the gated sum [T, D] after the tokens are back, rather than on every dispatched row [T*K, D].
    """
    apply_expert_parallel(model, groups)
    apply_tensor_parallel(model, groups)
    return model
