"""Exports as a user meets them: a real ZeRO-3 training run converted from its own files, a run folder
that to-hf must never delete, the tokenizer beside the weights, loading with transformers alone
(no package of ours on the path), strict loading of damaged folders, and umask permissions."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import molm_megatron  # noqa: F401  (registers moduleformer with the Auto classes)
from molm_megatron.cli import parse_job_config
from molm_megatron.config import model_preset
from molm_megatron.data.spec import adopt_data_eod
from molm_megatron.hf.configuration_moduleformer import CONFIG_DEFAULTS
from molm_megatron.hf.convert import EXPORT, EXPORT_FILES, export_hf, main as convert_main, save_model_file
from molm_megatron.model import MoLM
from molm_megatron.outputs import write_folder
from tests.training.conftest import small_data  # noqa: F401  (the fixture: CodeGen-tokenized stdlib text)
from tests.training.procs import ROOT, run
from tokenizer import codegen_tokenizer
from tokenizer.__main__ import main as tokenizer_cli


@pytest.fixture(scope="module")
def zero3_run(small_data, tmp_path_factory) -> dict:
    """A real 2-process ZeRO-3 run over gloo (tests/training/equivalence_worker.py: the Trainer,
    5 steps of the tiny preset on CodeGen-tokenized stdlib text); its run folder R holds the
    checkpoints R/ckpt, metrics.jsonl and TensorBoard files."""
    work = tmp_path_factory.mktemp("zero3")
    log = work / "log.txt"
    code = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "tests/training/equivalence_worker.py", str(work / "results.pt"), small_data, "dp2_zero3:1:1:3:2:1"],
               log, timeout=400)
    assert code == 0, log.read_text()[-6000:]
    result = torch.load(work / "results.pt", weights_only=False)["dp2_zero3"]
    return {**result, "run_dir": work / "work" / "dp2_zero3"}


def listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))}


def test_zero3_checkpoint_consolidates_and_exports_without_touching_the_run(zero3_run, tmp_path, capsys):
    run_dir = zero3_run["run_dir"]
    # The weights consolidated from the rank files' fp32 partitions are the gathered trained ones.
    assert set(zero3_run["consolidated"]) == set(zero3_run["params"])
    for key, value in zero3_run["params"].items():
        assert torch.equal(zero3_run["consolidated"][key], value), key

    # to-hf into the run folder itself (it holds the checkpoint) or a step folder: refused, nothing lost.
    before = listing(run_dir)
    assert (run_dir / "metrics.jsonl").is_file() and (run_dir / "ckpt").is_dir()
    for out in (run_dir, run_dir / "ckpt", next((run_dir / "ckpt").glob("step_*"))):
        for extra in ([], ["--overwrite"]):
            assert convert_main(["to-hf", "--checkpoint", str(run_dir / "ckpt"), "--out", str(out), *extra]) == 2
            assert "refusing" in capsys.readouterr().err
    assert listing(run_dir) == before

    old_umask = os.umask(0o022)
    try:
        out = tmp_path / "export"
        assert convert_main(["to-hf", "--checkpoint", str(run_dir / "ckpt"), "--out", str(out)]) == 0
    finally:
        os.umask(old_umask)
    assert listing(run_dir) == before
    # A plain mkdir's permissions (umask 022), not mkdtemp's 0700.
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in out.iterdir())

    # The run's model: bos/eos are the data's end of document (CodeGen's 50256, not the tiny preset's 511).
    meta = json.loads(next((run_dir / "ckpt").glob("step_*/meta.json")).read_text())
    assert meta["config"]["model"]["eos_token_id"] == 50256
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (50256, 50256)
    # The tokenizer of the run's data (CodeGen) is beside the weights.
    tok = AutoTokenizer.from_pretrained(out)
    text = "def f(x):\n        return x  # done\n"
    assert tok(text).input_ids == codegen_tokenizer().encode(text, add_special_tokens=False).ids
    assert tok.eos_token_id == 50256
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    model = MoLM(model_preset("tiny", vocab_size=50295, block_size=64, history_length=64,
                              bos_token_id=50256, eos_token_id=50256))
    model.load_state_dict(zero3_run["consolidated"])
    ids = torch.tensor([tok(text).input_ids])
    assert torch.equal(hf(ids).logits, model.eval()(ids).logits)

    # A second export to the same place needs --overwrite; then it replaces the first one.
    assert convert_main(["to-hf", "--checkpoint", str(run_dir / "ckpt"), "--out", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert convert_main(["to-hf", "--checkpoint", str(run_dir / "ckpt"), "--out", str(out), "--overwrite",
                         "--dtype", "bfloat16", "--tokenizer", "none"]) == 0
    assert load_file(str(out / "model.safetensors"))["lm_head.weight"].dtype == torch.bfloat16
    assert not (out / "tokenizer.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary or old folder left


def test_explicit_bos_eos_must_match_the_data(small_data):
    job = parse_job_config(["--data.prefixes", small_data, "--model.eos_token_id", "511"])
    with pytest.raises(ValueError, match=r"model.eos_token_id \(511\) differs from the end-of-document id of the "
                                         r"data \(50256, from .*stdlib_small.json\)"):
        adopt_data_eod(job)


def test_outputs_never_replace_foreign_folders(tmp_path, capsys):
    model = MoLM(model_preset("tiny")).eval()
    save_model_file(model, tmp_path / "model.pt")
    # A folder that is not an export (a run folder): refused with or without --overwrite, untouched.
    run_dir = tmp_path / "run"
    (run_dir / "ckpt" / "step_00000010").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("{}\n")
    before = listing(run_dir)
    for extra in ([], ["--overwrite"]):
        assert convert_main(["to-hf", "--model-file", str(tmp_path / "model.pt"), "--tokenizer", "none",
                             "--out", str(run_dir), *extra]) == 2
        assert "is not a Hugging Face export (it holds ckpt, metrics.jsonl)" in capsys.readouterr().err
        assert tokenizer_cli(["build-codegen", "--out", str(run_dir), *extra]) == 2
        assert "is not a tokenizer folder" in capsys.readouterr().err
    assert listing(run_dir) == before
    # Model files: an existing file is replaced only with --overwrite, the input never.
    assert convert_main(["consolidate", "--checkpoint", str(run_dir / "ckpt"), "--out",
                         str(run_dir / "metrics.jsonl")]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert convert_main(["to-hf", "--model-file", str(tmp_path / "model.pt"), "--tokenizer", "none",
                         "--out", str(tmp_path / "hf")]) == 0
    assert convert_main(["from-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "model.pt"),
                         "--overwrite"]) == 0
    assert listing(run_dir) == before

    # A write that fails half-way leaves the earlier export as it was and no temporary folder.
    before = listing(tmp_path / "hf")

    def fail(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_folder(tmp_path / "hf", fail, EXPORT, EXPORT_FILES, overwrite=True)
    assert listing(tmp_path / "hf") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "model.pt", "run"]


def test_damaged_folders_are_errors_naming_what_is_missing(tmp_path):
    export_hf(MoLM(model_preset("tiny")).eval(), tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))

    (tmp_path / "no_tensor").mkdir()
    (tmp_path / "no_tensor" / "config.json").write_text(json.dumps(config))
    save_file({k: v for k, v in tensors.items() if k != "transformer.h.1.mlpf.experts.weight"},
              str(tmp_path / "no_tensor" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"weights missing from the checkpoint: transformer\.h\.1\.mlpf\.experts\.weight"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "no_tensor")

    (tmp_path / "no_field").mkdir()
    (tmp_path / "no_field" / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "n_layer"}))
    save_file(tensors, str(tmp_path / "no_field" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="config.json of a moduleformer model lacks n_layer"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "no_field")


def test_export_tokenizer_must_match_the_model(tmp_path):
    with pytest.raises(ValueError, match=r"end-of-document id is 50256 but the model's bos_token_id/eos_token_id "
                                         r"are 511/511"):
        export_hf(MoLM(model_preset("tiny", vocab_size=50295)), tmp_path / "hf", tokenizer="codegen")
    assert not (tmp_path / "hf").exists()


def test_config_fields_are_the_model_configs():
    """The export's self-contained config knows every ModelConfig field with its default."""
    import dataclasses

    from molm_megatron.config import ModelConfig

    assert CONFIG_DEFAULTS == {f.name: getattr(ModelConfig(), f.name) for f in dataclasses.fields(ModelConfig)}


