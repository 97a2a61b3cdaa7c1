"""`train.cuda_graph` outside what can be captured is refused before training, naming why (exit 2).
The captured step's equality with the eager one is a GPU check (benchmarks/cuda_graph_check.py)."""

from __future__ import annotations

import sys

from tests.training.procs import run


def test_cuda_graph_on_cpu_is_refused_naming_the_reasons(small_data, tmp_path):
    log = tmp_path / "run.log"
    code = run([sys.executable, "pretrain.py", "--model.preset", "tiny", "--model.sample_topk", "1",
                "--data.prefixes", small_data, "--data.split", "80,20,0", "--train.steps", "2",
                "--train.micro_batch_size", "2", "--schedule.warmup_steps", "1", "--metrics.dir", str(tmp_path / "m"),
                "--train.device", "cpu", "--train.cuda_graph", "true"], log, timeout=180)
    text = log.read_text()
    assert code == 2, text[-3000:]
    assert "train.cuda_graph cannot be used: train.device is not cuda; model.sample_topk is 1" in text
