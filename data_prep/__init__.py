"""Data preparation: corpora (the Pile, CC-100, jsonl, Parquet, saved HF datasets) tokenized into
megatron-core indexed `.bin/.idx` datasets. `python -m data_prep --help` explains the command.
"""

from data_prep.pipeline import PrepConfig, Summary, prepare, prepare_text_files, token_dtype
from molm_megatron.data.corpus import FORMATS, REASONS, Document, InputReader, Skipped, stdlib_sources

__all__ = [
    "FORMATS",
    "REASONS",
    "Document",
    "InputReader",
    "PrepConfig",
    "Skipped",
    "Summary",
    "prepare",
    "prepare_text_files",
    "stdlib_sources",
    "token_dtype",
]
