"""The packages form floors: a module imports only from its own floor or the ones below, so no two
packages import each other (read from the source, imports inside functions included)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. The corpus readers sit below both tokenizer (which trains on corpora) and data_prep
# (which tokenizes them), and so does molm_megatron.outputs (how every command writes its output
# folders and files, tokenizer folders included); kernels know nothing of the model; benchmarks
# and the experiments (which run the product's commands) may use everything.
FLOORS = ["molm_kernels", "molm_megatron.outputs", "molm_megatron.data.corpus", "tokenizer", "molm_megatron", "data_prep",
          "benchmarks", "experiments"]


def floor_of(module: str) -> int | None:
    """Index in FLOORS of the most specific entry that `module` belongs to (None: third party)."""
    best = None
    for i, name in enumerate(FLOORS):
        if module == name or module.startswith(name + "."):
            if best is None or len(name) > len(FLOORS[best]):
                best = i
    return best


def imports_of(path: Path, module: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the importing package
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = package[: len(package) - node.level + 1]
                found.add(".".join(base + ([node.module] if node.module else [])))
            else:
                found.add(node.module)
    return found


def test_no_import_reaches_a_higher_floor():
    upward = []
    for top in ("kernels/molm_kernels", "tokenizer", "molm_megatron", "data_prep", "benchmarks", "experiments"):
        for path in sorted((ROOT / top).rglob("*.py")):
            # kernels/ is a plain folder: the package inside it is molm_kernels.
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            parts = parts[1:] if parts[0] == "kernels" else parts
            module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            own = floor_of(module)
            for imported in imports_of(path, module):
                other = floor_of(imported)
                if other is not None and other > own:
                    upward.append(f"{path.relative_to(ROOT)} imports {imported} ({FLOORS[own]} -> {FLOORS[other]})")
    assert not upward, "\n".join(upward)


def test_floor_lookup():
    # The check itself: the corpus module is its own floor, below tokenizer; the rest of the package above.
    assert FLOORS[floor_of("molm_megatron.data.corpus")] == "molm_megatron.data.corpus"
    assert FLOORS[floor_of("molm_megatron.data.spec")] == "molm_megatron"
    assert floor_of("tokenizer.loading") < floor_of("data_prep.pipeline")
    assert floor_of("torch") is None and floor_of("molm_kernelsx") is None and floor_of("kernels") is None


def test_kernels_folder_shadows_no_installed_kernels_package(tmp_path):
    # Hugging Face ships a top-level `kernels` package that transformers looks for. Our Triton
    # kernels live in the folder kernels/ as the package `molm_kernels`, so a `kernels` package
    # installed beside ours is the one `import kernels` finds, even run from the repository root
    # (where a kernels/ package of ours would come first on sys.path).
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("WHO = 'installed kernels'\n")
    code = ("import importlib.util, kernels, molm_kernels\n"
            "print(kernels.WHO)\n"
            "print(molm_kernels.stickbreaking_attention.__module__)\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout.split("\n")
    assert out[:2] == ["installed kernels", "molm_kernels"]
    # Without it, transformers does not take our folder for Hugging Face's package (the folder is at
    # most a namespace portion, with no distribution metadata).
    code = "from transformers.utils import is_kernels_available; print(is_kernels_available())"
    alone = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert alone.stdout.strip() == "False"
