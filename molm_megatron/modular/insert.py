"""Continual learning by inserting experts (ModuleFormer, Shen et al. 2023, section 4.2), vocabulary
growth for an extended tokenizer, and which tensors a fine-tuning run trains.

Insertion appends n new experts to every MLP router (and optionally every attention router): their
expert weights initialised as published (uniform(-1/in, 1/in)), the router's W_e extended by n rows
initialised as the router is (normal(0, initializer_range)). The softmax spans old and new experts.
With the partially trainable router only the new rows of W_e train; W_in, its bias, the old rows
and the old experts stay frozen. The model keeps inserted rows in separate `new_weight` parameters
(`n_new_*_experts` in the config), so freezing is per tensor: a frozen tensor has
`requires_grad = False`, gets no gradient, no optimizer state, no weight decay and takes part in no
gradient reduction, and is bitwise unchanged by training.

Vocabulary growth appends rows to the token embedding and the head (normal(0, initializer_range)).
When only the new rows may train, those two tensors train with a gradient mask that zeroes the old
rows' gradients, and without weight decay: AdamW's update of a row whose gradient has always been
zero is exactly zero (its moments stay zero), so the old rows are bitwise unchanged too; the whole
tensor has optimizer state.
"""

from __future__ import annotations

import dataclasses

import torch

from molm_megatron.model import MoLM
from molm_megatron.modular.weights import (expert_counts, full_state_dict, model_from_full, moe_prefix,
                                           with_expert_counts)

TRAINABLE = ("all", "new")
# Attribute on the embedding / head parameter when only its rows from this index on train.
ROWS_FROM = "trainable_rows_from"


def insert_experts(model: MoLM, n_mlp: int, n_att: int = 0, seed: int = 0) -> MoLM:
    """A new model with `n_mlp` new experts in every MLP router and `n_att` in every attention
    router, appended after the old ones; the old weights are copied unchanged.

    The inserted experts of `model` itself (a second insertion) become ordinary experts: only the
    ones inserted here are `n_new_*_experts` of the result.
    """
    if n_mlp < 0 or n_att < 0 or n_mlp + n_att == 0:
        raise ValueError(f"insert_experts needs n_mlp >= 0 and n_att >= 0, not both 0; got n_mlp={n_mlp}, "
                         f"n_att={n_att}")
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    full = full_state_dict(model)
    for layer in range(cfg.n_layer):
        for kind, n in (("attn", n_att), ("mlpf", n_mlp)):
            if not n:
                continue
            prefix = moe_prefix(layer, kind)
            router = full[prefix + "gate.w_gate.3.weight"]  # [E, G]
            rows = torch.empty(n, router.shape[1]).normal_(0.0, cfg.initializer_range, generator=gen)
            full[prefix + "gate.w_gate.3.weight"] = torch.cat([router, rows.to(router.dtype)])
            for name in ("experts.weight", "output_experts.weight"):
                w = full[prefix + name]  # [E, in, out]; published init uniform(-1/in, 1/in)
                bound = 1.0 / w.shape[1]
                new = torch.empty(n, *w.shape[1:]).uniform_(-bound, bound, generator=gen)
                full[prefix + name] = torch.cat([w, new.to(w.dtype)])
    att, mlp = expert_counts(cfg)
    new_cfg = with_expert_counts(cfg, [e + n_att for e in att], [e + n_mlp for e in mlp],
                                 n_new_att_experts=n_att, n_new_mlp_experts=n_mlp)
    return model_from_full(new_cfg, full).to(next(model.parameters()).dtype)


def grow_vocab(model: MoLM, vocab_size: int, seed: int = 0) -> MoLM:
    """A new model whose embedding and head have `vocab_size` rows; the first rows are the old
    ones (an extended tokenizer keeps the old ids), the new rows are normal(0, initializer_range)."""
    cfg = model.config
    if vocab_size < cfg.vocab_size:
        raise ValueError(f"the new vocabulary ({vocab_size} ids) is smaller than the model's "
                         f"(model.vocab_size {cfg.vocab_size}); an extended tokenizer only adds ids")
    if vocab_size == cfg.vocab_size:
        return model
    gen = torch.Generator().manual_seed(seed)
    full = full_state_dict(model)
    for name in ("transformer.wte.weight", "lm_head.weight"):
        w = full[name]  # [V, D]
        rows = torch.empty(vocab_size - w.shape[0], w.shape[1]).normal_(0.0, cfg.initializer_range, generator=gen)
        full[name] = torch.cat([w, rows.to(w.dtype)])
    return model_from_full(dataclasses.replace(cfg, vocab_size=vocab_size), full).to(next(model.parameters()).dtype)


def set_trainable(model: MoLM, trainable: str, train_embedding: bool = False, old_vocab_size: int | None = None) -> None:
    """Choose the tensors that train, in place (before parallelism is applied).

    trainable 'all': every tensor (full fine-tuning). 'new': only the inserted experts and their
    router rows (the `new_weight` parameters), the token embedding if `train_embedding`, and the rows
    from `old_vocab_size` on of the embedding and head when the vocabulary grew.
    """
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {', '.join(TRAINABLE)}; got {trainable!r}")
    grew = old_vocab_size is not None and old_vocab_size < model.config.vocab_size
    for name, param in model.named_parameters():
        for attribute in (ROWS_FROM, "no_weight_decay"):  # from an earlier choice
            param.__dict__.pop(attribute, None)
        if trainable == "all":
            param.requires_grad_(True)
        elif name.endswith(".new_weight") or (train_embedding and name == "transformer.wte.weight"):
            param.requires_grad_(True)
        elif grew and name in ("transformer.wte.weight", "lm_head.weight"):
            param.requires_grad_(True)
            setattr(param, ROWS_FROM, old_vocab_size)
            param.no_weight_decay = True  # see the module docstring: decay would move the old rows
        else:
            param.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("no tensor would train: trainable 'new' needs inserted experts, a grown vocabulary or "
                         "train_embedding")


def mask_frozen_rows(model: torch.nn.Module) -> None:
    """Zero the gradient of the rows below `trainable_rows_from` of every parameter that has it.

    Called on the parallelised model (its tensors are then shards; a tensor-parallel vocabulary
    shard knows its first global row from `param.shards`). The hook runs before the gradient is
    accumulated, so DeepSpeed only ever sees the masked gradient.
    """
    for param in model.parameters():
        first = getattr(param, ROWS_FROM, None)
        if first is None:
            continue
        start = sum(s.start for s in getattr(param, "shards", ()) if s.dim == 0)
        rows = torch.arange(start, start + param.shape[0], device=param.device)
        keep_V1 = (rows >= first).to(param.dtype).unsqueeze(1)
        param.register_hook(lambda grad, keep=keep_V1: grad * keep)


def count_trainable(model: MoLM) -> tuple[int, int]:
    """(trainable, total) parameters of the full model; a row-masked tensor counts its trainable rows."""
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            first = getattr(param, ROWS_FROM, 0)
            trainable += param.numel() - first * param[0].numel()
    return trainable, total

