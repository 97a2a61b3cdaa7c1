"""finetune.py end to end on CPU, on real text (the standard-library sources through data_prep).

One launch batch of four single-process runs (two at a time) and one of three two-process runs:
- continual learning (2 MLP + 1 attention experts inserted, partially trainable router, the
  vocabulary grown for a tokenizer made by `tokenizer extend`), started from a Hugging Face folder,
  with and without routing regularisation: every frozen tensor and the old vocabulary rows are
  bitwise the starting ones after the steps, the optimizer holds state for exactly the trainable
  tensors, the new rows and experts changed, and the regularised run routes a smaller share of
  tokens to the new experts;
- plain full fine-tuning and load-concentration fine-tuning from a model file: H(e) ends lower with
  the concentration loss;
- two processes, expert parallel 2 with ZeRO-2, continual learning: preempted by SIGUSR1 and
  resumed, it logs exactly the uninterrupted run's losses; the uninterrupted run's frozen tensors
  (consolidated from both expert shards) are bitwise the starting ones;
- the concentration-fine-tuned checkpoint: expert statistics on two domains, pruned to 98% of its
  parameters (the vocabulary is most of the tiny model), exported to Hugging Face and generating in a fresh process through the Auto classes.
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

from molm_megatron.config import model_preset
from molm_megatron.hf.convert import consolidate_checkpoint, export_hf, save_model_file
from molm_megatron.model import MoLM
from molm_megatron.modular import grow_vocab, insert_experts
from tests.training.procs import ROOT, launch_env, run, start, wait
from tests.training.test_pretrain import free_port, launch_plain, rows, same, wait_for_step

STEPS = 12
NEW_SHARE = "experts/layer1.mlpf/new_share"


def base(data: str, recipe: str, init: Path, out: Path, steps: int = STEPS) -> list[str]:
    """finetune.py with a recipe YAML, shrunk to the tiny model and the small real-text data."""
    return ["finetune.py", "--config", f"launch/configs/finetune_{recipe}.yaml", "--finetune.init_from", str(init),
            "--data.prefixes", data, "--data.weights", "1", "--data.split", "80,20,0",
            "--train.micro_batch_size", "2", "--train.global_batch_tokens", "128", "--train.steps", str(steps),
            "--train.eval_interval", "0", "--metrics.log_interval", "1", "--metrics.tensorboard", "false",
            "--metrics.dir", str(out), "--checkpoint.dir", str(out / "ckpt"), "--checkpoint.interval", "1000"]


@pytest.fixture(scope="module")
def start_model(tmp_path_factory) -> tuple[Path, Path, MoLM]:
    """A tiny model with the CodeGen vocabulary as a Hugging Face folder and as a model file, and
    CodeGen's tokenizer extended by 16 tokens learnt on a standard-library file (folder `tok`)."""
    import sysconfig

    from tokenizer import extend_bytelevel_bpe

    folder = tmp_path_factory.mktemp("start")
    torch.manual_seed(7)
    model = MoLM(model_preset("tiny", vocab_size=50295, block_size=64, history_length=64))
    export_hf(model, folder / "hf")
    save_model_file(model, folder / "model.pt")
    text = (Path(sysconfig.get_paths()["stdlib"]) / "email" / "message.py").read_text()
    extend_bytelevel_bpe("codegen", [text], 16, folder / "tok")
    return folder / "hf", folder / "model.pt", model


@pytest.fixture(scope="module")
def single_runs(small_data, start_model, tmp_path_factory) -> dict[str, Path]:
    """The four single-process runs, two at a time (2 cores)."""
    hf, model_file, _ = start_model
    root = tmp_path_factory.mktemp("finetune")
    continual = ["--finetune.insert_mlp_experts", "2", "--finetune.insert_att_experts", "1", "--optimizer.lr", "1e-2",
                 "--finetune.tokenizer", str(hf.parent / "tok")]
    runs = {
        "continual": base(small_data, "continual", hf, root / "continual") + continual
        + ["--model.routing_reg_weight", "0"],
        "regularised": base(small_data, "continual", hf, root / "regularised") + continual
        + ["--model.routing_reg_weight", "1.0"],
        "full": base(small_data, "full", model_file, root / "full") + ["--optimizer.lr", "3e-3"],
        "concentration": base(small_data, "concentration", model_file, root / "concentration")
        + ["--optimizer.lr", "3e-3", "--model.concentration_loss_weight", "2.0"],
    }
    names = list(runs)
    for pair in (names[:2], names[2:]):
        procs = {}
        for name in pair:
            (root / name).mkdir()
            procs[name] = start([sys.executable, *runs[name]], root / name / "log.txt")
        for name, proc in procs.items():
            assert wait(proc, 300) == 0, (root / name / "log.txt").read_text()[-3000:]
    return {name: root / name for name in names}


def grown_start(model: MoLM, vocab_size: int | None = None) -> MoLM:
    """The continual runs' starting model: the start with a grown vocabulary (seed train.seed) and
    the recipe's insertion (seed train.seed + 1)."""
    if vocab_size is not None:
        model = grow_vocab(model, vocab_size, seed=1234)
    return insert_experts(model, n_mlp=2, n_att=1, seed=1234 + 1)


