"""Loading tokenizer folders behind one small interface, `TextTokenizer`.

A tokenizer folder is either a Hugging Face folder (`tokenizer.json`, `tokenizer_config.json`,
`special_tokens_map.json`; loadable by `transformers.AutoTokenizer.from_pretrained`) or a
SentencePiece folder (`tokenizer.model`). `data_prep` and the tests only need `encode`, `decode`,
`vocab_size` and the end-of-document id, so that is all `TextTokenizer` has.

Backends for Hugging Face folders:
- `tokenizers`: the reference, any `tokenizer.json`.
- `tiktoken`: a fast path used only when the folder holds exactly CodeGen's tokenizer (GPT-2's
  vocabulary and merges plus the 38 whitespace tokens). About 4x the single-core throughput of
  `tokenizers` on our machines (BENCHMARKS.md); tests/tokenizer check both give the same ids.

Text that happens to contain "<|endoftext|>" is encoded as ordinary text by every backend: a
document must not be able to forge the end-of-document token that separates documents.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from pathlib import Path
from typing import Protocol, Sequence

import sentencepiece as spm
import tiktoken
from tokenizers import Tokenizer

from tokenizer.codegen import (CODEGEN_TOKENIZER_CLASS, EOS_ID, EOS_TOKEN, WHITESPACE_TOKENS, codegen_tokenizer,
                               gpt2_vocab_and_merges)
from tokenizer.folder import TOKENIZER_FILES, eos_token_of, write_hf_files
from tokenizer.sentencepiece_hf import sentencepiece_to_hf

CODEGEN = "codegen"
"""Name accepted wherever a tokenizer folder is: the built-in CodeGen tokenizer, built in memory."""

# GPT-2's pre-tokenizer regex in tiktoken's possessive form (openai/tiktoken,
# tiktoken_ext/openai_public.py, r50k_base): the same splits as GPT-2's
# 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ without backtracking.
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# CodeGen's added tokens, cut out leftmost-longest before BPE as Hugging Face does: greedy runs of
# at most 31 spaces / 9 tabs; a single leftover space or tab stays with the following text.
_WHITESPACE_RUN = re.compile("( {2,31}|\t{2,9})")


class TextTokenizer(Protocol):
    """What data preparation needs from a tokenizer."""

    description: str
    """Human-readable name of the tokenizer and backend, recorded next to every output."""
    vocab_size: int
    """Number of ids, including added and special tokens."""
    eod_id: int
    """End-of-document id appended after every document."""

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, without any added bos/eos."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; decode(encode(x)) == x for the byte-level and byte-fallback tokenizers here."""
        ...


class HFTokenizer:
    """Any Hugging Face `tokenizer.json`, through the `tokenizers` library."""

    def __init__(self, tok: Tokenizer, eod_token: str, description: str) -> None:
        self.tok = tok
        # Special tokens inside the text are encoded as text (see the module docstring).
        self.tok.encode_special_tokens = True
        eod_id = tok.token_to_id(eod_token)
        if eod_id is None:
            raise ValueError(f"{description}: end-of-document token {eod_token!r} is not in the vocabulary")
        self.eod_id = eod_id
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.description = description

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)


class CodeGenTiktoken(HFTokenizer):
    """CodeGen's tokenizer with tiktoken's BPE for encoding; same ids as `HFTokenizer`."""

    def __init__(self, tok: Tokenizer, description: str) -> None:
        super().__init__(tok, EOS_TOKEN, description)
        byte_of_char = {c: b for b, c in bytes_to_unicode().items()}
        vocab, _ = gpt2_vocab_and_merges()
        # tiktoken ranks merges by the id of the merged token; for GPT-2 ids are in merge order,
        # which is why tiktoken's r50k_base reproduces GPT-2 (checked in tests/tokenizer).
        ranks = {bytes(byte_of_char[c] for c in token): i for token, i in vocab.items() if i != EOS_ID}
        self._bpe = tiktoken.Encoding("codegen", pat_str=_GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})
        self._whitespace_id = {ws: EOS_ID + 1 + i for i, ws in enumerate(WHITESPACE_TOKENS)}

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        # re.split with a group alternates plain text (even indices) and whitespace runs (odd).
        for i, part in enumerate(_WHITESPACE_RUN.split(text)):
            if i % 2:
                ids.append(self._whitespace_id[part])
            elif part:
                ids.extend(self._bpe.encode_ordinary(part))
        return ids


