"""The Transformer-XL stream loader, token sources and the data spec, on indexed datasets made from
the Python standard library sources (documents: blocks between blank lines, CC-100 style).

Checks lean on the data itself, not on the loader's arithmetic: the streams of all rows and ranks,
cut at end-of-document tokens, must give back whole documents of the right split, each once. Some
blocks occur in several files (licence headers, `main()` calls), so documents are compared as
multisets: no document may come back more often than the data holds it.
"""

import collections
import json

import numpy as np
import pytest
import torch
import torch.distributed as dist
from megatron.core.datasets.indexed_dataset import IndexedDataset

from data_prep import PrepConfig, prepare, stdlib_sources
from molm_megatron.data import (
    DataSpec,
    TransformerXLStreamLoader,
    build_megatron_datasets,
    build_token_sources,
    load_data_spec,
    validation_batches,
)

EOD = 50256


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory):
    """Two datasets from disjoint stdlib files: "en" (about 1.2 MB) and "new" (about 0.6 MB)."""
    folder = tmp_path_factory.mktemp("data")
    files = stdlib_sources(1_800_000)
    cut = len(files) * 2 // 3
    out = {}
    for name, chunk in (("en", files[:cut]), ("new", files[cut:])):
        prepare(PrepConfig(inputs=chunk, output_prefix=folder / name, input_format="cc100"))
        out[name] = str(folder / name)
    return out


def documents(prefix: str, begin: int = 0, end: int | None = None) -> collections.Counter:
    """Multiset of the documents [begin, end) of an indexed dataset, read straight from the files."""
    ds = IndexedDataset(prefix)
    return collections.Counter(tuple(ds[i].tolist()) for i in range(begin, len(ds) if end is None else end))


def at_most(found: collections.Counter, available: collections.Counter) -> bool:
    return all(available[d] >= n for d, n in found.items())


def stream_of_rows(batches: list, row: int) -> list[int]:
    """Row `row`'s stream: its windows' inputs, plus the last label (the stream's next token)."""
    return [t for b in batches for t in b.input_ids[row].tolist()] + [batches[-1].labels[row, -1].item()]


def whole_documents(stream: list[int]) -> collections.Counter:
    """Documents that start and end inside `stream`, which starts at a document boundary or not."""
    cuts = [i for i, t in enumerate(stream) if t == EOD]
    return collections.Counter(tuple(stream[a + 1:b + 1]) for a, b in zip(cuts, cuts[1:]))


def test_windows_are_consecutive_and_cover_every_document_once(prefixes):
    spec = DataSpec([prefixes["en"]], [1.0], "1,0,0")
    loader = TransformerXLStreamLoader(build_token_sources(spec)["train"], micro_batch_size=3, seq_len=64)
    batches = [next(loader) for _ in range(loader.windows_per_epoch)]
    for t, b in enumerate(batches):
        assert b.input_ids.shape == b.labels.shape == (3, 64) and b.input_ids.dtype == torch.long
        assert torch.equal(b.labels[:, :-1], b.input_ids[:, 1:])
        if t + 1 < len(batches):
            assert torch.equal(b.labels[:, -1], batches[t + 1].input_ids[:, 0])  # row continues
        assert b.reset_memory.tolist() == [t == 0] * 3
    # The rows' streams, one after the other, are one stream: each row's last label is the next
    # row's first token. Cut at EODs it gives back whole training documents, each exactly once.
    streams = [stream_of_rows(batches, r) for r in range(3)]
    for r in range(2):
        assert streams[r][-1] == streams[r + 1][0]
    full = streams[0] + [t for s in streams[1:] for t in s[1:]]
    found = whole_documents([EOD] + full)
    all_docs = documents(prefixes["en"])
    assert at_most(found, all_docs)
    # Only the tail of the epoch (under 3 * 64 + 1 tokens, plus one document cut there) is left out.
    size = lambda docs: sum(len(d) * n for d, n in docs.items())
    assert size(all_docs) - size(found) < 3 * 64 + 1 + max(map(len, all_docs))