def check_frozen_and_new(trained: dict[str, torch.Tensor], start: MoLM, old_vocab: int = 50295) -> None:
    """Every frozen tensor bitwise the starting one and so are the old vocabulary rows; every inserted
    tensor changed, and the head's new rows (the data holds no new ids, so the embedding's new rows
    get no gradient)."""
    initial = start.state_dict()
    new = [name for name in initial if name.endswith(".new_weight")]
    assert len(new) == 2 * 2 * 3  # per layer and router kind: router rows, both expert projections
    for name, t in initial.items():
        if name.endswith(".new_weight"):
            assert not torch.equal(trained[name], t), f"{name} did not train"
        elif name in ("transformer.wte.weight", "lm_head.weight"):
            assert torch.equal(trained[name][:old_vocab], t[:old_vocab]), f"old rows of {name} changed"
        else:
            assert torch.equal(trained[name], t), f"frozen {name} changed"
    if start.config.vocab_size > old_vocab:
        assert not torch.equal(trained["lm_head.weight"][old_vocab:], initial["lm_head.weight"][old_vocab:])


def test_continual_learning_freezes_old_tensors_and_trains_new_rows(single_runs, start_model):
    from tokenizer.loading import load_tokenizer

    hf, _, model = start_model
    vocab = load_tokenizer(hf.parent / "tok").vocab_size
    assert vocab == 50295 + 16
    start = grown_start(model, vocab)
    folder = single_runs["continual"] / "ckpt" / f"step_{STEPS:08d}"
    trained = torch.load(folder / "model_tp00_ep000.pt", weights_only=True)["model"]
    check_frozen_and_new(trained, start)
    # ZeRO's fp32 masters hold exactly the trainable tensors (the embedding and head whole: their
    # old rows' gradients are masked), none of the frozen ones.
    fragments = torch.load(folder / "rank_00000.pt", weights_only=True)["optimizer"]["fragments"]
    new_weights = {name for name, _ in start.named_parameters() if name.endswith(".new_weight")}
    assert set(fragments) == new_weights | {"transformer.wte.weight", "lm_head.weight"}
    inserted = sum(p.numel() for name, p in start.named_parameters() if name in new_weights)
    assert sum(f["fp32"].numel() for f in fragments.values()) == inserted + 2 * vocab * 64
    trainable = inserted + 2 * 16 * 64
    log = (single_runs["continual"] / "log.txt").read_text()
    assert f"trainable parameters {trainable:,} of {start.num_params():,}" in log
    # Recipe defaults: constant learning rate, MI loss off.
    metrics = rows(single_runs["continual"])
    assert {r["lr"] for r in metrics.values()} == {1e-2}
    assert json.loads((folder / "meta.json").read_text())["config"]["model"]["aux_loss_weight"] == 0.0


def test_routing_regularisation_reduces_the_share_routed_to_new_experts(single_runs):
    def late_share(name: str) -> float:
        r = rows(single_runs[name])
        return sum(r[s][NEW_SHARE] for s in range(STEPS - 3, STEPS + 1)) / 4

    free, regularised = late_share("continual"), late_share("regularised")
    assert regularised < 0.8 * free, (regularised, free)
    reg = rows(single_runs["regularised"])
    assert reg[STEPS]["loss/routing_reg"] < reg[1]["loss/routing_reg"]


def test_load_concentration_lowers_the_expert_entropy(single_runs):
    def late_entropy(name: str) -> float:
        r = rows(single_runs[name])
        return sum(r[s]["loss/concentration"] for s in range(STEPS - 3, STEPS + 1)) / 4

    assert late_entropy("concentration") < late_entropy("full") - 0.05


def test_expert_parallel_continual_run_resumes_exactly_and_keeps_frozen_tensors(small_data, start_model, tmp_path):
    _, model_file, model = start_model
    args = lambda out: base(small_data, "continual", model_file, out, steps=8) + [  # noqa: E731
        "--finetune.insert_mlp_experts", "2", "--finetune.insert_att_experts", "1", "--parallel.expert_parallel_size",
        "2", "--parallel.zero_stage", "2", "--model.routing_reg_weight", "0.1", "--train.global_batch_tokens", "256"]
    preempted, reference, resumed = tmp_path / "p", tmp_path / "u", tmp_path / "r"
    for d in (preempted, reference, resumed):
        d.mkdir()
    procs = launch_plain(args(preempted) + ["--train.steps", "200"], preempted)  # stopped long before
    wait_for_step(preempted, 3, procs)
    os.kill(procs[0].pid, signal.SIGUSR1)
    assert [wait(p, 120) for p in procs] == [75, 75], (preempted / "rank0.log").read_text()[-3000:]
    log = (preempted / "rank0.log").read_text()
    k = int(re.search(r"preempted: checkpoint saved at step (\d+)", log).group(1))
    assert k < 8
    code = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "--master_port", str(free_port()), *args(reference)], reference / "log.txt")
    assert code == 0, (reference / "log.txt").read_text()[-3000:]
    # The resumed run continues the preempted one's checkpoint (its metrics in its own folder).
    resume = args(resumed) + ["--checkpoint.dir", str(preempted / "ckpt")]
    procs = launch_plain(resume, resumed)
    assert [wait(p, 180) for p in procs] == [0, 0], (resumed / "rank0.log").read_text()[-3000:]
    assert f"resumed from {preempted / 'ckpt'} at step {k}" in (resumed / "rank0.log").read_text()
    same(rows(preempted), rows(reference), range(1, k + 1))
    same(rows(resumed), rows(reference), range(k + 1, 9))
    assert rows(reference)[8][NEW_SHARE] > 0
    trained = consolidate_checkpoint(reference / "ckpt")
    assert sorted(p.name for p in (reference / "ckpt" / "step_00000008").glob("model_*")) == [
        "model_tp00_ep000.pt", "model_tp00_ep001.pt"]
    check_frozen_and_new(trained.state_dict(), grown_start(model))


