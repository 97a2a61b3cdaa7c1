"""The EMoE benchmark runs end to end at tiny size on CPU (the GPU run uses the real shapes)."""

from __future__ import annotations

import json


def test_emoe_bench_tiny_runs_and_sparse_matches_masked(tmp_path, capsys):
    from benchmarks.emoe_bench import main

    out = tmp_path / "emoe.json"
    assert main(["--tiny", "--tokens", "64", "--reps", "2", "--n-init", "1", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert [r["shape"] for r in results["cluster"]] == ["gpt2-tiny", "neox-tiny", "llama-tiny"]
    for r in results["ffn"]:
        assert r["k"] == 2 and r["experts"] == 8
        assert r["sparse_vs_masked_rel_err"] < 1e-5  # fp32 on CPU
        assert r["dense_ms"] > 0 and r["sparse_ms"] > 0 and r["masked_ms"] > 0
    assert "| FFN shape | tokens | k / N |" in capsys.readouterr().out
