"""Evaluating a training checkpoint (consolidated on the fly) gives exactly what evaluating its
Hugging Face export gives: a tiny pretrain.py run on standard library sources (data_prep, CodeGen
tokenizer), then both commands of the CLI on both folders."""

from __future__ import annotations

import json
import sys

from molm_megatron.eval.__main__ import main
from molm_megatron.hf.convert import checkpoint_to_hf
from tests.eval.conftest import stdlib_text
from tests.training.procs import run


def results_of(out) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    return {k: v for k, v in summary.items() if k not in ("settings", "seconds")}


def test_checkpoint_equals_its_export(tmp_path):
    from data_prep import prepare_text_files, stdlib_sources

    data = tmp_path / "stdlib"
    prepare_text_files(stdlib_sources(12000), data)
    cmd = [sys.executable, "pretrain.py", "--config", "launch/configs/tiny_cpu.yaml", "--data.prefixes", str(data),
           "--data.split", "80,20,0", "--train.micro_batch_size", "2", "--train.global_batch_tokens", "128",
           "--train.steps", "2", "--schedule.warmup_steps", "1", "--train.eval_interval", "0",
           "--checkpoint.dir", str(tmp_path / "ckpt"), "--checkpoint.interval", "2",
           "--metrics.dir", str(tmp_path / "metrics"), "--metrics.tensorboard", "false"]
    assert run(cmd, tmp_path / "pretrain.log", timeout=300) == 0, (tmp_path / "pretrain.log").read_text()[-3000:]
    export = checkpoint_to_hf(tmp_path / "ckpt", tmp_path / "hf")
    text = tmp_path / "text.txt"
    text.write_text(stdlib_text("textwrap.py", 1500), encoding="utf-8")

    got = {}
    for name, model in (("checkpoint", tmp_path / "ckpt"), ("export", export)):
        common = ["--model", str(model), "--device", "cpu", "--batch-size", "4", "--expert-stats"]
        ppl, lme = tmp_path / f"{name}_ppl", tmp_path / f"{name}_lm"
        assert main(["perplexity", *common, "--text", str(text), "--max-length", "100", "--out", str(ppl)]) == 0
        assert main(["lm-eval", *common, "--limit", "4", "--out", str(lme)]) == 0
        got[name] = (results_of(ppl), json.loads((ppl / "expert_stats.json").read_text()),
                     results_of(lme), json.loads((lme / "expert_stats.json").read_text()))
    assert got["checkpoint"] == got["export"]
    ppl, stats, lm_results, _ = got["checkpoint"]
    assert ppl["rolling"]["tokens"] == ppl["segments"]["tokens"] > 100
    assert ppl["segments"]["token_perplexity"] < 50295  # two steps of training already beat a uniform guess
    assert stats["tokens"] == ppl["segments"]["tokens"] and set(stats["counts"]) == {
        f"layer{i}.{kind}" for i in range(2) for kind in ("attn", "mlpf")}
    assert set(lm_results["tasks"]["stdlib_docstrings"]) >= {"acc,none", "acc_norm,none"}
