"""Stick-breaking attention (the PyTorch reference the model and kernels use) against a naive
loop that runs the stick-breaking process itself in float64."""

import math

import pytest
import torch

from molm_kernels import stickbreaking_attention_reference


def each_query(q, k):
    """(b, h, i, position, key/value head) of every query: the T queries are the last T of the S
    positions, query head h reads key/value head h // (H / G)."""
    B, H, T, _ = q.shape
    G, S = k.shape[1], k.shape[2]
    for b in range(B):
        for h in range(H):
            for i in range(T):
                yield b, h, i, S - T + i, h // (H // G)


def naive_stickbreaking(q, k, v, key_mask=None):
    """Walk each query's keys from nearest to farthest, breaking off sigmoid(l) of what is left."""
    D = q.shape[-1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b, h, i, pos, g in each_query(q, k):
        remaining = torch.tensor(1.0, dtype=torch.float64)
        for j in range(pos, -1, -1):
            if key_mask is not None and not key_mask[b, j]:
                continue  # a masked key takes nothing and lets everything through
            beta = torch.sigmoid(q[b, h, i] @ k[b, g, j] / math.sqrt(D))
            out[b, h, i] += beta * remaining * v[b, g, j]
            remaining = remaining * (1 - beta)
    return out


def _inputs(B, H, G, T, S, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    return mk(B, H, T, D), mk(B, G, S, D), mk(B, G, S, D)


@pytest.mark.parametrize("B,H,G,T,S,D", [(2, 2, 2, 7, 7, 4), (1, 4, 2, 5, 9, 3), (2, 2, 1, 1, 6, 8)])
def test_matches_naive_loop_values_and_gradients(B, H, G, T, S, D):
    q, k, v = _inputs(B, H, G, T, S, D)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[0, :2] = False  # left padding / reset memory on row 0
    ours = stickbreaking_attention_reference(q, k, v, mask)
    ref = naive_stickbreaking(q, k, v, mask)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    w = torch.randn_like(ref)
    g_ours = torch.autograd.grad((ours * w).sum(), (q, k, v))
    g_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_self_inclusion_and_dropped_leftover():
    # One query, one key: o = sigmoid(q.k/sqrt(D)) v; the rest (1 - sigmoid) is dropped.
    q = torch.tensor([[[[2.0, 0.0]]]], dtype=torch.float64)
    k = torch.tensor([[[[1.0, 0.0]]]], dtype=torch.float64)
    v = torch.tensor([[[[3.0, -1.0]]]], dtype=torch.float64)
    o = stickbreaking_attention_reference(q, k, v)
    beta = 1 / (1 + math.exp(-2.0 / math.sqrt(2)))
    torch.testing.assert_close(o, beta * v)
    # With v = 1 everywhere, o is the row's total attention mass: strictly below 1.
    q, k, _ = _inputs(1, 1, 1, 6, 6, 4)
    mass = stickbreaking_attention_reference(q, k, torch.ones(1, 1, 6, 4, dtype=torch.float64))
    expected = 1 - torch.stack([torch.prod(1 - torch.sigmoid(q[0, 0, i] @ k[0, 0, : i + 1].T / 2)) for i in range(6)])
    torch.testing.assert_close(mass[0, 0, :, 0], expected)
    assert (mass < 1).all()


def test_masked_keys_are_transparent():
    # Mask two memory keys (the queries are the last 2 of 6 positions).
    q, k, v = _inputs(1, 2, 2, 2, 6, 4, seed=3)
    mask = torch.tensor([[True, False, True, False, True, True]])
    with_mask = stickbreaking_attention_reference(q, k, v, mask)
    keep = mask[0]
    without = stickbreaking_attention_reference(q, k[:, :, keep], v[:, :, keep])
    torch.testing.assert_close(with_mask, without)


def test_query_block_shorter_than_keys_is_the_tail_of_the_full_block():
    q, k, v = _inputs(2, 2, 1, 8, 8, 4, seed=5)
    full = stickbreaking_attention_reference(q, k, v)
    tail = stickbreaking_attention_reference(q[:, :, 5:], k, v)
    torch.testing.assert_close(tail, full[:, :, 5:])


def test_bad_shapes_are_refused():
    q, k, v = _inputs(1, 3, 2, 4, 4, 4)
    with pytest.raises(ValueError, match="query heads \\(3\\) must be a multiple of key/value heads \\(2\\)"):
        stickbreaking_attention_reference(q, k, v)


# ---- the softmax + RoPE baseline (model.attention: softmax_rope) ----------------------------------


def rope_as_complex(x, position, theta):
    """RoFormer's rotation written as complex multiplication: the pair (x_j, x_{j + D/2}) is the
    complex number x_j + i x_{j + D/2}, multiplied by exp(i * position * theta^(-2j/D))."""
    D = x.shape[-1]
    z = torch.complex(x[: D // 2], x[D // 2:])
    freq = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    z = z * torch.polar(torch.ones_like(freq), position * freq)
    return torch.cat([z.real, z.imag])


def naive_softmax_rope(q, k, v, key_mask=None, theta=10000.0):
    """Per query: scores against every unmasked key at or before it (positions: keys 0..S-1, queries
    the last T), exp-normalised, weighted sum of the values. A query without such keys (padding)
    is left at zero: its output is unspecified."""
    D = q.shape[-1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b, h, i, pos, g in each_query(q, k):
        keys = [j for j in range(pos + 1) if key_mask is None or key_mask[b, j]]
        if not keys:
            continue
        qi = rope_as_complex(q[b, h, i], pos, theta)
        scores = torch.stack([qi @ rope_as_complex(k[b, g, j], j, theta) / math.sqrt(D) for j in keys])
        weights = torch.exp(scores - scores.max())
        out[b, h, i] = sum(w * v[b, g, j] for w, j in zip(weights / weights.sum(), keys))
    return out


@pytest.mark.parametrize("B,H,G,T,S,D", [(2, 2, 2, 7, 7, 4), (1, 4, 2, 5, 9, 6), (2, 2, 1, 1, 6, 8)])
def test_softmax_rope_matches_naive_loop_values_and_gradients(B, H, G, T, S, D):
    from molm_megatron.model.model import softmax_rope_attention

    q, k, v = _inputs(B, H, G, T, S, D, seed=7)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[0, :2] = False  # left padding / reset memory on row 0
    for key_mask in (None, mask):
        # Rows of queries that see no unmasked key (padding) are compared nowhere: weight 0.
        seen = torch.ones(B, 1, T, 1, dtype=torch.float64)
        if key_mask is not None:
            seen[:, 0, :, 0] = key_mask.cumsum(1)[:, S - T:] > 0
        ours = softmax_rope_attention(q, k, v, key_mask, theta=100.0)
        ref = naive_softmax_rope(q, k, v, key_mask, theta=100.0)
        torch.testing.assert_close(ours * seen, ref, rtol=1e-10, atol=1e-12)
        w = torch.randn_like(ref) * seen
        g_ours = torch.autograd.grad((ours * w).sum(), (q, k, v))
        g_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
        for a, b in zip(g_ours, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_softmax_rope_depends_on_distances_only_and_padding_queries_stay_finite():
    from molm_megatron.model.model import softmax_rope_attention

    q, k, v = _inputs(1, 2, 2, 4, 4, 4, seed=9)
    # Three masked keys in front shift every position by 3 and change nothing.
    pad = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    mask = torch.tensor([[False] * 3 + [True] * 4])
    shifted = softmax_rope_attention(torch.cat([pad, q], 2), torch.cat([pad, k], 2), torch.cat([pad, v], 2), mask,
                                     theta=10000.0)
    torch.testing.assert_close(shifted[:, :, 3:], softmax_rope_attention(q, k, v, None, theta=10000.0))
    assert torch.isfinite(shifted).all()  # the padding queries see only masked keys
