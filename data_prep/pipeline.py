"""Corpus -> tokens -> megatron-core indexed `.bin/.idx`, with N worker processes.

One job (`prepare`) reads its inputs in order, tokenizes documents in chunks of about
`chunk_bytes` of text on `workers` processes, appends the end-of-document id to every document and
writes one indexed dataset per output prefix (one per domain with `split_by_domain`) through
megatron-core's `IndexedDatasetBuilder`. Results are consumed in submission order, so the output
does not depend on the number of workers (byte for byte; tests/data_prep checks it).

Files of a finished job, for output prefix P:
- `P.bin`, `P.idx`: the indexed dataset (uint16 tokens when the vocabulary fits, else int32);
  with `split_by_domain`, `P_<domain>.bin/.idx` per domain instead, the domain's name cleaned
  ("Wikipedia (en)" -> `P_wikipedia_en`; the summary lists the mapping).
- `P.json` (per dataset prefix): documents, tokens, dtype, vocab size, end-of-document id, tokenizer.
- `P.skipped.tsv`: one line per skipped input: file, line, reason, detail.
- `P.summary.json`: the job's totals, settings, and the size and SHA-256 of every file above;
  written last, it marks the job finished.

Atomicity: everything is written under a `.tmp` name and renamed when complete. Before renaming,
the old `.idx` is removed, so at every instant a `.bin/.idx` pair with final names is complete and
consistent; the summary is removed when a job starts and written after every rename. A rerun skips
a job whose summary exists with the same settings and inputs and whose files still have their
recorded sizes and checksums, and redoes any other (saying which file differs). A job that finds
no document fails with an error naming its inputs (megatron-core cannot open an empty dataset).
Worker processes die with the job's process, even when it is killed with SIGKILL (Linux).
"""

from __future__ import annotations

import collections
import ctypes
import hashlib
import json
import logging
import os
import re
import signal
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from molm_megatron.data.corpus import FORMATS, Document, InputReader, Skipped, check_readable
from tokenizer.loading import CODEGEN, TextTokenizer, load_tokenizer

log = logging.getLogger("data_prep")

SUMMARY_SUFFIX = ".summary.json"


@dataclass
class PrepConfig:
    """One data-preparation job: inputs -> output prefix (or one prefix per domain)."""

    inputs: list[Path]
    """Input files (or saved Hugging Face dataset folders), read in this order."""
    output_prefix: Path
    """Output path prefix: writes <prefix>.bin/.idx (or <prefix>_<domain>.bin/.idx)."""
    tokenizer: str = "codegen"
    """Tokenizer folder, or "codegen" for the built-in CodeGen tokenizer."""
    backend: str = "auto"
    """Tokenizer backend: auto, tokenizers or tiktoken (CodeGen only)."""
    input_format: str = "auto"
    """One of molm_megatron.data.corpus.FORMATS."""
    text_field: str = "text"
    """Field with the document text (jsonl, parquet, hf); dotted paths reach nested objects."""
    domain_field: Optional[str] = None
    """Field with the document's domain; `pile` format defaults to meta.pile_set_name."""
    split_by_domain: bool = False
    """Write one output prefix per domain: <prefix>_<domain>."""
    hf_split: str = "train"
    """Split of a saved DatasetDict to read."""
    workers: int = 1
    """Tokenizer processes; 1 tokenizes in the main process."""
    chunk_bytes: int = 1 << 20
    """Text per task sent to a worker."""
    log_every_s: float = 10.0
    """Seconds between progress lines."""

    def __post_init__(self) -> None:
        self.inputs = [Path(p) for p in self.inputs]
        self.output_prefix = Path(self.output_prefix)
        if self.input_format not in FORMATS:
            raise ValueError(f"input_format must be one of {', '.join(FORMATS)}, got {self.input_format!r}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if not self.inputs:
            raise ValueError("no inputs given")
        if self.split_by_domain and not (self.domain_field or self.input_format == "pile"):
            raise ValueError("split_by_domain needs a domain field (domain_field, or input_format 'pile')")


@dataclass
class Summary:
    """What a job produced and skipped."""

    documents: int = 0
    tokens: int = 0
    text_bytes: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    """Skipped inputs per reason (molm_megatron.data.corpus.REASONS)."""
    outputs: list[str] = field(default_factory=list)
    """Dataset prefixes written."""
    domains: dict[str, str] = field(default_factory=dict)
    """With split_by_domain: each domain as it appears in the input -> its output prefix."""
    files: dict[str, dict] = field(default_factory=dict)
    """Every file the job wrote -> {"bytes": size, "sha256": hex digest}; a rerun checks them."""
    skip_log: str = ""
    seconds: float = 0.0
    reused: bool = False
    """True when a finished earlier run was found and nothing was redone."""

    def line(self) -> str:
        skipped = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items())) or "none"
        line = (f"{self.documents:,} documents, {self.tokens:,} tokens, {self.text_bytes / 1e6:,.1f} MB of text "
                f"in {self.seconds:.1f} s; skipped: {skipped}; outputs: {', '.join(self.outputs)}")
        if self.domains:
            line += "; domains: " + ", ".join(f"{d!r} -> {Path(p).name}" for d, p in sorted(self.domains.items()))
        if self.skipped:
            line += f"; skipped inputs are listed in {self.skip_log}"
        return line