def test_ranks_split_the_wider_batch_and_get_disjoint_data(prefixes):
    source = build_token_sources(DataSpec([prefixes["en"]], [1.0], "1,0,0"))["train"]
    wide = TransformerXLStreamLoader(source, micro_batch_size=4, seq_len=32, dp_size=1)
    ranks = [TransformerXLStreamLoader(source, micro_batch_size=2, seq_len=32, dp_rank=r, dp_size=2) for r in (0, 1)]
    assert wide.windows_per_epoch == ranks[0].windows_per_epoch == ranks[1].windows_per_epoch
    per_rank_docs = [collections.Counter(), collections.Counter()]
    for _ in range(wide.windows_per_epoch + 3):  # into the second epoch
        w, r0, r1 = next(wide), next(ranks[0]), next(ranks[1])
        assert torch.equal(w.input_ids, torch.cat([r0.input_ids, r1.input_ids]))
        assert torch.equal(w.labels, torch.cat([r0.labels, r1.labels]))
        assert torch.equal(w.reset_memory, torch.cat([r0.reset_memory, r1.reset_memory]))
    for r in (0, 1):
        loader = TransformerXLStreamLoader(source, micro_batch_size=2, seq_len=32, dp_rank=r, dp_size=2)
        batches = [next(loader) for _ in range(loader.windows_per_epoch)]
        for row in (0, 1):
            per_rank_docs[r] += whole_documents(stream_of_rows(batches, row))
    # Together the ranks hold each document no more often than the data does: disjoint.
    assert per_rank_docs[0] and per_rank_docs[1]
    assert at_most(per_rank_docs[0] + per_rank_docs[1], documents(prefixes["en"]))


def test_resume_reproduces_the_following_batches(prefixes):
    source = build_token_sources(DataSpec([prefixes["en"], prefixes["new"]], [4, 1], "1,0,0"))["train"]
    make = lambda: TransformerXLStreamLoader(source, micro_batch_size=4, seq_len=128, seed=7)
    straight = make()
    per_epoch = straight.windows_per_epoch
    steps = per_epoch + 6
    reference = [next(straight) for _ in range(steps)]
    assert [b.reset_memory.all().item() for b in reference] == [t % per_epoch == 0 for t in range(steps)]
    # The second epoch is reshuffled, not a replay.
    assert not torch.equal(reference[0].input_ids, reference[per_epoch].input_ids)
    for stop in (1, per_epoch - 1, per_epoch, per_epoch + 2):
        first = make()
        for _ in range(stop):
            next(first)
        state = json.loads(json.dumps(first.state_dict()))  # plain types only
        resumed = make()
        resumed.load_state_dict(state)
        for t in range(stop, steps):
            b = next(resumed)
            assert torch.equal(b.input_ids, reference[t].input_ids) and torch.equal(b.labels, reference[t].labels)
            assert torch.equal(b.reset_memory, reference[t].reset_memory)
    other = TransformerXLStreamLoader(source, micro_batch_size=2, seq_len=128, seed=7)
    with pytest.raises(ValueError, match="micro_batch_size is 4 in the checkpoint but 2 now"):
        other.load_state_dict(state)
    changed = TransformerXLStreamLoader(build_token_sources(DataSpec([prefixes["en"]], [1], "1,0,0"))["train"],
                                        micro_batch_size=4, seq_len=128, seed=7)
    with pytest.raises(ValueError, match="the data or the data spec changed"):
        changed.load_state_dict(state)


def test_blend_proportions_follow_token_weights(prefixes):
    """English : new language = 4 : 1 in tokens, although "new" has half of English's text."""
    spec = DataSpec([prefixes["en"], prefixes["new"]], [4, 1], "1,0,0")
    loader = TransformerXLStreamLoader(build_token_sources(spec)["train"], micro_batch_size=2, seq_len=256)
    batches = [next(loader) for _ in range(loader.windows_per_epoch)]
    en, new = documents(prefixes["en"]), documents(prefixes["new"])
    tokens = collections.Counter()
    for row in (0, 1):
        for doc, n in whole_documents(stream_of_rows(batches, row)).items():
            # A block found in both datasets cannot be attributed; one in neither is a bug.
            origin = "both" if doc in en and doc in new else "en" if doc in en else "new" if doc in new else "neither"
            tokens[origin] += len(doc) * n
    assert tokens["neither"] == 0 and tokens["both"] < 0.01 * sum(tokens.values())
    share = tokens["en"] / (tokens["en"] + tokens["new"])
    assert abs(share - 0.8) < 0.03, tokens


def test_validation_covers_held_out_documents_only(prefixes):
    spec = DataSpec([prefixes["en"], prefixes["new"]], [4, 1], "80,20,0")
    sources = build_token_sources(spec)
    assert sources["test"] is None
    held_out = collections.Counter()
    for prefix in prefixes.values():
        n = len(IndexedDataset(prefix))
        held_out += documents(prefix, round(0.8 * n), n)
    batches = list(validation_batches(sources["valid"], micro_batch_size=2, seq_len=64))
    assert batches and batches[0].reset_memory.all() and not any(b.reset_memory.any() for b in batches[1:])
    assert len(batches) == TransformerXLStreamLoader(sources["valid"], 2, 64).windows_per_epoch
    found = collections.Counter()
    for row in (0, 1):
        found += whole_documents(stream_of_rows(batches, row))
    # Held-out documents only, each at most once, nearly all of them in one pass.
    assert at_most(found, held_out) and found.total() > 0.8 * held_out.total()


