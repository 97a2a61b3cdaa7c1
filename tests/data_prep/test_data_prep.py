"""data_prep on real text (the Python standard library sources): every input format read back from
the .bin/.idx equals the documents tokenized by the `tokenizers` reference, multiprocess output is
byte-identical, corrupted input is skipped with file and line, and interrupted runs are redone."""

import gzip
import json
import lzma
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from megatron.core.datasets.indexed_dataset import IndexedDataset

from data_prep import PrepConfig, prepare, prepare_text_files, stdlib_sources
from data_prep.__main__ import main as data_prep_cli
from tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def reference():
    """The `tokenizers` backend: independent of the tiktoken fast path data_prep uses."""
    return load_tokenizer("codegen", backend="tokenizers")


@pytest.fixture(scope="module")
def texts():
    return [p.read_text(encoding="utf-8") for p in stdlib_sources(1_200_000) if p.stat().st_size > 0]


def read_back(prefix) -> list[list[int]]:
    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))]


def expected(reference, docs) -> list[list[int]]:
    return [reference.encode(d) + [reference.eod_id] for d in docs]


def test_text_files_read_back_equal_tokenized_documents(tmp_path, reference):
    files = [p for p in stdlib_sources(1_200_000) if p.stat().st_size > 0]
    summary = prepare_text_files(files, tmp_path / "stdlib")
    docs = [p.read_text(encoding="utf-8") for p in files]
    assert read_back(tmp_path / "stdlib") == expected(reference, docs)
    assert summary.documents == len(docs) and summary.skipped == {}
    assert summary.tokens == sum(len(d) for d in expected(reference, docs))
    ds = IndexedDataset(str(tmp_path / "stdlib"))
    assert ds.index.dtype == np.uint16  # vocab 50295 fits
    meta = json.loads((tmp_path / "stdlib.json").read_text())
    assert (meta["vocab_size"], meta["eod_id"], meta["documents"]) == (50295, 50256, len(docs))


