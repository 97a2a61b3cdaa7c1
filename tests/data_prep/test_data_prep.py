"""data_prep on real text (the Python standard library sources): every input format read back from
the .bin/.idx equals the documents tokenized by the `tokenizers` reference, multiprocess output is
byte-identical, corrupted input is skipped with file and line, and interrupted runs are redone."""

import gzip
import hashlib
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
    domains = ["Github" if i % 3 else "Wikipedia (en)" for i in range(len(texts))]
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
    # Output names are clean prefixes; the summary maps each domain as written in the data to its output.
    assert sorted(summary.outputs) == [str(tmp_path / "dom" / "pile_github"), str(tmp_path / "dom" / "pile_wikipedia_en")]
    assert summary.domains == {"Github": str(tmp_path / "dom" / "pile_github"),
                               "Wikipedia (en)": str(tmp_path / "dom" / "pile_wikipedia_en")}
    assert "'Wikipedia (en)' -> pile_wikipedia_en" in summary.line()
    for domain, name in (("Github", "github"), ("Wikipedia (en)", "wikipedia_en")):
        mine = [d for d, dom in zip(docs, domains) if dom == domain]
        assert read_back(tmp_path / "dom" / f"pile_{name}") == expected(reference, mine)
        assert json.loads((tmp_path / "dom" / f"pile_{name}.json").read_text())["domain"] == domain


def test_domains_that_clean_to_one_name_keep_separate_outputs(tmp_path):
    # "Books 3" and "books-3" both clean to books_3: the second gets its SHA-1 prefix appended;
    # a name of punctuation only is its SHA-1 prefix.
    names = ["Books 3", "books-3", "(?)"]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}", "meta": {"pile_set_name": d}}) + "\n"
                            for i, d in enumerate(names)))
    summary = prepare(PrepConfig(inputs=[path], output_prefix=tmp_path / "p", input_format="pile", split_by_domain=True))
    sha = {d: hashlib.sha1(d.encode()).hexdigest()[:8] for d in names}
    assert summary.domains == {"Books 3": str(tmp_path / "p_books_3"), "books-3": str(tmp_path / f"p_books_3_{sha['books-3']}"),
                               "(?)": str(tmp_path / f"p_{sha['(?)']}")}
    assert [len(IndexedDataset(p)) for p in summary.outputs] == [1, 1, 1]


@pytest.mark.parametrize("suffix", [".xz", ".zst", ".gz"])
def test_garbage_after_a_complete_stream_keeps_every_document(tmp_path, reference, texts, suffix):
    """Bytes appended after the last complete compressed stream (a botched concatenation, a
    download with trailing junk): every document before them is complete and kept, the last one
    included; the damage is one line of the skip log."""
    paragraphs = ["\n".join(line for line in t.split("\n")[:6] if line.strip()) for t in texts[:80]]
    paragraphs = [p for p in paragraphs if p]
    raw = ("\n\n".join(paragraphs)).encode()  # no newline after the last paragraph either
    compress = {".xz": lzma.compress, ".zst": zstandard.ZstdCompressor().compress, ".gz": gzip.compress}[suffix]
    path = tmp_path / f"cc.txt{suffix}"
    path.write_bytes(compress(raw) + b"\x00garbage after the stream" * 3)
    summary = prepare(PrepConfig(inputs=[path], output_prefix=tmp_path / "out"))
    assert read_back(tmp_path / "out") == expected(reference, paragraphs)
    assert summary.skipped == {"corrupt_input": 1}
    log = Path(summary.skip_log).read_text().splitlines()[1:]
    assert len(log) == 1 and log[0].split("\t")[:3] == [str(path), str(raw.count(b"\n") + 2), "corrupt_input"]
    assert "after a complete stream" in log[0]


def test_rerun_checks_output_sizes_and_checksums(tmp_path, caplog):
    """The summary records every output's size and SHA-256; a rerun after a .bin was truncated or
    altered redoes the job (naming the file) instead of reporting it finished."""
    files = [p for p in stdlib_sources(300_000) if p.stat().st_size > 0]
    prefix = tmp_path / "std"
    summary = prepare_text_files(files, prefix)
    outputs = [Path(f"{prefix}{ext}") for ext in (".bin", ".idx", ".json", ".skipped.tsv")]
    assert summary.files == {str(p): {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                             for p in outputs}
    saved = json.loads(Path(f"{prefix}.summary.json").read_text())["summary"]["files"]
    assert saved == summary.files
    good = Path(f"{prefix}.bin").read_bytes()
    assert prepare_text_files(files, prefix).reused

    os.truncate(f"{prefix}.bin", len(good) - 100)
    with caplog.at_level("WARNING", logger="data_prep"):
        again = prepare_text_files(files, prefix)
    assert not again.reused and Path(f"{prefix}.bin").read_bytes() == good
    assert f"{prefix}.bin has {len(good) - 100} bytes, the finished run wrote {len(good)}" in caplog.text

    caplog.clear()
    with open(f"{prefix}.bin", "r+b") as f:  # same size, one token changed
        f.seek(10)
        f.write(b"\x01\x02")
    with caplog.at_level("WARNING", logger="data_prep"):
        assert not prepare_text_files(files, prefix).reused
    assert f"{prefix}.bin changed since the finished run" in caplog.text
    assert Path(f"{prefix}.bin").read_bytes() == good


def test_empty_input_fails_naming_it_and_writes_no_dataset(tmp_path, capsys):
    """Empty files, whitespace only, or nothing but skipped documents: no dataset megatron-core can
    open exists for zero documents, so the job fails (exit 2) naming its inputs."""
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("\n\n  \n\t\n")
    (tmp_path / "bad.jsonl").write_text('{"no": "text"}\n{"text": "  "}\n')
    for name, detail in (("empty.txt", "(empty or only whitespace)"), ("blank.txt", "(empty or only whitespace)"),
                         ("bad.jsonl", "(skipped: 1 empty_document, 1 missing_field; listed in")):
        prefix = tmp_path / "out" / name.split(".")[0]
        assert data_prep_cli(["--input", str(tmp_path / name), "--output-prefix", str(prefix)]) == 2
        err = capsys.readouterr().err
        assert f"error: no documents in {tmp_path / name} {detail}" in err, err
        assert f"nothing written for {prefix}" in err
        for suffix in (".bin", ".idx", ".json", ".summary.json"):
            assert not Path(f"{prefix}{suffix}").exists(), suffix
    # The skip log stays: it says why nothing was read.
    assert "missing_field" in (tmp_path / "out" / "bad.skipped.tsv").read_text()


def test_summary_is_printed_once(tmp_path, capsys, caplog):
    (tmp_path / "a.txt").write_text("one paragraph\n\nanother one\n")
    cmd = ["--input", str(tmp_path / "a.txt"), "--output-prefix", str(tmp_path / "a")]
    for reused in (False, True):  # a fresh run, then a reused one
        caplog.clear()
        with caplog.at_level("INFO", logger="data_prep"):
            assert data_prep_cli(cmd) == 0
        out, err = capsys.readouterr()
        shown = out + err + caplog.text  # printed or logged
        assert shown.count("2 documents, ") == 1, shown
        assert ("reused finished run" in shown) == reused


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


def children(pid: int) -> list[int]:
    return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]


def alive(pid: int) -> bool:
    """Running and not a zombie (a dead child not yet reaped by anyone counts as dead)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


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
    workers = children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(proc.pid, signal.SIGKILL)  # the main process only, mid-write: its workers must follow
    proc.wait()
    try:
        deadline = time.monotonic() + 10
        while any(alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(w) for w in workers), "workers outlived their killed parent"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group, pass or fail
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