def token_dtype(vocab_size: int) -> type[np.number]:
    """uint16 when every id fits, as megatron-core's GPTDatasetConfig expects (vocab <= 65536)."""
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def prepare(config: PrepConfig) -> Summary:
    """Run one job (see the module docstring); returns its summary."""
    prefix = config.output_prefix
    for path in config.inputs:
        check_readable(path)
    _check_writable(prefix)
    tok = load_tokenizer(config.tokenizer, config.backend)
    fingerprint = _fingerprint(config, tok)
    summary_path = Path(str(prefix) + SUMMARY_SUFFIX)
    finished = _finished(summary_path, fingerprint)
    if finished is not None:
        log.info("reused finished run (same settings, inputs and output files): %s", finished.line())
        return finished
    # From here on the old outputs no longer count as finished.
    summary_path.unlink(missing_ok=True)

    start = time.monotonic()
    dtype = token_dtype(tok.vocab_size)
    writers: dict[Optional[str], _Writer] = {}
    names = _DomainNames(prefix)
    summary = Summary(skip_log=str(prefix) + ".skipped.tsv")
    skip_log = _TempFile(Path(summary.skip_log))
    skip_log.handle.write("file\tline\treason\tdetail\n")
    readers = [InputReader(p, config.input_format, config.text_field, config.domain_field, config.hf_split)
               for p in config.inputs]
    progress = _Progress(readers, config.log_every_s)
    try:
        for domains, tokens, lengths in _tokenized_chunks(_documents(readers, skip_log, summary), config):
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            for i, domain in enumerate(domains):
                key = domain if config.split_by_domain else None
                if key not in writers:
                    writers[key] = _Writer(prefix if key is None else names.prefix(key), dtype)
                writers[key].add(tokens[offsets[i]:offsets[i + 1]])
            summary.documents += len(domains)
            summary.tokens += int(offsets[-1])
            progress.update(summary)
        summary.seconds = time.monotonic() - start
        if summary.documents == 0:
            # megatron-core cannot open an empty .bin (mmap of an empty file), so there is no valid
            # empty output: refuse, keeping the skip log that says why nothing was read.
            skip_log.finish()
            skipped = ", ".join(f"{n} {r}" for r, n in sorted(summary.skipped.items()))
            raise ValueError(f"no documents in {', '.join(str(p) for p in config.inputs)}"
                             + (f" (skipped: {skipped}; listed in {summary.skip_log})" if skipped else
                                " (empty or only whitespace)") + f"; nothing written for {prefix}")
        # tokenizer_path: where the tokenizer is, so an export of a model trained on this data can
        # carry it (molm_megatron.hf.convert).
        meta = {"vocab_size": tok.vocab_size, "eod_id": tok.eod_id, "tokenizer": tok.description,
                "tokenizer_path": config.tokenizer if config.tokenizer == CODEGEN else
                str(Path(config.tokenizer).resolve()),
                "dtype": np.dtype(dtype).name}
        for key, writer in sorted(writers.items(), key=lambda kv: str(kv[0])):
            summary.files.update(writer.finish({**meta, "domain": key}))
            summary.outputs.append(str(writer.prefix))
            if key is not None:
                summary.domains[key] = str(writer.prefix)
        skip_log.finish()
        summary.files[str(skip_log.path)] = _file_record(skip_log.path)
        _write_json_atomic(summary_path, {"fingerprint": fingerprint, "summary": asdict(summary)})
    finally:
        for writer in writers.values():
            writer.discard()
        skip_log.discard()
    log.info("done: %s", summary.line())
    return summary


