"""Tokenizer folders on disk: writing them atomically and reading their eos token."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tokenizers import Tokenizer

DEFAULT_EOS = "<|endoftext|>"


def eos_token_of(folder: Path) -> str:
    """The eos token named in a Hugging Face folder's tokenizer_config.json (default `<|endoftext|>`)."""
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    eos = config.get("eos_token", DEFAULT_EOS)
    # transformers writes special tokens either as plain strings or as AddedToken dicts.
    return eos["content"] if isinstance(eos, dict) else eos


def save_hf_folder(tok: Tokenizer, out_dir: str | Path, eos_token: str, tokenizer_class: str) -> Path:
    """Write `tok` as a Hugging Face tokenizer folder; bos = eos = unk = `eos_token`.

    The folder is written under a temporary name and renamed, so a folder with the final name is
    always complete.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok.save(str(tmp / "tokenizer.json"))
    special = {"bos_token": eos_token, "eos_token": eos_token, "unk_token": eos_token}
    config = {
        "tokenizer_class": tokenizer_class,
        **special,
        "add_prefix_space": False,
        # transformers' clean-up would turn " ." into "." on decode and break the round trip.
        "clean_up_tokenization_spaces": False,
    }
    (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (tmp / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    replace_dir(tmp, out_dir)
    return out_dir


def replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished folder `tmp` to `out_dir`, replacing an older `out_dir`."""
    # A directory cannot be renamed over a non-empty one: move the old one aside first. Between
    # the two renames the final name is briefly absent, never half-written.
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
