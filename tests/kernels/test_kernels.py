"""Triton kernels against the float64 references (CPU, Triton interpreter), plus input checks.

The interpreter cases run once, in a child process that sets TRITON_INTERPRET=1 before Triton is
imported (see tests/kernels/interpreter_cases.py), so the rest of the session sees normal Triton.
Tolerance 1e-5: fp32 kernels against float64 references land near 1e-6.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from molm_kernels.scattered_experts_reference import route
from molm_kernels.stickbreaking_reference import stickbreaking_attention_reference

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-5


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "tests.kernels.interpreter_cases"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


SB_CASES = ["sb_causal", "sb_memory_gqa_keymask", "sb_decode_one_token", "sb_cu_seqlens",
            "sb_untruncated_atomic", "sb_head_slices"]
EXPERT_CASES = ["experts_gather_scatter_k2", "experts_grouped_out_k3", "experts_grouped_in_gated",
                "experts_flat_in_gated", "experts_k1", "experts_grouped_out_bias", "experts_fixed_gates_bias",
                "mlp_gelu_fused_k2", "mlp_gelu_fused_k3_expert_parallel_form",
                "mlp_gelu_fused_inference", "mlp_relu_fused", "mlp_silu_fused", "mlp_gelu_fused_biases_k2",
                "mlp_gelu_fused_biases_inference", "mlp_gelu_exact_biases_fused", "mlp_swiglu_k2",
                "mlp_swiglu_biases_composed",
                "mlp_gelu_fused_biases_strided_weights", "accumulated_weight_grads"]


@pytest.mark.parametrize("case", SB_CASES + EXPERT_CASES)
def test_kernel_output_and_every_gradient_match_float64_reference(interpreter_results, case):
    errors = interpreter_results[case]
    assert isinstance(errors, list), errors  # a traceback string if the case raised
    assert all(e < TOL for e in errors), f"{case}: relative errors {errors} (NaN = unwritten output)"


def test_truncated_sweep_is_differentiated_exactly(interpreter_results):
    *errors, truncated_fraction = interpreter_results["sb_truncated_exact_gradient"]
    assert truncated_fraction > 0, "the case must actually stop sweeps early"
    assert all(e < TOL for e in errors), errors


def test_reference_cu_seqlens_equals_separate_documents():
    """The reference's packed-document mask equals running each document on its own."""
    torch.manual_seed(0)
    cu = [0, 5, 17, 18, 30]
    q, k, v = (torch.randn(2, 2, 30, 8, dtype=torch.float64) for _ in range(3))
    packed = stickbreaking_attention_reference(q, k, v, cu_seqlens=torch.tensor(cu))
    for a, b in zip(cu[:-1], cu[1:]):
        alone = stickbreaking_attention_reference(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b])
        torch.testing.assert_close(packed[:, :, a:b], alone)


def test_input_errors_name_the_problem():
    from molm_kernels.scattered_experts import scatter_mm
    from molm_kernels.stickbreaking import doc_start_from_cu_seqlens, sb_forward

    q, k = torch.randn(1, 3, 4, 8), torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match=r"query heads \(3\) must be a multiple of key/value heads \(2\)"):
        sb_forward(q, k, k)
    with pytest.raises(ValueError, match=r"keys \(4\) must be at least as many as queries \(6\)"):
        sb_forward(torch.randn(1, 2, 6, 8), k, k)
    with pytest.raises(ValueError, match=r"key_mask_BS must be \[B, S\] = \(1, 4\), got \(1, 5\)"):
        sb_forward(torch.randn(1, 2, 4, 8), k, k, key_mask_BS=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"cu_seqlens must run from 0 to S=10"):
        doc_start_from_cu_seqlens(torch.tensor([0, 4, 9]), 1, 10)
    r = route(torch.tensor([[0], [1]]), 2)
    with pytest.raises(ValueError, match=r"x must be \[rows, 8\]"):
        scatter_mm(torch.randn(2, 5), torch.randn(2, 8, 3), r.sorted_flat_idx_N, r.expert_offsets_E, 1, True)


def test_doc_start_from_cu_seqlens():
    from molm_kernels.stickbreaking import doc_start_from_cu_seqlens

    starts = doc_start_from_cu_seqlens(torch.tensor([0, 3, 3, 7]), 2, 7)
    assert starts.tolist() == [[0, 0, 0, 3, 3, 3, 3]] * 2


