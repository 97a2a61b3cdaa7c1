"""Training data: the corpus readers, the data spec (prefixes, weights, split), megatron-core
datasets built from it, token sources over indexed datasets, and the Transformer-XL stream loader
(docs/design.md, "Data order").

Typical use in a trainer:

    spec = load_data_spec("data.yaml")
    sources = build_token_sources(spec)
    loader = TransformerXLStreamLoader(sources["train"], micro_batch_size, seq_len, dp_rank, dp_size, seed)
    for batch in loader: ...                      # Batch(input_ids, labels, reset_memory)
    for batch in validation_batches(sources["valid"], micro_batch_size, seq_len, dp_rank, dp_size): ...

The names below are imported on first use: `molm_megatron.data.corpus` (what `tokenizer` and
`data_prep` read corpora with) must not pay for importing megatron-core and torch.
"""

import importlib

_EXPORTS = {
    "Batch": "stream_loader",
    "DataSpec": "spec",
    "IndexedTokenSource": "token_source",
    "TokenSource": "token_source",
    "TransformerXLStreamLoader": "stream_loader",
    "build_megatron_datasets": "spec",
    "build_token_sources": "token_source",
    "load_data_spec": "spec",
    "validation_batches": "stream_loader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
