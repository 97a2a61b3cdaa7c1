"""Module manipulation against independent computations: a pruned model against the unpruned one
with the removed experts' router logits at -inf (a masked scorer), keep-all pruning as the
identity, layer dropping against the original blocks, insertion keeping the old weights, the
routing regularisation's gradient by hand, KL by hand, and the command line's refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from molm_megatron.config import model_preset
from molm_megatron.model import MoLM
from molm_megatron.modular import (drop_layers, full_state_dict, importance, insert_experts, kl_divergence,
                                   layers_to_drop, prune_experts, select_by_share, select_by_threshold)
from molm_megatron.modular.__main__ import main as modular_main
from molm_megatron.modular.stats import domain_kl
from molm_megatron.modular.weights import router_names

# Kept experts of the tiny model (4 attention, 8 MLP experts per layer, k = 2): uneven across layers.
KEEP = {"layer0.attn": [0, 2, 3], "layer0.mlpf": [1, 2, 4, 7], "layer1.attn": [1, 3],
        "layer1.mlpf": [0, 1, 2, 3, 4, 5, 6, 7]}


def make(seed=0, **overrides) -> MoLM:
    torch.manual_seed(seed)
    return MoLM(model_preset("tiny", **overrides)).double().eval()


def mask_removed_experts(model: MoLM, keep: dict[str, list[int]]) -> None:
    """Give every router a scorer that computes the published logits W_e GELU(W_in x + b) and sets
    the removed experts' logits to -inf: the unpruned model, restricted by masking."""
    for i, block in enumerate(model.transformer.h):
        for kind, moe in (("attn", block.attn.q_proj), ("mlpf", block.mlpf)):
            gate = moe.gate
            removed = torch.ones(gate.num_experts, dtype=torch.bool)
            removed[keep[f"layer{i}.{kind}"]] = False

            def scorer(x, gate=gate, removed=removed):
                w_in, b_in, w_e = gate.w_gate[0].weight, gate.w_gate[0].bias, gate.w_gate[3].weight
                return F.linear(F.gelu(F.linear(x, w_in, b_in)), w_e).masked_fill(removed, -math.inf)

            gate.scorer = scorer


def two_segments(model: MoLM, ids, mask):
    """Logits of a segment, then of the next with the first as memory and a padded batch row."""
    first = model(ids[:, :8], attention_mask=mask[:, :8])
    second = model(ids[:, 8:], attention_mask=mask, memory=first.memory)
    return first, second


def test_pruned_model_equals_unpruned_with_removed_router_logits_at_minus_inf():
    model = make(n_head=2, att_hidden=32)  # projected keys/values too
    torch.manual_seed(1)
    ids = torch.randint(0, 512, (3, 16))
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[1, :5] = 0  # left padding of row 1, in the memory segment and before it
    mask[2, 12:] = 0
    pruned = prune_experts(model, KEEP).eval()
    assert pruned.config.n_att_experts_per_layer == [3, 2] and pruned.config.n_mlp_experts_per_layer == [4, 8]
    got = two_segments(pruned, ids, mask)
    mask_removed_experts(model, KEEP)
    want = two_segments(model, ids, mask)
    for g, w in zip(got, want):
        real = mask[:, :8].bool() if g is got[0] else mask[:, 8:].bool()
        torch.testing.assert_close(g.logits[real], w.logits[real], rtol=1e-10, atol=1e-10)
        for name in ("mi", "concentration"):  # entropies of the marginals: removed experts have p = 0
            torch.testing.assert_close(g.aux_losses[name], w.aux_losses[name], rtol=1e-10, atol=1e-12)
    # The parameter count follows the per-layer counts.
    cfg = model.config
    removed_att, removed_mlp = 1 + 2, 4
    expert_att, expert_mlp = 2 * 64 * 32 + 32, 2 * 64 * 128 + 32
    assert pruned.num_params() == cfg.num_params() - removed_att * expert_att - removed_mlp * expert_mlp
    assert pruned.num_params() == sum(p.numel() for p in pruned.parameters())


def test_keep_all_pruning_is_the_identity():
    model = make()
    scores = importance({name: [0.0] + [1.0] * 7 if name.endswith("mlpf") else [1.0] * 4
                         for name in router_names(model.config)}, "max")
    keep = select_by_threshold(model, scores, 0.0)
    pruned = prune_experts(model, keep)
    assert pruned.config == model.config  # uniform counts stay uniform (loadable by the published code)
    want = model.state_dict()
    assert all(torch.equal(t, want[name]) for name, t in pruned.state_dict().items()) and \
        pruned.state_dict().keys() == want.keys()


