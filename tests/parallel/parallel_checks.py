"""Rank-side checks for tests/parallel/test_parallel_layouts.py, run in spawned gloo processes.

Each check builds the plain single-process MoLM (the oracle) and a parallelised copy with the same
initial weights, runs both on the same data and returns numbers (differences, counts, messages);
the pytest side asserts on them. Checks do all their communication before comparing, so a
mismatch cannot leave ranks waiting in different collectives.

Data-parallel semantics: DP rank d runs shard d; the oracle runs every shard and sums the losses.
Gradients of replicated parameters are summed over the DP group and those of expert-sharded ones
over the expert-data-parallel group (DeepSpeed's reductions, before its 1/dp scaling), then
gathered to full shape and compared with the oracle's.
"""

from __future__ import annotations

import copy
import json
import os
import traceback
from typing import Callable

import torch
import torch.distributed as dist

from molm_megatron.config import model_preset
from molm_megatron.model import MoLM
from molm_megatron.parallel import (
    apply_expert_parallel,
    destroy_parallel,
    expert_param_groups,
    full_state_dict,
    gather_full,
    init_parallel,
    load_full_state_dict,
    parallelize,
)
from molm_megatron.parallel.groups import ParallelGroups

B, T, M = 2, 12, 6  # batch rows per DP rank, segment length, memory length


def tiny_config(**overrides):
    """Odd vocabulary (uneven vocab split), every aux loss weighted so its gradient is checked."""
    fields = dict(vocab_size=509, history_length=M, aux_loss_weight=0.01, concentration_loss_weight=0.02,
                  z_loss_weight=0.001)
    fields.update(overrides)
    return model_preset("tiny", **fields)


def inserted_config():
    """Inserted attention and MLP experts, a pruned second layer, the routing regularisation weighted."""
    return tiny_config(n_att_experts_per_layer=[4, 3], n_mlp_experts_per_layer=[8, 6], n_new_att_experts=1,
                       n_new_mlp_experts=2, routing_reg_weight=0.1)


def make_batches(cfg, num_shards: int) -> list[dict]:
    """One (memory segment, training segment) pair per DP shard, identical on every rank."""
    g = torch.Generator().manual_seed(20261123)
    batches = []
    for _ in range(num_shards):
        prev = torch.randint(0, cfg.vocab_size, (B, M), generator=g)
        ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
        labels = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
        mask = torch.ones(B, M + T, dtype=torch.long)
        mask[1, M:M + 3] = 0  # left padding in row 1: excluded from losses, still dispatched
        labels[1, :3] = -100
        batches.append(dict(prev=prev, ids=ids, labels=labels, mask=mask))
    return batches


def run(model: MoLM, batch: dict):
    """Memory from a no-grad previous segment, then the training segment with labels."""
    with torch.no_grad():
        memory = model(batch["prev"]).memory
    return model(batch["ids"], labels=batch["labels"], attention_mask=batch["mask"], memory=memory,
                 collect_expert_stats=True)


def starve_experts(model: MoLM, layer: int, experts: range) -> None:
    """Make `experts` of one MLP router unreachable while the others keep input-dependent routing:
    hidden unit 0 of the router MLP is pinned near 30 and only the starved experts read it (-1)."""
    w_in, w_e = model.transformer.h[layer].mlpf.gate.w_gate[0], model.transformer.h[layer].mlpf.gate.w_gate[3]
    with torch.no_grad():
        w_in.weight[0].zero_()
        w_in.bias[0] = 30.0
        w_e.weight[:, 0] = 0.0
        w_e.weight[experts.start:experts.stop, 0] = -1.0


