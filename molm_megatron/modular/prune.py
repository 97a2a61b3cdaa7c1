"""Pruning rarely used experts into a smaller model (ModuleFormer, Shen et al. 2023, section 5.3) and
the layer-dropping baselines (Sajjad et al., "On the effect of dropping layers of pre-trained
transformer models", 2023).

Importance of expert e of a router = its routing frequency on a dataset (modular.stats), divided by
the router's largest frequency (`max`, the paper's default) or by their sum (`sum`). Experts are
removed under a threshold, or least important first (over all routers) until the parameters left
are at most a target share of the model's; every router keeps at least `min_experts`.

A pruned router drops the removed experts' rows of W_e, so the softmax runs over the kept experts
only: the pruned model computes exactly what the unpruned one computes with the removed experts'
router logits set to -inf (tests/modular checks this against such a masked forward). The result has
per-layer expert counts in its config; inserted experts are folded into the ordinary ones.
"""

from __future__ import annotations

import dataclasses

import torch

from molm_megatron.model import MoLM
from molm_megatron.modular.weights import (EXPERT_TENSORS, KINDS, expert_counts, full_state_dict, model_from_full,
                                           moe_prefix, num_experts, parse_router, router_names, with_expert_counts)

NORMS = ("max", "sum")
LAYER_DROP_MODES = ("top", "uniform")


