"""Corpus readers: corpus files -> documents, and a record of everything skipped and why.

Both `data_prep` (tokenizing into indexed datasets) and `tokenizer` (training on a corpus) read
their inputs through this module, so the two packages need not import each other.

Formats (`FORMATS`):
- `pile`: JSON lines, text in `text`, domain in `meta.pile_set_name` (the Pile, Gao et al., 2020).
- `jsonl`: JSON lines with a chosen text field (a dotted path such as `meta.body` reaches nested
  objects) and optionally a domain field.
- `cc100`: plain text, one paragraph per line, documents separated by blank lines (CC-100,
  Conneau et al., 2020; Wenzek et al., 2020).
- `text`: a whole file is one document (source trees, books).
- `parquet`: a local Parquet file with a text column.
- `hf`: a Hugging Face dataset saved with `save_to_disk` (a `Dataset` or one split of a
  `DatasetDict`).
The line formats read `.zst`, `.xz` and `.gz` files as well as plain ones. `auto` picks the format
from the name: a folder is `hf`, `*.parquet` is `parquet`, `*.jsonl`/`*.json` is `jsonl`, `*.txt`
is `cc100` (compression suffixes aside).

Bad input does not stop a run: every skipped document is a `Skipped` record naming the file, the
line (row for Parquet/HF, 1-based) and one of `REASONS`. A file that ends inside a compressed frame
(`truncated_input`) or whose compressed data is damaged (`corrupt_input`) yields what came before
the damage and a `Skipped` for the rest.
"""

from __future__ import annotations

import json
import lzma
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import zstandard

FORMATS = ("auto", "pile", "jsonl", "cc100", "text", "parquet", "hf")
REASONS = ("malformed_json", "missing_field", "invalid_utf8", "empty_document", "truncated_input", "corrupt_input")
PILE_DOMAIN_FIELD = "meta.pile_set_name"
_COMPRESSED = (".zst", ".xz", ".gz")
_CHUNK = 1 << 20


@dataclass
class Document:
    """One document to tokenize."""

    text: str
    num_bytes: int
    """UTF-8 size of `text` (for MB/s)."""
    source: str
    line: int
    """1-based line (row for Parquet/HF) where the document starts."""
    domain: Optional[str] = None


@dataclass
class Skipped:
    """Input that was not turned into a document."""

    source: str
    line: int
    reason: str
    """One of REASONS."""
    detail: str


Record = Document | Skipped


class InputDamaged(Exception):
    """A compressed stream ended early or is corrupt; carries the REASONS entry.

    `after_complete_stream`: the damage starts right after the end of a complete compressed
    stream (garbage appended to a finished `.xz`/`.zst`/`.gz`), so everything decompressed before it
    is whole, its last line and last document included.
    """

    def __init__(self, reason: str, detail: str, after_complete_stream: bool = False) -> None:
        super().__init__(detail)
        self.reason = reason
        self.after_complete_stream = after_complete_stream
        self.line = 0


