"""`python -m tokenizer`: build CodeGen's tokenizer, train a new one, extend one for a new language."""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
from pathlib import Path
from typing import Iterator, Optional

from molm_megatron.data.corpus import FORMATS, Document, InputReader, check_readable
from tokenizer.codegen import VOCAB_SIZE, build_codegen_tokenizer
from tokenizer.training import KINDS, extend_bytelevel_bpe, train_tokenizer



def _texts(args: argparse.Namespace) -> Iterator[str]:
    """Document texts of the corpus, any format data_prep reads, up to --max-documents."""
    for path in args.input:
        check_readable(path)
    docs = (record.text
            for path in args.input
            for record in InputReader(path, args.input_format, args.text_field)
            if isinstance(record, Document))
    return itertools.islice(docs, args.max_documents)


def _add_corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True, type=Path, help="corpus files (any data_prep format)")
    p.add_argument("--format", dest="input_format", choices=FORMATS, default="auto",
                   help="input format, as for python -m data_prep (default: from the file name)")
    p.add_argument("--text-field", default="text", help="text field for jsonl/parquet/hf inputs")
    p.add_argument("--max-documents", type=int, default=None, help="use at most this many documents")


def _add_overwrite_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing tokenizer folder at --out (a folder holding anything else is "
                        "never replaced)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tokenizer", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build-codegen", help=f"write CodeGen's tokenizer (GPT-2 BPE + 38 whitespace tokens, "
                                             f"vocab {VOCAB_SIZE}) as a Hugging Face folder, offline")
    b.add_argument("--out", required=True, type=Path, help="output folder")
    _add_overwrite_arg(b)

    t = sub.add_parser("train", help="train a new tokenizer on a corpus (exact round trip)")
    _add_corpus_args(t)
    t.add_argument("--kind", choices=KINDS, default="sentencepiece-bpe",
                   help="sentencepiece-bpe / sentencepiece-unigram (folder with tokenizer.model) or "
                        "bytelevel-bpe (Hugging Face folder)")
    t.add_argument("--vocab-size", type=int, required=True, help="vocabulary size")
    t.add_argument("--out", required=True, type=Path, help="output folder")
    _add_overwrite_arg(t)

    e = sub.add_parser("extend", help="append BPE tokens learnt on a new language's corpus to a byte-level "
                                      "BPE tokenizer; existing ids unchanged, new ids from the old vocab size on")
    _add_corpus_args(e)
    e.add_argument("--base", default="codegen", help='base tokenizer folder, or "codegen" (default)')
    e.add_argument("--new-tokens", type=int, required=True, help="number of tokens to add (at most)")
    e.add_argument("--min-frequency", type=int, default=2, help="ignore pairs seen fewer times")
    e.add_argument("--out", required=True, type=Path, help="output folder")
    _add_overwrite_arg(e)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        if args.command == "build-codegen":
            out = build_codegen_tokenizer(args.out, args.overwrite)
            print(f"wrote {out} (vocab {VOCAB_SIZE}, bos = eos = 50256)")
        elif args.command == "train":
            out = train_tokenizer(_texts(args), args.kind, args.vocab_size, args.out, args.overwrite)
            print(f"wrote {out}")
        else:
            out, new = extend_bytelevel_bpe(args.base, _texts(args), args.new_tokens, args.out, args.min_frequency,
                                            args.overwrite)
            print(f"wrote {out}: {len(new)} new tokens, e.g. {new[:10]}")
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
