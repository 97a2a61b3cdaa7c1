"""Conversion between our training weights and the Hugging Face format of the published MoLM
checkpoints (`model_type: moduleformer`, the same keys and shapes).

Our module names are the published ones, so the key map is the identity; the only differences are
the two unused attention buffers per layer (see modeling_moduleformer.UNUSED_PUBLISHED_BUFFERS).

A *model file* is what training consolidates a (ZeRO/TP/EP-sharded) checkpoint into:
`torch.save({"config": asdict(ModelConfig), "model": state_dict})`.

    python -m molm_megatron.hf.convert to-hf --model-file model.pt --out hf_dir [--dtype bfloat16]
    python -m molm_megatron.hf.convert from-hf --hf hf_dir --out model.pt
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import torch

from molm_megatron.config import ModelConfig
from molm_megatron.hf.modeling_moduleformer import ModuleFormerForCausalLM
from molm_megatron.model import MoLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_hf(model: MoLM, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write `model` as an HF folder (config.json, model.safetensors, generation_config.json).

    Written into a temporary sibling folder and renamed, so `out_dir` is either complete or absent.
    """
    out_dir = Path(out_dir)
    hf = ModuleFormerForCausalLM.from_molm(model)
    if dtype is not None:
        hf = hf.to(dtype)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        hf.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def import_hf(hf_dir: str | Path) -> MoLM:
    """A training model from an HF folder in the published format (ours or the published ones)."""
    return ModuleFormerForCausalLM.from_pretrained(hf_dir).to_molm()


def save_model_file(model: MoLM, path: str | Path) -> None:
    """Write a model file atomically (temporary name, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"config": dataclasses.asdict(model.config), "model": model.state_dict()}, tmp)
    os.replace(tmp, path)


def load_model_file(path: str | Path) -> MoLM:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("config", "model"):
        if key not in blob:
            raise ValueError(f"{path}: not a model file (no {key!r} entry); expected "
                             "{'config': ..., 'model': state_dict}")
    model = MoLM(ModelConfig(**blob["config"]))
    model.load_state_dict(blob["model"])
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m molm_megatron.hf.convert",
        description="Convert MoLM weights between a training model file and the Hugging Face format of the "
                    "published ModuleFormer checkpoints (loadable with AutoModelForCausalLM after "
                    "`import molm_megatron.hf`).")
    sub = parser.add_subparsers(dest="command", required=True)
    to_hf = sub.add_parser("to-hf", help="model file -> HF folder")
    to_hf.add_argument("--model-file", required=True, help="consolidated training weights (torch.save of "
                       "{'config', 'model'}), as written by training's consolidation")
    to_hf.add_argument("--out", required=True, help="HF folder to write (replaced atomically)")
    to_hf.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast the weights (default: keep)")
    from_hf = sub.add_parser("from-hf", help="HF folder (ours or a published MoLM) -> model file")
    from_hf.add_argument("--hf", required=True, help="HF folder with config.json and safetensors")
    from_hf.add_argument("--out", required=True, help="model file to write")
    args = parser.parse_args(argv)
    if args.command == "to-hf":
        out = export_hf(load_model_file(args.model_file), args.out, DTYPES.get(args.dtype))
    else:
        save_model_file(import_hf(args.hf), args.out)
        out = args.out
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
