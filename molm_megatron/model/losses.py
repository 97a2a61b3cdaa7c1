"""Every router auxiliary loss, written once and used by both kinds of expert.

Per router, over the valid (non-padding) tokens t of the micro-batch, with p_t(e) the router's
softmax over all E experts:

    p(e)   = mean_t p_t(e)
    H(e)   = -sum_e p(e) log p(e)
    H(e|x) = mean_t -sum_e p_t(e) log p_t(e)

- mutual information (ModuleFormer pretraining, Shen et al. 2023, eq. 6): MI loss = H(e|x) - H(e),
  i.e. minus the mutual information between tokens and experts;
- load concentration (ModuleFormer fine-tuning, eq. 8): H(e), which pushes a task onto few experts;
- switch (Fedus et al. 2021, eqs. 4-6): E * sum_e f_e P_e, f_e the fraction of assignments routed
  to e, P_e = p(e); with the router z-loss (Zoph et al. 2022, eq. 5): mean_t logsumexp(logits_t)^2;
- routing regularisation (continual learning): ||W_e_new||, the norm of the router's output rows
  of inserted experts (the router's `new_weight`).

Each loss is summed over routers and layers, then weighted by its own config coefficient
(`weighted_aux_loss`); the model returns that weighted sum, so the trainer adds it as it is.

The published code includes padding tokens in these statistics; we exclude them.
Legend: T tokens, E experts, K experts per token.
"""

from __future__ import annotations

import torch

from molm_megatron.config import ModelConfig

AUX_LOSS_NAMES = ("mi", "concentration", "switch", "z", "routing_reg")


def _masked_mean(x_T: torch.Tensor, valid_T: torch.Tensor | None) -> torch.Tensor:
    """Mean over dim 0, over valid rows only (x_T may carry trailing dims)."""
    if valid_T is None:
        return x_T.mean(0)
    w = valid_T.to(x_T.dtype)
    w = w.view(-1, *([1] * (x_T.dim() - 1)))
    return (x_T * w).sum(0) / w.sum().clamp(min=1)


def expert_marginal(probs_TE: torch.Tensor, valid_T: torch.Tensor | None) -> torch.Tensor:
    """p(e) = mean_t p_t(e) over valid tokens, [E]."""
    return _masked_mean(probs_TE, valid_T)


def mutual_information_loss(probs_TE: torch.Tensor, valid_T: torch.Tensor | None) -> torch.Tensor:
    """H(e|x) - H(e) (ModuleFormer eq. 6)."""
    h_cond = _masked_mean(torch.special.entr(probs_TE).sum(-1), valid_T)
    return h_cond - load_concentration_loss(probs_TE, valid_T)


def load_concentration_loss(probs_TE: torch.Tensor, valid_T: torch.Tensor | None) -> torch.Tensor:
    """H(e) of the expert marginal (ModuleFormer eq. 8)."""
    return torch.special.entr(expert_marginal(probs_TE, valid_T)).sum()


def switch_loss(probs_TE: torch.Tensor, experts_TK: torch.Tensor, valid_T: torch.Tensor | None) -> torch.Tensor:
    """E * sum_e f_e P_e (Switch Transformer eqs. 4-6); f_e counts assignments, not tokens."""
    num_experts = probs_TE.shape[-1]
    one_hot_TE = torch.zeros_like(probs_TE).scatter_add_(
        1, experts_TK, torch.ones_like(experts_TK, dtype=probs_TE.dtype))
    f_e = _masked_mean(one_hot_TE, valid_T) / experts_TK.shape[1]
    return num_experts * (f_e * expert_marginal(probs_TE, valid_T)).sum()


def z_loss(logits_TE: torch.Tensor, valid_T: torch.Tensor | None) -> torch.Tensor:
    """mean_t logsumexp(logits_t)^2 (ST-MoE router z-loss)."""
    return _masked_mean(torch.logsumexp(logits_TE, dim=-1) ** 2, valid_T)


def routing_regularization(new_weight_NG: torch.Tensor) -> torch.Tensor:
    """||W_e_new||: Frobenius norm of the router rows of inserted experts [N_new, gating_size]."""
    # At least fp32: the sum of many small bf16 squares would round away.
    return torch.linalg.vector_norm(new_weight_NG, dtype=torch.promote_types(new_weight_NG.dtype, torch.float32))


def router_aux_losses(
    probs_TE: torch.Tensor,
    logits_TE: torch.Tensor,
    experts_TK: torch.Tensor,
    valid_T: torch.Tensor | None,
    new_weight_NG: torch.Tensor | None,
    names: tuple[str, ...] = AUX_LOSS_NAMES,
) -> dict[str, torch.Tensor]:
    """The auxiliary losses `names` (default all, keyed by AUX_LOSS_NAMES) of one router;
    `new_weight_NG` is the router's rows of inserted experts (`Router.new_weight`, None without
    inserted experts). Training steps that log nothing ask only for the weighted ones: each loss
    is a dozen small kernels per router, forward and backward."""
    formulas = {
        "mi": lambda: mutual_information_loss(probs_TE, valid_T),
        "concentration": lambda: load_concentration_loss(probs_TE, valid_T),
        "switch": lambda: switch_loss(probs_TE, experts_TK, valid_T),
        "z": lambda: z_loss(logits_TE, valid_T),
        "routing_reg": lambda: (probs_TE.new_zeros(()) if new_weight_NG is None
                                else routing_regularization(new_weight_NG)),
    }
    return {name: formulas[name]() for name in names}


def loss_weights(cfg: ModelConfig) -> dict[str, float]:
    """The coefficient of each aux loss in the training loss (absent: weight 0). The load-balancing
    loss is the one named by `aux_loss_type` ('mi' or 'switch')."""
    weights = {cfg.aux_loss_type: cfg.aux_loss_weight, "concentration": cfg.concentration_loss_weight,
               "z": cfg.z_loss_weight, "routing_reg": cfg.routing_reg_weight}
    return {name: w for name, w in weights.items() if w}


def weighted_aux_loss(aux_losses: dict[str, torch.Tensor], cfg: ModelConfig, zero: torch.Tensor) -> torch.Tensor:
    """sum_name weight_name * aux_losses[name] (weights from `loss_weights`), added to `zero` (a 0-dim
    tensor that fixes device and dtype, returned as it is when no loss has a weight)."""
    total = zero
    for name, w in loss_weights(cfg).items():
        total = total + w * aux_losses[name]
    return total