class SentencePieceTokenizer:
    """A SentencePiece model (`tokenizer.model`); the end-of-document id is its `</s>`."""

    def __init__(self, model_file: Path) -> None:
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        if self.sp.eos_id() < 0:
            raise ValueError(f"{model_file}: the SentencePiece model has no eos piece to use as end of document")
        self.eod_id = self.sp.eos_id()
        self.vocab_size = self.sp.get_piece_size()
        self.description = f"sentencepiece:{model_file.parent.name}"

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE (openai/gpt-2, encoder.py)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    # The remaining bytes (controls, space, ...) map to 256, 257, ... in byte order.
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


@functools.cache
def _codegen_spec() -> dict:
    return json.loads(codegen_tokenizer().to_str())


def is_codegen(tok: Tokenizer) -> bool:
    """True when `tok` is exactly CodeGen's tokenizer (vocabulary, merges, added tokens, pipeline)."""
    ours = json.loads(tok.to_str())
    ref = _codegen_spec()
    same_merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in ours["model"].get("merges", [])]
    ref_merges = [tuple(m) for m in ref["model"]["merges"]]
    return (
        ours["model"]["type"] == "BPE"
        and ours["model"]["vocab"] == ref["model"]["vocab"]
        and same_merges == ref_merges
        and [(t["id"], t["content"]) for t in ours["added_tokens"]] == [(t["id"], t["content"]) for t in ref["added_tokens"]]
        and ours["normalizer"] is None
        and ours["pre_tokenizer"] == ref["pre_tokenizer"]
    )


def load_tokenizer(path: str | Path, backend: str = "auto") -> TextTokenizer:
    """Load a tokenizer folder, or the built-in CodeGen tokenizer when `path` is "codegen".

    backend: "auto" (tiktoken for CodeGen's tokenizer, `tokenizers` otherwise), "tokenizers" or
    "tiktoken" (only for CodeGen's tokenizer). SentencePiece folders ignore it.
    """
    if backend not in ("auto", "tokenizers", "tiktoken"):
        raise ValueError(f"backend must be auto, tokenizers or tiktoken, got {backend!r}")
    if str(path) == CODEGEN:
        if backend != "tokenizers":
            return CodeGenTiktoken(codegen_tokenizer(), f"{CODEGEN} (tiktoken)")
        tok, eod_token, description = codegen_tokenizer(), EOS_TOKEN, CODEGEN
    else:
        folder = Path(path)
        if (folder / "tokenizer.model").is_file() and not (folder / "tokenizer.json").is_file():
            return SentencePieceTokenizer(folder / "tokenizer.model")
        if not (folder / "tokenizer.json").is_file():
            raise ValueError(f"tokenizer {folder}: no tokenizer.json or tokenizer.model in it (or use {CODEGEN!r})")
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        eod_token = eos_token_of(folder)
        description = folder.name
    if backend == "tokenizers":
        return HFTokenizer(tok, eod_token, f"{description} (tokenizers)")
    if is_codegen(tok):
        return CodeGenTiktoken(tok, f"{description} (tiktoken)")
    if backend == "tiktoken":
        raise ValueError(f"tokenizer {path}: the tiktoken backend only serves CodeGen's tokenizer")
    return HFTokenizer(tok, eod_token, f"{description} (tokenizers)")


def copy_tokenizer_files(path: str | Path, dest: Path) -> None:
    """Write the tokenizer `path` (a folder, or "codegen") into the existing folder `dest`, beside
    other files (a model export), so that `transformers.AutoTokenizer` loads it from there: a Hugging
    Face folder's files are copied, CodeGen's written, and a SentencePiece folder's `tokenizer.model`
    copied with the Hugging Face files made from it (tokenizer/sentencepiece_hf.py)."""
    if str(path) == CODEGEN:
        write_hf_files(codegen_tokenizer(), dest, EOS_TOKEN, CODEGEN_TOKENIZER_CLASS)
        return
    names = [name for name in TOKENIZER_FILES if (Path(path) / name).is_file()]
    if not names:
        raise ValueError(f"tokenizer {path}: no {', '.join(TOKENIZER_FILES)} in it (or use {CODEGEN!r})")
    for name in names:
        shutil.copyfile(Path(path) / name, dest / name)
    if names == ["tokenizer.model"]:
        sp = SentencePieceTokenizer(Path(path) / "tokenizer.model").sp
        write_hf_files(sentencepiece_to_hf(Path(path) / "tokenizer.model"), dest, sp.id_to_piece(sp.eos_id()),
                       "PreTrainedTokenizerFast", bos_token=sp.id_to_piece(sp.bos_id()),
                       unk_token=sp.id_to_piece(sp.unk_id()))
