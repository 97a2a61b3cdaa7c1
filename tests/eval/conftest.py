"""Shared fixtures: a tiny MoLM (segments of 32 tokens with 32 of memory) with a 512-token
byte-level BPE trained on Python standard library sources, exported to a Hugging Face folder with
its tokenizer beside it. The small vocabulary keeps every forward cheap on CPU; the checkpoint test
runs the real CodeGen path."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

from molm_megatron.config import model_preset
from molm_megatron.hf.convert import export_hf
from molm_megatron.model import MoLM

# One intra-op thread: with the 2 cores shared by other test processes, a second thread makes each
# small op wait on the scheduler (about 50x slower here).
torch.set_num_threads(1)

STDLIB = Path(sysconfig.get_paths()["stdlib"])
VOCAB = 512


def stdlib_text(name: str, chars: int) -> str:
    return (STDLIB / name).read_text(encoding="utf-8")[:chars]


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory) -> Path:
    from tokenizer.training import train_bytelevel_bpe

    root = tmp_path_factory.mktemp("eval")
    texts = [(STDLIB / name).read_text(encoding="utf-8") for name in ("textwrap.py", "string.py", "shlex.py")]
    tok_dir = train_bytelevel_bpe(texts, VOCAB, root / "tokenizer")
    torch.manual_seed(0)
    # id 0 is the trained tokenizer's <|endoftext|>
    model = MoLM(model_preset("tiny", vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)).eval()
    out = export_hf(model, root / "hf")
    for path in tok_dir.iterdir():
        shutil.copy(path, out / path.name)
    return out


@pytest.fixture(scope="session")
def eval_model(hf_folder):
    from molm_megatron.eval.loading import load_eval_model

    return load_eval_model(hf_folder, device="cpu", dtype="float32")
