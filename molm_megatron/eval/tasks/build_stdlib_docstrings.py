"""Build the example multiple-choice task `stdlib_docstrings` from the installed Python standard library.

    python -m molm_megatron.eval.tasks.build_stdlib_docstrings [--out FILE] [--size 400] [--seed 0]

Each item, in the format of the paper's zero-shot tasks (HellaSwag / PIQA / ARC: a context, a few
choices, the index of the right one), is one public function of the standard library's sources:
the context is its `def` line and the first CONTEXT_WORDS words of its docstring, the right choice
the next CHOICE_WORDS words, and the three wrong choices are the same word window of three other
functions' docstrings. A model that reads code and its documentation should pick the true
continuation; chance is 25%.

The text is the CPython standard library's (Python Software Foundation License), read from this
interpreter's installation; the output depends only on the Python version (recorded per item) and
the seed, so rerunning on the same version rewrites the shipped file byte for byte.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import sys
import sysconfig
from pathlib import Path

from molm_megatron.outputs import atomic_write

CONTEXT_WORDS = 10
CHOICE_WORDS = 6
NUM_CHOICES = 4
# Folders of the standard library that are tests, demos, vendored tools or GUI code, not library text.
SKIPPED_PARTS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo",
                 "ensurepip", "__pycache__", "tkinter", "pydoc_data", "__phello__"}
DEFAULT_OUT = Path(__file__).resolve().parent / "stdlib_docstrings.jsonl"


def docstring_functions(root: Path) -> list[dict]:
    """Public functions with a docstring of at least CONTEXT_WORDS + CHOICE_WORDS words, in file and
    line order: {"source": "path:line", "header": 'def f(x):\\n    \"\"\"', "words": [...]}."""
    found, seen_text = [], set()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in SKIPPED_PARTS for part in rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few files are templates or in another encoding: not text we want
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for node in sorted(functions, key=lambda n: n.lineno):
            doc = ast.get_docstring(node)
            if node.name.startswith("_") or not doc:
                continue
            words = doc.split()
            text = " ".join(words)
            if len(words) < CONTEXT_WORDS + CHOICE_WORDS or text in seen_text:
                continue  # too short for a context and a choice, or a copy of another function's docstring
            seen_text.add(text)
            keyword = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
            header = f'{keyword} {node.name}({ast.unparse(node.args)}):\n    """'
            found.append({"source": f"{rel.as_posix()}:{node.lineno}", "header": header, "words": words})
    return found


def build_items(functions: list[dict], size: int, seed: int) -> list[dict]:
    """`size` items drawn with a fixed seed; wrong choices come from other functions and differ from
    the right one and from each other."""
    rng = random.Random(seed)
    window = lambda f: " " + " ".join(f["words"][CONTEXT_WORDS:CONTEXT_WORDS + CHOICE_WORDS])  # noqa: E731
    if len(functions) < max(size, NUM_CHOICES):
        raise ValueError(f"only {len(functions)} usable docstrings; asked for {size} items")
    items = []
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for index in sorted(rng.sample(range(len(functions)), size)):
        f = functions[index]
        gold = window(f)
        wrong: list[str] = []
        while len(wrong) < NUM_CHOICES - 1:
            other = window(functions[rng.randrange(len(functions))])
            if other != gold and other not in wrong:
                wrong.append(other)
        choices = wrong + [gold]
        rng.shuffle(choices)
        context = f["header"] + " ".join(f["words"][:CONTEXT_WORDS])
        items.append({"context": context, "choices": choices, "gold": choices.index(gold),
                      "source": f["source"], "python": version})
    return items


def write_jsonl(items: list[dict], out: Path) -> None:
    text = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
    atomic_write(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m molm_megatron.eval.tasks.build_stdlib_docstrings",
        description="Build the multiple-choice task file of stdlib_docstrings.yaml from this interpreter's "
                    "standard library: context = a function's def line and docstring start, choices = the "
                    "true continuation and three other docstrings' continuations.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON-lines file to write")
    parser.add_argument("--size", type=int, default=400, help="number of items")
    parser.add_argument("--seed", type=int, default=0, help="seed of the item and choice draws")
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                        help="standard library folder to read")
    args = parser.parse_args(argv)
    items = build_items(docstring_functions(args.stdlib), args.size, args.seed)
    write_jsonl(items, args.out)
    print(f"wrote {len(items)} items to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
