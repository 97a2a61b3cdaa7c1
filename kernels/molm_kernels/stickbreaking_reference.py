"""PyTorch reference of stick-breaking attention: the oracle for the Triton kernel and the CPU path.

Stick-breaking attention (Tan et al., "Scaling Stick-Breaking Attention", 2024; ModuleFormer,
Shen et al. 2023). For query i and key j <= i, with l_ij = q_i . k_j / sqrt(D):

    beta_ij = sigmoid(l_ij)
    A_ij    = beta_ij * prod_{j < m <= i} (1 - beta_im)
    o_i     = sum_j A_ij v_j

The nearest key (the query's own token) breaks first; the leftover mass prod_m (1 - beta_im) is
dropped, so rows sum to less than 1. In log space (fp32):

    log A_ij = logsigmoid(l_ij) + sum_{j < m <= i} logsigmoid(-l_im)

Masked keys get l = -inf: sigmoid(-inf) = 0 and logsigmoid(+inf) = 0, so they are transparent.

Shapes (legend): B batch, H query heads, G key/value heads (H = G * r: query head h reads kv head
h // r, so grouped query heads share K/V without copies), T queries, S keys (S >= T; the queries
are the last T positions of the S keys: memory / KV cache), D head size.

Packed variable-length sequences: `cu_seqlens` [num_docs + 1] (0, end of doc 0, ..., S) cuts the
S key positions of every batch row into documents; a query sees only keys of its own document.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def stickbreaking_attention_reference(
    q_BHTD: torch.Tensor,
    k_BGSD: torch.Tensor,
    v_BGSD: torch.Tensor,
    key_mask_BS: torch.Tensor | None = None,
    attn_dropout: float = 0.0,
    training: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stick-breaking attention, O(T * S) memory; returns o [B, H, T, D] in q's dtype.

    key_mask_BS: bool, True for real keys; False keys are transparent (left padding, reset memory).
    cu_seqlens: optional document boundaries over the S key positions (see the module docstring).
    """
    B, H, T, D = q_BHTD.shape
    G, S = k_BGSD.shape[1], k_BGSD.shape[2]
    if H % G:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({G})")
    if S < T:
        raise ValueError(f"keys ({S}) must be at least as many as queries ({T})")
    r = H // G
    # Accumulate in fp32 (fp64 stays fp64 for the oracle tests).
    acc = torch.float64 if q_BHTD.dtype == torch.float64 else torch.float32
    q = q_BHTD.to(acc).view(B, G, r, T, D)
    k, v = k_BGSD.to(acc), v_BGSD.to(acc)
    logits = torch.einsum("bgrtd,bgsd->bgrts", q, k) / math.sqrt(D)  # (B, G, r, T, S)
    # Query t sits at absolute position S - T + t; it sees keys s <= that position.
    pos_q = torch.arange(T, device=q.device) + (S - T)
    visible = torch.arange(S, device=q.device)[None, :] <= pos_q[:, None]  # (T, S)
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != S:
            raise ValueError(f"cu_seqlens must run from 0 to S={S}, got {cu_seqlens.tolist()}")
        doc = torch.bucketize(torch.arange(S, device=q.device), cu_seqlens.to(q.device), right=True)  # (S,)
        visible = visible & (doc[pos_q][:, None] == doc[None, :])
    if key_mask_BS is not None:
        visible = visible[None] & key_mask_BS.bool()[:, None, :]  # (B, T, S)
        visible = visible[:, None, None]
    logits = logits.masked_fill(~visible, -math.inf)
    # log(1 - beta_im) summed over the keys strictly after j: a reversed exclusive cumsum.
    log_not_beta = F.logsigmoid(-logits)  # 0 where masked (logits = -inf)
    after_j = log_not_beta.flip(-1).cumsum(-1).flip(-1) - log_not_beta
    log_att = F.logsigmoid(logits) + after_j
    att = log_att.exp()
    if attn_dropout and training:
        att = F.dropout(att, attn_dropout)
    o = torch.einsum("bgrts,bgsd->bgrtd", att, v)
    return o.reshape(B, H, T, D).to(q_BHTD.dtype)
