"""Hugging Face format: the published keys and shapes, exact round trips, a published-format
checkpoint built by hand, generate() with the cache, and loading in a fresh process."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import molm_megatron  # noqa: F401  (registers moduleformer with the Auto classes)
from molm_megatron.config import model_preset
from molm_megatron.hf import ModuleFormerForCausalLM
from molm_megatron.hf.convert import export_hf, import_hf, main as convert_main, save_model_file
from molm_megatron.model import MoLM


def published_keys_and_shapes(cfg):
    """The key list of docs/design.md, "Model semantics", written out independently of the model code."""
    d, g = cfg.n_embd, cfg.gating_size
    n = cfg.history_length + cfg.block_size
    keys = {"transformer.wte.weight": [cfg.vocab_size, d], "transformer.ln_f.weight": [d],
            "transformer.ln_f.bias": [d], "lm_head.weight": [cfg.vocab_size, d]}
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        E_att, E_mlp = cfg.att_experts(i), cfg.mlp_experts(i)  # inserted experts included
        keys.update({p + "ln_1.weight": [d], p + "ln_1.bias": [d], p + "ln_2.weight": [d], p + "ln_2.bias": [d],
                     p + "attn.q_proj.experts.weight": [E_att, d, cfg.att_hidden],
                     p + "attn.q_proj.output_experts.weight": [E_att, cfg.att_hidden, d],
                     p + "attn.q_proj.gate.w_gate.0.weight": [g, d], p + "attn.q_proj.gate.w_gate.0.bias": [g],
                     p + "attn.q_proj.gate.w_gate.3.weight": [E_att, g],
                     p + "mlpf.experts.weight": [E_mlp, d, cfg.ffd_hidden],
                     p + "mlpf.output_experts.weight": [E_mlp, cfg.ffd_hidden, d],
                     p + "mlpf.gate.w_gate.0.weight": [g, d], p + "mlpf.gate.w_gate.0.bias": [g],
                     p + "mlpf.gate.w_gate.3.weight": [E_mlp, g],
                     p + "attn.mask": [n, n], p + "attn.cum_weight": [n, n]})
        if not (cfg.n_head == 1 and cfg.att_hidden == d):
            keys.update({p + "attn.k_proj.weight": [cfg.att_hidden, d], p + "attn.k_proj.bias": [cfg.att_hidden],
                         p + "attn.v_proj.weight": [cfg.att_hidden, d], p + "attn.v_proj.bias": [cfg.att_hidden]})
    return keys


def make(preset="tiny", seed=0, **overrides):
    torch.manual_seed(seed)
    return MoLM(model_preset(preset, **overrides)).eval()


@pytest.mark.parametrize("preset", ["tiny", "tiny-multihead"])
def test_export_has_exactly_the_published_keys_and_round_trips(preset, tmp_path):
    model = make(preset)
    export_hf(model, tmp_path / "hf")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        saved = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    assert saved == published_keys_and_shapes(model.config)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "moduleformer" and config["n_att_experts"] == 4 and config["k_mlp"] == 2
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert isinstance(loaded, ModuleFormerForCausalLM)
    ids = torch.randint(0, 512, (2, 12))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    back = import_hf(tmp_path / "hf")
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_a_published_format_checkpoint_loads_and_gives_our_logits(tmp_path):
    """Build the folder the way the published checkpoints are laid out: their config.json fields,
    the unused buffers, fp32 safetensors; no code of ours writes it."""
    model = make()
    cfg = model.config
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    n = cfg.history_length + cfg.block_size
    for i in range(cfg.n_layer):
        tensors[f"transformer.h.{i}.attn.mask"] = torch.tril(torch.ones(n, n, dtype=torch.int8))
        tensors[f"transformer.h.{i}.attn.cum_weight"] = torch.tril(torch.ones(n, n), -1)
    (tmp_path / "pub").mkdir()
    save_file(tensors, str(tmp_path / "pub" / "model.safetensors"), metadata={"format": "pt"})
    published_config = {
        "architectures": ["ModuleFormerForCausalLM"], "model_type": "moduleformer",
        "activation_function": "gelu_new", "att_hidden": 64, "attn_pdrop": 0.0, "aux_loss_type": "mi",
        "aux_loss_weight": 0.0, "block_size": 32, "bos_token_id": 511, "embd_pdrop": 0.0, "eos_token_id": 511,
        "ffd_hidden": 128, "gate_type": "mlp", "gating_size": 32, "history_length": 32,
        "initializer_range": 0.02, "k_att": 2, "k_mlp": 2, "layer_norm_epsilon": 1e-05, "moe_pdrop": 0.0,
        "n_att_experts": 4, "n_embd": 64, "n_head": 1, "n_layer": 2, "n_mlp_experts": 8, "resid_pdrop": 0.0,
        "sample_topk": 0, "tie_word_embeddings": False, "torch_dtype": "float32", "use_cache": True,
        "vocab_size": 512,
    }
    (tmp_path / "pub" / "config.json").write_text(json.dumps(published_config))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pub").eval()
    ids = torch.randint(0, 512, (3, 9))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_hf_generate_equals_ours_with_left_padding(tmp_path):
    model = make()
    hf = ModuleFormerForCausalLM.from_molm(model).eval()
    ids = torch.randint(0, 500, (2, 7))
    ids[1, :3] = 0
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ours = model.generate(ids, 20, attention_mask=mask)
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)
    # Cached decoding equals a full forward over the generated text.
    full = hf(ours, attention_mask=torch.cat([mask, torch.ones(2, 20, dtype=mask.dtype)], 1)).logits
    assert torch.equal(ours[:, 7:], full[:, 6:-1].argmax(-1))


def test_a_fresh_process_loads_the_export_and_generates(tmp_path):
    """A fresh process: `import molm_megatron`, then the Auto classes load the export."""
    model = make()
    export_hf(model, tmp_path / "hf")
    prompt = torch.randint(0, 512, (1, 5))
    expected = model.generate(prompt, 8)[0].tolist()
    # `import molm_megatron` alone registers moduleformer, lazily: it imports neither transformers
    # nor torch (measured about 3 ms), the registration runs when transformers' auto modules load.
    code = (
        "import sys, time\n"
        "t = time.perf_counter(); import molm_megatron; t = time.perf_counter() - t\n"
        "assert 'transformers' not in sys.modules and 'torch' not in sys.modules, 'heavy import'\n"
        "assert t < 0.1, t\n"
        "import torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
        f"print(m.generate(torch.tensor([{prompt[0].tolist()}]), max_new_tokens=8, do_sample=False)[0].tolist())\n"
        f"print(m.generate(torch.tensor([{prompt[0].tolist()}]), max_new_tokens=8, do_sample=True, top_k=5).shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "hf")], capture_output=True, text=True,
                         check=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                          "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    lines = out.stdout.strip().splitlines()
    assert lines[0] == str(expected)
    assert lines[1] == "torch.Size([1, 13])"


def test_cli_round_trip_and_bf16_export(tmp_path, capsys):
    model = make("tiny-multihead")
    save_model_file(model, tmp_path / "model.pt")
    assert convert_main(["to-hf", "--model-file", str(tmp_path / "model.pt"), "--out", str(tmp_path / "hf"),
                         "--dtype", "bfloat16", "--tokenizer", "none"]) == 0
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
    assert convert_main(["from-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back.pt")]) == 0
    back = torch.load(tmp_path / "back.pt", weights_only=True)["model"]
    for k, v in model.state_dict().items():
        assert torch.equal(back[k].float(), v.to(torch.bfloat16).float()), k
    (tmp_path / "bad.pt").write_bytes(b"")
    torch.save({"model": {}}, tmp_path / "bad.pt")
    assert convert_main(["to-hf", "--model-file", str(tmp_path / "bad.pt"), "--out", str(tmp_path / "x"),
                         "--tokenizer", "none"]) == 2
    assert "bad.pt: not a model file (no 'config' entry)" in capsys.readouterr().err


def test_inserted_experts_and_per_layer_counts_export_in_the_published_layout_and_split_on_reload(tmp_path):
    model = make(n_att_experts_per_layer=[4, 3], n_mlp_experts_per_layer=[8, 5], n_new_att_experts=1,
                 n_new_mlp_experts=2)
    export_hf(model, tmp_path / "hf")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        saved = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        # The inserted experts are the last rows of the published tensors.
        mlp = model.transformer.h[1].mlpf
        assert torch.equal(f.get_tensor("transformer.h.1.mlpf.experts.weight")[3:], mlp.experts.new_weight)
        assert torch.equal(f.get_tensor("transformer.h.1.mlpf.gate.w_gate.3.weight")[:3], mlp.gate.w_gate[3].weight)
    assert saved == published_keys_and_shapes(model.config)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["n_att_experts_per_layer"], config["n_mlp_experts_per_layer"]) == ([4, 3], [8, 5])
    assert (config["n_new_att_experts"], config["n_new_mlp_experts"]) == (1, 2)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 512, (2, 12))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    back = import_hf(tmp_path / "hf")
    assert back.config == model.config
    assert sorted(back.state_dict()) == sorted(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_a_uniform_model_exports_only_the_published_config_fields(tmp_path):
    export_hf(make(), tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    new_fields = {"n_att_experts_per_layer", "n_mlp_experts_per_layer", "n_new_att_experts", "n_new_mlp_experts"}
    assert not new_fields & set(config)
