"""launch/quickstart.py end to end on a shortened setting (tiny preset, 20 steps): every step runs
on the project's real path, and its report matches what the run wrote.

Independent checks: the reported perplexity is the last validation pass of metrics.jsonl; the
exported folder loads through transformers' Auto classes; the printed sample is the greedy
continuation recomputed here token by token with full forwards (no cache) of the exported model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
PROMPT = "import os\n"
NEW_TOKENS = 8


def greedy_without_cache(hf_dir: Path, prompt: str, n: int) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import molm_megatron.hf  # noqa: F401  (registers model_type "moduleformer")

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        for _ in range(n):
            next_id = model(ids, use_cache=False).logits[0, -1].argmax()
            if next_id.item() == tok.eos_token_id:
                break
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return tok.decode(ids[0], skip_special_tokens=True)


def test_quickstart_runs_end_to_end(tmp_path):
    workdir = tmp_path / "quickstart"
    cmd = [sys.executable, "launch/quickstart.py", "--workdir", str(workdir), "--preset", "tiny", "--steps", "20",
           "--data-bytes", "1000000", "--prompt", PROMPT, "--max-new-tokens", str(NEW_TOKENS),
           # passed through to pretrain.py: the tiny preset on the CodeGen vocabulary
           "--model.vocab_size", "50295"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    out = done.stdout
    assert done.returncode == 0, out[-4000:] + done.stderr[-4000:]
    for step in range(1, 6):
        assert f"[quickstart {step}/5]" in out

    assert (workdir / "data" / "stdlib.bin").stat().st_size > 0
    metrics = [json.loads(line) for line in (workdir / "metrics" / "metrics.jsonl").read_text().splitlines()]
    valid = [m for m in metrics if "valid/ppl" in m]
    assert [m["step"] for m in valid] == [6, 12, 18, 20]  # every steps // 3, and the last step
    assert f"validation perplexity {valid[-1]['valid/ppl']:.2f} at step 20" in out
    # Training learned something: far below a uniform guess, and better at the end than at step 6.
    assert valid[-1]["valid/ppl"] < valid[0]["valid/ppl"] < 50295

    hf_dir = workdir / "hf"
    config = json.loads((hf_dir / "config.json").read_text())
    assert (config["model_type"], config["n_layer"], config["n_embd"], config["vocab_size"]) == ("moduleformer", 2, 64, 50295)
    sample = greedy_without_cache(hf_dir, PROMPT, NEW_TOKENS)
    assert sample.startswith(PROMPT)
    assert sample in out
