"""Training new tokenizers and extending an existing vocabulary for a new language.

- `train_sentencepiece`: SentencePiece BPE or unigram (Kudo & Richardson, 2018) with an exact
  round trip: identity normalisation, no dummy prefix, whitespace kept, byte fallback for every
  character outside the vocabulary.
- `train_bytelevel_bpe`: byte-level BPE (GPT-2 style) with `tokenizers`; exact by construction.
- `extend_bytelevel_bpe`: continued BPE training (Sennrich et al., 2016, algorithm 1) on a new
  language's corpus, starting from the segmentation the existing tokenizer produces. The learnt
  merges are appended after the existing ones, so every existing token keeps its id and the new
  tokens take ids from the old vocabulary size on. Because every existing merge ranks before every
  new one and no existing merge involves a new token, encoding with the extended tokenizer is
  "old segmentation, then the new merges in order", exactly what the training replayed.

The functions take an iterator of document texts; `python -m tokenizer` feeds them from any input
format `data_prep` reads.
"""

from __future__ import annotations

import heapq
import io
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tokenizer.codegen import EOS_TOKEN, codegen_tokenizer
from tokenizer.folder import check_tokenizer_target, eos_token_of, save_hf_folder, write_tokenizer_folder
from tokenizer.loading import CODEGEN

SENTENCEPIECE_KINDS = ("sentencepiece-bpe", "sentencepiece-unigram")
KINDS = SENTENCEPIECE_KINDS + ("bytelevel-bpe",)


def train_tokenizer(texts: Iterable[str], kind: str, vocab_size: int, out_dir: str | Path,
                    overwrite: bool = False) -> Path:
    """Train a tokenizer of `kind` (one of KINDS) on `texts` and save its folder to `out_dir`
    (an existing tokenizer folder is replaced only with `overwrite`)."""
    check_tokenizer_target(out_dir, overwrite)  # before the training, not after it
    if kind in SENTENCEPIECE_KINDS:
        return train_sentencepiece(texts, kind.split("-")[1], vocab_size, out_dir, overwrite)
    if kind == "bytelevel-bpe":
        return train_bytelevel_bpe(texts, vocab_size, out_dir, overwrite)
    raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")


def _lines(texts: Iterable[str], max_line_bytes: int) -> Iterator[str]:
    # SentencePiece learns from "sentences": lines here. Longer lines are cut into pieces rather
    # than dropped (spm drops sentences over max_sentence_length bytes).
    for text in texts:
        for line in text.split("\n"):
            while line:
                cut = len(line.encode("utf-8")[:max_line_bytes].decode("utf-8", "ignore"))
                yield line[:cut]
                line = line[cut:]


def train_sentencepiece(texts: Iterable[str], model_type: str, vocab_size: int, out_dir: str | Path,
                        overwrite: bool = False) -> Path:
    """Train a SentencePiece `model_type` ("bpe" or "unigram") model; folder holds `tokenizer.model`.

    Ids: 0 `<unk>`, 1 `<s>`, 2 `</s>` (the end-of-document id), then bytes `<0x00>`..`<0xFF>`,
    then the learnt pieces.
    """
    max_line_bytes = 4096
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_lines(texts, max_line_bytes),
        model_writer=model,
        model_type=model_type,
        vocab_size=vocab_size,
        # Exact round trip: no NFKC, no "▁" prepended, runs of spaces kept, unknown characters
        # spelled as bytes.
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        byte_fallback=True,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        character_coverage=0.9995,
        max_sentence_length=max_line_bytes,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    return write_tokenizer_folder(out_dir, lambda tmp: (tmp / "tokenizer.model").write_bytes(model.getvalue()),
                                  overwrite)


def train_bytelevel_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Train a GPT-2-style byte-level BPE; id 0 is `<|endoftext|>` (end of document)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        # All 256 byte symbols from the start, so any text is encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return save_hf_folder(tok, out_dir, EOS_TOKEN, "PreTrainedTokenizerFast", overwrite)