def test_selection_by_threshold_and_share_and_their_refusals():
    model = make()
    freq = {name: ([0.4, 0.3, 0.2, 0.1] if name.endswith("attn") else [0.05, 0.3, 0.1, 0.15, 0.1, 0.1, 0.1, 0.1])
            for name in router_names(model.config)}
    by_max, by_sum = importance(freq, "max"), importance(freq, "sum")
    torch.testing.assert_close(by_max["layer0.attn"], torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64))
    torch.testing.assert_close(by_sum["layer0.mlpf"], torch.tensor(freq["layer0.mlpf"], dtype=torch.float64))
    keep = select_by_threshold(model, by_max, 0.3)
    assert keep["layer0.attn"] == [0, 1, 2] and keep["layer1.mlpf"] == [1, 2, 3, 4, 5, 6, 7]
    with pytest.raises(ValueError, match=r"threshold 0.8 keeps 1 experts of router layer0.attn, fewer than the 2"):
        select_by_threshold(model, by_max, 0.8)
    total = model.num_params()
    keep = select_by_share(model, by_max, 0.8)
    smaller = prune_experts(model, keep)
    assert smaller.num_params() <= 0.8 * total
    assert all(len(kept) >= 2 for kept in keep.values())
    # The least important expert of the MLP routers (importance 1/6) goes first.
    assert 0 not in keep["layer1.mlpf"] and 0 not in keep["layer0.mlpf"]
    with pytest.raises(ValueError, match=r"target share 0.1 is unreachable keeping min_experts \(top-k\)"):
        select_by_share(model, by_max, 0.1)
    with pytest.raises(ValueError, match=r"min_experts \(1\) is below the top-k of router layer0.attn \(2\)"):
        select_by_share(model, by_max, 0.5, min_experts=1)
    with pytest.raises(ValueError, match=r"router layer1.mlpf has 4 experts in the statistics but 8 in the model"):
        select_by_threshold(model, {**by_max, "layer1.mlpf": by_max["layer0.attn"]}, 0.1)


def test_dropped_layers_keep_the_other_blocks():
    assert layers_to_drop(24, 4, "top") == [20, 21, 22, 23]
    assert layers_to_drop(24, 3, "uniform") == [5, 11, 17]
    assert layers_to_drop(4, 1, "uniform") == [1]
    model = make(n_layer=4)
    smaller = drop_layers(model, [1])
    assert smaller.config.n_layer == 3
    want = model.state_dict()
    for name, t in smaller.state_dict().items():
        old = name
        if name.startswith("transformer.h."):
            layer, rest = name[len("transformer.h."):].split(".", 1)
            old = f"transformer.h.{[0, 2, 3][int(layer)]}.{rest}"
        assert torch.equal(t, want[old]), name
    # The dropped model is the original with block 1 skipped.
    ids = torch.randint(0, 512, (2, 8))
    block = model.transformer.h[1]
    block.forward = lambda h, valid, key_mask, memory, memory_length: (
        h, model.transformer.h[0](h, valid, key_mask, memory, memory_length)[1], (h, h))
    torch.testing.assert_close(smaller(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_insertion_keeps_old_weights_and_the_routing_regularisation_gradient():
    model = make(aux_loss_weight=0.0)  # the routing regularisation alone
    grown = insert_experts(model, n_mlp=2, n_att=1, seed=3)
    cfg = grown.config
    assert (cfg.n_att_experts, cfg.n_mlp_experts, cfg.n_new_att_experts, cfg.n_new_mlp_experts) == (5, 10, 1, 2)
    old, new = full_state_dict(model), full_state_dict(grown)
    for name, t in old.items():
        assert torch.equal(new[name][: t.shape[0]], t), name
    # The inserted rows are separate parameters; the old rows are the old tensors.
    gate = grown.transformer.h[0].mlpf.gate
    assert torch.equal(gate.w_gate[3].weight, model.transformer.h[0].mlpf.gate.w_gate[3].weight)
    assert gate.new_weight.shape == (2, 32)
    assert grown.transformer.h[1].mlpf.experts.new_weight.shape == (2, 64, 128)
    # Published init of the new experts: uniform(-1/in, 1/in); router rows normal(0, 0.02).
    assert grown.transformer.h[0].mlpf.experts.new_weight.abs().max() <= 1 / 64
    # d(w * sum_routers ||W_new||_F) / dW_new = w * W_new / ||W_new||_F, and zero for every old tensor.
    weight = 0.3
    grown = insert_experts(model, n_mlp=2, n_att=1, seed=3)
    grown.config.routing_reg_weight = weight
    out = grown(torch.randint(0, 512, (2, 8)))
    out.aux_loss.backward()
    for block in grown.transformer.h:
        for g in (block.attn.q_proj.gate, block.mlpf.gate):
            torch.testing.assert_close(g.new_weight.grad, weight * g.new_weight.detach() / g.new_weight.detach().norm())
            assert g.w_gate[3].weight.grad is None or not g.w_gate[3].weight.grad.any()


def test_kl_matches_a_hand_computation():
    # P = (c + 0.5) / (sum + 0.5 E): p = [3.5, 1.5, 0.5] / 5.5, q = [1.5, 1.5, 2.5] / 5.5.
    p = [3.5 / 5.5, 1.5 / 5.5, 0.5 / 5.5]
    q = [1.5 / 5.5, 1.5 / 5.5, 2.5 / 5.5]
    want = sum(a * math.log(a / b) for a, b in zip(p, q))
    assert kl_divergence([3, 1, 0], [1, 1, 2], 0.5) == pytest.approx(want, rel=1e-12)
    assert kl_divergence([3, 1, 0], [3, 1, 0], 0.5) == 0.0
    assert kl_divergence([2, 2], [1, 3], 0.0) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75))
    counts = {"a": {"layer0.mlpf": [3, 1, 0], "layer1.mlpf": [2, 2, 0]},
              "b": {"layer0.mlpf": [1, 1, 2], "layer1.mlpf": [2, 2, 0]}}
    pairs = {(r["a"], r["b"]): r for r in domain_kl(counts, ["layer0.attn", "layer0.mlpf", "layer1.mlpf"], 0.5)}
    assert pairs[("a", "b")]["layers"] == [0, 1]
    assert pairs[("a", "b")]["per_layer"] == [pytest.approx(want), 0.0]
    assert pairs[("a", "b")]["mean"] == pytest.approx(want / 2)
    assert pairs[("b", "a")]["per_layer"][0] == pytest.approx(kl_divergence([1, 1, 2], [3, 1, 0], 0.5))


