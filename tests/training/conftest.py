"""Shared fixtures: a small indexed dataset of real text (Python standard library sources,
tokenized with the CodeGen tokenizer by data_prep), small enough that the Transformer-XL streams
restart within a few steps."""

from __future__ import annotations

import pytest

# Five files: documents of 1534, 97, 34, 34 and 1231 CodeGen tokens. Split "80,20,0" trains on the
# first four (4 streams of 64 tokens: an epoch of 6 windows) and validates on the fifth (4 windows).
SMALL_BYTES = 12000


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> str:
    from data_prep import prepare_text_files, stdlib_sources

    prefix = tmp_path_factory.mktemp("data") / "stdlib_small"
    prepare_text_files(stdlib_sources(SMALL_BYTES), prefix)
    return str(prefix)
