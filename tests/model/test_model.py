"""The MoLM model against independent computations: a hand-written router, the dense mixture of
all experts, the concatenated forward (memory), a left-padded batch, and token-by-token decoding."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from molm_megatron.config import ModelConfig, model_preset
from molm_megatron.model import MoLM
from molm_megatron.model.model import MoE, Router


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


# ---- shape fields: per-layer expert counts (a pruned model) and inserted experts -----------------

SHAPED = dict(n_att_experts_per_layer=[4, 3], n_mlp_experts_per_layer=[8, 5], n_new_att_experts=1,
              n_new_mlp_experts=2)


def test_per_layer_counts_and_inserted_experts_build_and_count_as_by_hand():
    model = make(**SHAPED)
    layer1 = model.transformer.h[1]
    assert layer1.mlpf.experts.weight.shape == (3, 64, 128) and layer1.mlpf.experts.new_weight.shape == (2, 64, 128)
    assert layer1.mlpf.output_experts.new_weight.shape == (2, 128, 64)
    assert layer1.mlpf.gate.w_gate[3].weight.shape == (3, 32) and layer1.mlpf.gate.new_weight.shape == (2, 32)
    assert layer1.attn.q_proj.experts.weight.shape == (2, 64, 64) and layer1.attn.q_proj.gate.new_weight.shape == (1, 32)
    # Hand count, tiny preset (d 64, gating 32, att_hidden 64, ffd 128, vocab 512, identity k/v):
    # a router is 64*32 + 32 + 32*E, an attention expert 2*64*64, an MLP expert 2*64*128, norms 4*64.
    router = lambda E: 64 * 32 + 32 + 32 * E  # noqa: E731
    layer0 = router(4) + 4 * 8192 + router(8) + 8 * 16384 + 256
    layer1 = router(3) + 3 * 8192 + router(5) + 5 * 16384 + 256
    head_and_norm = 512 * 64 + 2 * 64
    assert model.num_params() == layer0 + layer1 + 512 * 64 + head_and_norm == 345472
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    active = (router(4) + 2 * 8192 + router(8) + 2 * 16384 + 256) + (router(3) + 2 * 8192 + router(5) + 2 * 16384 + 256)
    assert model.num_params(active=True, embedding=False) == active + head_and_norm
    cfg = model.config
    assert cfg.flops_per_token(32) == 6.0 * (active + head_and_norm) + 3.0 * 2 * 2 * 2 * 2 * 64 * (32 + 33 / 2)


def test_shape_field_errors_name_the_field():
    with pytest.raises(ValueError, match=r"model.n_mlp_experts_per_layer has 3 entries; model.n_layer is 2"):
        model_preset("tiny", n_mlp_experts_per_layer=[8, 8, 8])
    with pytest.raises(ValueError, match=r"model.k_mlp \(2\) exceeds model.n_mlp_experts_per_layer\[1\] \(1\)"):
        model_preset("tiny", n_mlp_experts_per_layer=[8, 1])
    with pytest.raises(ValueError, match=r"model.n_new_att_experts \(3\) must be less than "
                                         r"model.n_att_experts_per_layer\[1\] \(3\)"):
        model_preset("tiny", n_att_experts_per_layer=[4, 3], n_new_att_experts=3)
    with pytest.raises(ValueError, match=r"model.n_new_mlp_experts \(8\) must be less than model.n_mlp_experts \(8\)"):
        model_preset("tiny", n_new_mlp_experts=8)


def concatenated(model: MoLM) -> MoLM:
    """The same weights with the inserted experts stored as ordinary ones (one tensor each)."""
    plain = MoLM(dataclasses.replace(model.config, n_new_att_experts=0, n_new_mlp_experts=0)).double().eval()
    state = dict(model.state_dict())
    for key in [k for k in state if k.endswith("new_weight")]:
        target = key.replace("gate.new_weight", "gate.w_gate.3.weight").replace("new_weight", "weight")
        state[target] = torch.cat([state[target], state.pop(key)])
    plain.load_state_dict(state)
    return plain


def test_inserted_experts_compute_as_ordinary_experts_and_regularise_their_router_rows():
    model = make(**SHAPED, aux_loss_weight=0.0, routing_reg_weight=0.5)
    plain = concatenated(model)
    ids = torch.randint(0, 512, (2, 10))
    out, ref = model(ids, labels=ids), plain(ids, labels=ids)
    torch.testing.assert_close(out.logits, ref.logits)
    for name in ("mi", "concentration", "switch", "z"):
        torch.testing.assert_close(out.aux_losses[name], ref.aux_losses[name])
    # routing_reg is the norm of each router's new_weight, summed over the 4 routers; only it is weighted.
    gates = [m.gate for block in model.transformer.h for m in (block.attn.q_proj, block.mlpf)]
    norms = sum(math.sqrt((g.new_weight ** 2).sum().item()) for g in gates)
    assert math.isclose(out.aux_losses["routing_reg"].item(), norms, rel_tol=1e-12)
    assert ref.aux_losses["routing_reg"].item() == 0.0
    torch.testing.assert_close(out.aux_loss, 0.5 * out.aux_losses["routing_reg"])
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    # Gradients reach both parts; the old rows' gradient equals the concatenated model's old rows.
    out.loss.backward()
    (ref.lm_loss + ref.aux_loss).backward()
    mlp, mlp_ref = model.transformer.h[1].mlpf, plain.transformer.h[1].mlpf
    torch.testing.assert_close(mlp.experts.weight.grad, mlp_ref.experts.weight.grad[:3])
    torch.testing.assert_close(mlp.experts.new_weight.grad, mlp_ref.experts.weight.grad[3:])
    w = mlp.gate.new_weight
    torch.testing.assert_close(mlp.gate.new_weight.grad - mlp_ref.gate.w_gate[3].weight.grad[3:], 0.5 * w / w.norm())
    assert model(ids).expert_stats is None  # statistics only when asked


def test_router_with_a_custom_scorer_and_unit_gates():
    centroids_ED = torch.randn(6, 16, dtype=torch.float64)
    router = Router(16, 6, 3, scorer=lambda x: x @ centroids_ED.T, unit_gates=True)
    assert not any(True for _ in router.parameters())  # no w_gate: the scorer is the whole gate
    x = torch.randn(5, 16, dtype=torch.float64)
    out = router(x)
    assert torch.equal(out.experts_TK, (x @ centroids_ED.T).topk(3, dim=-1).indices)
    assert torch.equal(out.gates_TK, torch.ones(5, 3, dtype=torch.float64))


@pytest.mark.parametrize("preset", ["tiny", "tiny-multihead"])
def test_softmax_rope_memory_padding_and_decoding_equal_the_full_forward(preset):
    """The baseline attention keeps the model's contracts: memory, reset rows, left padding and the
    cache give the full forward's logits (rotary positions are relative, so shifts change nothing)."""
    model = make(preset, attention="softmax_rope")
    ids = torch.randint(0, 512, (2, 24))
    full = model(ids).logits
    first = model(ids[:, :10], memory_length=32)
    torch.testing.assert_close(model(ids[:, 10:], memory=first.memory, memory_length=32).logits, full[:, 10:])
    reset = torch.tensor([[0] * 10 + [1] * 14, [1] * 24])
    out = model(ids[:, 10:], attention_mask=reset, memory=first.memory)
    torch.testing.assert_close(out.logits[0], model(ids[:1, 10:]).logits[0])
    padded = torch.cat([torch.zeros(2, 4, dtype=torch.long), ids[:, :10]], 1)
    out = model(padded, attention_mask=torch.tensor([[0] * 4 + [1] * 10] * 2))
    torch.testing.assert_close(out.logits[:, 4:], full[:, :10])
    assert torch.isfinite(out.logits).all()
    step = model(ids[:, :5], memory_length=100)
    for t in range(5, 12):
        step = model(ids[:, t:t + 1], memory=step.memory, memory_length=100)
        torch.testing.assert_close(step.logits[:, 0], full[:, t])
    assert not torch.allclose(full, make(preset).forward(ids).logits)  # a different attention, same weights


def test_softmax_rope_config_errors_and_export_refusal(tmp_path):
    from molm_megatron.hf.convert import export_hf

    with pytest.raises(ValueError, match=r"model.attention \('softmax'\) must be one of \('stickbreaking', "
                                         r"'softmax_rope'\)"):
        model_preset("tiny", attention="softmax")
    with pytest.raises(ValueError, match=r"needs an even head size; model.att_hidden \(66\) / model.n_head \(2\) = 33"):
        model_preset("tiny-multihead", attention="softmax_rope", att_hidden=66)
    with pytest.raises(ValueError, match="model.attention 'softmax_rope' has no Hugging Face export"):
        export_hf(make(attention="softmax_rope"), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