@pytest.fixture
def one_process_group(tmp_path):
    # megatron-core's BlendedDataset asks for the rank: a trainer has a process group; so do we.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_yaml_spec_to_megatron_datasets(prefixes, tmp_path, one_process_group):
    spec_file = tmp_path / "data.yaml"
    spec_file.write_text(f"datasets:\n  - {{prefix: {prefixes['en']}, weight: 4}}\n"
                         f"  - {{prefix: {prefixes['new']}, weight: 1}}\nsplit: '90,10,0'\n")
    spec = load_data_spec(spec_file)
    assert (spec.vocab_size, spec.eod_id, spec.weights) == (50295, EOD, [4.0, 1.0])
    train, valid, test = build_megatron_datasets(spec, seq_len=64, num_samples=(2000, 100, 0), cache_dir=tmp_path / "c")
    assert test is None and len(train) >= 2000 and len(valid) >= 100
    # megatron-core blends samples (fixed-length, so tokens) 4 : 1.
    assert abs(np.mean(np.asarray(train.dataset_index[:2000]) == 0) - 0.8) < 0.01
    sample = train[0]
    assert sample["tokens"].shape == (64,) and torch.equal(sample["tokens"][1:], sample["labels"][:-1])
    # The held-out documents are the same for megatron-core and for the stream loader.
    ours = build_token_sources(spec)["valid"]
    for component, (mine, gpt) in enumerate(zip(ours.documents, valid.datasets)):
        assert np.array_equal(mine, gpt.indices), component


def test_spec_rejects_unfinished_or_mismatched_prefixes(prefixes, tmp_path):
    with pytest.raises(ValueError, match=f"prefix {tmp_path}/missing is missing .bin, .idx, .json"):
        DataSpec([prefixes["en"], str(tmp_path / "missing")], [1, 1])
    # The same documents tokenized by another tokenizer must not be blended in.
    meta = json.loads(open(prefixes["new"] + ".json").read())
    for ext in (".bin", ".idx"):
        (tmp_path / f"other{ext}").write_bytes(open(prefixes["new"] + ext, "rb").read())
    (tmp_path / "other.json").write_text(json.dumps({**meta, "vocab_size": 32000, "eod_id": 2, "tokenizer": "spm"}))
    with pytest.raises(ValueError, match="was tokenized with spm"):
        DataSpec([prefixes["en"], str(tmp_path / "other")], [1, 1])
    with pytest.raises(ValueError, match="need at least 2048001"):
        TransformerXLStreamLoader(build_token_sources(DataSpec([prefixes["new"]], [1], "1,0,0"))["train"],
                                  micro_batch_size=2, seq_len=1024, dp_size=1_000).windows_per_epoch


def test_spec_names_a_truncated_bin_or_idx_at_open(prefixes, tmp_path):
    """A .bin cut short (a full disk, an interrupted copy) or a damaged .idx is refused when the spec
    opens the prefix, naming the file, not in some later read during training."""
    for ext in (".bin", ".idx", ".json"):
        (tmp_path / f"cut{ext}").write_bytes(open(prefixes["new"] + ext, "rb").read())
    cut = str(tmp_path / "cut")
    DataSpec([cut], [1])  # the copy itself is whole
    bin_size = (tmp_path / "cut.bin").stat().st_size
    # The index says how long the .bin is: its tokens times the dtype's size.
    assert bin_size == int(IndexedDataset(cut).sequence_lengths.sum()) * 2
    with open(tmp_path / "cut.bin", "r+b") as f:
        f.truncate(bin_size - 2)
    with pytest.raises(ValueError, match=rf"{cut}\.bin: {bin_size - 2} bytes, but {cut}\.idx describes {bin_size} bytes"):
        DataSpec([prefixes["en"], cut], [1, 1])
    with open(tmp_path / "cut.bin", "ab") as f:
        f.write(b"\0\0\0\0")  # too long is as wrong as too short
    with pytest.raises(ValueError, match=rf"{cut}\.bin: {bin_size + 2} bytes"):
        DataSpec([cut], [1])
    (tmp_path / "cut.bin").write_bytes(open(prefixes["new"] + ".bin", "rb").read())
    idx = (tmp_path / "cut.idx").read_bytes()
    (tmp_path / "cut.idx").write_bytes(idx[:-8])
    with pytest.raises(ValueError, match=rf"{cut}\.idx: {len(idx) - 8} bytes, but its header describes"):
        DataSpec([cut], [1])
    (tmp_path / "cut.idx").write_bytes(idx[:20])
    with pytest.raises(ValueError, match=rf"{cut}\.idx: not a megatron-core index"):
        DataSpec([cut], [1])
