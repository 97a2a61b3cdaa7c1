"""Conversion between our training weights and the Hugging Face format of the published MoLM
checkpoints (`model_type: moduleformer`, the same keys and shapes).

Our module names are the published ones, so the key map is the identity; the only differences are
the two unused attention buffers per layer (see modeling_moduleformer.UNUSED_PUBLISHED_BUFFERS).

A training checkpoint (molm_megatron/training/checkpoint.py) holds one model file per distinct
(TP rank, EP rank) shard, each with the place of every sharded tensor in the full one (ZeRO-3:
the fp32 master-weight fragments in the rank files instead); they are consolidated here without
process groups. A *model file* is one consolidated model:
`torch.save({"config": asdict(ModelConfig), "model": state_dict})`.

An export holds config.json (with an `auto_map`), model.safetensors, generation_config.json,
the tokenizer the run was trained with, configuration_moduleformer.py and modeling_moduleformer.py
(copies of configuration_moduleformer.py and modeling_moduleformer_standalone.py), so it loads
with transformers alone (`trust_remote_code=True`) or through our classes (`import molm_megatron`). Every output goes
through molm_megatron.outputs: written beside its place and renamed, an existing export or model
file replaced only with --overwrite, and never a folder that holds anything else.

A checkpoint of a fine-tuned Hugging Face dense or EMoE model (finetune.py from a GPT-2, GPT-NeoX
or Llama folder; molm_megatron.emoe) records the model's own config; `to-hf` writes it as that
model's folder, LoRA merged: the EMoE folder, or with `--dense` the plain dense one.

    python -m molm_megatron.hf.convert to-hf --checkpoint runs/x/checkpoints --out hf_dir [--dtype bfloat16]
    python -m molm_megatron.hf.convert to-hf --model-file model.pt --tokenizer codegen --out hf_dir
    python -m molm_megatron.hf.convert to-hf --checkpoint runs/emoe/checkpoints --out dense_dir --dense
    python -m molm_megatron.hf.convert consolidate --checkpoint runs/x/checkpoints --out model.pt
    python -m molm_megatron.hf.convert from-hf --hf hf_dir --out model.pt
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import torch

from molm_megatron.config import ModelConfig
from molm_megatron.hf.modeling_moduleformer import ModuleFormerForCausalLM
from molm_megatron.model import MoLM
from molm_megatron.outputs import check_file_target, check_folder_target, write_file, write_folder
from molm_megatron.training.checkpoint import find_step_folder, read_meta, read_model_shards, read_rank_states
from molm_megatron.training.fragments import assemble
from molm_megatron.training.optimizer_state import fp32_fragments
from tokenizer.folder import TOKENIZER_FILES
from tokenizer.loading import CODEGEN, copy_tokenizer_files, load_tokenizer

if TYPE_CHECKING:
    from molm_megatron.emoe.training import EMoECausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXPORT = "Hugging Face export"
EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
                "model.safetensors.index.json", "configuration_moduleformer.py", "modeling_moduleformer.py",
                *TOKENIZER_FILES)
"""Every file an export holds: only a folder of these (or an empty one) is ever replaced."""
# The export's own code (file name in the export -> our file): transformers alone runs it.
STANDALONE_FILES = {"configuration_moduleformer.py": Path(__file__).with_name("configuration_moduleformer.py"),
                    "modeling_moduleformer.py": Path(__file__).with_name("modeling_moduleformer_standalone.py")}
# config.json's auto_map: with trust_remote_code=True the Auto classes take both from those files.
AUTO_MAP = {"AutoConfig": "configuration_moduleformer.ModuleFormerConfig",
            "AutoModelForCausalLM": "modeling_moduleformer.ModuleFormerForCausalLM"}
NO_TOKENIZER = "none"


def export_hf(model: MoLM, out_dir: str | Path, dtype: torch.dtype | None = None, tokenizer: str | Path | None = None,
              overwrite: bool = False, protect: Iterable[str | Path] = ()) -> Path:
    """Write `model` as an HF folder: config.json, model.safetensors, generation_config.json, the
    self-contained configuration_/modeling_moduleformer.py, and the tokenizer `tokenizer` (a tokenizer folder or
    "codegen"; None writes none), whose end-of-document id must be the model's eos_token_id.

    `out_dir` ends up complete or unchanged; an earlier export there is replaced only with
    `overwrite`; a folder holding anything else, or holding a `protect` path, never.
    """
    if model.config.attention != "stickbreaking":
        raise ValueError(f"model.attention {model.config.attention!r} has no Hugging Face export: the published "
                         "ModuleFormer format (and the export's own modeling code) has stick-breaking attention "
                         "only; evaluate the training checkpoint folder directly (python -m molm_megatron.eval ... "
                         "--model CHECKPOINT_DIR)")
    check_folder_target(out_dir, EXPORT, EXPORT_FILES, overwrite, protect)
    cfg = model.config
    if tokenizer is not None:
        check_tokenizer_matches(tokenizer, cfg.vocab_size, {"bos_token_id": cfg.bos_token_id,
                                                            "eos_token_id": cfg.eos_token_id})
    hf = ModuleFormerForCausalLM.from_molm(model)
    if dtype is not None:
        hf = hf.to(dtype)
    hf.config.auto_map = dict(AUTO_MAP)

    def write(tmp: Path) -> None:
        hf.save_pretrained(tmp)
        for name, source in STANDALONE_FILES.items():
            shutil.copyfile(source, tmp / name)
        if tokenizer is not None:
            copy_tokenizer_files(tokenizer, tmp)

    return write_folder(out_dir, write, EXPORT, EXPORT_FILES, overwrite, protect)


def check_tokenizer_matches(tokenizer: str | Path, vocab_size: int, end_ids: dict[str, int | list[int]]) -> None:
    """Raise ValueError unless the tokenizer's ids fit the model's vocab_size and its end of document
    is each of the model's `end_ids` (config field -> id, or a list holding it: what generate()
    stops at)."""
    tok = load_tokenizer(tokenizer, "tokenizers")
    if tok.vocab_size > vocab_size:
        raise ValueError(f"tokenizer {tokenizer} has {tok.vocab_size} ids but the model's vocab_size is {vocab_size}")
    wrong = {name: ids for name, ids in end_ids.items() if tok.eod_id not in (ids if isinstance(ids, list) else [ids])}
    if wrong:
        raise ValueError(f"tokenizer {tokenizer}: its end-of-document id is {tok.eod_id} but the model's "
                         f"{'/'.join(wrong)} {'are' if len(wrong) > 1 else 'is'} "
                         f"{'/'.join(str(v) for v in wrong.values())}")


def export_hf_lm(model: EMoECausalLM, out_dir: str | Path, dtype: torch.dtype | None = None,
                 tokenizer: str | Path | None = None, overwrite: bool = False, protect: Iterable[str | Path] = (),
                 dense: bool = False) -> Path:
    """Write a Hugging Face dense or EMoE model (molm_megatron.emoe) as its own folder, LoRA merged:
    the EMoE folder (its `emoe` entry kept), or with `dense` the plain dense folder ("train as
    EMoE, ship dense"); plus the tokenizer `tokenizer` (None writes none). Same output rules as
    export_hf."""
    from molm_megatron.emoe.convert import dense_copy

    check_folder_target(out_dir, EXPORT, EXPORT_FILES, overwrite, protect)
    hf = model.merged_model()
    if tokenizer is not None:
        check_tokenizer_matches(tokenizer, hf.config.vocab_size, {"eos_token_id": hf.config.eos_token_id})
    if dense:
        hf = dense_copy(hf)
    if dtype is not None:
        hf = hf.to(dtype)

    def write(tmp: Path) -> None:
        hf.save_pretrained(tmp)
        if tokenizer is not None:
            copy_tokenizer_files(tokenizer, tmp)

    return write_folder(out_dir, write, EXPORT, EXPORT_FILES, overwrite, protect)


def checkpoint_tokenizer(checkpoint: str | Path) -> str:
    """The tokenizer a training checkpoint was trained with, from its training data's metadata
    (`<prefix>.json`, written by data_prep): a tokenizer folder or "codegen"."""
    folder = find_step_folder(checkpoint)
    data = read_meta(folder)["config"].get("data", {})
    if data.get("spec"):
        from molm_megatron.data.spec import load_data_spec  # megatron-core: only when needed

        prefixes = load_data_spec(data["spec"]).prefixes
    else:
        prefixes = data.get("prefixes") or []
    advice = f"give --tokenizer (a tokenizer folder, {CODEGEN!r}, or {NO_TOKENIZER!r})"
    if not prefixes:
        raise ValueError(f"{folder}/meta.json names no training data to take the tokenizer from; {advice}")
    meta_path = Path(prefixes[0] + ".json")
    if not meta_path.is_file():
        raise ValueError(f"the training data's metadata {meta_path} (from {folder}/meta.json) is not there, so the "
                         f"run's tokenizer is unknown; {advice}")
    meta = json.loads(meta_path.read_text())
    if "tokenizer_path" in meta:
        return meta["tokenizer_path"]
    if str(meta.get("tokenizer", "")).startswith(f"{CODEGEN} ("):  # data_prep's description of CodeGen
        return CODEGEN
    raise ValueError(f"{meta_path} names tokenizer {meta.get('tokenizer')!r} but not its folder; {advice}")


def import_hf(hf_dir: str | Path) -> MoLM:
    """A training model from an HF folder in the published format (ours or the published ones)."""
    return ModuleFormerForCausalLM.from_pretrained(hf_dir).to_molm()


def model_from_saved_config(saved: dict) -> MoLM | EMoECausalLM:
    """The model a checkpoint's meta.json describes (its "model" entry, `TrainingSpec.config`), with
    fresh weights: a MoLM, or a Hugging Face dense/EMoE model (an "hf_config" entry)."""
    if "hf_config" in saved:
        from molm_megatron.emoe.training import EMoECausalLM

        return EMoECausalLM.from_saved_config(saved)
    return MoLM(ModelConfig(**saved))


def consolidate_checkpoint(checkpoint: str | Path) -> MoLM | EMoECausalLM:
    """The full model of a training checkpoint (a `checkpoint.dir` or one of its step folders),
    whatever its layout: every shard's tensors are placed where their `shards` records say. The
    shards are the model files (ZeRO 1-2) or, for ZeRO-3, the fp32 master-weight fragments of the
    rank files (molm_megatron.training.optimizer_state). A MoLM, or for a fine-tuned Hugging Face
    dense/EMoE model its trainer-facing module (with its LoRA adapters, unmerged)."""
    shards = read_model_shards(checkpoint)
    folder, model_section = shards.folder, shards.model_config
    model = model_from_saved_config(model_section)
    if shards.layout.get("zero_stage") == 3:
        fragments = fp32_fragments(read_rank_states(folder, shards.layout["world_size"]))
    elif not shards.files:
        raise ValueError(f"{folder}: no model_tp*_ep*.pt files")
    else:
        fragments = shards.fragments()
    state = model.state_dict()
    # A tied tensor (GPT-2's head is its embedding) is one parameter under two names: ZeRO-3 records
    # it once, so its other names take the first name's consolidated tensor.
    first_name: dict[tuple, str] = {}
    aliases = {name: first_name.setdefault((t.data_ptr(), t.shape), name) if t.numel() else name
               for name, t in state.items()}
    aliases = {name: first for name, first in aliases.items() if name != first}
    unexpected = sorted(set(fragments) - set(state))
    if unexpected:
        raise ValueError(f"{folder}: unexpected tensors {unexpected[:5]} for model {model_section}")
    full, missing = {}, []
    for name, like in state.items():
        if name in aliases:
            continue
        tensor, held = assemble(fragments[name]) if name in fragments else (None, None)
        if tensor is None or tensor.shape != like.shape or not held.all():
            missing.append(name)
        else:
            full[name] = tensor
    if missing:
        raise ValueError(f"{folder}: the shard files do not cover {missing[:5]} (layout {shards.layout})")
    model.load_state_dict({**full, **{alias: full[first] for alias, first in aliases.items()}})
    return model


def checkpoint_to_hf(checkpoint: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None,
                     tokenizer: str | Path | None = "auto", overwrite: bool = False, dense: bool = False) -> Path:
    """A training checkpoint as a Hugging Face folder (see consolidate_checkpoint, export_hf and
    export_hf_lm), with the tokenizer of its training data ("auto"), the tokenizer given, or none
    (None). `dense`: an EMoE model's weights as the plain dense folder."""
    check_folder_target(out_dir, EXPORT, EXPORT_FILES, overwrite, [checkpoint])  # before the slow part
    if dense and "hf_config" not in read_model_shards(checkpoint).model_config:
        raise ValueError(f"--dense: {checkpoint} holds a MoLM model, not an EMoE one (a MoLM export keeps its "
                         "experts)")
    if tokenizer == "auto":
        tokenizer = checkpoint_tokenizer(checkpoint)
    model = consolidate_checkpoint(checkpoint)
    if isinstance(model, MoLM):
        return export_hf(model, out_dir, dtype, tokenizer, overwrite, [checkpoint])
    return export_hf_lm(model, out_dir, dtype, tokenizer, overwrite, [checkpoint], dense)


def save_model_file(model: MoLM, path: str | Path, overwrite: bool = False, protect: Iterable[str | Path] = ()) -> Path:
    """Write a model file atomically (temporary name, then rename); an existing file is replaced
    only with `overwrite`, a `protect` path never."""
    blob = {"config": dataclasses.asdict(model.config), "model": model.state_dict()}
    return write_file(path, lambda tmp: torch.save(blob, tmp), "model file", overwrite, protect)


def load_model_file(path: str | Path) -> MoLM:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("config", "model"):
        if key not in blob:
            raise ValueError(f"{path}: not a model file (no {key!r} entry); expected "
                             "{'config': ..., 'model': state_dict}")
    model = MoLM(ModelConfig(**blob["config"]))
    model.load_state_dict(blob["model"])
    return model


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code (2 with a one-line message on bad input)."""
    parser = argparse.ArgumentParser(
        prog="python -m molm_megatron.hf.convert",
        description="Convert MoLM weights between training checkpoints, model files and the Hugging Face format "
                    "of the published ModuleFormer checkpoints. Exports load with transformers alone "
                    "(AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)) or, after "
                    "`import molm_megatron`, without trust_remote_code. Outputs are written beside their place "
                    "and renamed; an existing output is replaced only with --overwrite.")
    sub = parser.add_subparsers(dest="command", required=True)
    to_hf = sub.add_parser("to-hf", help="training checkpoint or model file -> HF folder")
    source = to_hf.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="pretrain.py's checkpoint.dir (its newest complete checkpoint) or "
                        "one step_* folder; any TP/EP layout, ZeRO 1-3")
    source.add_argument("--model-file", help="consolidated weights (torch.save of {'config', 'model'}), as written "
                        "by `consolidate` or `from-hf`")
    to_hf.add_argument("--out", required=True, help="HF folder to write (a new or empty folder, or an earlier "
                       "export with --overwrite)")
    to_hf.add_argument("--tokenizer", default=None,
                       help=f"tokenizer to write beside the weights: a tokenizer folder, {CODEGEN!r}, or "
                            f"{NO_TOKENIZER!r}; default with --checkpoint: the one its training data was "
                            "tokenized with (from the data's .json); required with --model-file")
    to_hf.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast the weights (default: keep)")
    to_hf.add_argument("--dense", action="store_true", help="a checkpoint of a fine-tuned EMoE model: write the "
                       "plain dense folder (no emoe entry; plain transformers loads it) instead of the EMoE folder")
    cons = sub.add_parser("consolidate", help="training checkpoint -> model file")
    cons.add_argument("--checkpoint", required=True, help="checkpoint.dir or one step_* folder")
    cons.add_argument("--out", required=True, help="model file to write")
    from_hf = sub.add_parser("from-hf", help="HF folder (ours or a published MoLM) -> model file")
    from_hf.add_argument("--hf", required=True, help="HF folder with config.json and safetensors")
    from_hf.add_argument("--out", required=True, help="model file to write")
    for p in (to_hf, cons, from_hf):
        p.add_argument("--overwrite", action="store_true", help="replace an existing output of the same kind "
                       "(never a folder holding anything else, nor the input)")
    args = parser.parse_args(argv)
    try:
        out = _run(parser, args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Path:
    if args.command == "to-hf":
        tokenizer = None if args.tokenizer == NO_TOKENIZER else args.tokenizer
        if args.checkpoint:
            out = checkpoint_to_hf(args.checkpoint, args.out, DTYPES.get(args.dtype),
                                   "auto" if args.tokenizer is None else tokenizer, args.overwrite, args.dense)
        else:
            if args.dense:
                parser.error("--dense applies to checkpoints of fine-tuned EMoE models, not to model files")
            if args.tokenizer is None:
                parser.error(f"to-hf --model-file needs --tokenizer (a tokenizer folder, {CODEGEN!r}, or "
                             f"{NO_TOKENIZER!r}): a model file does not record its tokenizer")
            check_folder_target(args.out, EXPORT, EXPORT_FILES, args.overwrite, [args.model_file])
            out = export_hf(load_model_file(args.model_file), args.out, DTYPES.get(args.dtype), tokenizer,
                            args.overwrite, [args.model_file])
    elif args.command == "consolidate":
        check_file_target(args.out, "model file", args.overwrite, [args.checkpoint])  # before the slow part
        if "hf_config" in read_model_shards(args.checkpoint).model_config:
            raise ValueError(f"{args.checkpoint} holds a fine-tuned Hugging Face dense/EMoE model; model files hold "
                             "MoLM models: export it with to-hf (add --dense for the plain dense folder)")
        out = save_model_file(consolidate_checkpoint(args.checkpoint), args.out, args.overwrite, [args.checkpoint])
    else:
        check_file_target(args.out, "model file", args.overwrite, [args.hf])
        out = save_model_file(import_hf(args.hf), args.out, args.overwrite, [args.hf])
    return out


if __name__ == "__main__":
    sys.exit(main())
