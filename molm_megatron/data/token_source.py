"""Token sources: documents in a seeded shuffled order, epoch by epoch, for the stream loader.

A `TokenSource` answers two questions: which documents make up epoch e, in which order
(`epoch_order`), and what are the tokens of a piece of one document (`read`). The Transformer-XL
stream loader concatenates an epoch's documents into one token stream and cuts it into streams.

`IndexedTokenSource` serves megatron-core indexed datasets (`IndexedDataset`, the `.bin/.idx`
files data_prep writes), blended with weights:
- Weights are shares of tokens. Blending is per document, so the document counts are chosen with
  weights w_i / (mean document length of prefix i), which makes the expected token shares w_i.
- Which prefix supplies the next document follows megatron-core's `build_blending_indices`
  (greedy, always the prefix furthest below its share), so shares hold over any stretch of the
  stream, not only on average.
- An epoch has as many documents as the prefixes together (sum of their document counts).
  Prefix i supplies c_i of them, taken from its own endless sequence of shuffled passes over its
  documents (pass k shuffled with seed (seed, i, k)); epoch e takes positions e*c_i .. (e+1)*c_i - 1
  of that sequence. An up-weighted prefix thus repeats its documents; a down-weighted one is read
  further along in later epochs instead of restarting.
- Without weights (validation, test) c_i is the prefix's document count: every document exactly
  once per epoch.
"""

from __future__ import annotations

from typing import Optional, Protocol

import numpy as np
from megatron.core.datasets import helpers
from megatron.core.datasets.indexed_dataset import IndexedDataset

from molm_megatron.data.spec import SPLITS, DataSpec


class TokenSource(Protocol):
    """Documents in a seeded shuffled order (see the module docstring)."""

    eod_id: int
    """End-of-document id ending every document."""

    def epoch_order(self, epoch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(document keys, document lengths in tokens), both int64 [num_documents], for `epoch`;
        the same for the same (epoch, seed) on every rank and every run."""
        ...

    def read(self, key: int, offset: int, length: int) -> np.ndarray:
        """Tokens [offset, offset + length) of the document with `key`."""
        ...


class IndexedTokenSource:
    """A weighted blend of megatron-core indexed datasets, optionally restricted to some documents.

    prefixes: `.bin/.idx` prefixes. documents: per prefix, the document ids to use (default all).
    weights: token shares per prefix, or None for every document once per epoch.
    """

    def __init__(self, prefixes: list[str], eod_id: int, documents: Optional[list[np.ndarray]] = None,
                 weights: Optional[list[float]] = None) -> None:
        self.prefixes = prefixes
        self.eod_id = eod_id
        self.datasets = [IndexedDataset(p) for p in prefixes]
        if documents is None:
            documents = [np.arange(len(ds), dtype=np.int64) for ds in self.datasets]
        self.documents = [np.asarray(d, dtype=np.int64) for d in documents]
        empty = [p for p, d in zip(prefixes, self.documents) if len(d) == 0]
        if empty:
            raise ValueError(f"token source: no documents from {', '.join(empty)}")
        self.lengths = [ds.sequence_lengths[d].astype(np.int64) for ds, d in zip(self.datasets, self.documents)]
        # Keys are global document numbers: prefix i's document j has key key_base[i] + j.
        self.key_base = np.concatenate([[0], np.cumsum([len(ds) for ds in self.datasets])]).astype(np.int64)

        num_docs = np.array([len(d) for d in self.documents], dtype=np.float64)
        if weights is None:
            doc_weights = num_docs
        else:
            if len(weights) != len(prefixes):
                raise ValueError(f"token source: {len(prefixes)} prefixes but {len(weights)} weights")
            doc_weights = np.asarray(weights, dtype=np.float64) / np.array([l.mean() for l in self.lengths])
        size = int(num_docs.sum())
        # which prefix supplies each document of an epoch, and that prefix's running count
        self.pattern = np.zeros(size, dtype=np.int16)
        self.pattern_rank = np.zeros(size, dtype=np.int64)
        helpers.build_blending_indices(self.pattern, self.pattern_rank, doc_weights / doc_weights.sum(),
                                       len(prefixes), size, False)
        self.per_epoch = np.bincount(self.pattern, minlength=len(prefixes)).astype(np.int64)

    def epoch_order(self, epoch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        keys = np.empty(len(self.pattern), dtype=np.int64)
        lengths = np.empty(len(self.pattern), dtype=np.int64)
        for i, (docs, doc_lengths) in enumerate(zip(self.documents, self.lengths)):
            take = self.per_epoch[i]
            if take == 0:
                continue
            # Positions of this epoch in prefix i's endless sequence of shuffled passes.
            position = epoch * take + np.arange(take, dtype=np.int64)
            passes, within = np.divmod(position, len(docs))
            local = np.empty(take, dtype=np.int64)
            for k in np.unique(passes):
                perm = np.random.default_rng([seed, i, int(k)]).permutation(len(docs))
                mask = passes == k
                local[mask] = perm[within[mask]]
            slots = self.pattern == i
            keys[slots] = self.key_base[i] + docs[local]
            lengths[slots] = doc_lengths[local]
        return keys, lengths

    def read(self, key: int, offset: int, length: int) -> np.ndarray:
        i = int(np.searchsorted(self.key_base, key, side="right")) - 1
        return self.datasets[i].get(int(key - self.key_base[i]), offset=offset, length=length)


def build_token_sources(spec: DataSpec) -> dict[str, Optional[IndexedTokenSource]]:
    """Token sources of the train, valid and test splits of `spec` (None for an empty split).

    Training blends with the spec's weights; valid and test hold every held-out document exactly
    once per epoch, so validation loss is measured on the same documents whatever the weights.
    """
    num_docs = [len(IndexedDataset(p)) for p in spec.prefixes]
    sources: dict[str, Optional[IndexedTokenSource]] = {}
    for name in SPLITS:
        ranges = [spec.split_ranges(n)[name] for n in num_docs]
        keep = [i for i, (b, e) in enumerate(ranges) if e > b]
        if name == "train" and len(keep) < len(spec.prefixes):
            empty = [spec.prefixes[i] for i in range(len(ranges)) if i not in keep]
            raise ValueError(f"data spec: no training documents in {', '.join(empty)} with split {spec.split!r}")
        if not keep:
            sources[name] = None
            continue
        sources[name] = IndexedTokenSource(
            [spec.prefixes[i] for i in keep], spec.eod_id,
            documents=[np.arange(*ranges[i], dtype=np.int64) for i in keep],
            weights=[spec.weights[i] for i in keep] if name == "train" else None,
        )
    return sources
