"""The experiment scripts: their text helpers against hand-made cases, the runner's deadline, the
report's blocks, and one smoke run of every experiment through the product's commands (a few
steps each, on real text of this machine; about 40 commands, 3-5 minutes on 2 cores)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments.common import REPO, Runner, product_env
from experiments.data import DataScale, chunks, split_documents, troff_to_text
from experiments.report import update_block


def test_troff_to_text_keeps_the_running_text():
    page = "\n".join([
        '.\\" a comment',
        '.TH APROPOS 1 2023-01-08 2.11.2 "Dienstprogramme"',
        ".SH BEZEICHNUNG",
        "apropos \\- Suche in Handbuchseiten",
        ".PP",
        "\\fBapropos\\fP durchsucht \\fISchl\\(:usselw\\(:orter\\fR au\\(sser \\(Fcman\\(Fo.",
        '.BR \\-d ", " \\-\\-debug',
    ])
    assert troff_to_text(page) == ("BEZEICHNUNG\napropos - Suche in Handbuchseiten\n\n"
                                   "apropos durchsucht Schlüsselwörter außer »man«.\n-d, --debug")


def test_chunks_cut_at_blank_lines_and_join_back():
    paragraphs = [f"paragraph {i} " + "word " * (i * 7 % 18) for i in range(60)]
    text = "\n\n".join(paragraphs)
    pieces = chunks(text, 300)
    assert "".join(pieces) == text
    assert all(len(p) <= 300 for p in pieces)
    assert all(p.endswith("\n\n") for p in pieces[:-1])  # every cut after a blank line (there are enough)
    assert chunks("x" * 700, 300) == ["x" * 300, "x" * 300, "x" * 100]  # no line end at all: cut anywhere


def test_split_holds_out_every_20th_document_in_hash_order_within_budgets():
    import hashlib

    docs = {f"doc{i}": (lambda i=i: f"text {i} " * 10) for i in range(200)}
    train, heldout = split_documents(docs, DataScale(train_bytes=3000, heldout_bytes=400, vocab_size=0))
    order = sorted(docs, key=lambda n: hashlib.sha1(n.encode()).hexdigest())
    expected_heldout = [docs[n]() for n in order[::20]]
    assert heldout == expected_heldout[:len(heldout)] and 0 < sum(map(len, heldout)) <= 400
    assert not set(train) & set(heldout)
    assert 0 < sum(map(len, train)) <= 3000
    assert train == [docs[n]() for i, n in enumerate(order) if i % 20][:len(train)]


def test_runner_stops_a_command_at_the_deadline_and_skips_later_ones(tmp_path):
    runner = Runner(tmp_path, jobs=2, deadline=time.monotonic() + 3)
    out = runner.run_many({"quick": ["-c", "print('done')"], "slow": ["-c", "import time; time.sleep(60)"]})
    assert out["quick"].rc == 0 and out["quick"].ok
    assert out["slow"].rc == -15 and not out["slow"].ok  # SIGTERM at the deadline
    assert out["slow"].seconds < 30
    late = runner.run("late", ["-c", "print('never')"])
    assert late.rc is None and not late.ok
    assert "done" in (tmp_path / "quick.log").read_text()


def test_report_replaces_its_block_or_appends_one():
    text = "# Title\n\n<!-- results:pruning:cpu -->\nold\n<!-- /results:pruning:cpu -->\n\nafter\n"
    updated = update_block(text, "pruning:cpu", "new table\n")
    assert updated == "# Title\n\n<!-- results:pruning:cpu -->\nnew table\n<!-- /results:pruning:cpu -->\n\nafter\n"
    appended = update_block(updated, "attention:gpu", "curves\n")
    assert appended.endswith("\n\n<!-- results:attention:gpu -->\ncurves\n<!-- /results:attention:gpu -->\n")
    assert "new table" in appended


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """`experiments.data` and `run_all.sh` at the smoke scale, as a user runs them."""
    root = tmp_path_factory.mktemp("experiments")
    data, out = root / "data", root / "out"
    env = product_env()
    subprocess.run([sys.executable, "-m", "experiments.data", "--out", str(data), "--scale", "smoke"], cwd=REPO,
                   env=env, check=True, capture_output=True)
    done = subprocess.run(["bash", "experiments/run_all.sh", "smoke", str(data), str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    return data, out, done


def test_every_experiment_runs_end_to_end_at_the_smoke_scale(smoke):
    data, out, done = smoke
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "run_all.json").read_text())
    assert set(summary["experiments"]) == {"attention", "modularity", "continual", "pruning", "emoe"}
    for name in summary["experiments"]:
        record = json.loads((out / name / "results.json").read_text())
        assert record["runs"] and all(r["rc"] == 0 for r in record["runs"]), name
        assert (out / name / f"{name}.png").stat().st_size > 0
    report = (out / "EXPERIMENTS_results.md").read_text()
    for title in ("Attention and load balancing", "Domain modularity", "Inserting experts vs forgetting", "Pruning",
                  "EMoE vs dense fine-tuning"):
        assert title in report


def test_smoke_results_are_what_the_product_wrote(smoke):
    data, out, _ = smoke
    # Experiment 1: the extrapolation evaluation ran at twice the training segment with as much memory.
    attention = json.loads((out / "attention" / "results.json").read_text())
    block = attention["scale"]["model"]["block_size"]
    summary = json.loads((out / "attention" / "eval" / "stickbreaking_mi_s0_x2" / "summary.json").read_text())
    assert (summary["settings"]["segment_length"], summary["settings"]["memory_length"]) == (2 * block, 2 * block)
    assert attention["results"]["variants"]["stickbreaking_mi"]["extrapolation_ppl"]["2"]["mean"] == \
        summary["segments"]["token_perplexity"]
    # Experiment 3: a pruned model's share is its tensors' size over the fine-tuned model's, at most the target.
    import torch

    from molm_megatron.hf.convert import consolidate_checkpoint

    pruning = json.loads((out / "pruning" / "results.json").read_text())
    point = next(p for p in pruning["results"]["models"]["concentration"]["points"] if p["kind"] == "prune_max")
    pruned = torch.load(out / "pruning" / "pruned" / "concentration_max" / "model.pt", weights_only=True)["model"]
    finetuned = consolidate_checkpoint(out / "pruning" / "runs" / "concentration" / "checkpoints").state_dict()
    share = sum(t.numel() for t in pruned.values()) / sum(t.numel() for t in finetuned.values())
    assert point["params_share"] == pytest.approx(share)
    assert point["params_share"] <= pruning["scale"]["prune_shares"][0]
    # Experiment 2: the inserted arm routed a share of its tokens to the new experts.
    continual = json.loads((out / "continual" / "results.json").read_text())
    inserted = [a for name, a in continual["results"]["arms"].items() if name.startswith("inserted")]
    assert inserted and all(0 < a["new_share"] < 1 for a in inserted)
    # Experiments 2 and 5: the dense arms ran; the EMoE shipped dense is a plain GPT-2 folder.
    assert all(continual["results"]["arms"][a]["ppl"]["code"] for a in ("dense_frozen", "dense_full", "dense_lora"))
    emoe = json.loads((out / "emoe" / "results.json").read_text())
    assert all(by["code"]["mean"] for by in emoe["results"]["arms"].values())
    shipped = json.loads((out / "emoe" / "emoe_shipped_dense_s0" / "config.json").read_text())
    assert shipped["model_type"] == "gpt2" and "emoe" not in shipped
    assert "emoe" in json.loads((out / "emoe" / "base_emoe" / "config.json").read_text())
    # Experiment 4: one KL value per ordered pair of the three domains.
    modularity = json.loads((out / "modularity" / "results.json").read_text())
    for m in modularity["results"]["models"].values():
        assert len(m["kl"]) == 6 and all(v["mean"] >= 0 for v in m["kl"].values())
    assert os.path.isdir(data / "tokenizer")
