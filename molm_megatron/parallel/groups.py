"""The process groups of a run, made once so that megatron-core and DeepSpeed agree on peers.

Tensor-parallel (TP) and data-parallel (DP) groups come from megatron-core's
`parallel_state.initialize_model_parallel` (pipeline size 1). Expert-parallel (EP) and
expert-data-parallel (EDP) groups are laid out by DeepSpeed's own table
(`deepspeed.utils.groups._get_expert_parallel_ranks`, its "E + M + D" layout) and registered under
DeepSpeed's name `ep_size_{ep}` in the dictionaries its ZeRO optimizer reads (expert gradients are
reduced over the EDP group found there by `param.group_name`). Creating them here rather than
letting a DeepSpeed `MoE` layer create them keeps one set of communicators for both our dispatcher
and DeepSpeed.

Layout, world = tp * dp and dp = ep * edp (megatron order 'tp-cp-ep-dp-pp'):
- TP groups: runs of tp consecutive ranks; DP groups: ranks with the same TP rank (stride tp);
- EP groups: runs of ep consecutive members of a DP group; EDP groups: the members at the same
  position of the EP groups of one DP group.
World 4, tp 2, ep 2: TP [0,1] [2,3]; DP [0,2] [1,3]; EP [0,2] [1,3]; EDP [0] [2] [1] [3].
World 4, tp 1, ep 2: TP [0] [1] [2] [3]; DP [0,1,2,3]; EP [0,1] [2,3]; EDP [0,2] [1,3].

`ParallelGroups` also exposes the megatron-style getters DeepSpeed expects of `mpu`
(`deepspeed.initialize(..., mpu=groups)`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist

from molm_megatron.config import ModelConfig


def check_divides(divisor_name: str, divisor: int, name: str, value: int, where: str = "") -> None:
    """ValueError naming both fields and values unless `divisor` divides `value`."""
    if divisor <= 0 or value % divisor:
        raise ValueError(f"{where}{divisor_name} ({divisor}) must divide {name} ({value})")


def validate_layout(world_size: int, tp: int, ep: int, cfg: ModelConfig | None = None) -> None:
    """Check a layout before building anything; ValueError names the fields and both values.

    tp must divide the world size, ep the data-parallel size; with a model config also: ep divides
    the MLP experts, tp divides the MLP expert width and does not exceed the vocabulary.
    """
    for name, value in (("parallel.tensor_parallel_size", tp), ("parallel.expert_parallel_size", ep)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    check_divides("parallel.tensor_parallel_size", tp, "the world size", world_size)
    dp = world_size // tp
    check_divides("parallel.expert_parallel_size", ep,
                  f"the data-parallel size = world size {world_size} / parallel.tensor_parallel_size {tp}", dp)
    if cfg is not None:
        # Old and inserted experts are split over the EP ranks separately (expert_parallel.py).
        check_divides("parallel.expert_parallel_size", ep, "model.n_new_mlp_experts", cfg.n_new_mlp_experts)
        for layer in range(cfg.n_layer):
            name = f"model.n_mlp_experts_per_layer[{layer}]" if cfg.n_mlp_experts_per_layer else "model.n_mlp_experts"
            check_divides("parallel.expert_parallel_size", ep, name, cfg.mlp_experts(layer))
        check_divides("parallel.tensor_parallel_size", tp, "model.ffd_hidden", cfg.ffd_hidden)
        if tp > cfg.vocab_size:
            raise ValueError(f"parallel.tensor_parallel_size ({tp}) exceeds model.vocab_size ({cfg.vocab_size})")


@dataclass
class ParallelGroups:
    """This rank's groups, ranks and sizes on each axis ('tp', 'dp', 'ep', 'edp').

    With ep == 1 there is no expert parallelism: `ep_group` is None and EDP is DP.
    """

    world_size: int
    rank: int
    tp_size: int
    tp_rank: int
    tp_group: dist.ProcessGroup
    tp_ranks: list[int]
    dp_size: int
    dp_rank: int
    dp_group: dist.ProcessGroup
    dp_ranks: list[int]
    ep_size: int
    ep_rank: int
    ep_group: dist.ProcessGroup | None
    ep_ranks: list[int]
    edp_size: int
    edp_rank: int
    edp_group: dist.ProcessGroup
    edp_ranks: list[int]
    ep_group_name: str
    """DeepSpeed's name of the EP/EDP group pair, `ep_size_{ep}`; expert params carry it as `group_name`."""
    owned_groups: list[dist.ProcessGroup] = field(default_factory=list, repr=False)

    def axis_group(self, axis: str) -> dist.ProcessGroup:
        return {"tp": self.tp_group, "dp": self.dp_group, "ep": self.ep_group, "edp": self.edp_group}[axis]

    def axis_size(self, axis: str) -> int:
        return {"tp": self.tp_size, "dp": self.dp_size, "ep": self.ep_size, "edp": self.edp_size}[axis]

    def axis_rank(self, axis: str) -> int:
        return {"tp": self.tp_rank, "dp": self.dp_rank, "ep": self.ep_rank, "edp": self.edp_rank}[axis]

    # ---- the `mpu` interface DeepSpeed reads (deepspeed/utils/bwc.py, runtime/utils.py) ----
    def get_tensor_model_parallel_group(self) -> dist.ProcessGroup:
        return self.tp_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.tp_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.tp_ranks[0]

    # Pipeline size is 1, so "model parallel" is tensor parallel.
    get_model_parallel_group = get_tensor_model_parallel_group
    get_model_parallel_rank = get_tensor_model_parallel_rank
    get_model_parallel_world_size = get_tensor_model_parallel_world_size

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self.dp_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp_size

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.dp_ranks

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0