class InputReader:
    """Iterates the records of one input file; `bytes_read` / `total_bytes` give progress."""

    def __init__(self, path: str | Path, input_format: str = "auto", text_field: str = "text",
                 domain_field: Optional[str] = None, hf_split: str = "train") -> None:
        self.path = Path(path)
        self.format = resolve_format(self.path, input_format)
        self.text_field = text_field
        # `pile` implies its domain field; others read a domain only when asked to.
        self.domain_field = domain_field or (PILE_DOMAIN_FIELD if input_format == "pile" else None)
        self.hf_split = hf_split
        self.total_bytes = _size(self.path)
        self.bytes_read = 0

    def __iter__(self) -> Iterator[Record]:
        read: Callable[[], Iterator[Record]] = {
            "jsonl": self._read_jsonl,
            "cc100": self._read_cc100,
            "text": self._read_text,
            "parquet": self._read_parquet,
            "hf": self._read_hf,
        }[self.format]
        return read()

    # --- byte streams -------------------------------------------------------------------

    def _chunks(self) -> Iterator[bytes]:
        """Decompressed bytes of the file; raises InputDamaged at a truncated or corrupt frame."""
        make = {
            ".zst": lambda: zstandard.ZstdDecompressor().decompressobj(),
            ".xz": lzma.LZMADecompressor,
            # wbits 16 + 15: gzip container.
            ".gz": lambda: zlib.decompressobj(16 + zlib.MAX_WBITS),
        }.get(self.path.suffix)
        with open(self.path, "rb") as raw:
            if make is None:
                while chunk := raw.read(_CHUNK):
                    self.bytes_read += len(chunk)
                    yield chunk
                return
            decomp, fed = make(), False
            while chunk := raw.read(_CHUNK):
                self.bytes_read += len(chunk)
                while chunk:
                    try:
                        out = decomp.decompress(chunk)
                    except (zstandard.ZstdError, lzma.LZMAError, zlib.error, EOFError) as err:
                        # `fed` is False while a fresh decompressor has accepted nothing yet: the
                        # bad bytes follow a stream that ended cleanly (or start the file).
                        raise InputDamaged("corrupt_input", f"{type(err).__name__}: {err}",
                                           after_complete_stream=not fed) from err
                    fed = True
                    if out:
                        yield out
                    # Concatenated frames/streams (pigz, pzstd, xz -T): start a new decompressor
                    # on whatever follows the end of the current one.
                    chunk = decomp.unused_data if decomp.eof else b""
                    if decomp.eof:
                        decomp, fed = make(), False
            if fed:
                raise InputDamaged("truncated_input", f"file ends inside a {self.path.suffix} frame")

    def _lines(self) -> Iterator[tuple[int, bytes]]:
        """(1-based line number, line without its newline); InputDamaged carries the line reached."""
        lineno, rest = 0, b""
        try:
            for chunk in self._chunks():
                lines = (rest + chunk).split(b"\n")
                rest = lines.pop()
                for line in lines:
                    lineno += 1
                    yield lineno, line
        except InputDamaged as err:
            if err.after_complete_stream and rest:
                # The stream before the damage is whole: its last line is complete without a newline.
                lineno += 1
                yield lineno, rest
            # Otherwise the partial line before the damage is dropped with the rest of the file.
            err.line = lineno + 1
            raise
        if rest:
            yield lineno + 1, rest

    def _damaged(self, err: InputDamaged) -> Skipped:
        where = "after a complete stream" if err.after_complete_stream else "inside a stream"
        return Skipped(str(self.path), err.line, err.reason, f"{err} ({where}); the rest of the file is skipped")

    # --- formats ------------------------------------------------------------------------

    def _read_jsonl(self) -> Iterator[Record]:
        source = str(self.path)
        try:
            for lineno, raw in self._lines():
                if not raw.strip():
                    continue  # blank lines hold no document
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as err:
                    yield Skipped(source, lineno, "invalid_utf8", f"byte {err.start} of the line")
                    continue
                except json.JSONDecodeError as err:
                    yield Skipped(source, lineno, "malformed_json", str(err))
                    continue
                yield self._from_fields(obj, source, lineno)
        except InputDamaged as err:
            yield self._damaged(err)

    def _from_fields(self, obj: Any, source: str, lineno: int) -> Record:
        """A Document from a JSON object / table row, or why not."""
        if not isinstance(obj, dict):
            return Skipped(source, lineno, "malformed_json", f"expected a JSON object, got {type(obj).__name__}")
        text = _field(obj, self.text_field)
        if not isinstance(text, str):
            return Skipped(source, lineno, "missing_field", f"no string field {self.text_field!r}")
        domain = None
        if self.domain_field:
            domain = _field(obj, self.domain_field)
            if not isinstance(domain, str):
                return Skipped(source, lineno, "missing_field", f"no string field {self.domain_field!r}")
        return _document(text, source, lineno, domain)

    def _read_cc100(self) -> Iterator[Record]:
        source = str(self.path)
        lines: list[str] = []
        start, bad = 0, None
        try:
            for lineno, raw in self._lines():
                if not raw.strip():
                    if bad is not None:
                        yield bad
                    elif lines:
                        yield _document("\n".join(lines), source, start, None)
                    lines, bad = [], None
                    continue
                if not lines and bad is None:
                    start = lineno
                try:
                    lines.append(raw.decode("utf-8"))
                except UnicodeDecodeError as err:
                    # One bad line spoils its document: skip the whole document, report the line.
                    bad = bad or Skipped(source, lineno, "invalid_utf8", f"byte {err.start} of the line; document from line {start} skipped")
                    lines.append("")
        except InputDamaged as err:
            # The document being read when the damage hit is dropped with the rest, unless the damage
            # follows a complete stream: then that document is complete too.
            if err.after_complete_stream:
                if bad is not None:
                    yield bad
                elif lines:
                    yield _document("\n".join(lines), source, start, None)
            yield self._damaged(err)
            return
        if bad is not None:
            yield bad
        elif lines:
            yield _document("\n".join(lines), source, start, None)

    def _read_text(self) -> Iterator[Record]:
        source = str(self.path)
        parts: list[bytes] = []
        try:
            for chunk in self._chunks():
                parts.append(chunk)
        except InputDamaged as err:
            err.line = sum(p.count(b"\n") for p in parts) + 1
            if not err.after_complete_stream:
                yield self._damaged(err)
                return
            # The whole compressed stream was read before the damage: it is the document.
            damage = self._damaged(err)
        else:
            damage = None
        data = b"".join(parts)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            line = data.count(b"\n", 0, err.start) + 1
            yield Skipped(source, line, "invalid_utf8", f"byte {err.start} of the file")
        else:
            yield _document(text, source, 1, None)
        if damage is not None:
            yield damage

    def _read_table(self, columns: list[str], num_rows: int, batches: Iterator[dict[str, list]]) -> Iterator[Record]:
        source = str(self.path)
        row = 0
        for batch in batches:
            for values in zip(*(batch[c] for c in columns)):
                row += 1
                yield self._from_fields(dict(zip(columns, values)), source, row)
            self.bytes_read = self.total_bytes * row // max(num_rows, 1)

    def _columns(self, available: list[str]) -> list[str]:
        wanted = [f for f in (self.text_field, self.domain_field) if f]
        missing = [f for f in wanted if f not in available]
        if missing:
            # A whole column missing is not a bad row: it is the wrong field name for this file.
            raise ValueError(f"{self.path}: no column {missing[0]!r}; columns are {available}")
        return wanted

    def _read_parquet(self) -> Iterator[Record]:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(self.path)
        columns = self._columns(pf.schema_arrow.names)
        batches = (b.to_pydict() for b in pf.iter_batches(batch_size=1024, columns=columns))
        return self._read_table(columns, pf.metadata.num_rows, batches)

    def _read_hf(self) -> Iterator[Record]:
        import datasets

        ds = datasets.load_from_disk(str(self.path))
        if isinstance(ds, datasets.DatasetDict):
            if self.hf_split not in ds:
                raise ValueError(f"{self.path}: no split {self.hf_split!r}; splits are {list(ds)}")
            ds = ds[self.hf_split]
        columns = self._columns(ds.column_names)
        return self._read_table(columns, len(ds), ds.select_columns(columns).iter(batch_size=1024))