def compare_layout(groups: ParallelGroups, cfg, prepare: Callable[[MoLM], None] | None = None) -> dict:
    """Loss, aux losses, logits, every gradient and the full state of a parallelised MoLM against
    the single-process oracle."""
    torch.manual_seed(1234)  # identical initial weights on every rank
    oracle = MoLM(cfg)
    if prepare is not None:
        prepare(oracle)
    model = parallelize(copy.deepcopy(oracle), groups)
    batches = make_batches(cfg, groups.dp_size)

    ref_outs = [run(oracle, b) for b in batches]
    sum(o.loss for o in ref_outs).backward()
    out = run(model, batches[groups.dp_rank])
    out.loss.backward()
    ref = ref_outs[groups.dp_rank]

    shards = getattr(model.lm_head.weight, "shards", ())
    start = shards[-1].start if shards else 0
    result = {
        "loss_diff": abs(out.loss.item() - ref.loss.item()),
        "lm_loss_sum_diff": abs(out.lm_loss_sum.item() - ref.lm_loss_sum.item()),
        "aux_diff": max(abs(out.aux_losses[k].item() - ref.aux_losses[k].item()) for k in ref.aux_losses),
        "logits_diff": (out.logits - ref.logits[..., start:start + out.logits.shape[-1]]).abs().max().item(),
        "local_vocab": out.logits.shape[-1],
        # Assignments each DP shard sends to each MLP expert, per layer (from the oracle, independent of EP).
        "counts": [[o.expert_stats[f"layer{i}.mlpf"].tolist() for o in ref_outs] for i in range(cfg.n_layer)],
    }

    ref_grads = {n: p.grad for n, p in oracle.named_parameters()}
    missing, worst = [], (0.0, "")
    for name, p in model.named_parameters():
        if p.grad is None:
            missing.append(name)  # still joins the collectives below, with zeros, to keep ranks in step
        grad = torch.zeros_like(p) if p.grad is None else p.grad.clone()
        dist.all_reduce(grad, group=groups.edp_group if getattr(p, "allreduce", True) is False else groups.dp_group)
        full = gather_full(grad, getattr(p, "shards", ()), groups)
        rel = ((full - ref_grads[name]).abs().max() / ref_grads[name].abs().max().clamp(min=1e-6)).item()
        worst = max(worst, (rel, name))
    result["params_without_grad"] = missing
    result["grad_max_rel_diff"], result["grad_worst_param"] = worst

    # The recorded shards undo the split exactly, and a full state loads back into the shards.
    full = full_state_dict(model, groups)
    result["state_diff"] = max((full[k] - v).abs().max().item() for k, v in oracle.state_dict().items())
    result["state_keys_match"] = sorted(full) == sorted(oracle.state_dict())
    doubled = {k: 2 * v for k, v in full.items()}
    load_full_state_dict(model, doubled)
    result["reload_diff"] = max((v - doubled[k]).abs().max().item() for k, v in full_state_dict(model, groups).items())
    result["num_sharded"] = sum(1 for p in model.parameters() if getattr(p, "shards", ()))
    return result


def layout_facts(groups: ParallelGroups) -> dict:
    """The rank tables, DeepSpeed's registry and megatron-core's view, for the pytest side."""
    from deepspeed.utils import groups as ds_groups
    from megatron.core import parallel_state

    name = groups.ep_group_name
    facts = {"tp": groups.tp_ranks, "dp": groups.dp_ranks, "ep": groups.ep_ranks, "edp": groups.edp_ranks,
             "megatron_tp_rank": parallel_state.get_tensor_model_parallel_rank() == groups.tp_rank,
             "megatron_dp_size": parallel_state.get_data_parallel_world_size() == groups.dp_size}
    if groups.ep_size > 1:
        facts["deepspeed_ep"] = list(ds_groups._get_expert_parallel_group_ranks(name))
        facts["deepspeed_edp"] = list(ds_groups._get_expert_data_parallel_group_ranks(name))
        facts["deepspeed_same_group"] = (ds_groups._get_expert_parallel_group(name) is groups.ep_group
                                         and ds_groups._get_expert_data_parallel_group(name) is groups.edp_group)
    return facts


