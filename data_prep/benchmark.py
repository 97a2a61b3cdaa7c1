"""`python -m data_prep.benchmark`: tokenization throughput per worker and scaling with workers.

Corpus: the Python standard library sources (site-packages excluded), as a jsonl file. Measures
(1) one core tokenizing in a loop, per backend, and (2) whole `prepare` jobs (read, tokenize with
N processes, write .bin/.idx) for each worker count. Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from data_prep.pipeline import PrepConfig, prepare
from molm_megatron.data.corpus import stdlib_sources
from tokenizer.loading import load_tokenizer


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m data_prep.benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts for whole jobs")
    p.add_argument("--max-mb", type=float, default=None, help="use only the first MB of the corpus")
    args = p.parse_args(argv)

    files = stdlib_sources(int(args.max_mb * 1e6) if args.max_mb else None)
    texts = [t for t in (f.read_text(encoding="utf-8", errors="replace") for f in files) if t.strip()]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    rows = [f"corpus: {len(texts)} stdlib files, {mb:.1f} MB", "", "| measurement | MB/s | tokens/s |", "|---|---|---|"]
    for backend in ("tiktoken", "tokenizers"):
        tok = load_tokenizer("codegen", backend)
        start = time.perf_counter()
        tokens = sum(len(tok.encode(t)) for t in texts)
        seconds = time.perf_counter() - start
        rows.append(f"| tokenize only, 1 core, {backend} | {mb / seconds:.2f} | {tokens / seconds:,.0f} |")
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "stdlib.jsonl"
        corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
        for workers in args.workers:
            start = time.perf_counter()
            summary = prepare(PrepConfig(inputs=[corpus], output_prefix=Path(tmp) / f"w{workers}", workers=workers))
            seconds = time.perf_counter() - start
            rows.append(f"| prepare jsonl -> .bin/.idx, {workers} worker(s) (tiktoken) | {mb / seconds:.2f} | "
                        f"{summary.tokens / seconds:,.0f} |")
    rows.append(f"\n(cores available: {os.cpu_count()})")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
