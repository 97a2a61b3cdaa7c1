"""finetune.py on Hugging Face dense and EMoE models, end to end on CPU, on real text (the standard-
library sources through data_prep). The start: a small random GPT-2 with the CodeGen vocabulary,
converted to 8 experts per FFN with k = 2 (molm_megatron.emoe.convert).

Four single-process runs (two at a time), two 2-process runs and README's experiment:
- full fine-tuning of the EMoE model (launch/configs/finetune_emoe.yaml): the LM loss falls, each
  EMoE layer's expert load is logged; preempted by SIGUSR1 and resumed, a run logs exactly the
  uninterrupted run's losses and gradient norms;
- LoRA (finetune_emoe_lora.yaml): only the adapters change, every other tensor is bitwise the
  start's, and ZeRO's fp32 partition holds exactly the adapters;
- ZeRO-2 and ZeRO-3 over gloo, two processes of micro-batch 1: per-step losses, gradient norms and
  the final weights equal the one-process run's with micro-batch 2 (the stream loader gives
  data-parallel rank r row r of the wider batch); the single process is the oracle;
- export: the checkpoint as an EMoE folder and as a dense folder (hf.convert to-hf [--dense]); a
  fresh process gets the trained model's logits from the EMoE folder through the Auto classes, and
  from the dense folder in plain transformers (nothing of ours imported) the EMoE logits at k = N;
  the expert statistics (modular stats) count the checkpoint's gates;
- README's EMoE experiment runs as written (tiny model, 2 steps), its dense baseline (the
  unconverted folder through the same recipe) logging no experts;
- bad settings are refused by name before the weights are read.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

import molm_megatron.emoe as emoe
from tests.training.procs import ROOT, launch_env, run, start, wait
from tests.training.test_pretrain import free_port, rows, wait_for_step

E, STEPS = 8, 8
# Compared per step between runs that must train identically.
COMPARED = ("loss/lm", "grad_norm", "experts/layer0.mlpf/load_entropy", "experts/layer1.mlpf/load_max")


@pytest.fixture(scope="module")
def start_folders(tmp_path_factory) -> tuple[Path, Path]:
    """(dense GPT-2 folder, its EMoE folder: 8 experts per FFN, k = 2, both layers)."""
    root = tmp_path_factory.mktemp("start")
    torch.manual_seed(0)
    # initializer_range 0.1: the FFN visibly moves the logits, so dropping experts shows.
    cfg = GPT2Config(vocab_size=50295, n_positions=64, n_embd=32, n_layer=2, n_head=2, n_inner=64, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.1)
    GPT2LMHeadModel(cfg).save_pretrained(root / "dense")
    emoe.convert(root / "dense", root / "emoe", num_experts=E, top_k=2, n_init=2, log=lambda _: None)
    return root / "dense", root / "emoe"


def finetune(recipe: str, init: Path, data: str, out: Path, steps: int = STEPS) -> list[str]:
    """finetune.py with a recipe, shrunk to the tiny model (windows of 32) and the small real-text data."""
    return ["finetune.py", "--config", f"launch/configs/{recipe}.yaml", "--finetune.init_from", str(init),
            "--data.prefixes", data, "--data.split", "80,20,0", "--model.block_size", "32",
            "--train.micro_batch_size", "2", "--train.global_batch_tokens", "64", "--train.steps", str(steps),
            "--train.eval_interval", "0", "--optimizer.lr", "3e-3", "--metrics.log_interval", "1",
            "--metrics.tensorboard", "false", "--metrics.dir", str(out), "--checkpoint.dir", str(out / "ckpt"),
            "--checkpoint.interval", "1000"]


@pytest.fixture(scope="module")
def single_runs(small_data, start_folders, tmp_path_factory) -> dict[str, Path]:
    """EMoE full fine-tuning beside a run preempted by SIGUSR1 at step 3, then LoRA beside the
    preempted run resumed (into its own metrics folder): two processes at a time (2 cores)."""
    _, emoe_dir = start_folders
    root = tmp_path_factory.mktemp("finetune")
    resumed = finetune("finetune_emoe", emoe_dir, small_data, root / "resumed")
    resumed[resumed.index("--checkpoint.dir") + 1] = str(root / "preempted" / "ckpt")
    runs = {"emoe": finetune("finetune_emoe", emoe_dir, small_data, root / "emoe"),
            "preempted": finetune("finetune_emoe", emoe_dir, small_data, root / "preempted", steps=200),
            "lora": finetune("finetune_emoe_lora", emoe_dir, small_data, root / "lora"),
            "resumed": resumed}
    for pair in (["emoe", "preempted"], ["lora", "resumed"]):
        procs = {}
        for name in pair:
            (root / name).mkdir()
            procs[name] = start([sys.executable, *runs[name]], root / name / "log.txt")
        if "preempted" in procs:
            wait_for_step(root / "preempted", 3, [procs["preempted"]])
            os.kill(procs["preempted"].pid, signal.SIGUSR1)
        for name, proc in procs.items():
            assert wait(proc, 300) == (75 if name == "preempted" else 0), (root / name / "log.txt").read_text()[-3000:]
    return {name: root / name for name in runs}


def same(a: dict[int, dict], b: dict[int, dict], steps: range) -> None:
    for step in steps:
        got, want = {k: a[step].get(k) for k in COMPARED}, {k: b[step].get(k) for k in COMPARED}
        assert got == want, f"step {step}: {got} != {want}"


def test_emoe_fine_tuning_lowers_the_loss_logs_expert_load_and_resumes_exactly(single_runs):
    emoe_rows = rows(single_runs["emoe"])
    assert sorted(emoe_rows) == list(range(1, STEPS + 1))
    first, last = emoe_rows[1]["loss/lm"], emoe_rows[STEPS]["loss/lm"]
    assert last < first - 0.2, (first, last)
    for layer in (0, 1):
        # Entropy of the token counts over 8 experts: at most log 8, and the gate does use several.
        assert 1.0 < emoe_rows[STEPS][f"experts/layer{layer}.mlpf/load_entropy"] <= torch.log(torch.tensor(8.0)) + 1e-6
    assert emoe_rows[STEPS]["throughput/tokens_per_s"] > 0
    log = (single_runs["preempted"] / "log.txt").read_text()
    k = int(re.search(r"preempted: checkpoint saved at step (\d+)", log).group(1))
    assert 3 <= k < STEPS
    resumed_log = (single_runs["resumed"] / "log.txt").read_text()
    assert f"resumed from {single_runs['preempted'] / 'ckpt'} at step {k}" in resumed_log
    same(rows(single_runs["preempted"]), emoe_rows, range(1, k + 1))
    same(rows(single_runs["resumed"]), emoe_rows, range(k + 1, STEPS + 1))


def test_lora_trains_only_the_adapters(single_runs, start_folders):
    _, emoe_dir = start_folders
    initial = load_file(emoe_dir / "model.safetensors")
    folder = single_runs["lora"] / "ckpt" / f"step_{STEPS:08d}"
    trained = torch.load(folder / "model_tp00_ep000.pt", weights_only=True)["model"]
    adapters = {name: t for name, t in trained.items() if ".lora_" in name}
    # GPT-2's two attention projections in each of 2 layers, A and B each.
    assert len(adapters) == 2 * 2 * 2
    assert all(t.any() for name, t in adapters.items() if ".lora_B." in name)  # peft starts B at zero
    base = {name.replace("hf_model.base_model.model.", "").replace(".base_layer", ""): t
            for name, t in trained.items() if ".lora_" not in name}
    assert set(initial) <= set(base)
    for name, t in initial.items():
        assert torch.equal(base[name], t), f"frozen {name} changed"
    fragments = torch.load(folder / "rank_00000.pt", weights_only=True)["optimizer"]["fragments"]
    assert set(fragments) == set(adapters)  # fp32 masters and moments of the adapters alone
    assert sum(f["fp32"].numel() for f in fragments.values()) == sum(t.numel() for t in adapters.values())
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["model"]["lora"] == {"r": 8, "alpha": 16.0, "dropout": 0.05,
                                     "target_modules": ["attn.c_attn", "attn.c_proj"]}


@pytest.mark.parametrize("zero", [2, 3])
def test_zero_two_processes_train_like_one(single_runs, small_data, start_folders, tmp_path, zero):
    _, emoe_dir = start_folders
    args = finetune("finetune_emoe", emoe_dir, small_data, tmp_path) + [
        "--train.micro_batch_size", "1", "--parallel.zero_stage", str(zero)]
    code = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "--master_port", str(free_port()), *args], tmp_path / "log.txt")
    assert code == 0, (tmp_path / "log.txt").read_text()[-3000:]
    got, want = rows(tmp_path), rows(single_runs["emoe"])
    for key, rtol in (("loss/lm", 1e-6), ("grad_norm", 1e-5)):
        torch.testing.assert_close(torch.tensor([got[s][key] for s in range(1, STEPS + 1)], dtype=torch.float64),
                                   torch.tensor([want[s][key] for s in range(1, STEPS + 1)], dtype=torch.float64),
                                   rtol=rtol, atol=0, msg=lambda m: f"ZeRO-{zero} {key}: {m}")
    from molm_megatron.hf.convert import consolidate_checkpoint

    two = consolidate_checkpoint(tmp_path / "ckpt").state_dict()
    one = consolidate_checkpoint(single_runs["emoe"] / "ckpt").state_dict()
    assert set(two) == set(one)
    for name, t in one.items():
        if name.endswith("attn.c_attn.bias"):
            # The key bias adds the same amount to every score of a query, which the softmax ignores:
            # its gradient is rounding noise, which Adam scales up to steps of the learning rate.
            two[name], t = two[name][torch.arange(t.numel()) // 32 != 1], t[torch.arange(t.numel()) // 32 != 1]
        torch.testing.assert_close(two[name], t, rtol=0, atol=5e-5, msg=lambda m: f"ZeRO-{zero} {name}: {m}")


FRESH_PROCESS = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
ids = torch.tensor(json.loads(sys.argv[1]))
out = {}
# Plain transformers first: the dense export is an ordinary GPT-2 folder.
m = AutoModelForCausalLM.from_pretrained(sys.argv[2] + "/dense").double().eval()
out["plain_dense"] = [type(m).__name__, m(input_ids=ids).logits.tolist()]
out["ours_imported"] = any(name.split(".")[0] in ("molm_megatron", "molm_kernels") for name in sys.modules)
import molm_megatron  # the package alone registers the EMoE classes
m = AutoModelForCausalLM.from_pretrained(sys.argv[2] + "/emoe").double().eval()
out["emoe"] = [type(m).__name__, m(input_ids=ids).logits.tolist()]
print(json.dumps(out))
"""


