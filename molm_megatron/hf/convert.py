"""Conversion between our training weights and the Hugging Face format of the published MoLM
checkpoints (`model_type: moduleformer`, the same keys and shapes).

Our module names are the published ones, so the key map is the identity; the only differences are
the two unused attention buffers per layer (see modeling_moduleformer.UNUSED_PUBLISHED_BUFFERS).

A training checkpoint (molm_megatron/training/checkpoint.py) holds one model file per distinct
(TP rank, EP rank) shard, each with the place of every sharded tensor in the full one; they are
consolidated here without process groups. A *model file* is one consolidated model:
`torch.save({"config": asdict(ModelConfig), "model": state_dict})`.

    python -m molm_megatron.hf.convert to-hf --checkpoint runs/x/checkpoints --out hf_dir [--dtype bfloat16]
    python -m molm_megatron.hf.convert to-hf --model-file model.pt --out hf_dir
    python -m molm_megatron.hf.convert consolidate --checkpoint runs/x/checkpoints --out model.pt
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
from molm_megatron.training.checkpoint import read_model_shards

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


def consolidate_checkpoint(checkpoint: str | Path) -> MoLM:
    """The full model of a training checkpoint (a `checkpoint.dir` or one of its step folders),
    whatever its TP/EP layout: every shard file's tensors are placed where their `shards` records
    say. ZeRO-3 checkpoints keep the weights only in the optimizer partitions and are refused."""
    shards = read_model_shards(checkpoint)
    folder, model_section = shards.folder, shards.model_config
    model = MoLM(ModelConfig(**model_section))
    if not shards.files:
        raise ValueError(f"{folder}: no model_tp*_ep*.pt files (a ZeRO-3 checkpoint keeps its weights in the "
                         "optimizer partitions; consolidate it with a ZeRO-1/2 run)")
    full = {name: torch.empty_like(t) for name, t in model.state_dict().items()}
    # Each distinct piece counts once: a tensor sharded over TP only is repeated in every EP file.
    seen: dict[str, set] = {name: set() for name in full}
    covered = dict.fromkeys(full, 0)
    for path, blob in shards:
        for name, local in blob["model"].items():
            if name not in full:
                raise ValueError(f"{path}: unexpected tensor {name!r} for model {model_section}")
            shards = blob["shards"].get(name, [])
            piece = tuple((s["dim"], s["start"], s["length"]) for s in shards)
            if piece in seen[name]:
                continue
            seen[name].add(piece)
            target = full[name]
            for dim, start, length in piece:  # narrow() gives views: the copy lands inside the full tensor
                target = target.narrow(dim, start, length)
            target.copy_(local)
            covered[name] += local.numel()
    missing = [name for name, n in covered.items() if n != full[name].numel()]
    if missing:
        raise ValueError(f"{folder}: the shard files do not cover {missing[:5]} (layout {shards.layout})")
    model.load_state_dict(full)
    return model


def checkpoint_to_hf(checkpoint: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """A training checkpoint as a Hugging Face folder (see consolidate_checkpoint, export_hf)."""
    return export_hf(consolidate_checkpoint(checkpoint), out_dir, dtype)


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
    to_hf = sub.add_parser("to-hf", help="training checkpoint or model file -> HF folder")
    source = to_hf.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="pretrain.py's checkpoint.dir (its newest complete checkpoint) or "
                        "one step_* folder; any TP/EP layout, ZeRO 1-2")
    source.add_argument("--model-file", help="consolidated weights (torch.save of {'config', 'model'})")
    to_hf.add_argument("--out", required=True, help="HF folder to write (replaced atomically)")
    to_hf.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast the weights (default: keep)")
    cons = sub.add_parser("consolidate", help="training checkpoint -> model file")
    cons.add_argument("--checkpoint", required=True, help="checkpoint.dir or one step_* folder")
    cons.add_argument("--out", required=True, help="model file to write")
    from_hf = sub.add_parser("from-hf", help="HF folder (ours or a published MoLM) -> model file")
    from_hf.add_argument("--hf", required=True, help="HF folder with config.json and safetensors")
    from_hf.add_argument("--out", required=True, help="model file to write")
    args = parser.parse_args(argv)
    if args.command == "to-hf":
        model = consolidate_checkpoint(args.checkpoint) if args.checkpoint else load_model_file(args.model_file)
        out = export_hf(model, args.out, DTYPES.get(args.dtype))
    elif args.command == "consolidate":
        save_model_file(consolidate_checkpoint(args.checkpoint), args.out)
        out = args.out
    else:
        save_model_file(import_hf(args.hf), args.out)
        out = args.out
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
