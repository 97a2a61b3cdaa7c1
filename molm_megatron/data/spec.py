"""The data spec: which indexed datasets to train on, with what weights and train/valid/test split.

YAML form (prefixes relative to the spec file's folder; written by `python -m data_prep`):

    datasets:
      - {prefix: data/pile_en, weight: 4}   # English
      - {prefix: data/cc100_de, weight: 1}  # the new language: 4 : 1
    split: "98,1,1"                         # train, valid, test shares of each prefix's documents

Weights are shares of training tokens (megatron-core's convention: they are normalised).
The split follows megatron-core: each prefix's documents are cut into consecutive train, valid and
test ranges (`convert_split_vector_to_split_matrix`), so the held-out documents are the same for
megatron-core's `GPTDataset`s (`build_megatron_datasets`) and for the Transformer-XL stream loader
(`molm_megatron.data.token_source.build_token_sources`).
"""

from __future__ import annotations

import json
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import yaml
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import DType

SPLITS = ("train", "valid", "test")


@dataclass
class DataSpec:
    """Indexed-dataset prefixes with weights, and the train/valid/test split of their documents."""

    prefixes: list[str]
    """Paths of `.bin/.idx` pairs without the extension."""
    weights: list[float]
    """Share of training tokens per prefix (normalised)."""
    split: str = "98,1,1"
    """Train, valid, test shares of every prefix's documents, megatron-core's `split` string."""
    vocab_size: int = field(init=False)
    """From the prefixes' `<prefix>.json` (data_prep); all prefixes must agree."""
    eod_id: int = field(init=False)

    def __post_init__(self) -> None:
        if not self.prefixes:
            raise ValueError("data spec: datasets is empty")
        if len(self.weights) != len(self.prefixes):
            raise ValueError(f"data spec: {len(self.prefixes)} prefixes but {len(self.weights)} weights")
        if any(w <= 0 for w in self.weights):
            raise ValueError(f"data spec: weights must be positive, got {self.weights}")
        self.vocab_size, self.eod_id = _check_prefixes(self.prefixes)

    def split_ranges(self, num_documents: int) -> dict[str, tuple[int, int]]:
        """[begin, end) document ranges of each split for a prefix of `num_documents` documents,
        rounded exactly as BlendedMegatronDatasetBuilder does."""
        matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(self.split))
        ranges = {}
        for name, bounds in zip(SPLITS, matrix):
            if bounds is None:
                ranges[name] = (0, 0)
            else:
                ranges[name] = (int(round(bounds[0] * num_documents)), int(round(bounds[1] * num_documents)))
        return ranges


