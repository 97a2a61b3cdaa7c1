"""Real text of this machine for the experiments, in three domains, tokenized by the product.

    python -m experiments.data --out build/experiments_data --scale gpu

Domains (every source is text that a Debian machine with Python has offline):
- `code`: the Python standard library's sources (`data_prep.stdlib_sources`);
- `prose`: the Python documentation's reStructuredText sources (Debian's `python3.X-doc` package,
  `--python-docs`); without them, the docstrings of the standard library (English prose too);
- `german` (`--language de`): manual pages in that language (troff markup removed) and the
  translations (msgstr) of the installed gettext catalogues.

Each domain's documents are ordered by a hash of their names; every 20th goes to the held-out set
(up to the scale's held-out bytes), the rest to training (up to the scale's training bytes). A
byte-level BPE tokenizer is trained by `python -m tokenizer train` on the English and code training
text only, so that German is a new language to it as it is to the pretrained models of the
continual-learning experiment; `python -m data_prep` then writes the indexed datasets:

    OUT/train_<domain>.bin/.idx    training documents (data_prep --split-by-domain)
    OUT/heldout_<domain>.bin/.idx  held-out documents (expert statistics read these)
    OUT/heldout_<domain>.txt       the same held-out documents as text (perplexity reads these)
    OUT/tokenizer/                 the tokenizer (a Hugging Face folder)
    OUT/manifest.json              sources, sizes, token counts, vocabulary size
"""

from __future__ import annotations

import argparse
import ast
import gettext
import gzip
import hashlib
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from experiments.common import REPO, product_env

DOMAINS = ("code", "prose", "german")
HELDOUT_EVERY = 20  # one source document in 20 is held out
# Documents are cut into pieces of at most this many characters (at blank lines, else at line ends) so
# that a few percent of a domain's documents (pretrain.py's validation split) is never a few tiny files.
CHUNK_CHARS = 8000


@dataclass(frozen=True)
class DataScale:
    train_bytes: int  # per domain
    heldout_bytes: int  # per domain
    vocab_size: int


DATA_SCALES = {
    # CI: enough for a few steps and one validation window per domain.
    "smoke": DataScale(train_bytes=120_000, heldout_bytes=30_000, vocab_size=1024),
    "cpu": DataScale(train_bytes=1_500_000, heldout_bytes=100_000, vocab_size=8192),
    # About 3.5M tokens in all (7 MB of uint16 tokens): small enough to carry to the GPU machine.
    "gpu": DataScale(train_bytes=4_000_000, heldout_bytes=150_000, vocab_size=8192),
}


def default_python_docs() -> Path:
    """Where Debian's python3.X-doc package puts the documentation's reStructuredText sources."""
    return Path(f"/usr/share/doc/python{sys.version_info.major}.{sys.version_info.minor}/html/_sources")


# ---- the sources: document name -> a function that reads its text ("" when it has none) ---------------

Sources = dict[str, Callable[[], str]]


def read_text(path: Path) -> Callable[[], str]:
    return lambda: path.read_text(encoding="utf-8", errors="replace")


def code_documents() -> Sources:
    """Each standard-library source file is one document."""
    from data_prep import stdlib_sources

    return {str(p): read_text(p) for p in stdlib_sources()}


def python_docs_documents(folder: Path) -> Sources:
    """Each .rst.txt page of the Python documentation is one document."""
    return {str(p): read_text(p) for p in sorted(folder.rglob("*.rst.txt"))}


