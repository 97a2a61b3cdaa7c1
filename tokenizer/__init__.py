"""Tokenizers for MoLM: CodeGen's (the published models'), new SentencePiece / byte-level BPE
ones, and vocabulary extension for a new language. `python -m tokenizer --help` lists the commands.
"""

from tokenizer.codegen import EOS_ID, VOCAB_SIZE, WHITESPACE_TOKENS, build_codegen_tokenizer, codegen_tokenizer
from tokenizer.loading import CODEGEN, TextTokenizer, load_tokenizer
from tokenizer.training import KINDS, extend_bytelevel_bpe, train_tokenizer

__all__ = [
    "CODEGEN",
    "EOS_ID",
    "KINDS",
    "VOCAB_SIZE",
    "WHITESPACE_TOKENS",
    "TextTokenizer",
    "build_codegen_tokenizer",
    "codegen_tokenizer",
    "extend_bytelevel_bpe",
    "load_tokenizer",
    "train_tokenizer",
]
