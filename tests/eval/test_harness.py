"""lm-evaluation-harness adapter: its loglikelihoods equal a direct computation with our model
(contexts spanning several Transformer-XL segments included), a local multiple-choice task scores
the accuracy of a hand argmax, and the expert counts equal the model's own collect_expert_stats."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from molm_megatron.eval.expert_stats import ExpertCounter
from molm_megatron.eval.harness import MoLMHarnessLM, load_local_task, run_lm_eval
from molm_megatron.eval.__main__ import TASKS_DIR
from tests.eval.conftest import stdlib_text


def direct_scores(molm, ctx_ids, cont_ids, segment_length, memory_length, stats=None):
    """log P(continuation | context) and greedy match, from our model alone: one unpadded row run
    window by window with its memory; routing counts from the model's collect_expert_stats."""
    ids = torch.tensor([ctx_ids + cont_ids])
    inputs, targets = ids[:, :-1], ids[0, 1:]
    step = segment_length or inputs.shape[1]
    memory, logprobs = None, []
    with torch.no_grad():
        for start in range(0, inputs.shape[1], step):
            out = molm(inputs[:, start:start + step], memory=memory, memory_length=memory_length,
                       collect_expert_stats=True)
            memory = out.memory
            logprobs.append(out.logits.log_softmax(-1)[0])
            if stats is not None:
                for name, count in out.expert_stats.items():
                    stats[name] = stats.get(name, 0) + count
    lp = torch.cat(logprobs)[-len(cont_ids):]
    tail = targets[-len(cont_ids):]
    return lp.gather(1, tail[:, None]).sum().item(), bool((lp.argmax(-1) == tail).all())


def encode_pair(tok, context, continuation):
    """The harness's split of a request into tokens (context alone, then the rest of the whole)."""
    whole = tok(context + continuation).input_ids
    ctx = tok(context).input_ids
    return ctx, whole[len(ctx):]


def requests(pairs):
    from lm_eval.api.instance import Instance

    return [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]


def test_adapter_loglikelihoods_equal_direct_computation(eval_model):
    tok, molm, cfg = eval_model.tokenizer, eval_model.molm, eval_model.molm.config
    text = stdlib_text("textwrap.py", 900)
    # A long context and a long continuation: both span several segments.
    pairs = [(text[:500], text[500:]), ("def main(argv", "):\n    return 0"),
             ("import os", "\nimport sys"), ("x = [1, 2,", " 3]")]
    ctx_ids, cont_ids = encode_pair(tok, *pairs[0])
    assert len(ctx_ids) > 2 * cfg.block_size and len(cont_ids) > 2 * cfg.block_size

    views = {}
    settings = [(None, None), (0, 0), (cfg.block_size, 10_000), (cfg.block_size, 0)]
    for segment_length, memory_length in settings:
        lm = MoLMHarnessLM(eval_model, batch_size=3, segment_length=segment_length, memory_length=memory_length)
        got = lm.loglikelihood(requests(pairs))
        for (context, continuation), (ll, greedy) in zip(pairs, got):
            want_ll, want_greedy = direct_scores(molm, *encode_pair(tok, context, continuation),
                                                 lm.segment_length, lm.memory_length)
            assert ll == pytest.approx(want_ll, abs=1e-3), (segment_length, memory_length, context[:20])
            assert greedy == want_greedy
        views[segment_length, memory_length] = [ll for ll, _ in got]
    full = views[0, 0]
    # Memory that holds everything: segments compute exactly the full forward.
    assert views[cfg.block_size, 10_000] == pytest.approx(full, abs=1e-3)
    # Without memory each segment starts blind: the long request scores differently, the short
    # ones (a single segment) do not.
    no_memory = views[cfg.block_size, 0]
    assert abs(no_memory[0] - full[0]) > 1e-2
    assert no_memory[1:] == pytest.approx(full[1:], abs=1e-3)


def test_local_mc_task_accuracy_equals_hand_argmax(eval_model, tmp_path):
    # The shipped task, copied elsewhere: its data file is found relative to the YAML, not the cwd.
    for name in ("stdlib_docstrings.yaml", "stdlib_docstrings.jsonl"):
        shutil.copy(TASKS_DIR / name, tmp_path / name)
    limit = 6
    counter = ExpertCounter(eval_model.molm)
    lm = MoLMHarnessLM(eval_model, batch_size=4, counter=counter)
    results = run_lm_eval(lm, [tmp_path / "stdlib_docstrings.yaml"], tmp_path / "out", limit=limit,
                          model_name="tiny")
    docs = [json.loads(line) for line in (tmp_path / "stdlib_docstrings.jsonl").read_text().splitlines()[:limit]]

    tok, molm, cfg = eval_model.tokenizer, eval_model.molm, eval_model.molm.config
    hits = hits_norm = 0
    stats, tokens = {}, 0
    for doc in docs:
        scores = []
        for choice in doc["choices"]:
            ctx, cont = encode_pair(tok, doc["context"], choice)
            scores.append(direct_scores(molm, ctx, cont, cfg.block_size, cfg.history_length, stats)[0])
            tokens += len(ctx) + len(cont) - 1
        hits += max(range(len(scores)), key=scores.__getitem__) == doc["gold"]
        normed = [s / len(c) for s, c in zip(scores, doc["choices"])]  # acc_norm: per character of the choice
        hits_norm += max(range(len(normed)), key=normed.__getitem__) == doc["gold"]

    task = results["results"]["stdlib_docstrings"]
    assert task["acc,none"] == hits / limit
    assert task["acc_norm,none"] == hits_norm / limit
    written = list((tmp_path / "out" / "tiny").glob("results_*.json"))
    assert len(written) == 1
    assert json.loads(written[0].read_text())["results"]["stdlib_docstrings"]["acc,none"] == hits / limit
    assert len(list((tmp_path / "out" / "tiny").glob("samples_stdlib_docstrings_*.jsonl"))) == 1
    # Every scored token counted once, padding left out, as collect_expert_stats counts them.
    assert counter.tokens == tokens
    assert {name: c.tolist() for name, c in counter.counts.items()} == {n: c.tolist() for n, c in stats.items()}
    assert all(sum(c.tolist()) == tokens * cfg.k_att for n, c in counter.counts.items() if n.endswith("attn"))


def test_local_task_errors_name_the_file(tmp_path):
    (tmp_path / "t.yaml").write_text("task: t\ndataset_path: json\n"
                                     "dataset_kwargs:\n  data_files:\n    test: nope.jsonl\n")
    with pytest.raises(ValueError, match=r"t\.yaml: data file 'nope\.jsonl' not found"):
        load_local_task(tmp_path / "t.yaml")


def test_the_shipped_task_file_is_what_its_builder_writes(tmp_path):
    from molm_megatron.eval.tasks.build_stdlib_docstrings import main as build

    shipped = (TASKS_DIR / "stdlib_docstrings.jsonl").read_text()
    version = json.loads(shipped.splitlines()[0])["python"]
    if version != f"{sys.version_info.major}.{sys.version_info.minor}":
        pytest.skip(f"the shipped file was built from Python {version}'s standard library")
    assert build(["--out", str(tmp_path / "rebuilt.jsonl")]) == 0
    assert (tmp_path / "rebuilt.jsonl").read_text() == shipped