def docstrings(path: Path) -> str:
    """The module, class and function docstrings of a source file (five words or more), blank-line separated."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""  # a few test files are invalid on purpose
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    return "\n\n".join(s for s in (ast.get_docstring(n) for n in nodes) if s and len(s.split()) >= 5)


def docstring_documents() -> Sources:
    """The docstrings of each standard-library file, as one document."""
    from data_prep import stdlib_sources

    return {f"{p}:docstrings": (lambda p=p: docstrings(p)) for p in stdlib_sources()}


# troff: named characters (\(xx or \[xx]), the escapes that carry no text (fonts, sizes, strings,
# spacing), and the macros whose arguments are running text.
TROFF_NAMED = {":a": "ä", ":o": "ö", ":u": "ü", ":A": "Ä", ":O": "Ö", ":U": "Ü", "ss": "ß", "Fo": "«",
               "Fc": "»", "aq": "'", "dq": '"', "oq": "‘", "cq": "’", "lq": "“", "rq": "”", "em": "—", "en": "–",
               "hy": "-", "mi": "-", "pl": "+", "eq": "=", "bu": "•", "co": "©", "ga": "`", "ti": "~", "ha": "^",
               "rs": "\\", "'e": "é", "`e": "è", "'a": "á", "`a": "à", "^e": "ê", ",c": "ç", "->": "→", "<-": "←",
               "mu": "×"}
TROFF_NAMED_RE = re.compile(r"\\\((..)|\\\[([^]\s]*)\]")
TROFF_DROP = re.compile(r"\\f(\(..|\[[^]]*\]|.)|\\\*(\(..|\[[^]]*\]|.)|\\s[-+]?\d+|\\[kz].|\\[|&^:%]")
TROFF_SIMPLE = {"\\-": "-", "\\e": "\\", "\\ ": " ", "\\~": " ", "\\.": "."}
TROFF_TEXT_MACROS = {"SH", "SS", "B", "I", "SM", "SB"}  # arguments joined by spaces
TROFF_ALTERNATING_MACROS = {"BR", "IR", "RB", "BI", "IB", "RI"}  # fonts alternate, arguments joined as they are
TROFF_ARG = re.compile(r'"([^"]*)"|(\S+)')


def troff_to_text(source: str) -> str:
    """The running text of a manual page: comments and layout requests dropped, the arguments of
    the heading and font macros kept, escapes resolved or removed."""
    lines = []
    for line in source.splitlines():
        if line.startswith((".\\\"", "'\\\"")):
            continue
        if line.startswith((".", "'")):
            macro, _, args = line[1:].strip().partition(" ")
            if macro not in TROFF_TEXT_MACROS | TROFF_ALTERNATING_MACROS:
                if macro in ("PP", "P", "LP", "TP", "IP", "sp", "br"):
                    lines.append("")
                continue
            words = [quoted or plain for quoted, plain in TROFF_ARG.findall(args)]
            line = ("" if macro in TROFF_ALTERNATING_MACROS else " ").join(words)
        line = TROFF_NAMED_RE.sub(lambda m: TROFF_NAMED.get(m.group(1) or m.group(2), ""), line)
        line = TROFF_DROP.sub("", line)
        for escape, char in TROFF_SIMPLE.items():
            line = line.replace(escape, char)
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def manual_page(path: Path) -> str:
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    return troff_to_text(raw.decode("utf-8", errors="replace"))


def catalogue(path: Path) -> str:
    """The translations (msgstr) of a gettext catalogue, one a line."""
    try:
        with open(path, "rb") as f:
            entries = gettext.GNUTranslations(f)._catalog
    except (OSError, UnicodeDecodeError, ValueError):
        return ""  # a damaged catalogue, or one whose header does not name its real charset
    return "\n".join(v for k, v in entries.items() if k and isinstance(v, str) and v.strip())


def language_documents(language: str) -> Sources:
    """Manual pages and gettext translations in `language` (e.g. de): one document per page or catalogue."""
    pages = {str(p): (lambda p=p: manual_page(p)) for p in sorted(Path("/usr/share/man", language).rglob("*"))
             if p.is_file()}
    catalogues = {str(p): (lambda p=p: catalogue(p)) for p in sorted(Path("/usr/share/locale", language).rglob("*.mo"))}
    return pages | catalogues


def domain_documents(domain: str, python_docs: Path, language: str) -> tuple[Sources, str]:
    """The documents of one domain and a line saying where they came from."""
    if domain == "code":
        return code_documents(), "Python standard library sources"
    if domain == "prose":
        if python_docs.is_dir():
            return python_docs_documents(python_docs), f"Python documentation sources ({python_docs.name} folder)"
        return docstring_documents(), "Python standard library docstrings (no documentation sources found)"
    return language_documents(language), f"manual pages and gettext translations in {language!r}"


def chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """`text` in consecutive pieces of at most `size` characters, cut after a blank line where one
    falls in the second half of a piece, else after a line end, else anywhere."""
    pieces = []
    while len(text) > size:
        cut = next((i + sep_len for sep, sep_len in (("\n\n", 2), ("\n", 1))
                    if (i := text.rfind(sep, size // 2, size - sep_len + 1)) >= 0), size)
        pieces.append(text[:cut])
        text = text[cut:]
    return [p for p in pieces + [text] if p.strip()]


def split_documents(docs: Sources, scale: DataScale) -> tuple[list[str], list[str]]:
    """(train, held-out) texts: documents in the order of their names' hashes, every HELDOUT_EVERY-th
    held out, each side up to its byte budget (a document that would overshoot it is left out)."""
    order = sorted(docs, key=lambda name: hashlib.sha1(name.encode()).hexdigest())
    sides = {"train": ([], scale.train_bytes), "heldout": ([], scale.heldout_bytes)}
    used = {"train": 0, "heldout": 0}
    for i, name in enumerate(order):
        side = "heldout" if i % HELDOUT_EVERY == 0 else "train"
        texts, budget = sides[side]
        if used[side] >= budget:
            if all(used[s] >= sides[s][1] for s in sides):
                break
            continue
        text = docs[name]()
        size = len(text.encode("utf-8"))
        if not text.strip() or (texts and used[side] + size > budget):
            continue
        texts.append(text)
        used[side] += size
    return sides["train"][0], sides["heldout"][0]


# ---- tokenizing with the product's commands -------------------------------------------------------


def write_jsonl(path: Path, domains: list[tuple[str, list[str]]]) -> None:
    """One JSON line per piece of a document: its text and its domain (data_prep --split-by-domain
    reads both)."""
    with open(path, "w", encoding="utf-8") as f:
        for domain, texts in domains:
            for text in texts:
                for piece in chunks(text):
                    f.write(json.dumps({"text": piece, "domain": domain}, ensure_ascii=False) + "\n")


def product(args: list[str], log: Path) -> None:
    """Run a product command (python -m ...), its output into `log`; raise on failure."""
    with open(log, "a") as f:
        rc = subprocess.call([sys.executable, *args], cwd=REPO, env=product_env(), stdout=f, stderr=subprocess.STDOUT)
    if rc:
        raise SystemExit(f"python {' '.join(args)} failed with exit code {rc}; see {log}")


def prepare(out: Path, scale_name: str, python_docs: Path, language: str) -> dict:
    scale = DATA_SCALES[scale_name]
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    log = out / "prepare.log"
    manifest: dict = {"scale": scale_name, "domains": {}}
    texts = {}
    for domain in DOMAINS:
        docs, source = domain_documents(domain, python_docs, language)
        train, heldout = split_documents(docs, scale)
        if not train or not heldout:
            raise SystemExit(f"too few {domain} documents ({len(docs)} found; {source})")
        texts[domain] = train, heldout
        # Perplexity reads one text file, scored as one stream (eval --split none).
        (out / f"heldout_{domain}.txt").write_text("\n\n".join(heldout), encoding="utf-8")
        manifest["domains"][domain] = {"source": source, "documents": len(docs), "train_documents": len(train),
                                       "heldout_documents": len(heldout),
                                       "train_bytes": sum(len(t.encode()) for t in train),
                                       "heldout_bytes": sum(len(t.encode()) for t in heldout)}
    for side, index in (("train", 0), ("heldout", 1)):
        write_jsonl(raw / f"{side}.jsonl", [(d, texts[d][index]) for d in DOMAINS])
    write_jsonl(raw / "english.jsonl", [(d, texts[d][0]) for d in ("code", "prose")])
    tokenizer = out / "tokenizer"
    product(["-m", "tokenizer", "train", "--kind", "bytelevel-bpe", "--vocab-size", str(scale.vocab_size),
             "--input", str(raw / "english.jsonl"), "--out", str(tokenizer), "--overwrite"], log)
    for side in ("train", "heldout"):
        product(["-m", "data_prep", "--format", "jsonl", "--domain-field", "domain", "--split-by-domain",
                 "--input", str(raw / f"{side}.jsonl"), "--output-prefix", str(out / side),
                 "--tokenizer", str(tokenizer)], log)
    for domain in DOMAINS:
        info = {side: json.loads((out / f"{side}_{domain}.json").read_text()) for side in ("train", "heldout")}
        manifest["domains"][domain].update(train_tokens=info["train"]["tokens"],
                                           heldout_tokens=info["heldout"]["tokens"])
        manifest["vocab_size"] = info["train"]["vocab_size"]
    shutil.rmtree(raw)  # the indexed datasets hold the same text; keep the folder small to carry
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--scale", choices=sorted(DATA_SCALES), default="gpu", help="how much text per domain")
    p.add_argument("--python-docs", type=Path, default=default_python_docs(),
                   help="folder of the Python documentation's .rst.txt sources (default: Debian's python3.X-doc)")
    p.add_argument("--language", default="de", help="the other language's locale name (manual pages, catalogues)")
    args = p.parse_args(argv)
    manifest = prepare(args.out, args.scale, args.python_docs, args.language)
    for domain, d in manifest["domains"].items():
        print(f"{domain}: {d['train_tokens']:,} training tokens, {d['heldout_tokens']:,} held-out tokens "
              f"({d['source']})")
    print(f"vocabulary {manifest['vocab_size']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
