"""EMoE: conversion of small random GPT-2, GPT-NeoX and Llama models built with transformers,
against the dense models themselves (fp64), a hand-computed gate, planted clusters and plain
transformers; and once on real weights (a tiny GPT-2 trained on standard-library text in the test).
Fine-tuning through finetune.py, exports and the fresh-process checks: test_finetune.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM,
                          LlamaConfig, LlamaForCausalLM)

import molm_megatron.emoe as emoe
from molm_megatron.emoe.cluster import balanced_kmeans
from molm_megatron.emoe.layer import ARCHITECTURES, EMoEMLP, keys_FD
from molm_megatron.emoe.training import apply_lora, load_for_training

E, D_FF, V = 8, 64, 97  # experts, FFN width, vocabulary of the random models


def dense_model(arch: str) -> torch.nn.Module:
    """A small random dense model; initializer_range 0.1 so the FFN visibly moves the logits."""
    common = dict(vocab_size=V, initializer_range=0.1)
    if arch == "gpt2":
        cfg = GPT2Config(n_positions=64, n_embd=32, n_layer=3, n_head=2, n_inner=D_FF, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, **common)
        return GPT2LMHeadModel(cfg).eval()
    if arch == "gpt_neox":
        cfg = GPTNeoXConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=D_FF,
                            max_position_embeddings=64, **common)
        return GPTNeoXForCausalLM(cfg).eval()
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                      intermediate_size=D_FF, max_position_embeddings=64, **common)
    return LlamaForCausalLM(cfg).eval()


ARCHS = ["gpt2", "gpt_neox", "llama"]
FIRST = {"gpt2": "c_fc", "gpt_neox": "dense_h_to_4h", "llama": "gate_proj"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Per architecture: (dense folder, EMoE folder with E experts, top-k = E, layers 0 and 2)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("emoe")
    out = {}
    for arch in ARCHS:
        dense_model(arch).save_pretrained(root / arch)
        emoe.convert(root / arch, root / f"{arch}-emoe", num_experts=E, top_k=E, layers=[0, 2], n_init=2,
                     log=lambda _: None)
        out[arch] = (root / arch, root / f"{arch}-emoe")
    return out


def logits(model, ids):
    return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_k_equals_n_gives_the_dense_logits_masked_and_sparse(folders, arch):
    """k = N: the EMoE model (both computations) and the permuted-but-ungated folder in the plain
    dense class all give the original dense logits (fp64)."""
    dense_dir, emoe_dir = folders[arch]
    ids = torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(1))
    dense = AutoModelForCausalLM.from_pretrained(dense_dir).double().eval()
    assert type(dense) is emoe.EMOE_CLASSES[arch].dense_class  # a dense folder loads as before
    expected = logits(dense, ids)
    model = AutoModelForCausalLM.from_pretrained(emoe_dir).double().eval()
    assert isinstance(model, emoe.EMOE_CLASSES[arch]) and sorted(model.emoe_layers()) == [0, 2]
    for computation in ("sparse", "masked"):
        model.set_emoe(computation=computation)
        torch.testing.assert_close(logits(model, ids), expected, rtol=1e-10, atol=1e-10)
    plain = model.dense_class.from_pretrained(emoe_dir).double().eval()
    assert type(plain) is model.dense_class
    torch.testing.assert_close(logits(plain, ids), expected, rtol=1e-10, atol=1e-10)
    # The neurons really were permuted (else the checks above prove nothing about the permutation).
    spec = model.emoe_layers()[0].spec
    k_dense = keys_FD(getattr(dense.get_submodule(spec.blocks)[0].mlp, FIRST[arch]), spec.conv1d)
    k_emoe = keys_FD(getattr(model.emoe_layers()[0], FIRST[arch]), spec.conv1d)
    assert not torch.equal(k_dense, k_emoe)
    assert torch.equal(k_dense[k_dense[:, 0].argsort()], k_emoe[k_emoe[:, 0].argsort()])


@pytest.mark.parametrize("arch", ARCHS)
def test_masked_and_sparse_agree_below_n_values_and_gradients(folders, arch):
    """k = 3 < N: the sparse computation (scattered-expert reference on CPU) equals the masked
    dense one in logits and in the gradient of every parameter (fp64), and differs from dense."""
    dense_dir, emoe_dir = folders[arch]
    ids = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(2))
    model = AutoModelForCausalLM.from_pretrained(emoe_dir).double().eval()
    model.set_emoe(top_k=3)
    results = {}
    for computation in ("masked", "sparse"):
        model.set_emoe(computation=computation)
        model.zero_grad()
        out = logits(model, ids)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        results[computation] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(results["sparse"][0], results["masked"][0], rtol=1e-10, atol=1e-10)
    for name, g in results["masked"][1].items():
        torch.testing.assert_close(results["sparse"][1][name], g, rtol=1e-9, atol=1e-10, msg=name)
    dense = AutoModelForCausalLM.from_pretrained(dense_dir).double().eval()
    assert (results["sparse"][0] - logits(dense, ids)).abs().max() > 1e-3  # the gate does drop experts


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("width", [16, 12])
def test_sparse_layer_reads_weights_in_place_or_padded_with_equal_values_and_gradients(arch, width):
    """One EMoE layer, 4 experts of `width` neurons: a multiple of 16 is read in place (views of
    the dense weights), 12 through copies zero-padded to 16; either way the sparse computation
    equals the masked one in output and every parameter's gradient (fp64), at k = 2."""
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXMLP
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(3)
    d_ff, spec = 4 * width, ARCHITECTURES[arch]
    mlp = {"gpt2": lambda: GPT2MLP(d_ff, GPT2Config(n_embd=32, resid_pdrop=0.0)),
           "gpt_neox": lambda: GPTNeoXMLP(GPTNeoXConfig(hidden_size=32, intermediate_size=d_ff, num_attention_heads=2)),
           "llama": lambda: LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=d_ff, num_attention_heads=2)),
           }[arch]()
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.3)
    cfg_act = {"gpt2": "gelu_new", "gpt_neox": "gelu", "llama": "silu"}[arch]
    layer = EMoEMLP(mlp, spec, cfg_act, 4, 2).double()
    w1 = layer.kernel_weights()[0]
    first = getattr(layer, spec.first).weight
    assert (w1.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()) == (width % 16 == 0)
    assert w1.shape[2] == 16 * math.ceil(width / 16)
    x = torch.randn(23, 32, dtype=torch.float64)
    results = {}
    for computation in ("masked", "sparse"):
        layer.set_routing(2, computation)
        layer.zero_grad()
        y = layer(x)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        results[computation] = [y.detach()] + [p.grad.clone() for p in layer.parameters()]
    for got, want in zip(results["sparse"], results["masked"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_gate_is_the_mean_of_each_experts_key_rows_hand_check(folders):
    """GPT-2 layer 0: score_e(x) = x . mean of expert e's rows of c_fc (columns of the Conv1D
    weight) + mean of its c_fc biases, computed by a loop; the chosen experts are its top-k."""
    model = AutoModelForCausalLM.from_pretrained(folders["gpt2"][1]).double()
    layer = model.emoe_layers()[0]
    w_DF, b_F = layer.c_fc.weight.detach(), layer.c_fc.bias.detach()  # Conv1D: [D, d_ff]
    x = torch.randn(5, w_DF.shape[0], dtype=torch.float64)
    F_e = D_FF // E
    hand = torch.empty(5, E, dtype=torch.float64)
    for t in range(5):
        for e in range(E):
            cols = range(e * F_e, (e + 1) * F_e)
            hand[t, e] = sum(float(x[t] @ w_DF[:, i]) + float(b_F[i]) for i in cols) / F_e
    torch.testing.assert_close(layer.scores(x), hand, rtol=1e-12, atol=1e-12)
    layer.set_routing(2, "sparse")
    routed = layer.router(x)
    assert torch.equal(routed.experts_TK.sort(1).values, hand.topk(2, dim=1).indices.sort(1).values)
    assert torch.equal(routed.gates_TK, torch.ones(5, 2, dtype=routed.gates_TK.dtype))  # weight 1 each


def test_balanced_kmeans_gives_equal_clusters_and_finds_planted_groups():
    """Keys drawn around 4 directions (16 each, shuffled, with different norms: clustering is on
    the normalised keys): every cluster has exactly 16 keys and each is one planted group."""
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(4, 24, generator=g)
    group = torch.randperm(64, generator=g) % 4
    keys = (centres[group] + 0.05 * torch.randn(64, 24, generator=g)) * torch.rand(64, 1, generator=g).add(0.5)
    labels = balanced_kmeans(keys, 4, seed=0, n_init=2)
    assert np.bincount(labels).tolist() == [16] * 4
    for c in range(4):
        assert len(set(group[torch.from_numpy(labels == c)].tolist())) == 1


def test_converted_layers_hold_balanced_contiguous_experts(folders):
    """Expert e's slice of a converted Llama layer is exactly cluster e of the dense keys
    (clustered again here with the converter's settings), every slice d_ff / N neurons, and the
    up and down projections moved with the gate projection."""
    dense = LlamaForCausalLM.from_pretrained(folders["llama"][0]).model.layers[2].mlp
    model = AutoModelForCausalLM.from_pretrained(folders["llama"][1]).emoe_layers()[2]
    labels = balanced_kmeans(dense.gate_proj.weight, E, seed=0, n_init=2)
    assert np.bincount(labels).tolist() == [D_FF // E] * E
    F_e = D_FF // E
    for e in range(E):
        members = np.flatnonzero(labels == e)  # the converter keeps a cluster's neurons in order
        rows = slice(e * F_e, (e + 1) * F_e)
        assert torch.equal(model.gate_proj.weight[rows], dense.gate_proj.weight[members])
        assert torch.equal(model.up_proj.weight[rows], dense.up_proj.weight[members])
        assert torch.equal(model.down_proj.weight[:, rows], dense.down_proj.weight[:, members])


def test_bad_input_is_refused_before_any_work(folders, tmp_path):
    dense_dir = folders["gpt2"][0]
    out = tmp_path / "out"
    cases = [
        (dict(num_experts=7), r"d_ff \(64\) must be divisible by --experts \(7\)"),
        (dict(top_k=9), r"--top-k \(9\) must be between 1 and --experts \(8\)"),
        (dict(layers=[0, 3]), r"layer indices \[3\] out of range: the model has 3 layers \(0..2\)"),
        (dict(layer_start=0, layer_stride=0), r"--layer-stride must be >= 1"),
    ]
    for kwargs, message in cases:
        settings = dict(num_experts=E, top_k=2) | kwargs
        with pytest.raises(ValueError, match=message):
            emoe.convert(dense_dir, out, **settings, log=lambda _: None)
    opt = tmp_path / "opt"
    opt.mkdir()
    (opt / "config.json").write_text(json.dumps({"model_type": "opt", "num_hidden_layers": 2}))
    with pytest.raises(ValueError, match=r"model_type 'opt' is not supported by EMoE \(supported: gpt2, "
                                         r"gpt_neox, llama\)"):
        emoe.convert(opt, out, log=lambda _: None)
    with pytest.raises(ValueError, match="already an EMoE model"):
        emoe.convert(folders["gpt2"][1], out, num_experts=E, top_k=2, log=lambda _: None)
    with pytest.raises(FileExistsError, match="exists; choose a new --out"):
        emoe.convert(dense_dir, folders["llama"][1], num_experts=E, top_k=2, log=lambda _: None)
    assert not out.exists() and not (tmp_path / "out.labels").exists()  # nothing written
    from molm_megatron.modular.weights import load_model

    with pytest.raises(ValueError, match="holds an EMoE gpt2 model, not a MoLM one: expert insertion, pruning"):
        load_model(folders["gpt2"][1])  # a starting point of MoLM's module manipulation
    from molm_megatron.emoe.__main__ import main

    assert main(["convert", "--model", str(dense_dir), "--out", str(out), "--experts", "5"]) == 2


def test_labels_are_cached_per_layer(folders, tmp_path):
    """A second conversion with the same cache reuses every layer's labels (and gives the same
    weights); the cache holds one file per converted layer."""
    dense_dir = folders["gpt_neox"][0]
    logs = []
    emoe.convert(dense_dir, tmp_path / "a", num_experts=E, top_k=2, layer_start=1, layer_stride=1,
                 cache_dir=tmp_path / "cache", n_init=2, log=logs.append)
    emoe.convert(dense_dir, tmp_path / "b", num_experts=E, top_k=2, layer_start=1, layer_stride=1,
                 cache_dir=tmp_path / "cache", n_init=2, log=logs.append)
    assert len(list((tmp_path / "cache").glob("layer*.npy"))) == 2
    assert sum("labels from cache" in line for line in logs) == 2
    a = GPTNeoXForCausalLM.from_pretrained(tmp_path / "a").state_dict()
    b = GPTNeoXForCausalLM.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_trains_only_the_adapters_and_saves_merged(folders, tmp_path):
    """LoRA through peft on the attention projections: only adapter weights change, the EMoE
    FFNs stay bitwise; the merged save reloads with the fine-tuned logits, and `export-dense` of it
    loads in the plain dense class with the merged model's logits at k = N."""
    torch.manual_seed(5)
    model = apply_lora(load_for_training(folders["llama"][1], dtype=torch.float64), r=4)
    model.unwrapped().set_emoe(top_k=3)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, V, (2, 12))
    for _ in range(3):
        model(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    with torch.no_grad():
        expected = model(ids).logits
    model.merged_model().save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").double().eval()
    assert reloaded.config.emoe["top_k"] == 3
    torch.testing.assert_close(logits(reloaded, ids), expected, rtol=1e-9, atol=1e-9)
    from molm_megatron.emoe.__main__ import main

    assert main(["export-dense", "--model", str(tmp_path / "merged"), "--out", str(tmp_path / "dense")]) == 0
    dense = LlamaForCausalLM.from_pretrained(tmp_path / "dense").double().eval()
    assert "emoe" not in dense.config.to_dict()
    reloaded.set_emoe(top_k=E)
    torch.testing.assert_close(logits(dense, ids), logits(reloaded, ids), rtol=1e-9, atol=1e-9)


def test_expert_statistics_count_valid_tokens_per_layer(folders):
    """collect_expert_stats: 'layer{N}.mlpf' -> tokens per expert, k per valid token."""
    model = load_for_training(folders["gpt_neox"][1], dtype=torch.float64)
    model.unwrapped().set_emoe(top_k=3)
    ids = torch.randint(0, V, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0  # 3 padding tokens
    out = model(ids, attention_mask=mask, collect_expert_stats=True)
    assert sorted(out.expert_stats) == ["layer0.mlpf", "layer2.mlpf"]
    for counts in out.expert_stats.values():
        assert counts.shape == (E,) and counts.sum().item() == 17 * 3
    assert model(ids).expert_stats is None


def _stdlib_bytes(limit: int) -> bytes:
    """Python standard-library sources (real text on every machine), concatenated."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    data = bytearray()
    for path in sorted(root.glob("*.py")):
        data += path.read_bytes()
        if len(data) >= limit:
            break
    return bytes(data[:limit])


def test_real_weights_sparse_perplexity_at_quarter_k(tmp_path):
    """A tiny byte-level GPT-2 trained here on standard-library text, converted to 16 experts of
    every layer; held-out perplexity: dense, EMoE sparse at k = N/4 (recorded, no threshold),
    and EMoE at k = N (equal to dense)."""
    torch.manual_seed(6)
    torch.set_num_threads(2)
    data = torch.tensor(list(_stdlib_bytes(600_000)), dtype=torch.long)
    train, held = data[:-60_000], data[-60_000:]
    cfg = GPT2Config(vocab_size=256, n_positions=128, n_embd=64, n_layer=2, n_head=4, n_inner=256,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    T, B = 128, 8
    for _ in range(250):
        starts = torch.randint(0, train.numel() - T - 1, (B,))
        batch = torch.stack([train[s:s + T + 1] for s in starts.tolist()])
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval().save_pretrained(tmp_path / "dense")
    emoe.convert(tmp_path / "dense", tmp_path / "emoe", num_experts=16, top_k=4, n_init=2, log=lambda _: None)
    emoe_model = AutoModelForCausalLM.from_pretrained(tmp_path / "emoe").eval()

    windows = held[: (held.numel() // T) * T].view(-1, T)[:64]

    @torch.no_grad()
    def perplexity(m) -> float:
        return math.exp(m(input_ids=windows, labels=windows).loss.item())

    dense_ppl, sparse_ppl = perplexity(model), perplexity(emoe_model)
    emoe_model.set_emoe(top_k=16)
    full_ppl = perplexity(emoe_model)
    print(f"\nEMoE real weights (byte GPT-2, 2 layers, d_ff 256, 16 experts): held-out perplexity dense {dense_ppl:.3f}, "
          f"sparse k=4 {sparse_ppl:.3f}, k=16 {full_ppl:.3f}")
    assert dense_ppl < 20  # it learned something (bytes: uniform is 256)
    assert math.isclose(full_ppl, dense_ppl, rel_tol=1e-4)
    assert math.isfinite(sparse_ppl)