def prepare_text_files(files: Iterable[str | Path], output_prefix: str | Path, tokenizer: str = "codegen",
                       workers: int = 1) -> Summary:
    """Quick start: each text file becomes one document of the dataset at `output_prefix`.

    Example: `prepare_text_files(stdlib_sources(4_000_000), "data/stdlib")` writes a few MB of
    Python sources as `data/stdlib.bin/.idx` in seconds.
    """
    return prepare(PrepConfig(inputs=list(files), output_prefix=Path(output_prefix), tokenizer=tokenizer,
                              input_format="text", workers=workers))


# --- reading and tokenizing ------------------------------------------------------------------


def _documents(readers: list[InputReader], skip_log: "_TempFile", summary: Summary) -> Iterable[Document]:
    for reader in readers:
        for record in reader:
            if isinstance(record, Skipped):
                summary.skipped[record.reason] = summary.skipped.get(record.reason, 0) + 1
                detail = re.sub(r"[\t\r\n]+", " ", record.detail)
                skip_log.handle.write(f"{record.source}\t{record.line}\t{record.reason}\t{detail}\n")
                continue
            summary.text_bytes += record.num_bytes
            yield record


_TOKENIZER: Optional[TextTokenizer] = None


def _init_tokenizer(name: str, backend: str) -> None:
    # Each worker loads its own tokenizer once; tokenizer objects are not sent per task.
    global _TOKENIZER
    _TOKENIZER = load_tokenizer(name, backend)


def _init_worker(name: str, backend: str, parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    _init_tokenizer(name, backend)


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this worker when its parent dies, however it dies (SIGKILL included,
    where the pool's own shutdown never runs and each idle worker would otherwise hold its tokenizer
    in memory for good). Linux's prctl(PR_SET_PDEATHSIG); elsewhere nothing is done.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("worker %d: prctl(PR_SET_PDEATHSIG) failed (errno %d); it may outlive its parent",
                    os.getpid(), ctypes.get_errno())
    # The parent may have died before the prctl call took effect: then we are an orphan already.
    if os.getppid() != parent_pid:
        os._exit(1)