def test_prune_command_refuses_bad_input_and_writes_nothing(tmp_path, capsys):
    from molm_megatron.hf.convert import save_model_file

    model = make().float()
    save_model_file(model, tmp_path / "model.pt")
    counts = {name: [5, 1, 1, 1] if name.endswith("attn") else [1] * 8 for name in router_names(model.config)}
    stats = {"version": 1, "model": {"n_layer": 2, "vocab_size": 512}, "routers": router_names(model.config),
             "smoothing": 0.5, "domains": {"code": {"prefix": "x", "tokens": 8, "counts": counts,
                                                    "frequency": {k: [c / sum(v) for c in v] for k, v in counts.items()}}},
             "kl": []}
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    (tmp_path / "empty.json").write_text("{}")
    out = tmp_path / "out"
    base = ["prune", "--model", str(tmp_path / "model.pt"), "--out", str(out)]
    cases = [
        (["--from-stats", str(tmp_path / "stats.json"), "--domain", "prose", "--threshold", "0.1"],
         "unknown domain 'prose'; the statistics have code"),
        (["--from-stats", str(tmp_path / "stats.json"), "--threshold", "0.5"],
         "threshold 0.5 keeps 1 experts of router layer0.attn, fewer than the 2 it must keep"),
        (["--from-stats", str(tmp_path / "empty.json"), "--threshold", "0.5"],
         "empty.json: not expert statistics written by `python -m molm_megatron.modular stats`"),
    ]
    stats_vocab = dict(stats, model={"n_layer": 2, "vocab_size": 50295})
    (tmp_path / "vocab.json").write_text(json.dumps(stats_vocab))
    cases.append((["--from-stats", str(tmp_path / "vocab.json"), "--threshold", "0.1"],
                  "statistics of a model with vocab_size 50295, but"))
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            modular_main(base + args)
        assert e.value.code == 2 and message in capsys.readouterr().err
        assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # Several shares at once: one model each; an existing output is refused.
    assert modular_main(base + ["--from-stats", str(tmp_path), "--target-share", "0.9", "0.8"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["share_0.8", "share_0.9"]
    record = json.loads((out / "share_0.8" / "manipulation.json").read_text())
    assert record["params_after"] <= 0.8 * record["params_before"]
    assert (out / "share_0.8" / "hf" / "config.json").is_file() and (out / "share_0.9" / "model.pt").is_file()
    with pytest.raises(SystemExit):
        modular_main(base + ["--from-stats", str(tmp_path), "--threshold", "0.1"])
    assert "exists; choose a new folder or pass --overwrite" in capsys.readouterr().err


def test_grown_vocabulary_trains_only_the_new_rows():
    from molm_megatron.modular import count_trainable, grow_vocab, mask_frozen_rows, set_trainable
    from molm_megatron.training.optimizer import param_groups

    model = make().float()
    grown = grow_vocab(model, 520, seed=1)
    assert grown.config.vocab_size == 520
    set_trainable(grown, "new", old_vocab_size=512)
    mask_frozen_rows(grown)
    assert count_trainable(grown) == (2 * 8 * 64, grown.num_params())
    groups = param_groups(grown, weight_decay=0.1)
    assert [len(g["params"]) for g in groups] == [0, 2]  # embedding and head, never decayed
    before = {name: t.clone() for name, t in grown.state_dict().items()}
    opt = torch.optim.AdamW(groups, lr=1e-2)
    ids = torch.tensor([[1, 515, 3, 519, 512, 7]])
    for _ in range(3):
        out = grown(ids[:, :-1], labels=ids[:, 1:])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    after = grown.state_dict()
    for name in ("transformer.wte.weight", "lm_head.weight"):
        assert torch.equal(after[name][:512], before[name][:512]), name
        assert not torch.equal(after[name][512:], before[name][512:]), name
    assert all(torch.equal(after[n], before[n]) for n in before if n not in ("transformer.wte.weight", "lm_head.weight"))
    # With train_embedding the whole embedding trains (and the head's new rows).
    set_trainable(grown, "new", train_embedding=True, old_vocab_size=512)
    assert count_trainable(grown)[0] == 520 * 64 + 8 * 64