def _new_groups(tables: list[list[int]], rank: int, owned: list) -> tuple[dist.ProcessGroup, list[int]]:
    """Create one group per rank list (every rank must create every group, in the same order);
    return the one holding `rank`."""
    mine = None
    for ranks in tables:
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = (group, list(ranks))
            owned.append(group)
    assert mine is not None, f"rank {rank} is in none of {tables}"
    return mine


def init_parallel(tp: int, ep: int) -> ParallelGroups:
    """Build the TP/DP groups (megatron-core) and the EP/EDP groups (DeepSpeed's layout and names).

    Call after `torch.distributed` is initialised (e.g. by `deepspeed.init_distributed`), on every
    rank, before building the DeepSpeed engine. Undo with `destroy_parallel`.
    """
    from deepspeed.utils import groups as ds_groups
    from megatron.core import parallel_state

    if not dist.is_initialized():
        raise RuntimeError("init_parallel needs torch.distributed initialised first")
    if parallel_state.model_parallel_is_initialized():
        raise RuntimeError("megatron-core parallel_state is already initialised; call destroy_parallel first")
    world, rank = dist.get_world_size(), dist.get_rank()
    validate_layout(world, tp, ep)
    # No gloo twins of the NCCL groups: only megatron's distributed optimizer uses them, we use ZeRO.
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=1,
                                             create_gloo_process_groups=False)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    dp_group = parallel_state.get_data_parallel_group()
    dp_ranks = dist.get_process_group_ranks(dp_group)
    name = f"ep_size_{ep}"
    owned: list[dist.ProcessGroup] = []
    if ep > 1:
        ep_tables, edp_tables = ds_groups._get_expert_parallel_ranks(world, tp, ep)
        ep_group, ep_ranks = _new_groups(ep_tables, rank, owned)
        edp_group, edp_ranks = _new_groups(edp_tables, rank, owned)
        # Our invariant: experts are shared out among data-parallel peers only (never TP peers).
        assert set(ep_ranks) <= set(dp_ranks) and set(edp_ranks) <= set(dp_ranks), (ep_ranks, edp_ranks, dp_ranks)
        # Register where DeepSpeed's ZeRO and engine look expert groups up by `param.group_name`.
        ds_groups._EXPERT_PARALLEL_GROUP[name], ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = ep_group, ep_ranks
        ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = edp_group
        ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = edp_ranks
    else:
        ep_group, ep_ranks, edp_group, edp_ranks = None, [rank], dp_group, dp_ranks
    return ParallelGroups(
        world_size=world, rank=rank,
        tp_size=tp, tp_rank=parallel_state.get_tensor_model_parallel_rank(), tp_group=tp_group,
        tp_ranks=dist.get_process_group_ranks(tp_group),
        dp_size=world // tp, dp_rank=parallel_state.get_data_parallel_rank(), dp_group=dp_group, dp_ranks=dp_ranks,
        ep_size=ep, ep_rank=ep_ranks.index(rank), ep_group=ep_group, ep_ranks=ep_ranks,
        edp_size=len(edp_ranks), edp_rank=edp_ranks.index(rank), edp_group=edp_group, edp_ranks=edp_ranks,
        ep_group_name=name, owned_groups=owned,
    )


def destroy_parallel(groups: ParallelGroups) -> None:
    """Undo `init_parallel` (megatron-core state, our EP/EDP groups, DeepSpeed's registry entries);
    the default (world) group stays."""
    from deepspeed.utils import groups as ds_groups
    from megatron.core import parallel_state

    for registry in (ds_groups._EXPERT_PARALLEL_GROUP, ds_groups._EXPERT_PARALLEL_GROUP_RANKS,
                     ds_groups._EXPERT_DATA_PARALLEL_GROUP, ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS):
        registry.pop(groups.ep_group_name, None)
    for group in groups.owned_groups:
        dist.destroy_process_group(group)
    groups.owned_groups.clear()
    parallel_state.destroy_model_parallel()