def test_checkpoint_exports_as_emoe_and_dense_and_reloads_in_a_fresh_process(single_runs, small_data, start_folders,
                                                                             tmp_path):
    from molm_megatron.hf.convert import consolidate_checkpoint
    from molm_megatron.hf.convert import main as convert_main
    from molm_megatron.modular.__main__ import main as modular_main

    ckpt = single_runs["emoe"] / "ckpt"
    assert convert_main(["to-hf", "--checkpoint", str(ckpt), "--out", str(tmp_path / "emoe")]) == 0
    assert convert_main(["to-hf", "--checkpoint", str(ckpt), "--out", str(tmp_path / "dense"), "--dense"]) == 0
    assert "emoe" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    assert json.loads((tmp_path / "emoe" / "config.json").read_text())["emoe"]["top_k"] == 2
    trained = consolidate_checkpoint(ckpt).double().eval()
    c_fc = "hf_model.transformer.h.1.mlp.c_fc.weight"
    start = load_file(start_folders[1] / "model.safetensors")["transformer.h.1.mlp.c_fc.weight"]
    assert not torch.equal(trained.state_dict()[c_fc].float(), start)  # the experts trained
    ids = torch.randint(0, 50295, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected_emoe = trained(ids).logits
        trained.unwrapped().set_emoe(top_k=E)
        expected_dense = trained(ids).logits
    assert (expected_emoe - expected_dense).abs().max() > 1e-3  # k = 2 does drop experts
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, json.dumps(ids.tolist()), str(tmp_path)], cwd=ROOT,
                          env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["plain_dense"][0] == "GPT2LMHeadModel" and not got["ours_imported"]
    assert got["emoe"][0] == "EMoEGPT2LMHeadModel"
    torch.testing.assert_close(torch.tensor(got["emoe"][1], dtype=torch.float64), expected_emoe, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(torch.tensor(got["plain_dense"][1], dtype=torch.float64), expected_dense, rtol=1e-9,
                               atol=1e-9)
    # Expert statistics of the checkpoint: each EMoE layer's gate, k = 2 assignments per token.
    assert modular_main(["stats", "--model", str(ckpt), "--data", small_data, "--out", str(tmp_path / "stats"),
                         "--micro-batch-size", "2", "--max-batches", "3", "--device", "cpu"]) == 0
    stats = json.loads((tmp_path / "stats" / "stats.json").read_text())
    assert stats["routers"] == ["layer0.mlpf", "layer1.mlpf"]
    (domain,) = stats["domains"].values()
    assert domain["tokens"] == 3 * 2 * 32
    assert [sum(c) for c in domain["counts"].values()] == [2 * domain["tokens"]] * 2


@pytest.mark.parametrize("argv, message", [
    (["--model.block_size", "128"], r"model.block_size \(128\) must be between 1 and the model's context length \(64"),
    (["--model.concentration_loss_weight", "1"],
     r"model.concentration_loss_weight: finetune.init_from .* is an EMoE gpt2 model; of the model settings only "
     r"model.block_size"),
    (["--parallel.expert_parallel_size", "2"],
     r"parallel.expert_parallel_size \(2\) must be 1: .* trains data-parallel only \(ZeRO 1-3\)"),
    (["--finetune.insert_mlp_experts", "2"], r"finetune.insert_mlp_experts: finetune.init_from .* is an EMoE gpt2"),
    (["--train.activation_checkpoint", "full"], r"train.activation_checkpoint 'full': .* no MoA layers or MoLM blocks"),
    (["--train.cuda_graph", "true"], r"train.cuda_graph: .* keeps no Transformer-XL memory"),
    (["--finetune.lora_rank", "4", "--finetune.lora_targets", "mlp.c_fc"],
     r"finetune.lora_targets: 'mlp.c_fc' reaches transformer.h.0.mlp.c_fc, inside an EMoE FFN"),
    (["--finetune.lora_rank", "4", "--finetune.lora_targets", "q_proj"],
     r"finetune.lora_targets: 'q_proj' names no module of this gpt2 model"),
])
def test_bad_settings_are_refused_by_name(small_data, start_folders, argv, message, monkeypatch):
    from molm_megatron.cli import parse_job_config
    from molm_megatron.config import FinetuneJobConfig
    from molm_megatron.modular import finetune as finetune_module

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were read before the settings were checked")

    monkeypatch.setattr(finetune_module, "load_any_model", no_weights)
    job = parse_job_config(["--finetune.init_from", str(start_folders[1]), "--data.prefixes", small_data] + argv,
                           root=FinetuneJobConfig, prog="finetune.py")
    with pytest.raises(ValueError, match=message):
        finetune_module.build_finetune_model(job)


def test_data_of_a_larger_vocabulary_is_refused(small_data, tmp_path):
    """The CodeGen data (50295 ids) on a GPT-2 of the GPT-2 vocabulary (50257)."""
    from molm_megatron.cli import parse_job_config
    from molm_megatron.config import FinetuneJobConfig
    from molm_megatron.modular.finetune import build_finetune_model

    GPT2Config(vocab_size=50257, n_positions=16, n_embd=8, n_layer=1, n_head=2).save_pretrained(tmp_path)
    job = parse_job_config(["--finetune.init_from", str(tmp_path), "--data.prefixes", small_data],
                           root=FinetuneJobConfig, prog="finetune.py")
    with pytest.raises(ValueError, match=r"the data's vocabulary \(50295 ids, from .*\) exceeds the model's "
                                         r"vocab_size \(50257\)"):
        build_finetune_model(job)


def readme_example() -> list[str]:
    """The command lines of README's EMoE experiment (continuations joined, comments dropped)."""
    text = (ROOT / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "molm_megatron.emoe convert --model $M" in b]
    return [line.strip() for line in block.replace("\\\n", " ").splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


# Appended to the example's finetune.py commands (later flags win): the tiny model's windows, 2 steps.
SHRINK = ("--model.block_size 32 --train.micro_batch_size 2 --train.global_batch_tokens 64 --train.steps 2 "
          "--train.eval_interval 0 --metrics.log_interval 1")


def test_readme_experiment_runs_as_written_with_the_dense_baseline(tmp_path):
    """README's EMoE experiment in a scratch folder, with M a tiny GPT-2 (d_ff 128: 64 experts of 2
    neurons) holding the CodeGen tokenizer, and the fine-tuning shrunk to 2 steps. Its dense
    baseline (the unconverted folder through the same recipe) trains and logs no experts."""
    from tokenizer.loading import copy_tokenizer_files

    model = tmp_path / "gpt2-tiny"
    torch.manual_seed(1)
    GPT2LMHeadModel(GPT2Config(vocab_size=50295, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                               n_inner=128)).save_pretrained(model)
    copy_tokenizer_files("codegen", model)
    lines = readme_example()
    assert lines[0] == "M=gpt2-medium"
    script = [f"M={model}"] + [f"{line} {SHRINK}" if "finetune.py" in line else line for line in lines[1:]]
    for name in (".venv", "launch", "finetune.py"):  # the example's paths, relative to the repository
        (tmp_path / name).symlink_to(ROOT / name)
    proc = subprocess.run(["bash", "-e", "-c", "\n".join(script)], cwd=tmp_path, env=launch_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = tmp_path / "runs" / "emoe"
    assert "emoe" not in json.loads((runs / "ft_dense" / "config.json").read_text())
    emoe_rows, base_rows = rows(runs / "ft"), rows(runs / "ft_base")
    assert sorted(emoe_rows) == sorted(base_rows) == [1, 2]
    assert "experts/layer1.mlpf/load_entropy" in emoe_rows[2]
    assert not [key for key in base_rows[2] if key.startswith("experts/")]
    meta = json.loads((runs / "ft_base" / "checkpoints" / "step_00000002" / "meta.json").read_text())
    assert "emoe" not in meta["model"]["hf_config"] and meta["model"]["block_size"] == 32
    for name in ("eval_ft_dense", "eval_ft_base"):
        summary = json.loads((runs / name / "summary.json").read_text())
        assert summary["segments"]["tokens"] > 1000 and summary["rolling"]["tokens"] == summary["segments"]["tokens"]
