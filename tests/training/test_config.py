"""The run's config tree: YAML plus --section.field flags, validation with pinned error texts,
and pretrain.py --help."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from molm_megatron.cli import build_arg_parser, field_docs, parse_job_config
from molm_megatron.config import JobConfig, TrainConfig
from tests.training.procs import ROOT, launch_env


def write(tmp_path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_then_flags_override_defaults(tmp_path):
    cfg = write(tmp_path, "model:\n  preset: demo\n  n_layer: 2\ntrain:\n  steps: 50\n  micro_batch_size: 4\n"
                          "data:\n  prefixes: [a, b]\n  weights: [3, 1]\n")
    job = parse_job_config(["--config", cfg, "--train.steps", "70", "--model.k_mlp", "1", "--metrics.tensorboard", "no",
                            "--schedule.warmup_steps", "5"])
    model = job.model.build()
    assert (model.n_layer, model.k_mlp, model.n_embd) == (2, 1, 128)  # demo's n_embd, YAML and flag overrides
    assert (job.train.steps, job.train.micro_batch_size) == (70, 4)  # flag beats YAML, YAML beats default
    assert job.data.prefixes == ["a", "b"] and job.data.weights == [3.0, 1.0]
    assert job.metrics.tensorboard is False
    assert job.optimizer.lr == 3e-4 and (job.optimizer.beta1, job.optimizer.beta2, job.optimizer.eps) == (0.9, 0.95, 1e-8)


def test_resolved_config_holds_every_model_field():
    job = parse_job_config(["--model.preset", "molm-350m-4b", "--model.n_layer", "4"])
    tree = job.to_dict()
    assert tree["model"]["preset"] == "molm-350m-4b" and tree["model"]["n_layer"] == 4
    assert tree["model"]["n_mlp_experts"] == 32 and tree["train"]["steps"] == 1000


@pytest.mark.parametrize("text, message", [
    ("train:\n  steps: 10\n  stpes: 3\n", "run.yaml:3: unknown field train.stpes; known: steps,"),
    ("trian:\n  steps: 10\n", "run.yaml:1: unknown section 'trian'; known: model, parallel,"),
    ("train:\n  steps: ten\n", "run.yaml:2: train.steps: expected int, got 'ten'"),
    ("model:\n  preset: tiny\n  n_embed: 3\n", "run.yaml:3: unknown field model.n_embed (not a ModelConfig field)"),
    ("train: 5\n", "run.yaml:1: section 'train' must be a mapping of fields"),
])
def test_yaml_errors_name_file_line_and_field(tmp_path, text, message):
    with pytest.raises(ValueError) as e:
        parse_job_config(["--config", write(tmp_path, text)])
    assert message in str(e.value)
    assert str(e.value).startswith(str(tmp_path))


@pytest.mark.parametrize("argv, message", [
    (["--train.steps", "0"], "train.steps must be positive, got 0"),
    (["--parallel.zero_stage", "4"], "parallel.zero_stage must be one of 1, 2, 3; got 4"),
    (["--parallel.zero_stage", "3", "--parallel.expert_parallel_size", "2"],
     "parallel.zero_stage 3 needs parallel.expert_parallel_size 1, got 2 (DeepSpeed partitions no expert "
     "parameters in stage 3)"),
    (["--optimizer.beta2", "1.0"], "optimizer.beta2 must be in [0, 1), got 1.0"),
    (["--schedule.min_lr_ratio", "1.5"], "schedule.min_lr_ratio must be in [0, 1], got 1.5"),
    (["--train.steps", "10", "--schedule.warmup_steps", "20"],
     "schedule.decay_steps (10, 0 = train.steps) is shorter than schedule.warmup_steps (20)"),
    (["--data.prefixes", "a", "b", "--data.weights", "1"], "data.weights has 1 entries but data.prefixes has 2"),
    (["--train.precision", "fp16"], "train.precision must be one of auto, bf16, fp32; got 'fp16'"),
    (["--model.preset", "huge"], "unknown model preset 'huge'; known: demo, molm-350m-4b,"),
    (["--model.k_mlp", "64"], "model.k_mlp (64) exceeds model.n_mlp_experts (8)"),
    (["--train.micro_batch_size", "2.5"], "--train.micro_batch_size: train.micro_batch_size: expected int, got '2.5'"),
])
def test_validation_errors_are_pinned(argv, message):
    with pytest.raises(ValueError) as e:
        parse_job_config(argv)
    assert message in str(e.value)


def test_every_field_has_a_help_text():
    for cls in (JobConfig.__dataclass_fields__[name].default_factory for name in JobConfig.__dataclass_fields__):
        docs = field_docs(cls)
        missing = [f for f in cls.__dataclass_fields__ if f not in docs]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"
    assert field_docs(TrainConfig)["global_batch_tokens"].startswith("Tokens per optimizer step over all ranks")
    flags = {a.option_strings[0] for a in build_arg_parser()._actions if a.option_strings}
    assert {"--model.preset", "--model.n_layer", "--train.global_batch_tokens", "--checkpoint.dir",
            "--parallel.expert_parallel_size", "--data.prefixes"} <= flags


def test_pretrain_help_and_config_error_answer_without_training():
    help_run = subprocess.run([sys.executable, "pretrain.py", "--help"], cwd=ROOT, env=launch_env(),
                              capture_output=True, text=True, timeout=60)
    assert help_run.returncode == 0
    assert "usage: pretrain.py [-h] [--config FILE.yaml] [--section.field VALUE ...]" in help_run.stdout
    assert "Tokens per optimizer step over all ranks" in help_run.stdout
    bad = subprocess.run([sys.executable, "pretrain.py", "--train.steps", "-1"], cwd=ROOT, env=launch_env(),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "pretrain.py: error: train.steps must be positive, got -1" in bad.stderr


def test_a_missing_config_file_exits_2_naming_it(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ValueError, match=f"--config {missing}: cannot read the file \\(No such file or directory\\)"):
        parse_job_config(["--config", str(missing)])
    run = subprocess.run([sys.executable, "pretrain.py", "--config", str(missing)], cwd=ROOT, env=launch_env(),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and f"pretrain.py: error: --config {missing}: cannot read the file" in run.stderr
    assert "Traceback" not in run.stderr


@dataclasses.dataclass
class InsertConfig:
    """Expert insertion (a fine-tuning section)."""

    n_new_mlp_experts: int = 0
    """MLP experts added to every layer."""
    init_from: str = ""
    """Checkpoint or Hugging Face folder to start from."""


@dataclasses.dataclass
class FinetuneJob(JobConfig):
    """Fine-tune a ModuleFormer (MoLM) model."""

    insert: InsertConfig = dataclasses.field(default_factory=InsertConfig)


def test_a_job_subclass_adds_its_own_section(tmp_path):
    cfg = write(tmp_path, "insert:\n  n_new_mlp_experts: 2\ntrain:\n  steps: 30\n")
    job = parse_job_config(["--config", cfg, "--insert.init_from", "ck", "--schedule.warmup_steps", "3"],
                           root=FinetuneJob, prog="finetune.py")
    assert isinstance(job, FinetuneJob) and (job.insert.n_new_mlp_experts, job.insert.init_from) == (2, "ck")
    assert job.train.steps == 30 and job.to_dict()["insert"] == {"n_new_mlp_experts": 2, "init_from": "ck"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("insert:\n  bad: 1\n")
    with pytest.raises(ValueError, match="bad.yaml:2: unknown field insert.bad; known: n_new_mlp_experts, init_from"):
        parse_job_config(["--config", str(bad)], root=FinetuneJob, prog="finetune.py")
    with pytest.raises(ValueError, match="run.yaml:1: unknown section 'insert'"):
        parse_job_config(["--config", cfg])  # the pretraining job has no such section
    text = build_arg_parser(FinetuneJob, "finetune.py").format_help()
    assert text.startswith("usage: finetune.py [-h]") and "Fine-tune a ModuleFormer (MoLM) model." in text
    assert "insert: Expert insertion (a fine-tuning section)" in text and "MLP experts added to every layer." in text


def readme_data_spec() -> str:
    """The data-spec YAML block of README.md, as a user would copy it."""
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("**Data spec**"):]
    return block[block.index("```yaml\n") + 8:block.index("\n```", block.index("```yaml"))] + "\n"


def test_the_readme_data_spec_trains_as_data_spec(small_data, tmp_path):
    import shutil

    from molm_megatron.training.trainer import build_stream_data

    for name in ("pile_en", "cc100_de"):  # the README's prefixes, relative to the spec file
        (tmp_path / "data").mkdir(exist_ok=True)
        for ext in (".bin", ".idx", ".json"):
            shutil.copy(small_data + ext, tmp_path / "data" / (name + ext))
    spec = tmp_path / "spec.yaml"
    spec.write_text(readme_data_spec())
    flags = ["--train.micro_batch_size", "2", "--model.vocab_size", "50295", "--model.block_size", "64"]
    job = parse_job_config(flags + ["--data.spec", str(spec)])
    cfg = job.model.build()
    by_spec, _ = build_stream_data(job, cfg, dp_rank=0, dp_size=1)
    by_flags, _ = build_stream_data(parse_job_config(flags + [
        "--data.prefixes", str(tmp_path / "data" / "pile_en"), str(tmp_path / "data" / "cc100_de"),
        "--data.weights", "4", "1", "--data.split", "98,1,1"]), cfg, dp_rank=0, dp_size=1)
    for _ in range(3):
        a, b = next(by_spec), next(by_flags)
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.reset_memory, b.reset_memory)
    with pytest.raises(ValueError, match=r"data.spec \(.*spec.yaml\) replaces data.prefixes and data.weights"):
        parse_job_config(["--data.spec", str(spec), "--data.prefixes", "a"])
