"""`python -m data_prep`: corpus files -> megatron-core indexed datasets (see data_prep.pipeline)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import logging
import sys
from pathlib import Path

from data_prep.pipeline import PrepConfig, prepare
from molm_megatron.data.corpus import FORMATS

EPILOG = """\
examples:
  # the Pile, one dataset per domain (Pile set name), 8 tokenizer processes
  python -m data_prep --format pile --input pile/00.jsonl.zst --output-prefix data/pile00 --split-by-domain --workers 8
  # CC-100 German, one output per input file under data/cc100/
  python -m data_prep --input de.txt.xz --output-dir data/cc100 --workers 8
  # any jsonl with the text in field "content"
  python -m data_prep --format jsonl --text-field content --input code.jsonl --output-prefix data/code

Skipped inputs (malformed JSON, missing field, invalid UTF-8, empty document, truncated or corrupt
.zst/.xz/.gz) are counted and listed with file and line in <prefix>.skipped.tsv. A rerun skips jobs
whose <prefix>.summary.json exists with the same settings and inputs and whose outputs still have
the sizes and SHA-256 it records. With --split-by-domain each domain's output is <prefix>_<name>,
the name lower-case with other characters made "_" ("Wikipedia (en)" -> <prefix>_wikipedia_en).
A job that finds no document at all fails (exit 2) naming its inputs.
"""


def _field_help(cls: type) -> dict[str, str]:
    """Each dataclass field's docstring (the string right under it), used as its --help text."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _parser() -> argparse.ArgumentParser:
    docs = _field_help(PrepConfig)
    defaults = {f.name: f.default for f in dataclasses.fields(PrepConfig)}
    p = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="Tokenize corpora (Pile jsonl/.zst, CC-100 text/.xz, jsonl, Parquet, saved HF datasets) "
                    "into megatron-core indexed .bin/.idx datasets, appending the end-of-document token.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, type=Path, help=docs["inputs"])
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--output-prefix", type=Path, help=docs["output_prefix"] + " One job for all inputs.")
    out.add_argument("--output-dir", type=Path,
                     help="One job per input file, prefix <dir>/<input name without extensions>.")
    p.add_argument("--format", dest="input_format", choices=FORMATS, default=defaults["input_format"], help=docs["input_format"])
    for name in ("tokenizer", "backend", "text_field", "domain_field", "hf_split"):
        p.add_argument("--" + name.replace("_", "-"), default=defaults[name], help=docs[name])
    p.add_argument("--split-by-domain", action="store_true", help=docs["split_by_domain"])
    p.add_argument("--workers", type=int, default=defaults["workers"], help=docs["workers"])
    p.add_argument("--log-every", dest="log_every_s", type=float, default=defaults["log_every_s"], help=docs["log_every_s"])
    return p


def _stem(path: Path) -> str:
    # "00.jsonl.zst" -> "00", "de.txt.xz" -> "de", a dataset folder keeps its name.
    return path.name.split(".")[0] if not path.is_dir() else path.name


def main(argv: list[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    inputs, output_dir, output_prefix = args.pop("input"), args.pop("output_dir"), args.pop("output_prefix")
    jobs = [(inputs, output_prefix)] if output_prefix else [([p], output_dir / _stem(p)) for p in inputs]
    try:
        # Each job logs its summary once (prepare's last line), reused or not.
        for i, o in jobs:
            prepare(PrepConfig(inputs=i, output_prefix=o, **args))
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
