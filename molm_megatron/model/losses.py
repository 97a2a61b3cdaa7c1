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
  of inserted experts.

The published code includes padding tokens in these statistics; we exclude them.
Legend: T tokens, E experts, K experts per token.
"""

from __future__ import annotations

import torch

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


def routing_regularization(new_rows_NE: torch.Tensor) -> torch.Tensor:
    """||W_e_new||: Frobenius norm of the router rows of inserted experts (0 when none)."""
    return new_rows_NE.norm() if new_rows_NE.numel() else new_rows_NE.new_zeros(())


def router_aux_losses(
    probs_TE: torch.Tensor,
    logits_TE: torch.Tensor,
    experts_TK: torch.Tensor,
    valid_T: torch.Tensor | None,
    new_rows_NE: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """All auxiliary losses of one router, keyed by AUX_LOSS_NAMES."""
    return {
        "mi": mutual_information_loss(probs_TE, valid_T),
        "concentration": load_concentration_loss(probs_TE, valid_T),
        "switch": switch_loss(probs_TE, experts_TK, valid_T),
        "z": z_loss(logits_TE, valid_T),
        "routing_reg": routing_regularization(new_rows_NE),
    }