def test_dispatch_uses_references_on_cpu():
    """On CPU tensors the dispatch point returns exactly the reference (dropout off)."""
    import molm_kernels

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 1, 9, 8), torch.randn(1, 1, 9, 8)
    assert torch.equal(molm_kernels.stickbreaking_attention(q, k, v), stickbreaking_attention_reference(q, k, v))
    assert math.isfinite(molm_kernels.stickbreaking_attention(q, k, v, cu_seqlens=torch.tensor([0, 4, 9])).sum().item())


def test_route_offsets_equal_a_naive_count():
    """route's searchsorted offsets (no host sync on GPU) equal per-expert counts, cumulated by a loop."""
    torch.manual_seed(0)
    E = 7
    idx = torch.randint(0, E - 2, (50, 3))  # the last two experts get no token: empty runs at the end
    idx[idx == 2] = 3  # and an empty run in the middle
    r = route(idx, E)
    flat = idx.reshape(-1).tolist()
    ends, total = [], 0
    for e in range(E):
        total += sum(1 for v in flat if v == e)
        ends.append(total)
    assert r.expert_offsets_E.tolist() == ends
    assert [flat[i] for i in r.sorted_flat_idx_N.tolist()] == sorted(flat)


def test_linear_padded_out_equals_linear_with_gradients():
    """The padded-vocabulary output layer gives F.linear's logits and gradients (float64), and its
    strided view works with cross entropy as the model uses it."""
    from molm_kernels import linear_padded_out

    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(77, 16, dtype=torch.float64, requires_grad=True)  # 77: not a multiple of 64
    labels = torch.randint(0, 77, (10,))
    out = linear_padded_out(x, w)
    assert out.shape == (2, 5, 77) and out.stride(-2) == 128
    ref = torch.nn.functional.linear(x, w)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    loss = torch.nn.functional.cross_entropy(out.view(-1, 77), labels)
    loss_ref = torch.nn.functional.cross_entropy(ref.view(-1, 77), labels)
    for a, b in zip(torch.autograd.grad(loss, (x, w)), torch.autograd.grad(loss_ref, (x, w))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_every_reference_activation_has_a_fused_kernel_code():
    """The reference path (CPU) and the Triton epilogue (GPU) take activations by the same config
    names; a name known to one only would work on CPU and fail with a KeyError on the GPU. Each
    code's values and gradients are checked by the interpreter cases mlp_*_fused."""
    from molm_kernels.scattered_experts import ACT_CODES
    from molm_kernels.scattered_experts_reference import ACTIVATIONS

    assert set(ACT_CODES) == set(ACTIVATIONS)
    assert sorted(ACT_CODES.values()) == list(range(len(ACT_CODES)))


@pytest.mark.parametrize("form", ["biases", "swiglu", "swiglu_biases"])
def test_reference_mlp_with_biases_and_glu_equals_a_per_token_loop(form):
    """scattered_mlp_reference's biases and GLU form against a dumb loop over tokens and choices:
    y_t = sum_j g_tj (W2[e] h + b2[e]), h = act(W1[e] x + b1[e]) (* W3[e] x in the GLU form)."""
    from molm_kernels.scattered_experts_reference import ACTIVATIONS, scattered_mlp_reference

    torch.manual_seed(0)
    T, K, E, I, F, O = 9, 2, 4, 6, 5, 7
    idx = torch.randint(0, E, (T, K))
    x, g = torch.randn(T, I, dtype=torch.float64), torch.rand(T, K, dtype=torch.float64)
    w1, w2, w3 = (torch.randn(E, I, F, dtype=torch.float64), torch.randn(E, F, O, dtype=torch.float64),
                  torch.randn(E, I, F, dtype=torch.float64))
    b1, b2 = torch.randn(E, F, dtype=torch.float64), torch.randn(E, O, dtype=torch.float64)
    glu, biases = "swiglu" in form, "biases" in form
    act = ACTIVATIONS["silu" if glu else "gelu_new"]
    y = scattered_mlp_reference(x, w1, w2, K, route(idx, E), g, "silu" if glu else "gelu_new",
                                b1 if biases else None, b2 if biases else None, w3 if glu else None)
    for t in range(T):
        expected = torch.zeros(O, dtype=torch.float64)
        for j in range(K):
            e = idx[t, j]
            h = act(x[t] @ w1[e] + (b1[e] if biases else 0))
            if glu:
                h = h * (x[t] @ w3[e])
            expected += g[t, j] * (h @ w2[e] + (b2[e] if biases else 0))
        torch.testing.assert_close(y[t], expected, rtol=1e-12, atol=1e-12)
