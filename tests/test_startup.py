"""Commands start quietly and fast: `--help` of the tokenizer and data_prep commands loads no heavy
library, and importing megatron-core through our package prints none of its known warnings."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "megatron", "transformers", "datasets", "deepspeed")


@pytest.mark.parametrize("package", ["tokenizer", "data_prep"])
def test_help_imports_no_heavy_library(package):
    code = (f"import sys\nfrom {package}.__main__ import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            f"print('LOADED', sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "usage: python -m" in out
    assert out.strip().splitlines()[-1] == "LOADED []"


def test_megatron_core_import_is_quiet():
    # The data spec module imports megatron-core's datasets, which import all of megatron.core.
    proc = subprocess.run([sys.executable, "-c", "import molm_megatron.data.spec"], capture_output=True,
                          text=True, check=True)
    assert "Transformer Engine and Apex" not in proc.stderr, proc.stderr
    # Without our package first, megatron-core does warn: the check above can fail.
    bare = subprocess.run([sys.executable, "-c", "import megatron.core"], capture_output=True, text=True, check=True)
    assert "Transformer Engine and Apex are not installed" in bare.stderr