def test_fine_tuned_and_pruned_model_exports_and_generates_through_auto_classes(single_runs, small_data, tmp_path):
    from data_prep import prepare_text_files, stdlib_sources
    from molm_megatron.modular.__main__ import main as modular_main

    # A second domain: other standard-library files than the training ones (the json package).
    other = tmp_path / "json_pkg"
    prepare_text_files([p for p in stdlib_sources() if p.parent.name == "json"], other)
    ckpt = single_runs["concentration"] / "ckpt"
    stats = tmp_path / "stats"
    assert modular_main(["stats", "--model", str(ckpt), "--data", small_data, str(other), "--out", str(stats),
                         "--micro-batch-size", "2", "--max-batches", "4", "--device", "cpu"]) == 0
    result = json.loads((stats / "stats.json").read_text())
    assert set(result["domains"]) == {Path(small_data).name, "json_pkg"}
    for d in result["domains"].values():
        assert sum(d["counts"]["layer0.mlpf"]) == 2 * d["tokens"]  # k = 2 assignments per token
    assert (stats / "heatmap.png").stat().st_size > 0 and (stats / "stats.csv").is_file()
    pruned = tmp_path / "pruned"
    assert modular_main(["prune", "--model", str(ckpt), "--from-stats", str(stats), "--target-share", "0.98",
                         "--out", str(pruned)]) == 0
    record = json.loads((pruned / "manipulation.json").read_text())
    # The CodeGen vocabulary's embedding and head are 94% of this tiny model: 98% removes experts.
    assert record["params_after"] <= 0.98 * record["params_before"]
    code = (
        "import json, sys, torch, molm_megatron.hf\n"
        "from transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
        "ids = torch.tensor([[50256, 1000, 2000]])\n"
        "out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)\n"
        "print(json.dumps({'tokens': out[0].tolist(), 'experts': m.config.n_mlp_experts_per_layer}))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(pruned / "hf")], cwd=ROOT, env=launch_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    from molm_megatron.hf.convert import load_model_file

    ours = load_model_file(pruned / "model.pt").eval()
    want = ours.generate(torch.tensor([[50256, 1000, 2000]]), max_new_tokens=5)
    assert got["tokens"] == want[0].tolist() and len(got["tokens"]) == 8
    assert got["experts"] == ours.config.n_mlp_experts_per_layer


@pytest.mark.parametrize("argv, message", [
    ([], "finetune.init_from is empty: give the starting weights"),
    (["--finetune.init_from", "x", "--model.n_layer", "4"], "model.n_layer: the model's shape comes from finetune.init_from"),
    (["--finetune.init_from", "x", "--model.preset", "tiny"], "model.preset ('tiny'): fine-tuning takes its model from"),
    (["--finetune.init_from", "x", "--finetune.trainable", "new"],
     "finetune.trainable 'new' trains nothing without finetune.insert_mlp_experts"),
    (["--finetune.init_from", "x", "--finetune.insert_mlp_experts", "3", "--parallel.expert_parallel_size", "2"],
     "finetune.insert_mlp_experts (3) must be a multiple of parallel.expert_parallel_size (2)"),
    (["--finetune.init_from", "x", "--finetune.trainable", "some"], "finetune.trainable must be one of all, new; got 'some'"),
])
def test_finetune_settings_are_checked_by_name(argv, message):
    from molm_megatron.cli import parse_job_config
    from molm_megatron.config import FinetuneJobConfig

    with pytest.raises(ValueError) as e:
        parse_job_config(argv, root=FinetuneJobConfig, prog="finetune.py")
    assert message in str(e.value)


def test_finetune_defaults_are_the_papers():
    from molm_megatron.cli import parse_job_config
    from molm_megatron.config import FinetuneJobConfig

    job = parse_job_config(["--finetune.init_from", "x"], root=FinetuneJobConfig, prog="finetune.py")
    assert (job.optimizer.lr, job.schedule.warmup_steps, job.schedule.min_lr_ratio) == (5e-5, 0, 1.0)
    job = parse_job_config(["--config", "launch/configs/finetune_continual.yaml"], root=FinetuneJobConfig)
    assert (job.optimizer.lr, job.finetune.trainable, job.model.overrides["routing_reg_weight"]) == (3e-4, "new", 0.01)