def write_inputs(folder: Path, texts: list[str]) -> dict:
    """The same documents in every input format; returns {name: (path, format, extra config)}."""
    domains = ["Github" if i % 3 else "Pile-CC" for i in range(len(texts))]
    pile_lines = "".join(json.dumps({"text": t, "meta": {"pile_set_name": d}}) + "\n" for t, d in zip(texts, domains))
    (folder / "pile.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(pile_lines.encode()))
    nested = "".join(json.dumps({"id": i, "body": {"content": t}}) + "\n" for i, t in enumerate(texts))
    (folder / "nested.jsonl.gz").write_bytes(gzip.compress(nested.encode()))
    pq.write_table(pa.table({"text": texts, "n": list(range(len(texts)))}), folder / "table.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts})}).save_to_disk(str(folder / "hfds"))
    # CC-100: paragraphs (the files' non-blank lines, 7 per document) separated by blank lines.
    lines = [line for t in texts for line in t.split("\n") if line.strip()]
    paragraphs = ["\n".join(lines[i:i + 7]) for i in range(0, len(lines), 7)]
    (folder / "cc.txt.xz").write_bytes(lzma.compress(("\n\n".join(paragraphs) + "\n").encode()))
    return {
        "pile": (folder / "pile.jsonl.zst", "pile", {}, texts, domains),
        "jsonl": (folder / "nested.jsonl.gz", "auto", {"text_field": "body.content"}, texts, None),
        "parquet": (folder / "table.parquet", "auto", {}, texts, None),
        "hf": (folder / "hfds", "auto", {}, texts, None),
        "cc100": (folder / "cc.txt.xz", "auto", {}, paragraphs, None),
    }


def test_every_format_and_domains(tmp_path, reference, texts):
    inputs = write_inputs(tmp_path, texts[:40])
    for name, (path, fmt, extra, docs, _) in inputs.items():
        prepare(PrepConfig(inputs=[path], output_prefix=tmp_path / "out" / name, input_format=fmt, **extra))
        assert read_back(tmp_path / "out" / name) == expected(reference, docs), name
    # One output prefix per Pile domain, documents in input order within each.
    path, _, _, docs, domains = inputs["pile"]
    summary = prepare(PrepConfig(inputs=[path], output_prefix=tmp_path / "dom" / "pile", input_format="pile",
                                 split_by_domain=True))
    assert sorted(summary.outputs) == [str(tmp_path / "dom" / "pile_Github"), str(tmp_path / "dom" / "pile_Pile-CC")]
    for domain in ("Github", "Pile-CC"):
        mine = [d for d, dom in zip(docs, domains) if dom == domain]
        assert read_back(tmp_path / "dom" / f"pile_{domain}") == expected(reference, mine)


def test_multiprocess_output_is_byte_identical(tmp_path, texts):
    lines = "".join(json.dumps({"text": t, "meta": {"pile_set_name": f"d{i % 2}"}}) + "\n" for i, t in enumerate(texts))
    path = tmp_path / "in.jsonl"
    path.write_text(lines, encoding="utf-8")
    outputs = {}
    for workers in (1, 2):
        # Small chunks: many tasks in flight, so any reordering would show.
        config = PrepConfig(inputs=[path], output_prefix=tmp_path / f"w{workers}" / "x", input_format="pile",
                            split_by_domain=True, workers=workers, chunk_bytes=20_000)
        summary = prepare(config)
        outputs[workers] = {Path(p).name + ext: Path(p + ext).read_bytes() for p in summary.outputs for ext in (".bin", ".idx")}
    assert outputs[1].keys() == {"x_d0.bin", "x_d0.idx", "x_d1.bin", "x_d1.idx"}
    assert outputs[1] == outputs[2]


def test_corrupted_inputs_are_skipped_with_file_and_line(tmp_path, reference, texts):
    good = texts[:6]
    lines = [
        json.dumps({"text": good[0]}).encode(),
        b'{"text": "unterminated',                                  # line 2: malformed JSON
        json.dumps({"body": good[1]}).encode(),                     # line 3: missing field
        json.dumps({"text": good[1]}).encode()[:-2] + b'\xff"}',    # line 4: invalid UTF-8
        json.dumps({"text": "  \n\t "}).encode(),                   # line 5: empty document
        b'{"text": "lone \\ud800 surrogate"}',                      # line 6: not encodable as UTF-8
        b"[1, 2, 3]",                                               # line 7: not an object
        json.dumps({"text": good[2]}).encode(),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join(lines) + b"\n")
    # Truncated .zst (the last frame cut in half) and truncated .xz: keep what came before.
    body = "".join(json.dumps({"text": t}) + "\n" for t in good[3:5]).encode()
    full = zstandard.ZstdCompressor().compress(json.dumps({"text": good[5]}).encode() + b"\n")
    cut = zstandard.ZstdCompressor().compress(body)
    (tmp_path / "cut.jsonl.zst").write_bytes(full + cut[: len(cut) // 2])
    # Two short paragraphs, then a long one that the cut (the last 40 compressed bytes) spoils.
    paragraphs = ["\n".join(line for line in t.split("\n") if line.strip()) for t in (good[1], good[2], good[0])]
    xz = lzma.compress(("\n\n".join(paragraphs) + "\n").encode())
    (tmp_path / "cut.txt.xz").write_bytes(xz[: len(xz) - 40])
    # A damaged .zst: a good frame, then bytes that are no zstd frame.
    (tmp_path / "corrupt.jsonl.zst").write_bytes(full + b"this is not a zstd frame" * 4)

    inputs = [bad, tmp_path / "cut.jsonl.zst", tmp_path / "cut.txt.xz", tmp_path / "corrupt.jsonl.zst"]
    summary = prepare(PrepConfig(inputs=inputs, output_prefix=tmp_path / "out" / "x"))
    assert summary.skipped == {"malformed_json": 2, "missing_field": 1, "invalid_utf8": 2, "empty_document": 1,
                               "truncated_input": 2, "corrupt_input": 1}
    log = [line.split("\t")[:3] for line in Path(summary.skip_log).read_text().splitlines()[1:]]
    assert log[:7] == [[str(bad), "2", "malformed_json"], [str(bad), "3", "missing_field"],
                       [str(bad), "4", "invalid_utf8"], [str(bad), "5", "empty_document"],
                       [str(bad), "6", "invalid_utf8"], [str(bad), "7", "malformed_json"],
                       [str(tmp_path / "cut.jsonl.zst"), "2", "truncated_input"]]
    assert log[7][0] == str(tmp_path / "cut.txt.xz") and log[7][2] == "truncated_input"
    assert log[8] == [str(tmp_path / "corrupt.jsonl.zst"), "2", "corrupt_input"]
    # Good documents survive, in order; the .xz document cut by the truncation is dropped.
    docs = read_back(tmp_path / "out" / "x")
    assert docs[:3] == expected(reference, [good[0], good[2], good[5]])
    assert docs[3:5] == expected(reference, paragraphs[:2])
    assert docs[5:] == expected(reference, [good[5]])


def test_unreadable_input_and_unwritable_output_are_clear_errors(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    assert data_prep_cli(["--input", str(missing), "--output-prefix", str(tmp_path / "o")]) == 2
    assert f"input {missing} does not exist" in capsys.readouterr().err
    (tmp_path / "a.jsonl").write_text('{"text": "hi"}\n')
    (tmp_path / "file").write_text("")
    with pytest.raises(PermissionError, match=f"cannot write output prefix {tmp_path}/file/o"):
        prepare(PrepConfig(inputs=[tmp_path / "a.jsonl"], output_prefix=tmp_path / "file" / "o"))
    with pytest.raises(ValueError, match="cannot tell the input format"):
        prepare(PrepConfig(inputs=[tmp_path / "file"], output_prefix=tmp_path / "o"))
    with pytest.raises(ValueError, match=r"no column 'body'; columns are \['text'"):
        pq.write_table(pa.table({"text": ["x"]}), tmp_path / "t.parquet")
        prepare(PrepConfig(inputs=[tmp_path / "t.parquet"], output_prefix=tmp_path / "o", text_field="body"))


def test_killed_run_leaves_nothing_finished_and_rerun_completes(tmp_path, texts):
    path = tmp_path / "big.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(12):  # about 14 MB: several seconds of work for 2 workers
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    prefix = tmp_path / "out" / "big"
    cmd = [sys.executable, "-m", "data_prep", "--input", str(path), "--output-prefix", str(prefix), "--workers", "2"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    tmp_bin = Path(f"{prefix}.bin.tmp")
    deadline = time.monotonic() + 60
    while not (tmp_bin.exists() and tmp_bin.stat().st_size > 1_000_000) and time.monotonic() < deadline:
        assert proc.poll() is None, "the run finished before it could be interrupted"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its workers, mid-write
    proc.wait()
    assert tmp_bin.exists()
    for suffix in (".bin", ".idx", ".json", ".summary.json"):
        assert not Path(f"{prefix}{suffix}").exists(), suffix

    summary = prepare(PrepConfig(inputs=[path], output_prefix=prefix, workers=2))
    assert summary.documents == 12 * len(texts) and not summary.reused
    assert not tmp_bin.exists()
    assert len(IndexedDataset(str(prefix))) == summary.documents
    assert prepare(PrepConfig(inputs=[path], output_prefix=prefix, workers=1)).reused
    # A changed input is not "finished": it is redone.
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "one more"}) + "\n")
    again = prepare(PrepConfig(inputs=[path], output_prefix=prefix))
    assert not again.reused and again.documents == summary.documents + 1
