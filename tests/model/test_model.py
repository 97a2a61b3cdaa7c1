"""The MoLM model against independent computations: a hand-written router, the dense mixture of
all experts, the concatenated forward (memory), a left-padded batch, and token-by-token decoding."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from molm_megatron.config import ModelConfig, model_preset
from molm_megatron.model import MoLM
from molm_megatron.model.model import MoE


def make(preset="tiny", seed=0, **overrides):
    torch.manual_seed(seed)
    model = MoLM(model_preset(preset, **overrides)).double().eval()
    return model


def test_router_is_mlp_softmax_topk_without_renormalisation():
    model = make()
    router = model.transformer.h[0].mlpf.gate
    x = torch.randn(5, 64, dtype=torch.float64)
    w_in, b_in, w_e = router.w_gate[0].weight, router.w_gate[0].bias, router.w_gate[3].weight
    z = x @ w_in.T + b_in
    logits = (z * 0.5 * (1 + torch.erf(z / math.sqrt(2)))) @ w_e.T  # exact-erf GELU
    probs = logits.softmax(-1)
    out = router(x)
    torch.testing.assert_close(out.probs_TE.double(), probs, rtol=1e-5, atol=1e-7)
    top = probs.topk(2, dim=-1)
    assert torch.equal(out.experts_TK, top.indices)
    torch.testing.assert_close(out.gates_TK.double(), top.values, rtol=1e-5, atol=1e-7)
    assert (out.gates_TK.sum(-1) < 1).all()  # not renormalised


def test_sample_topk_keeps_the_best_and_samples_the_rest():
    model = make(sample_topk=1)
    router = model.transformer.h[0].mlpf.gate.train()
    x = torch.randn(64, 64, dtype=torch.float64)
    out = router(x)
    best = out.probs_TE.argmax(-1)
    assert torch.equal(out.experts_TK[:, 0], best)
    assert (out.experts_TK[:, 1] != best).all()
    torch.testing.assert_close(out.gates_TK, out.probs_TE.gather(1, out.experts_TK))


def dense_mixture(moe: MoE, x, act):
    """sum over ALL experts e of p_e W_out[e] act(W_in[e] x): what top-k with k = E must equal."""
    probs = moe.gate(x).probs_TE.to(x.dtype)
    h = act(torch.einsum("td,edf->tef", x, moe.experts.weight))
    y = torch.einsum("tef,efd->ted", h, moe.output_experts.weight)
    return (probs[:, :, None] * y).sum(1)


def test_smoe_with_k_equal_e_is_the_dense_mixture():
    model = make(k_mlp=8)
    moe = model.transformer.h[1].mlpf
    x = torch.randn(9, 64, dtype=torch.float64)
    y, _ = moe(x, None)
    torch.testing.assert_close(y, dense_mixture(moe, x, lambda t: F.gelu(t, approximate="tanh")))


def test_smoe_top_k_is_the_gated_sum_of_the_chosen_experts():
    model = make()
    moe = model.transformer.h[0].mlpf
    x = torch.randn(7, 64, dtype=torch.float64)
    y, routed = moe(x, None)
    r = routed.router
    expected = torch.zeros_like(y)
    for t in range(7):
        for j in range(2):
            e = r.experts_TK[t, j]
            h = F.gelu(x[t] @ moe.experts.weight[e], approximate="tanh")
            expected[t] += r.gates_TK[t, j] * (h @ moe.output_experts.weight[e])
    torch.testing.assert_close(y, expected)


def test_moa_matches_a_per_expert_loop():
    from tests.model.test_attention import naive_stickbreaking
    model = make("tiny-multihead")
    moa = model.transformer.h[0].attn
    x = torch.randn(1, 5, 64, dtype=torch.float64)
    y, routed, _ = moa(x, None, None, None, 0)
    r = routed.router
    k = moa.k_proj(x).view(1, 5, 2, 16).transpose(1, 2)
    v = moa.v_proj(x).view(1, 5, 2, 16).transpose(1, 2)
    expected = torch.zeros(5, 64, dtype=torch.float64)
    for j in range(2):  # each chosen expert slot: its own queries over the shared k/v
        e = r.experts_TK[:, j]
        q = torch.einsum("td,tda->ta", x[0], moa.q_proj.experts.weight[e]).view(5, 2, 16).transpose(0, 1)
        o = naive_stickbreaking(q[None], k, v)[0].transpose(0, 1).reshape(5, 32)
        expected += r.gates_TK[:, j, None] * torch.einsum("ta,tad->td", o, moa.q_proj.output_experts.weight[e])
    torch.testing.assert_close(y[0], expected)


@pytest.mark.parametrize("preset", ["tiny", "tiny-multihead"])
def test_memory_equals_the_concatenated_forward(preset):
    model = make(preset)
    ids = torch.randint(0, 512, (2, 24))
    full = model(ids).logits
    first = model(ids[:, :10], memory_length=32)
    second = model(ids[:, 10:], memory=first.memory, memory_length=32)
    torch.testing.assert_close(second.logits, full[:, 10:])
    assert first.memory[0][0].requires_grad is False


def test_reset_memory_rows_are_masked():
    model = make()
    prev, ids = torch.randint(0, 512, (2, 8)), torch.randint(0, 512, (2, 8))
    first = model(prev)
    reset = torch.tensor([[0] * 8 + [1] * 8, [1] * 16])  # row 0's stream restarted: drop its memory
    out = model(ids, attention_mask=reset, memory=first.memory)
    torch.testing.assert_close(out.logits[0], model(ids[:1]).logits[0])
    torch.testing.assert_close(out.logits[1], model(torch.cat([prev[1], ids[1]])[None]).logits[0, 8:])


def test_left_padding_is_transparent():
    model = make()
    a, b = torch.randint(0, 512, (10,)), torch.randint(0, 512, (6,))
    ids = torch.stack([a, torch.cat([torch.zeros(4, dtype=torch.long), b])])
    mask = torch.tensor([[1] * 10, [0] * 4 + [1] * 6])
    labels = ids.masked_fill(mask == 0, -100)
    out = model(ids, labels=labels, attention_mask=mask)
    torch.testing.assert_close(out.logits[1, 4:], model(b[None]).logits[0])
    torch.testing.assert_close(out.logits[0], model(a[None]).logits[0])
    assert out.num_label_tokens.item() == 16


def test_aux_losses_exclude_padding():
    model = make()
    b = torch.randint(0, 512, (6,))
    padded = model(torch.cat([torch.zeros(4, dtype=torch.long), b])[None], attention_mask=torch.tensor([[0] * 4 + [1] * 6]))
    alone = model(b[None])
    for name in ("mi", "concentration", "switch", "z"):
        torch.testing.assert_close(padded.aux_losses[name], alone.aux_losses[name])


def test_losses_are_summed_over_layers_and_weighted():
    model = make(aux_loss_weight=0.5, z_loss_weight=0.25, concentration_loss_weight=0.125)
    ids = torch.randint(0, 512, (2, 8))
    out = model(ids, labels=ids, collect_expert_stats=True)
    lm = F.cross_entropy(out.logits.view(-1, 512), ids.view(-1))
    torch.testing.assert_close(out.lm_loss, lm)
    aux = out.aux_losses
    torch.testing.assert_close(out.loss, lm + 0.5 * aux["mi"] + 0.25 * aux["z"] + 0.125 * aux["concentration"])
    # 2 layers x 2 routers of concentration H(e), each at most log E.
    assert aux["concentration"] <= 2 * (math.log(4) + math.log(8)) + 1e-9
    assert set(out.expert_stats) == {"layer0.attn", "layer0.mlpf", "layer1.attn", "layer1.mlpf"}
    assert out.expert_stats["layer0.mlpf"].sum().item() == 2 * 8 * 2  # every token picks k_mlp = 2
    assert out.expert_stats["layer1.attn"].shape == (4,)


def test_decoding_token_by_token_equals_the_full_forward():
    model = make()
    prompt = torch.randint(0, 512, (2, 5))
    tokens = model.generate(prompt, max_new_tokens=40)  # past history_length (32): the cache keeps all
    full = model(tokens).logits
    assert torch.equal(tokens[:, 5:], full[:, 4:-1].argmax(-1))
    # Step by step through the cache, logits equal the full forward's.
    out = model(tokens[:, :5], memory_length=100)
    for t in range(5, tokens.shape[1]):
        out = model(tokens[:, t:t + 1], memory=out.memory, memory_length=100)
        torch.testing.assert_close(out.logits[:, 0], full[:, t])


def test_sampling_is_reproducible_with_a_generator():
    model = make()
    prompt = torch.randint(0, 512, (1, 3))
    a = model.generate(prompt, 6, do_sample=True, top_k=5, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 6, do_sample=True, top_k=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (1, 9)


def test_initialisation_as_published():
    torch.manual_seed(0)
    model = MoLM(model_preset("tiny", n_embd=256, ffd_hidden=512))
    w = model.transformer.h[0].mlpf.experts.weight
    assert w.abs().max() <= 1 / 256 and w.abs().max() > 0.9 / 256  # uniform(-1/in, 1/in)
    assert abs(model.lm_head.weight.std().item() - 0.02) < 1e-3
    assert torch.equal(model.transformer.ln_f.weight, torch.ones(256))


TABLE = {"molm-350m-4b": (4e9, 350e6), "molm-700m-4b": (4e9, 700e6), "molm-700m-8b": (8e9, 700e6)}


@pytest.mark.parametrize("preset", list(TABLE))
def test_preset_parameter_counts_match_the_paper_table(preset):
    cfg = model_preset(preset)
    total, active = TABLE[preset]
    # The table rounds to one significant figure; the embedding lookup is not counted.
    assert abs(cfg.num_params(embedding=False) - total) / total < 0.05
    assert abs(cfg.num_params(active=True, embedding=False) - active) / active < 0.1
    small = model_preset("tiny")
    assert small.num_params() == sum(p.numel() for p in MoLM(small).parameters())


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"model.k_att \(5\) exceeds model.n_att_experts \(4\)"):
        model_preset("tiny", k_att=5)
    with pytest.raises(ValueError, match=r"model.att_hidden \(64\) is not divisible by model.n_head \(3\)"):
        model_preset("tiny", n_head=3)
    with pytest.raises(ValueError, match="unknown model preset 'nope'"):
        model_preset("nope")
    with pytest.raises(ValueError, match="model.bogus is not a ModelConfig field"):
        model_preset("tiny", bogus=1)
    with pytest.raises(ValueError, match="aux_loss_type"):
        dataclasses.replace(ModelConfig(), aux_loss_type="cv").validate()
