"""HumanEval: the sandbox passes a canonical solution, fails a wrong one, stops an infinite loop at
its time limit, refuses writes outside its temporary folder and the network; pass@k matches the
formula on hand cases; batched sampling with the KV cache gives completions cut at the stop
sequences, and greedy ones equal a decode by full forwards without cache."""

from __future__ import annotations

import json
import socket
import time
from math import comb

import pytest
import torch

from molm_megatron.eval.__main__ import main
from molm_megatron.eval.humaneval import (STOP_SEQUENCES, check_program, pass_at_k, read_problems,
                                          sample_completions, truncate_at_stop)
from molm_megatron.eval.sandbox import Limits, run_program


@pytest.fixture(scope="module")
def problems():
    return read_problems()


def test_canonical_passes_wrong_fails_infinite_loop_times_out(problems):
    p = problems[0]
    assert len(problems) == 164 and p["task_id"] == "HumanEval/0"
    assert run_program(check_program(p, p["canonical_solution"])).result == "passed"
    wrong = run_program(check_program(p, "    return not any(numbers)\n"))
    assert not wrong.passed and wrong.result.startswith("failed: AssertionError")
    start = time.monotonic()
    loop = run_program(check_program(p, "    while True:\n        pass\n"), Limits(timeout_s=1.0))
    assert loop.result == "timed out" and time.monotonic() - start < 5


def test_sandbox_cannot_write_outside_its_folder_or_reach_the_network(tmp_path):
    target = tmp_path / "outside.txt"
    (tmp_path / "inside.txt").write_text("keep")
    attempts = [
        f"open({str(target)!r}, 'w').write('x')",
        f"import os; os.close(os.open({str(target)!r}, os.O_CREAT | os.O_WRONLY))",
        f"import pathlib; pathlib.Path({str(target)!r}).write_text('x')",
        "open('../escaped.txt', 'w')",
        f"import os; os.mkdir({str(tmp_path / 'dir')!r})",
        f"import posix; posix.rename({str(tmp_path / 'inside.txt')!r}, {str(target)!r})",
        f"import posix; posix.unlink({str(tmp_path / 'inside.txt')!r})",
        f"import subprocess; subprocess.run(['touch', {str(target)!r}])",
        f"import os; os.posix_spawn('/usr/bin/touch', ['touch', {str(target)!r}], {{}})",
        f"import ctypes; ctypes.CDLL(None).system(b'touch {target}')",
        "import _posixsubprocess",
    ]
    for program in attempts:
        verdict = run_program(program)
        assert not verdict.passed and "failed" in verdict.result, program
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inside.txt"]
    assert (tmp_path / "inside.txt").read_text() == "keep"
    # Its own folder is writable, and is where relative paths go.
    ok = run_program("import os\nos.mkdir('d')\nopen('d/f.txt', 'w').write('hi')\n"
                     "assert open('d/f.txt').read() == 'hi'")
    assert ok.passed, ok.result

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    with server:
        port = server.getsockname()[1]
        verdict = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)")
    assert not verdict.passed


def test_pass_at_k_matches_the_formula_on_hand_cases():
    assert pass_at_k(5, 2, 1) == pytest.approx(2 / 5)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 10) == 1.0
    assert pass_at_k(4, 2, 3) == 1.0  # fewer than k wrong samples: any k include a right one
    for n, c, k in [(200, 13, 1), (200, 13, 10), (200, 13, 100), (20, 3, 7)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), rel=1e-9)
    with pytest.raises(ValueError, match="pass@10 needs at least 10 samples"):
        pass_at_k(5, 1, 10)


def test_truncate_at_stop():
    assert truncate_at_stop("    return x\n\ndef g():\n    pass") == "    return x\n"
    assert truncate_at_stop("    return x\nif __name__:\n#\n") == "    return x"
    assert truncate_at_stop("    return x") == "    return x"


def test_batched_sampling_and_greedy_decoding(eval_model, problems):
    prompts = [p["prompt"] for p in problems[:3]]
    hf, tok = eval_model.hf, eval_model.tokenizer
    sampled = sample_completions(hf, tok, prompts, n=2, temperature=0.8, top_p=0.95, max_new_tokens=12,
                                 batch_size=4, seed=1)
    assert [len(c) for c in sampled] == [2, 2, 2]
    assert all(not any(s in c for s in STOP_SEQUENCES) for cs in sampled for c in cs)
    again = sample_completions(hf, tok, prompts, n=2, temperature=0.8, top_p=0.95, max_new_tokens=12,
                               batch_size=4, seed=1)
    assert again == sampled

    greedy = sample_completions(hf, tok, prompts, n=1, temperature=0.0, top_p=1.0, max_new_tokens=10,
                                batch_size=3, seed=0)
    molm = eval_model.molm
    for prompt, (completion,) in zip(prompts, greedy):
        ids = tok(prompt).input_ids
        new: list[int] = []
        with torch.no_grad():
            for _ in range(10):
                nxt = molm(torch.tensor([ids + new])).logits[0, -1].argmax().item()
                if nxt == tok.eos_token_id:
                    break
                new.append(nxt)
                if any(s in tok.decode(new) for s in STOP_SEQUENCES):
                    break
        assert completion == truncate_at_stop(tok.decode(new))


def test_cli_scores_given_completions(problems, tmp_path):
    rows = []
    for p in problems[:2]:
        rows.append({"task_id": p["task_id"], "completion": p["canonical_solution"]})
        rows.append({"task_id": p["task_id"], "completion": "    return None\n"})
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["humaneval", "--completions", str(tmp_path / "c.jsonl"), "--limit", "2", "--out",
                 str(tmp_path / "out"), "--workers", "2"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["pass@1"] == 0.5 and summary["n"] == 2 and summary["passed"] == 2 and summary["failed"] == 2
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [(s["task_id"], s["sample"], s["passed"]) for s in samples] == [
        ("HumanEval/0", 0, True), ("HumanEval/0", 1, False), ("HumanEval/1", 0, True), ("HumanEval/1", 1, False)]
    with pytest.raises(SystemExit, match="holds the summary.json"):
        main(["humaneval", "--completions", str(tmp_path / "c.jsonl"), "--limit", "2", "--out", str(tmp_path / "out")])