def extend_bytelevel_bpe(base_dir: str | Path, texts: Iterable[str], num_new_tokens: int, out_dir: str | Path,
                         min_frequency: int = 2, overwrite: bool = False) -> tuple[Path, list[str]]:
    """Append up to `num_new_tokens` BPE tokens learnt on `texts` to the tokenizer in `base_dir`.

    Returns the output folder and the new tokens (byte-level strings) in id order. Existing ids,
    added tokens included, are unchanged; new ids start at the old vocabulary size.
    """
    check_tokenizer_target(out_dir, overwrite)  # before the training, not after it
    base = codegen_tokenizer() if str(base_dir) == CODEGEN else Tokenizer.from_file(str(Path(base_dir) / "tokenizer.json"))
    eos_token = EOS_TOKEN if str(base_dir) == CODEGEN else eos_token_of(Path(base_dir))
    spec = json.loads(base.to_str())
    if spec["model"]["type"] != "BPE" or spec["pre_tokenizer"] is None or "ByteLevel" not in json.dumps(spec["pre_tokenizer"]):
        raise ValueError(f"{base_dir}: extension needs a byte-level BPE tokenizer.json, got model "
                         f"{spec['model']['type']} with pre-tokenizer {spec['pre_tokenizer']}")
    words = _segmented_words(base, texts)
    merges = continued_bpe(words, num_new_tokens, min_frequency)

    vocab: dict[str, int] = spec["model"]["vocab"]
    # Added tokens (CodeGen's whitespace runs) live outside the BPE vocabulary, but `tokenizers`
    # numbers new model entries from the model's own size: put them in the model vocabulary at
    # their ids so the appended tokens come after them. BPE never produces these raw strings.
    for added in spec["added_tokens"]:
        vocab.setdefault(added["content"], added["id"])
    next_id = base.get_vocab_size(with_added_tokens=True)
    if sorted(vocab.values()) != list(range(next_id)):
        raise ValueError(f"{base_dir}: the base vocabulary ids are not 0..{next_id - 1} without gaps")
    new_tokens = []
    for left, right in merges:
        vocab[left + right] = next_id
        next_id += 1
        new_tokens.append(left + right)
    spec["model"]["merges"] = [list(m) for m in _merge_pairs(spec["model"]["merges"])] + [list(m) for m in merges]
    extended = Tokenizer.from_str(json.dumps(spec))
    assert extended.get_vocab_size(with_added_tokens=True) == next_id
    return save_hf_folder(extended, out_dir, eos_token, "PreTrainedTokenizerFast", overwrite), new_tokens


def _merge_pairs(merges: list) -> list[tuple[str, str]]:
    # tokenizer.json stores merges as ["a", "b"] pairs (tokenizers >= 0.20) or "a b" strings.
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


def _segmented_words(base: Tokenizer, texts: Iterable[str]) -> Counter[tuple[str, ...]]:
    """Count the words of `texts` as the base tokenizer segments them (tuples of its tokens)."""
    base.encode_special_tokens = True
    words: Counter[tuple[str, ...]] = Counter()
    for text in texts:
        enc = base.encode(text, add_special_tokens=False)
        word: list[str] = []
        last = None
        # word_ids numbers the pre-tokenizer's words; an added token is a word of its own.
        for token, word_id in zip(enc.tokens, enc.word_ids):
            if word_id != last and word:
                words[tuple(word)] += 1
                word = []
            word.append(token)
            last = word_id
        if word:
            words[tuple(word)] += 1
    # A one-token word has no pair to merge.
    return Counter({w: c for w, c in words.items() if len(w) > 1})


def continued_bpe(words: Counter[tuple[str, ...]], num_merges: int, min_frequency: int = 2) -> list[tuple[str, str]]:
    """BPE merges learnt on pre-segmented `words` (word -> count): the most frequent adjacent pair
    is merged, `num_merges` times or until the best pair occurs fewer than `min_frequency` times.
    Ties go to the lexicographically smallest pair, so the result is deterministic.
    """
    seqs = [list(w) for w in words]
    counts = list(words.values())
    pair_count: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, seq in enumerate(seqs):
        for pair in zip(seq, seq[1:]):
            pair_count[pair] += counts[i]
            where[pair].add(i)
    # Max-heap with lazy deletion: stale entries (count changed) are skipped when popped.
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap and len(merges) < num_merges:
        neg, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -neg:
            continue
        if -neg < min_frequency:
            break
        merges.append(pair)
        merged = pair[0] + pair[1]
        touched: set[tuple[str, str]] = set()
        for i in where.pop(pair):
            seq, c = seqs[i], counts[i]
            for p in zip(seq, seq[1:]):
                pair_count[p] -= c
                touched.add(p)
            j, out = 0, []
            while j < len(seq):
                if j + 1 < len(seq) and (seq[j], seq[j + 1]) == pair:
                    out.append(merged)
                    j += 2
                else:
                    out.append(seq[j])
                    j += 1
            seqs[i] = out
            for p in zip(out, out[1:]):
                pair_count[p] += c
                where[p].add(i)
                touched.add(p)
        del pair_count[pair]
        for p in touched:
            if p in pair_count:
                if pair_count[p] > 0:
                    heapq.heappush(heap, (-pair_count[p], p))
                else:
                    del pair_count[p]
    return merges
