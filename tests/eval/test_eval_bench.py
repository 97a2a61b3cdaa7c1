"""benchmarks/eval_bench.py at tiny shapes on CPU: both models go through the same harness
requests and sampling settings, and the figures it reports are the work it did over its time."""

from __future__ import annotations

import json

from benchmarks.eval_bench import main


def test_eval_bench_runs_at_tiny_size(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["--tiny", "--device", "cpu", "--batch-size", "4", "--requests", "6", "--context-chars", "200",
                 "--prompts", "2", "--samples", "2", "--max-new-tokens", "6", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    ours, theirs = results["molm"], results["pythia"]
    for r in (ours, theirs):
        assert r["loglikelihood_tokens_per_s"] == r["loglikelihood_tokens"] / r["loglikelihood_seconds"] > 0
        assert r["humaneval_samples"] == 4
        assert r["humaneval_samples_per_s"] == r["humaneval_samples"] / r["humaneval_seconds"] > 0
    assert ours["loglikelihood_tokens"] == theirs["loglikelihood_tokens"]  # same requests, same tokenizer