def importance(frequencies: dict[str, list[float]], norm: str) -> dict[str, torch.Tensor]:
    """Per router, each expert's frequency divided by the router's max or sum (float64 [E])."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}; got {norm!r}")
    out = {}
    for name, freq in frequencies.items():
        f = torch.tensor(freq, dtype=torch.float64)
        scale = f.max() if norm == "max" else f.sum()
        out[name] = f / scale if scale > 0 else torch.ones_like(f)  # an unused router: all equally (un)important
    return out


def _floor(model: MoLM, name: str, min_experts: int | None) -> int:
    """Experts router `name` must keep: min_experts, by default (None) its top-k, never fewer."""
    cfg = model.config
    k = cfg.k_att if name.endswith(".attn") else cfg.k_mlp
    if min_experts is None:
        return k
    if min_experts < k:
        raise ValueError(f"min_experts ({min_experts}) is below the top-k of router {name} ({k}): a router "
                         "must keep at least k experts")
    return min_experts


def _check_routers(model: MoLM, scores: dict[str, torch.Tensor], min_experts: int | None, where: str) -> None:
    """Statistics for every router of the model with its number of experts, and a valid min_experts."""
    cfg = model.config
    for name in router_names(cfg):
        _floor(model, name, min_experts)
        layer, kind = parse_router(name)
        if name not in scores:
            raise ValueError(f"{where}: no statistics for router {name} of the model (statistics of another model?)")
        if scores[name].numel() != num_experts(cfg, layer, kind):
            raise ValueError(f"{where}: router {name} has {scores[name].numel()} experts in the statistics but "
                             f"{num_experts(cfg, layer, kind)} in the model")


def select_by_threshold(model: MoLM, scores: dict[str, torch.Tensor], threshold: float,
                        min_experts: int | None = None, where: str = "statistics") -> dict[str, list[int]]:
    """Kept experts per router: those with importance >= threshold. ValueError when a router would
    keep fewer than `min_experts` (default: its top-k), naming the router, the count and the threshold."""
    _check_routers(model, scores, min_experts, where)
    keep = {}
    for name in router_names(model.config):
        kept = [e for e, s in enumerate(scores[name].tolist()) if s >= threshold]
        if len(kept) < _floor(model, name, min_experts):
            raise ValueError(f"threshold {threshold} keeps {len(kept)} experts of router {name}, fewer than "
                             f"the {_floor(model, name, min_experts)} it must keep (min_experts); lower the threshold")
        keep[name] = kept
    return keep


def _expert_params(model: MoLM, kind: str) -> int:
    """Parameters one expert of this kind costs: its two projections and its router row."""
    cfg = model.config
    hidden = cfg.att_hidden if kind == "attn" else cfg.ffd_hidden
    return 2 * cfg.n_embd * hidden + cfg.gating_size


def select_by_share(model: MoLM, scores: dict[str, torch.Tensor], target_share: float,
                    min_experts: int | None = None, where: str = "statistics") -> dict[str, list[int]]:
    """Kept experts per router after removing the least important experts (ties: higher layer,
    then higher expert index first) until at most `target_share` of the model's parameters remain.

    ValueError when `min_experts` per router (default: its top-k) makes the target unreachable.
    """
    _check_routers(model, scores, min_experts, where)
    if not 0 < target_share <= 1:
        raise ValueError(f"target share must be in (0, 1], got {target_share}")
    total = model.num_params()
    keep = {name: list(range(scores[name].numel())) for name in router_names(model.config)}
    order = sorted(((s, -parse_router(name)[0], -e, name, e)
                    for name in keep for e, s in enumerate(scores[name].tolist())))
    left = total
    for _, _, _, name, e in order:
        if left <= target_share * total:
            break
        if len(keep[name]) <= _floor(model, name, min_experts):
            continue
        keep[name].remove(e)
        left -= _expert_params(model, parse_router(name)[1])
    if left > target_share * total:
        raise ValueError(f"target share {target_share} is unreachable keeping min_experts "
                         f"({'top-k' if min_experts is None else min_experts}) per router: "
                         f"the smallest model keeps {left / total:.4f} of the parameters")
    return keep


def prune_experts(model: MoLM, keep: dict[str, list[int]]) -> MoLM:
    """A new model with only the kept experts of every router (`keep`: router name -> expert ids,
    e.g. from select_by_threshold); their weights and router rows are copied unchanged."""
    cfg = model.config
    full = full_state_dict(model)
    att, mlp = [], []
    for layer in range(cfg.n_layer):
        for kind in KINDS:
            kept = sorted(keep[f"layer{layer}.{kind}"])
            k = cfg.k_att if kind == "attn" else cfg.k_mlp
            if len(kept) < k:
                raise ValueError(f"router layer{layer}.{kind} would keep {len(kept)} experts, fewer than its top-k ({k})")
            index = torch.tensor(kept, dtype=torch.long)
            for name in EXPERT_TENSORS:
                key = moe_prefix(layer, kind) + name
                full[key] = full[key].index_select(0, index)
            (att if kind == "attn" else mlp).append(len(kept))
    new_cfg = with_expert_counts(cfg, att, mlp, n_new_att_experts=0, n_new_mlp_experts=0)
    return model_from_full(new_cfg, full).to(next(model.parameters()).dtype)


def layers_to_drop(n_layer: int, n_drop: int, mode: str) -> list[int]:
    """Indices of the layers to drop: the top `n_drop` ('top'), or `n_drop` spread evenly ('uniform':
    layer round((j + 1) * n_layer / (n_drop + 1)) - 1 for j < n_drop, never the same twice)."""
    if mode not in LAYER_DROP_MODES:
        raise ValueError(f"mode must be one of {', '.join(LAYER_DROP_MODES)}; got {mode!r}")
    if not 0 <= n_drop < n_layer:
        raise ValueError(f"can drop 0 to {n_layer - 1} of {n_layer} layers, not {n_drop}")
    if mode == "top":
        return list(range(n_layer - n_drop, n_layer))
    return sorted({round((j + 1) * n_layer / (n_drop + 1)) - 1 for j in range(n_drop)})


def _dropped_config(cfg, kept: list[int]):
    att, mlp = expert_counts(cfg)
    return with_expert_counts(dataclasses.replace(cfg, n_layer=len(kept)), [att[i] for i in kept],
                              [mlp[i] for i in kept])


def drop_layers(model: MoLM, drop: list[int]) -> MoLM:
    """A new model without the blocks in `drop`; the others keep their weights, renumbered."""
    cfg = model.config
    kept = [i for i in range(cfg.n_layer) if i not in set(drop)]
    out = {}
    for name, t in full_state_dict(model).items():
        if not name.startswith("transformer.h."):
            out[name] = t
            continue
        layer, rest = name[len("transformer.h."):].split(".", 1)
        if int(layer) in kept:
            out[f"transformer.h.{kept.index(int(layer))}.{rest}"] = t
    return model_from_full(_dropped_config(cfg, kept), out).to(next(model.parameters()).dtype)


def layers_for_share(model: MoLM, target_share: float, mode: str) -> list[int]:
    """The fewest layers to drop (by `mode`) so that at most `target_share` of the parameters remain
    (counted from the configs, nothing is built)."""
    if not 0 < target_share <= 1:
        raise ValueError(f"target share must be in (0, 1], got {target_share}")
    cfg = model.config
    total = cfg.num_params()
    for n_drop in range(cfg.n_layer):
        drop = layers_to_drop(cfg.n_layer, n_drop, mode)
        left = _dropped_config(cfg, [i for i in range(cfg.n_layer) if i not in drop]).num_params()
        if left <= target_share * total:
            return drop
    raise ValueError(f"target share {target_share} needs dropping every layer (one layer keeps "
                     f"{left / total:.4f} of the parameters)")
