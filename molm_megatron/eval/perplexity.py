"""Perplexity of a local text file, by two protocols (each result names its own):

- `rolling` (lm-evaluation-harness's `loglikelihood_rolling`, as its wikitext task): each document
  is scored in disjoint windows of `max_length` tokens; the first window starts from the
  end-of-text token, every later one sees only the last token of the window before it. The
  windows go through our harness adapter, so a window longer than block_size is itself scored in
  Transformer-XL segments.
- `segments` (how pretrain.py validates): the documents are joined into one token stream, each
  document after an end-of-text token, as data_prep writes them; the stream is cut into
  `batch_size` contiguous rows, and every row is scored in consecutive `segment_length` windows,
  each attending over the previous `memory_length` keys of its row. Memory carries across
  documents, as in training; a row's first window has none. The end-of-text tokens are inputs
  only, so both protocols predict exactly the documents' tokens.

Both report the harness's quantities from the summed log-likelihood LL (natural log) of the
predicted tokens: token perplexity exp(-LL / tokens), word perplexity exp(-LL / words), byte
perplexity exp(-LL / bytes), bits per byte -LL / (bytes ln 2), with words and bytes counted as
the harness does (`re.split(r"\\s+", doc)`, UTF-8 bytes).
"""

from __future__ import annotations

import contextlib
import math
import re

import torch
from tqdm import tqdm

from molm_megatron.eval.expert_stats import ExpertCounter
from molm_megatron.model import MoLM
from molm_megatron.training.memory import StreamMemory


def count_words(doc: str) -> int:
    """Words as lm-evaluation-harness counts them for word perplexity."""
    return len(re.split(r"\s+", doc))


def count_bytes(doc: str) -> int:
    return len(doc.encode("utf-8"))


def split_documents(text: str, split: str) -> list[str]:
    """`none`: the whole file is one document; `blank-lines`: documents separated by blank lines
    (CC-100's layout), each stripped of its surrounding newlines."""
    if split == "none":
        return [text] if text else []
    if split == "blank-lines":
        return [d.strip("\n") for d in re.split(r"\n\s*\n", text) if d.strip()]
    raise ValueError(f"--split {split!r}: expected none or blank-lines")


def perplexities(loglikelihood: float, tokens: int, words: int, num_bytes: int) -> dict[str, float]:
    """The harness's perplexity quantities from a summed natural-log likelihood and the counts."""
    return {"loglikelihood": loglikelihood, "tokens": tokens, "words": words, "bytes": num_bytes,
            "token_perplexity": math.exp(-loglikelihood / tokens),
            "word_perplexity": math.exp(-loglikelihood / words),
            "byte_perplexity": math.exp(-loglikelihood / num_bytes),
            "bits_per_byte": -loglikelihood / (num_bytes * math.log(2))}


def rolling_perplexity(lm, documents: list[str]) -> dict[str, float]:
    """The harness's rolling-window protocol through `lm` (an HFLM, e.g. MoLMHarnessLM)."""
    from lm_eval.api.instance import Instance

    requests = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(doc,), idx=i)
                for i, doc in enumerate(documents)]
    loglikelihoods = lm.loglikelihood_rolling(requests)
    tokens = sum(len(lm.tok_encode(doc)) for doc in documents)
    return perplexities(sum(loglikelihoods), tokens, sum(map(count_words, documents)),
                        sum(map(count_bytes, documents)))


def stream_rows(documents_ids: list[list[int]], eos_id: int, batch_size: int, segment_length: int,
                pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, labels, real), each [B, W * segment_length]: the stream `eos doc1 eos doc2 ...` cut
    into B contiguous rows; labels are the next tokens, -100 where the next token is an end-of-text
    separator or padding; `real` is False on the padding (at the end of the last row only)."""
    stream, predicted = [], []
    for ids in documents_ids:
        stream.append(eos_id)
        predicted.append(False)  # the separator is context, not a token of the text
        stream.extend(ids)
        predicted.extend([True] * len(ids))
    inputs = torch.tensor(stream[:-1])
    labels = torch.tensor(stream[1:]).masked_fill(~torch.tensor(predicted[1:]), -100)
    n = inputs.numel()
    windows = math.ceil(n / segment_length)
    per_row = math.ceil(windows / max(1, min(batch_size, windows)))
    rows = math.ceil(windows / per_row)  # so that no row is padding alone
    row_len = per_row * segment_length
    pad = rows * row_len - n
    inputs = torch.cat([inputs, inputs.new_full((pad,), pad_id)]).view(rows, row_len)
    labels = torch.cat([labels, labels.new_full((pad,), -100)]).view(rows, row_len)
    real = (torch.arange(rows * row_len) < n).view(rows, row_len)
    return inputs, labels, real


def segment_lengths(model: MoLM, segment_length: int | None, memory_length: int | None) -> tuple[int, int]:
    """Scoring segment and memory lengths: the given ones, else the model's training block_size
    and history_length."""
    spec = model.training_spec()
    return (spec.block_size if segment_length is None else segment_length,
            spec.history_length if memory_length is None else memory_length)


@torch.no_grad()
def segment_perplexity(model: MoLM, documents: list[str], documents_ids: list[list[int]], eos_id: int,
                       batch_size: int, segment_length: int | None = None, memory_length: int | None = None,
                       counter: ExpertCounter | None = None) -> dict[str, float]:
    """The Transformer-XL protocol (module docstring); segment/memory lengths default to the
    model's block_size / history_length. The result carries the lengths used."""
    segment_length, memory_length = segment_lengths(model, segment_length, memory_length)
    device = next(model.parameters()).device
    inputs, labels, real = stream_rows(documents_ids, eos_id, batch_size, segment_length)
    inputs, labels = inputs.to(device), labels.to(device)
    total, memory = 0.0, StreamMemory(device)
    no_reset_B = torch.zeros(inputs.shape[0], dtype=torch.bool, device=device)  # one stream per row, never restarted
    starts = range(0, inputs.shape[1], segment_length)
    for start in tqdm(starts, desc=f"segments of {segment_length} x {inputs.shape[0]} rows", unit="window"):
        window = slice(start, start + segment_length)
        x, y = inputs[:, window], labels[:, window]
        # Padding sits at the end of the last row, so no real token attends to it: no attention
        # mask is needed, only the expert counts must leave it out.
        kv, mask_BS = memory.inputs(no_reset_B, x.shape[1])
        with counter.capture() if counter is not None else contextlib.nullcontext():
            out = model(x, labels=y, memory=kv, attention_mask=mask_BS, memory_length=memory_length)
        if counter is not None:
            counter.add_rows(counter.routes(x.shape[0]), real[:, window])
        memory.remember(out.memory, mask_BS)
        total += out.lm_loss_sum.double().item()
    tokens = int((labels != -100).sum())
    assert tokens == sum(map(len, documents_ids)), "every token of the text is predicted exactly once"
    return {**perplexities(-total, tokens, sum(map(count_words, documents)), sum(map(count_bytes, documents))),
            "segment_length": segment_length, "memory_length": memory_length}
