"""Perplexity: the harness's rolling windows equal a direct loop over the windows; the
Transformer-XL segment protocol with a memory that holds everything equals one full forward, and
its rows equal streams scored alone; word/byte conversions on known counts, against the harness's
own aggregation functions."""

from __future__ import annotations

import math

import pytest
import torch

from molm_megatron.eval.expert_stats import ExpertCounter
from molm_megatron.eval.harness import MoLMHarnessLM
from molm_megatron.eval.perplexity import (count_bytes, count_words, perplexities, rolling_perplexity,
                                           segment_perplexity, split_documents, stream_rows)
from tests.eval.conftest import stdlib_text


def full_logprob(molm, inputs, targets):
    """Sum of log P(targets | inputs) from one forward; targets -100 are skipped."""
    with torch.no_grad():
        lp = molm(torch.tensor([inputs])).logits[0].double().log_softmax(-1)
    return sum(lp[i, t].item() for i, t in enumerate(targets) if t != -100)


def test_rolling_perplexity_equals_a_direct_loop_over_windows(eval_model):
    tok, molm = eval_model.tokenizer, eval_model.molm
    documents = [stdlib_text("shlex.py", 700), stdlib_text("string.py", 300)]
    window = 40
    lm = MoLMHarnessLM(eval_model, batch_size=3, max_length=window, segment_length=0)
    got = rolling_perplexity(lm, documents)

    eos, total, tokens = tok.eos_token_id, 0.0, 0
    for doc in documents:
        ids = tok(doc).input_ids
        assert len(ids) > 3 * window
        tokens += len(ids)
        # The harness's windows: the first predicts ids[:window] from eos + ids[:window-1]; each
        # later one predicts up to `window` further tokens from the `window` tokens before each of
        # them (so the last, shorter one sees more than one token of context).
        for start in range(0, len(ids), window):
            end = min(start + window, len(ids))
            if start == 0:
                total += full_logprob(molm, [eos] + ids[:end - 1], ids[:end])
            else:
                inputs = ids[end - window - 1:end - 1]
                total += full_logprob(molm, inputs, [-100] * (window - (end - start)) + ids[start:end])
    assert got["tokens"] == tokens
    assert got["loglikelihood"] == pytest.approx(total, rel=1e-5)
    assert got["token_perplexity"] == pytest.approx(math.exp(-total / tokens), rel=1e-5)


def test_segment_protocol_with_full_memory_equals_one_forward(eval_model):
    tok, molm, cfg = eval_model.tokenizer, eval_model.molm, eval_model.molm.config
    documents = split_documents(stdlib_text("textwrap.py", 900) + "\n\n\n" + stdlib_text("shlex.py", 400),
                                "blank-lines")
    ids = [tok(d).input_ids for d in documents]
    eos = tok.eos_token_id
    stream = [t for doc in ids for t in [eos] + doc]
    assert len(stream) > 4 * cfg.block_size
    # The reference: the whole stream in one forward; separators are inputs, never targets.
    targets = [t if t != eos else -100 for t in stream[1:]]
    want = full_logprob(molm, stream[:-1], targets)

    got = segment_perplexity(molm, documents, ids, eos, batch_size=1, memory_length=10_000)
    assert got["tokens"] == sum(map(len, ids))
    assert (got["segment_length"], got["memory_length"]) == (cfg.block_size, 10_000)  # the model's block by default
    assert got["loglikelihood"] == pytest.approx(want, rel=1e-5)

    # Three rows: each row is its own stream (no memory at its start), padding left out.
    inputs, labels, real = stream_rows(ids, eos, 3, cfg.block_size)
    rows = [(x[r].tolist(), y[r].tolist()) for x, y, r in zip(inputs, labels, real)]
    want_rows = sum(full_logprob(molm, x, y) for x, y in rows)
    counter = ExpertCounter(molm)
    got_rows = segment_perplexity(molm, documents, ids, eos, batch_size=3, memory_length=10_000, counter=counter)
    assert got_rows["loglikelihood"] == pytest.approx(want_rows, rel=1e-5)
    assert inputs.shape[0] == 3 and not real[-1, -1] and real[:-1].all()
    assert counter.tokens == int(real.sum())


def test_word_and_byte_conversions_on_known_counts():
    from lm_eval.api.metrics import bits_per_byte, weighted_perplexity

    text = "naïve  café\nüber tab\tend"
    assert count_words(text) == 5  # the harness's re.split(r"\s+", doc)
    assert count_bytes(text) == len(text) + 3  # ï, é, ü take two bytes each in UTF-8
    got = perplexities(-12.0, tokens=6, words=4, num_bytes=24)
    assert got["token_perplexity"] == pytest.approx(math.exp(2.0))
    assert got["word_perplexity"] == pytest.approx(math.exp(3.0))
    assert got["byte_perplexity"] == pytest.approx(math.exp(0.5))
    assert got["bits_per_byte"] == pytest.approx(0.5 / math.log(2))
    # The same numbers as the harness's aggregations over (loglikelihood, count) pairs.
    assert got["word_perplexity"] == pytest.approx(weighted_perplexity([(-5.0, 1), (-7.0, 3)]))
    assert got["bits_per_byte"] == pytest.approx(bits_per_byte([(-12.0, 24)]))