# Run by a fresh interpreter whose import system cannot see this repository: the editable install's
# finder is removed and the check that our packages are unimportable comes first.
STANDALONE_CHECK = r"""
import importlib.util, json, sys
sys.meta_path = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path = [p for p in sys.path if "__editable__" not in p]
for name in ("molm_megatron", "molm_kernels", "tokenizer", "data_prep"):
    assert importlib.util.find_spec(name) is None, name
import torch
from transformers import AutoModelForCausalLM
args = json.loads(sys.argv[1])
out = {}
for folder in args["folders"]:
    m = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ids = torch.tensor(args["ids"])
    with torch.no_grad():
        logits = m(ids).logits
    gen = m.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
    out[folder] = {"module": type(m).__module__, "logits": logits.tolist(), "generated": gen[0].tolist()}
try:
    AutoModelForCausalLM.from_pretrained(args["damaged"], trust_remote_code=True)
    out["damaged"] = "loaded"
except ValueError as err:
    out["damaged"] = str(err)
print(json.dumps(out))
"""


def test_export_loads_with_transformers_alone(tmp_path):
    presets = {"tiny": model_preset("tiny"), "tiny-multihead": model_preset("tiny-multihead"),
               # A pruned model's per-layer counts with inserted experts (the export appends them).
               "per-layer": model_preset("tiny", n_att_experts_per_layer=[4, 3], n_mlp_experts_per_layer=[8, 5],
                                         n_new_att_experts=1, n_new_mlp_experts=2)}
    models, folders = {}, []
    for i, (name, cfg) in enumerate(presets.items()):
        torch.manual_seed(i)
        models[name] = MoLM(cfg).eval()
        folders.append(str(export_hf(models[name], tmp_path / name)))
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in (tmp_path / "tiny").iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(damaged / "model.safetensors"))
    del tensors["transformer.h.0.attn.q_proj.experts.weight"]
    save_file(tensors, str(damaged / "model.safetensors"), metadata={"format": "pt"})

    ids = torch.randint(0, 512, (2, 11))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-I", "-c", STANDALONE_CHECK,
                           json.dumps({"folders": folders, "ids": ids.tolist(), "damaged": str(damaged)})],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, folder in zip(presets, folders):
        model = models[name]
        assert got[folder]["module"].startswith("transformers_modules"), got[folder]["module"]
        with torch.no_grad():
            ours = model(ids).logits
        torch.testing.assert_close(torch.tensor(got[folder]["logits"]), ours, rtol=1e-5, atol=1e-5)
        assert got[folder]["generated"] == model.generate(ids[:1, :5], 6)[0].tolist()
    assert "weights missing from the checkpoint: transformer.h.0.attn.q_proj.experts.weight" in got["damaged"]
    assert str(ROOT) not in proc.stdout
