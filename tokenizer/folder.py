"""Tokenizer folders on disk: writing them atomically and reading their eos token."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from tokenizers import Tokenizer

from molm_megatron.outputs import check_folder_target, write_folder

DEFAULT_EOS = "<|endoftext|>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
"""Every file a tokenizer folder of ours holds (a SentencePiece folder holds only tokenizer.model)."""


def eos_token_of(folder: Path) -> str:
    """The eos token named in a Hugging Face folder's tokenizer_config.json (default `<|endoftext|>`)."""
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    eos = config.get("eos_token", DEFAULT_EOS)
    # transformers writes special tokens either as plain strings or as AddedToken dicts.
    return eos["content"] if isinstance(eos, dict) else eos


def save_hf_folder(tok: Tokenizer, out_dir: str | Path, eos_token: str, tokenizer_class: str,
                   overwrite: bool = False) -> Path:
    """Write `tok` as a Hugging Face tokenizer folder; bos = eos = unk = `eos_token`.

    Written beside `out_dir` and renamed (molm_megatron.outputs): an existing tokenizer folder is
    replaced only with `overwrite`, any other folder never.
    """
    return write_tokenizer_folder(out_dir, lambda tmp: write_hf_files(tok, tmp, eos_token, tokenizer_class),
                                  overwrite)


def write_hf_files(tok: Tokenizer, folder: Path, eos_token: str, tokenizer_class: str,
                   bos_token: str | None = None, unk_token: str | None = None) -> None:
    """The files of a Hugging Face tokenizer folder, written into the existing `folder`; bos and unk
    default to the eos token (GPT-2's convention)."""
    special = {"bos_token": bos_token or eos_token, "eos_token": eos_token, "unk_token": unk_token or eos_token}
    config = {
        "tokenizer_class": tokenizer_class,
        **special,
        "add_prefix_space": False,
        # transformers' clean-up would turn " ." into "." on decode and break the round trip.
        "clean_up_tokenization_spaces": False,
    }
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")


def write_tokenizer_folder(out_dir: str | Path, write: Callable[[Path], object], overwrite: bool = False) -> Path:
    """`write(tmp)` fills a temporary folder that then becomes the tokenizer folder `out_dir`."""
    return write_folder(out_dir, write, "tokenizer folder", TOKENIZER_FILES, overwrite)


def check_tokenizer_target(out_dir: str | Path, overwrite: bool = False) -> None:
    """Raise ValueError now if `out_dir` could not receive a tokenizer folder later."""
    check_folder_target(out_dir, "tokenizer folder", TOKENIZER_FILES, overwrite)