def param_group_facts(groups: ParallelGroups, cfg) -> dict:
    """What DeepSpeed's MoE helpers see of an expert-parallel model's parameters."""
    from deepspeed.moe.utils import is_moe_param

    torch.manual_seed(1234)
    model = apply_expert_parallel(MoLM(cfg), groups)
    expert_names = sorted(n for n, p in model.named_parameters() if is_moe_param(p))
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    split = expert_param_groups([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}])
    moe = [g for g in split if g.get("moe")]
    return {
        "expert_names": expert_names,
        "group_names": sorted({p.group_name for n, p in model.named_parameters() if is_moe_param(p)}),
        "moe_groups": [(g["name"], g["weight_decay"], len(g["params"])) for g in moe],
        "dense_params": sum(len(g["params"]) for g in split if not g.get("moe")),
        "expert_shape": list(model.transformer.h[0].mlpf.experts.weight.shape),
    }


def error_text(fn: Callable[[], object]) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return "no error"


def with_layout(tp: int, ep: int, check: Callable[[ParallelGroups], dict]) -> dict:
    groups = init_parallel(tp, ep)
    try:
        return check(groups)
    finally:
        destroy_parallel(groups)


def checks_world2() -> dict[str, Callable[[], dict]]:
    cfg = tiny_config()
    return {
        "tp2": lambda: with_layout(2, 1, lambda g: compare_layout(g, cfg)),
        "ep2": lambda: with_layout(1, 2, lambda g: compare_layout(g, cfg)),
        # Layer 0 sends no token to EP rank 1's experts (4..7): it must still run, without hanging.
        "ep2_starved": lambda: with_layout(1, 2, lambda g: compare_layout(
            g, cfg, prepare=lambda m: starve_experts(m, 0, range(4, 8)))),
        "ep2_param_groups": lambda: with_layout(1, 2, lambda g: param_group_facts(g, cfg)),
        "ep2_bad_experts": lambda: with_layout(1, 2, lambda g: {"error": error_text(
            lambda: apply_expert_parallel(MoLM(tiny_config(n_mlp_experts=5)), g))}),
        # Inserted experts (separate tensors) and per-layer counts: TP splits both parts of each expert tensor.
        "tp2_inserted": lambda: with_layout(2, 1, lambda g: compare_layout(g, inserted_config())),
        # EP splits old and inserted experts separately: rank r holds its share of each.
        "ep2_inserted": lambda: with_layout(1, 2, lambda g: compare_layout(g, inserted_config())),
        "ep2_bad_inserted": lambda: with_layout(1, 2, lambda g: {"error": error_text(
            lambda: apply_expert_parallel(MoLM(tiny_config(n_new_mlp_experts=1)), g))}),
    }


def checks_world4() -> dict[str, Callable[[], dict]]:
    cfg = tiny_config()
    return {
        "ep2_dp2": lambda: with_layout(1, 2, lambda g: {**compare_layout(g, cfg), "facts": layout_facts(g)}),
        "tp2_ep2": lambda: with_layout(2, 2, lambda g: {**compare_layout(g, cfg), "facts": layout_facts(g)}),
        # EP rank 1 of layer 1 gets nothing while TP splits its experts: zero rows inside TP lanes.
        "tp2_ep2_starved": lambda: with_layout(2, 2, lambda g: compare_layout(
            g, cfg, prepare=lambda m: starve_experts(m, 1, range(4, 8)))),
    }


SUITES = {"world2": checks_world2, "world4": checks_world4}


def worker(rank: int, world_size: int, store_path: str, suite: str, out_dir: str) -> None:
    """Entry point of one spawned rank: run every check of `suite`, write rank{rank}.json."""
    torch.set_num_threads(1)  # 2-4 ranks share 2 cores
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    results = {}
    try:
        for name, check in SUITES[suite]().items():
            try:
                results[name] = check()
            except Exception:  # recorded so the pytest side shows which check broke and why
                results[name] = {"exception": traceback.format_exc()}
                raise
    finally:
        tmp = os.path.join(out_dir, f"rank{rank}.json.tmp")
        with open(tmp, "w") as f:
            json.dump(results, f)
        os.replace(tmp, os.path.join(out_dir, f"rank{rank}.json"))
        dist.destroy_process_group()
