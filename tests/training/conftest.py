"""Shared fixtures: a small indexed dataset of real text (Python standard library sources,
tokenized with the CodeGen tokenizer by data_prep), small enough that the Transformer-XL streams
restart within a few steps."""

from __future__ import annotations

import pytest

# Five files, about 2,300 tokens: with 4 streams of 64 tokens an epoch is 8 windows.
SMALL_BYTES = 9000


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> str:
    from data_prep.pipeline import prepare_text_files, stdlib_sources

    prefix = tmp_path_factory.mktemp("data") / "stdlib_small"
    prepare_text_files(stdlib_sources(SMALL_BYTES), prefix)
    return str(prefix)
