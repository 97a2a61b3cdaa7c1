"""Training data: the data spec (prefixes, weights, split), megatron-core datasets built from it,
token sources over indexed datasets, and the Transformer-XL stream loader (DESIGN.md section 3).

Typical use in a trainer:

    spec = load_data_spec("data.yaml")
    sources = build_token_sources(spec)
    loader = TransformerXLStreamLoader(sources["train"], micro_batch_size, seq_len, dp_rank, dp_size, seed)
    for batch in loader: ...                      # Batch(input_ids, labels, reset_memory)
    for batch in validation_batches(sources["valid"], micro_batch_size, seq_len, dp_rank, dp_size): ...
"""

from molm_megatron.data.spec import DataSpec, build_megatron_datasets, load_data_spec
from molm_megatron.data.stream_loader import Batch, TransformerXLStreamLoader, validation_batches
from molm_megatron.data.token_source import IndexedTokenSource, TokenSource, build_token_sources

__all__ = [
    "Batch",
    "DataSpec",
    "IndexedTokenSource",
    "TokenSource",
    "TransformerXLStreamLoader",
    "build_megatron_datasets",
    "build_token_sources",
    "load_data_spec",
    "validation_batches",
]