def load_data_spec(path: str | Path) -> DataSpec:
    """Read a YAML data spec (format in the module docstring)."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    entries = raw.get("datasets")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: 'datasets' must be a non-empty list of {{prefix, weight}}")
    prefixes, weights = [], []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "prefix" not in entry:
            raise ValueError(f"{path}: datasets[{i}] needs a 'prefix'")
        prefixes.append(str(path.parent / entry["prefix"]))
        weights.append(float(entry.get("weight", 1.0)))
    unknown = set(raw) - {"datasets", "split"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; known: datasets, split")
    return DataSpec(prefixes, weights, str(raw.get("split", "98,1,1")))


# megatron-core's .idx header: magic, version, dtype code, sequence count, document count; then
# int32 sequence lengths, int64 sequence pointers (byte offsets into the .bin), int64 document indices.
_IDX_HEADER = struct.Struct("<9sQBQQ")
_IDX_MAGIC = b"MMIDIDX\x00\x00"


def check_indexed_files(prefix: str) -> None:
    """The `.idx` of `prefix` is whole and its `.bin` holds exactly the tokens the index describes.

    Reads only the header and the last entry (cheap for any size); a truncated or swapped file
    raises ValueError naming it, instead of failing on some read in the middle of training.
    """
    idx_path, bin_path = Path(prefix + ".idx"), Path(prefix + ".bin")
    idx_size = idx_path.stat().st_size
    with open(idx_path, "rb") as f:
        head = f.read(_IDX_HEADER.size)
        if len(head) < _IDX_HEADER.size or not head.startswith(_IDX_MAGIC):
            raise ValueError(f"{idx_path}: not a megatron-core index (bad header or truncated to {idx_size} bytes)")
        _, _, code, num_sequences, num_documents = _IDX_HEADER.unpack(head)
        expected_idx = _IDX_HEADER.size + num_sequences * (4 + 8) + num_documents * 8
        if idx_size != expected_idx:
            raise ValueError(f"{idx_path}: {idx_size} bytes, but its header describes {num_sequences} sequences "
                             f"({expected_idx} bytes): the index is truncated or damaged; rerun data_prep")
        if num_sequences == 0:
            expected_bin = 0
        else:
            f.seek(_IDX_HEADER.size + 4 * (num_sequences - 1))
            last_length = int(np.frombuffer(f.read(4), dtype=np.int32)[0])
            f.seek(_IDX_HEADER.size + 4 * num_sequences + 8 * (num_sequences - 1))
            last_pointer = int(np.frombuffer(f.read(8), dtype=np.int64)[0])
            expected_bin = last_pointer + last_length * np.dtype(DType.dtype_from_code(code)).itemsize
    bin_size = bin_path.stat().st_size
    if bin_size != expected_bin:
        raise ValueError(f"{bin_path}: {bin_size} bytes, but {idx_path} describes {expected_bin} bytes of tokens: "
                         "the .bin is truncated or from another run; rerun data_prep for this prefix")


def _check_prefixes(prefixes: list[str]) -> tuple[int, int]:
    """Every prefix finished by data_prep and tokenized alike; returns (vocab_size, eod_id)."""
    seen: Optional[tuple[int, int, str]] = None
    for prefix in prefixes:
        missing = [ext for ext in (".bin", ".idx", ".json") if not Path(prefix + ext).is_file()]
        if missing:
            raise ValueError(f"data spec: prefix {prefix} is missing {', '.join(missing)} "
                             "(not written by data_prep, or not finished)")
        check_indexed_files(prefix)
        meta = json.loads(Path(prefix + ".json").read_text(encoding="utf-8"))
        this = (meta["vocab_size"], meta["eod_id"], meta["tokenizer"])
        if seen is not None and this[:2] != seen[:2]:
            raise ValueError(f"data spec: prefix {prefix} was tokenized with {this[2]} (vocab {this[0]}, eod {this[1]}) "
                             f"but {prefixes[0]} with {seen[2]} (vocab {seen[0]}, eod {seen[1]})")
        seen = this
    assert seen is not None
    return seen[0], seen[1]


def job_data_ids(job) -> tuple[str, int, int] | None:
    """(first prefix, vocab_size, eod_id) of a job's training data, from data_prep's `<prefix>.json`;
    None when the job names no data (build_stream_data names the problem)."""
    prefixes = load_data_spec(job.data.spec).prefixes if job.data.spec else list(job.data.prefixes)
    if not prefixes:
        return None
    return (prefixes[0], *_check_prefixes(prefixes))


def adopt_data_eod(job) -> None:
    """Make the model's bos/eos (`job.model`) the end-of-document id of its training data, read from
    the prefixes' `<prefix>.json` (data_prep): the id the model sees between documents, so the one
    its exports begin and stop generation with. A preset's own value gives way (the tiny preset's
    511 is an ordinary token of CodeGen data); one set explicitly that differs is an error."""
    data = job_data_ids(job)
    if data is None:
        return
    prefix, _, eod = data
    overrides = job.model.overrides
    for name in ("bos_token_id", "eos_token_id"):
        if name in overrides and overrides[name] != eod:
            raise ValueError(f"model.{name} ({overrides[name]}) differs from the end-of-document id of the data "
                             f"({eod}, from {prefix}.json); leave it unset or set it to {eod}")
        overrides[name] = eod


class _TokenIds:
    """The ids megatron-core's GPTDataset asks its tokenizer for; no text is tokenized there."""

    def __init__(self, vocab_size: int, eod_id: int) -> None:
        self.vocab_size = vocab_size
        self.eod = eod_id
        self.unique_identifiers = OrderedDict(vocab_size=vocab_size, eod=eod_id)


def build_megatron_datasets(spec: DataSpec, seq_len: int, num_samples: tuple[int, int, int], seed: int = 1234,
                            cache_dir: str | Path | None = None) -> list[Optional[GPTDataset]]:
    """megatron-core's train/valid/test datasets of `spec`: blended `GPTDataset`s of `seq_len`
    tokens (samples shuffled, as Megatron-LM trains without memory).

    num_samples: samples wanted per split. cache_dir: where megatron-core caches its index arrays
    (default `<folder of the first prefix>/megatron_cache`). With several prefixes, call it after
    `torch.distributed` is initialised (a one-process group will do): megatron-core 0.16's
    `BlendedDataset` asks for the rank unconditionally.
    """
    if len(spec.prefixes) > 1 and not torch.distributed.is_initialized():
        raise ValueError("build_megatron_datasets: a blend of several prefixes needs torch.distributed "
                         "initialised (megatron-core's BlendedDataset reads the rank)")
    cache = Path(cache_dir) if cache_dir else Path(spec.prefixes[0]).parent / "megatron_cache"
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_len,
        # One prefix: no weights, so megatron-core builds a plain GPTDataset, no BlendedDataset.
        blend=(spec.prefixes, spec.weights if len(spec.prefixes) > 1 else None),
        split=spec.split,
        path_to_cache=str(cache),
        tokenizer=_TokenIds(spec.vocab_size, spec.eod_id),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        # MoLM has no positional encoding and builds its own causal mask.
        create_attention_mask=False,
    )
    return BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), lambda: True, config).build()

