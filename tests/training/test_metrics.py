"""Metrics: expert-load statistics against hand-computed values, MFU peaks, and the fan-out of one
`log` call to stdout, JSON lines and TensorBoard."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from molm_megatron.training.metrics import (CPU_PEAK_FLOPS, MetricsLogger, Progress, expert_load_metrics,
                                            peak_flops_per_device)


def test_expert_load_entropy_and_extremes():
    out = expert_load_metrics({"layer0.mlpf": torch.tensor([6, 2, 0, 0]), "layer1.attn": torch.tensor([5, 5])})
    # p = (3/4, 1/4, 0, 0): H = -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.562335; mean count 2: max 6/2, min 0/2.
    assert out["experts/layer0.mlpf/load_entropy"] == pytest.approx(0.5623351446)
    assert out["experts/layer0.mlpf/load_max"] == pytest.approx(3.0)
    assert out["experts/layer0.mlpf/load_min"] == 0.0
    # Perfect balance: entropy log E, max = min = 1.
    assert out["experts/layer1.attn/load_entropy"] == pytest.approx(math.log(2))
    assert out["experts/layer1.attn/load_max"] == out["experts/layer1.attn/load_min"] == pytest.approx(1.0)


def test_peak_flops():
    assert peak_flops_per_device(torch.device("cpu")) == CPU_PEAK_FLOPS == 1e11
    assert peak_flops_per_device(torch.device("cpu"), peak_tflops=989) == 989e12


def test_progress_rate_and_eta():
    progress = Progress(start_step=10, total_steps=110)
    progress.start_time -= 20.0  # 20 s ago
    out = progress(step=30)  # 20 steps in 20 s: 1 step/s, 80 steps left
    assert out["progress/steps_per_s"] == pytest.approx(1.0, rel=1e-3)
    assert out["progress/eta_s"] == pytest.approx(80.0, rel=1e-3)


def test_log_fans_out_to_stdout_jsonl_and_tensorboard(tmp_path, capsys):
    logger = MetricsLogger(str(tmp_path), total_steps=100, tensorboard=True, enabled=True, aux_name="mi")
    metrics = {"loss/lm": 2.5, "loss/mi": -0.01, "loss/switch": 3.0, "lr": 3e-4, "grad_norm": 0.75,
               "throughput/tokens_per_s": 12345.0, "mfu": 0.3456, "progress/steps_per_s": 2.0, "progress/eta_s": 45.0}
    logger.log(metrics, step=10)
    logger.log({**metrics, "loss/lm": 2.4}, step=20)
    logger.close()
    line = capsys.readouterr().out.splitlines()[0]
    assert line == ("step 10/100 | loss 2.5000 | mi -0.0100 | lr 3.00e-04 | gnorm 0.750 | tok/s 12,345 | "
                    "mfu 34.6% | step/s 2.00 | eta 0:00:45")
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {"step": 10, **metrics} and rows[1]["loss/lm"] == 2.4
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss/lm")] == [(10, 2.5), (20, pytest.approx(2.4))]
    assert "throughput/tokens_per_s" in events.Tags()["scalars"]


def test_other_ranks_write_nothing(tmp_path, capsys):
    logger = MetricsLogger(str(tmp_path / "m"), total_steps=5, tensorboard=True, enabled=False)
    logger.log({"loss/lm": 1.0}, step=1)
    logger.close()
    assert capsys.readouterr().out == "" and not (tmp_path / "m").exists()


def test_an_empty_metrics_dir_writes_no_files(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    logger = MetricsLogger("", total_steps=5, tensorboard=True, enabled=True)
    logger.log({"loss/lm": 1.0}, step=1)
    logger.close()
    assert capsys.readouterr().out == "step 1/5 | loss 1.0000\n" and os.listdir(tmp_path) == []


def test_wandb_is_imported_only_when_enabled_and_named_when_missing(tmp_path):
    import importlib.util
    import sys

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here; this checks the error of a machine without it")
    logger = MetricsLogger(str(tmp_path), total_steps=5, tensorboard=False, enabled=True, wandb=False)
    logger.log({"loss/lm": 1.0}, step=1)
    logger.close()
    assert "wandb" not in sys.modules
    with pytest.raises(ValueError) as e:
        MetricsLogger(str(tmp_path), total_steps=5, tensorboard=False, enabled=True, wandb=True, wandb_mode="offline")
    assert str(e.value) == ("metrics.wandb is true but the Python package `wandb` is not installed: pip install wandb, "
                            "or leave metrics.wandb false")