def _tokenize(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Ids of every text followed by the end-of-document id, concatenated; and the lengths."""
    assert _TOKENIZER is not None
    eod = _TOKENIZER.eod_id
    ids: list[int] = []
    lengths = np.empty(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        doc = _TOKENIZER.encode(text)
        doc.append(eod)
        ids.extend(doc)
        lengths[i] = len(doc)
    return np.asarray(ids, dtype=np.int64), lengths


def _chunks(docs: Iterable[Document], chunk_bytes: int) -> Iterable[tuple[list[Optional[str]], list[str]]]:
    domains: list[Optional[str]] = []
    texts: list[str] = []
    size = 0
    for doc in docs:
        domains.append(doc.domain)
        texts.append(doc.text)
        size += doc.num_bytes
        if size >= chunk_bytes:
            yield domains, texts
            domains, texts, size = [], [], 0
    if texts:
        yield domains, texts


def _tokenized_chunks(docs: Iterable[Document], config: PrepConfig) -> Iterator[tuple[list, np.ndarray, np.ndarray]]:
    """(domains, tokens, lengths) per chunk, in input order, whatever the number of workers."""
    if config.workers == 1:
        _init_tokenizer(config.tokenizer, config.backend)
        for domains, texts in _chunks(docs, config.chunk_bytes):
            yield (domains, *_tokenize(texts))
        return
    # At most 2 tasks per worker in flight: workers stay busy while reading and memory stays
    # bounded (Pool.imap would read the whole input ahead).
    pending: collections.deque[tuple[list, Future]] = collections.deque()
    # The death signal fires when the thread that started a worker exits: the pool starts its
    # workers from this (the calling) thread, which lives as long as the job.
    with ProcessPoolExecutor(config.workers, initializer=_init_worker,
                             initargs=(config.tokenizer, config.backend, os.getpid())) as pool:
        for domains, texts in _chunks(docs, config.chunk_bytes):
            pending.append((domains, pool.submit(_tokenize, texts)))
            if len(pending) >= 2 * config.workers:
                domains_done, future = pending.popleft()
                yield (domains_done, *future.result())
        while pending:
            domains_done, future = pending.popleft()
            yield (domains_done, *future.result())


# --- writing ----------------------------------------------------------------------------------


class _DomainNames:
    """Output prefixes per domain: `<prefix>_<clean name>`, the name lower-case with every run of
    other characters than letters and digits made one `_` ("Wikipedia (en)" -> wikipedia_en,
    "Pile-CC" -> pile_cc, "PubMed Central" -> pubmed_central). Two domains that clean to the same
    name, or a name with nothing left, get the first 8 hex digits of the domain's SHA-1 appended,
    so no two domains ever share an output.
    """

    def __init__(self, prefix: Path) -> None:
        self.base = prefix
        self.names: dict[str, str] = {}

    def prefix(self, domain: str) -> Path:
        if domain not in self.names:
            name = re.sub(r"[^a-z0-9]+", "_", domain.lower()).strip("_")
            if not name or name in self.names.values():
                digest = hashlib.sha1(domain.encode("utf-8")).hexdigest()[:8]
                name = f"{name}_{digest}" if name else digest
            self.names[domain] = name
        return self.base.with_name(f"{self.base.name}_{self.names[domain]}")


class _TempFile:
    """A text file written as <path>.tmp and renamed to <path> by finish()."""

    def __init__(self, path: Path) -> None:
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        self.handle = open(self.tmp, "w", encoding="utf-8")

    def finish(self) -> None:
        self.handle.close()
        _fsync(self.tmp)
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.handle.close()
        self.tmp.unlink(missing_ok=True)


class _Writer:
    """One indexed dataset written through IndexedDatasetBuilder under temporary names."""

    def __init__(self, prefix: Path, dtype: type[np.number]) -> None:
        self.prefix = prefix
        self.tmp_bin = prefix.with_name(prefix.name + ".bin.tmp")
        self.tmp_idx = prefix.with_name(prefix.name + ".idx.tmp")
        # Imported here: megatron-core takes seconds to import, which `--help` and a reused job skip.
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.builder = IndexedDatasetBuilder(str(self.tmp_bin), dtype=dtype)
        self.dtype = dtype
        # The .bin is the documents' tokens back to back in `dtype`: hashed as they are added, so a
        # multi-GB file is not read back to checksum it.
        self.bin_hash = hashlib.sha256()
        self.bin_bytes = 0
        self.documents = 0
        self.tokens = 0
        self.finished = False

    def add(self, tokens: np.ndarray) -> None:
        # One sequence per document: the layout GPTDataset expects.
        self.builder.add_document(tokens, [len(tokens)])
        data = np.asarray(tokens, dtype=self.dtype).tobytes(order="C")
        self.bin_hash.update(data)
        self.bin_bytes += len(data)
        self.documents += 1
        self.tokens += len(tokens)

    def finish(self, meta: dict) -> dict[str, dict]:
        """Rename into place; returns the records ({path: {bytes, sha256}}) of the files written."""
        self.builder.finalize(str(self.tmp_idx))
        _fsync(self.tmp_bin)
        _fsync(self.tmp_idx)
        assert self.tmp_bin.stat().st_size == self.bin_bytes, "the .bin is not the tokens hashed"
        final_bin, final_idx = Path(f"{self.prefix}.bin"), Path(f"{self.prefix}.idx")
        # Remove the old index first: a new .bin beside an old .idx must never be visible.
        final_idx.unlink(missing_ok=True)
        os.replace(self.tmp_bin, final_bin)
        os.replace(self.tmp_idx, final_idx)
        final_json = Path(f"{self.prefix}.json")
        _write_json_atomic(final_json, {**meta, "documents": self.documents, "tokens": self.tokens})
        self.finished = True
        return {str(final_bin): {"bytes": self.bin_bytes, "sha256": self.bin_hash.hexdigest()},
                str(final_idx): _file_record(final_idx), str(final_json): _file_record(final_json)}

    def discard(self) -> None:
        if not self.finished:
            self.builder.data_file.close()
            self.tmp_bin.unlink(missing_ok=True)
            self.tmp_idx.unlink(missing_ok=True)


def _file_record(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    _fsync(tmp)
    os.replace(tmp, path)


def _check_writable(prefix: Path) -> None:
    folder = prefix.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".{prefix.name}.write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"cannot write output prefix {prefix}: {err.strerror} ({folder})") from err


def _fingerprint(config: PrepConfig, tok: TextTokenizer) -> dict:
    """What a finished job must match to be reused: inputs (size, mtime) and settings."""
    inputs = []
    for path in config.inputs:
        stat = path.stat()
        inputs.append([str(path), stat.st_size, stat.st_mtime_ns])
    settings = {k: v for k, v in asdict(config).items() if k not in ("inputs", "output_prefix", "workers", "log_every_s")}
    # The worker count and chunking do not change the output (byte-identical), so they are left out.
    settings.pop("chunk_bytes")
    return {"inputs": inputs, "settings": json.loads(json.dumps(settings, default=str)),
            "tokenizer": [tok.description, tok.vocab_size, tok.eod_id]}


def _finished(summary_path: Path, fingerprint: dict) -> Optional[Summary]:
    if not summary_path.is_file():
        return None
    saved = json.loads(summary_path.read_text(encoding="utf-8"))
    if saved.get("fingerprint") != fingerprint:
        log.info("%s: settings or inputs changed since the finished run; redoing it", summary_path)
        return None
    summary = Summary(**saved["summary"])
    if not summary.files:
        log.info("%s records no output sizes and checksums (an older version wrote it); redoing the job",
                 summary_path)
        return None
    for name, record in sorted(summary.files.items()):
        path = Path(name)
        if not path.is_file():
            log.warning("%s is missing since the finished run; redoing the job", path)
            return None
        size = path.stat().st_size
        if size != record["bytes"]:
            log.warning("%s has %d bytes, the finished run wrote %d; redoing the job", path, size, record["bytes"])
            return None
        if _sha256(path) != record["sha256"]:
            log.warning("%s changed since the finished run (SHA-256 differs); redoing the job", path)
            return None
    summary.reused = True
    return summary


class _Progress:
    """A log line every `every_s` seconds: documents/s, MB/s of text, share of input read, ETA."""

    def __init__(self, readers: list[InputReader], every_s: float) -> None:
        self.readers = readers
        self.total = sum(r.total_bytes for r in readers) or 1
        self.every_s = every_s
        self.start = self.last = time.monotonic()

    def update(self, summary: Summary) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s:
            return
        self.last = now
        elapsed = now - self.start
        done = sum(r.bytes_read for r in self.readers) / self.total
        eta = elapsed * (1 - done) / done if done > 0 else float("nan")
        log.info("%d docs (%.0f docs/s), %.1f MB (%.2f MB/s), %.1f%% of input, ETA %s",
                 summary.documents, summary.documents / elapsed, summary.text_bytes / 1e6,
                 summary.text_bytes / 1e6 / elapsed, 100 * done, _hms(eta))


def _hms(seconds: float) -> str:
    if seconds != seconds:  # NaN: nothing read yet
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