def resolve_format(path: Path, input_format: str) -> str:
    """The reader for `path`: `input_format` itself, or guessed from the name when "auto"."""
    if input_format not in FORMATS:
        raise ValueError(f"input format must be one of {', '.join(FORMATS)}, got {input_format!r}")
    if input_format == "pile":
        return "jsonl"
    if input_format != "auto":
        return input_format
    if path.is_dir():
        return "hf"
    name = path.name[: -len(path.suffix)] if path.suffix in _COMPRESSED else path.name
    for suffix, fmt in ((".parquet", "parquet"), (".jsonl", "jsonl"), (".json", "jsonl"), (".txt", "cc100")):
        if name.endswith(suffix):
            return fmt
    raise ValueError(f"{path}: cannot tell the input format from the name; pass --format (one of {', '.join(FORMATS[1:])})")


def check_readable(path: Path) -> None:
    """Raise a clear error for an input that cannot be read at all (nothing to skip there)."""
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist")
    try:
        if path.is_dir():
            os.listdir(path)
        else:
            open(path, "rb").close()
    except OSError as err:
        raise PermissionError(f"input {path} cannot be read: {err.strerror}") from err


def stdlib_sources(max_bytes: Optional[int] = None) -> list[Path]:
    """The Python standard library's `.py` files (site-packages excluded) in sorted order; with
    `max_bytes`, the leading ones that fit in it. Real text present on every machine.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)
    if max_bytes is None:
        return files
    chosen, total = [], 0
    for path in files:
        size = path.stat().st_size
        if total + size > max_bytes:
            break
        chosen.append(path)
        total += size
    return chosen


def _document(text: str, source: str, line: int, domain: Optional[str]) -> Record:
    if not text.strip():
        return Skipped(source, line, "empty_document", "no text besides whitespace")
    try:
        num_bytes = len(text.encode("utf-8"))
    except UnicodeEncodeError as err:
        # JSON may escape lone surrogates (\ud800), which are no valid UTF-8 text.
        return Skipped(source, line, "invalid_utf8", f"lone surrogate at character {err.start}")
    return Document(text, num_bytes, source, line, domain)


def _field(obj: dict, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size
