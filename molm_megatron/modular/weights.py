"""Where module manipulation gets its weights from, and the full-tensor view it edits.

Starting points (`load_model`): a pretraining checkpoint folder of any parallel layout (its
`checkpoint.dir` or one `step_*` folder, consolidated from its shard files), a Hugging Face folder
in the published MoLM format (the published weights or our exports), or a model file
(`{"config", "model"}`, written by `python -m molm_megatron.hf.convert consolidate` and by
`python -m molm_megatron.modular prune|drop-layers`); for benchmarks and tests also `preset:NAME`,
a model preset with its published random initialisation. `load_any_model` also takes Hugging Face
dense or EMoE GPT-2 / GPT-NeoX / Llama folders (molm_megatron.emoe) and checkpoints of them: what
finetune.py and the expert statistics run on.

Every transformation here edits a *full* state dict: the published keys, with each router's W_e
and each expert tensor holding all of its experts (old and inserted ones concatenated, in the
published order), then builds the new model from it (`model_from_full`), which splits the last
`n_new_*_experts` of each back into their separate trainable parameters.

Legend: E experts of one router, G gating_size, D n_embd, H an expert's hidden width.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from molm_megatron.config import ModelConfig
from molm_megatron.model import MoLM

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from molm_megatron.emoe.training import EMoECausalLM

# Router name (as in `out.expert_stats`, 'layer{N}.attn' / 'layer{N}.mlpf') -> module path of its MoE.
KINDS = {"attn": "attn.q_proj", "mlpf": "mlpf"}
# The three tensors of one MoE whose first dimension is the expert: router rows and both projections.
EXPERT_TENSORS = ("gate.w_gate.3.weight", "experts.weight", "output_experts.weight")



def moe_prefix(layer: int, kind: str) -> str:
    """'transformer.h.{layer}.attn.q_proj.' or 'transformer.h.{layer}.mlpf.'."""
    return f"transformer.h.{layer}.{KINDS[kind]}."


def router_names(cfg: ModelConfig) -> list[str]:
    """Every router of the model, in layer order: 'layer0.attn', 'layer0.mlpf', 'layer1.attn', ..."""
    return [f"layer{i}.{kind}" for i in range(cfg.n_layer) for kind in KINDS]


def parse_router(name: str) -> tuple[int, str]:
    """(layer, kind) of a router name of `router_names`: 'layer3.mlpf' -> (3, 'mlpf')."""
    layer, kind = name.split(".")
    return int(layer[len("layer"):]), kind


def num_experts(cfg: ModelConfig, layer: int, kind: str) -> int:
    """Experts (old and inserted) of one router."""
    return cfg.att_experts(layer) if kind == "attn" else cfg.mlp_experts(layer)


def with_expert_counts(cfg: ModelConfig, att: list[int], mlp: list[int], **changes) -> ModelConfig:
    """`cfg` with these per-layer expert counts (and other field changes), validated.

    A kind whose layers all have the same count stays uniform (`n_*_experts`, empty per-layer
    list), so a uniform result remains loadable by the published code.
    """
    fields = dict(changes)
    for kind, counts in (("att", att), ("mlp", mlp)):
        uniform = len(set(counts)) == 1
        fields[f"n_{kind}_experts"] = counts[0] if uniform else max(counts)
        fields[f"n_{kind}_experts_per_layer"] = [] if uniform else list(counts)
    new = dataclasses.replace(cfg, **fields)
    new.validate()
    return new


def expert_counts(cfg: ModelConfig) -> tuple[list[int], list[int]]:
    """Per-layer (attention, MLP) expert counts."""
    return ([cfg.att_experts(i) for i in range(cfg.n_layer)], [cfg.mlp_experts(i) for i in range(cfg.n_layer)])


def full_state_dict(model: MoLM) -> dict[str, torch.Tensor]:
    """The model's weights with inserted experts' rows concatenated after the old ones (published
    keys and shapes, as the Hugging Face export holds them), detached copies on the CPU."""
    from molm_megatron.hf.modeling_moduleformer import merge_inserted_experts

    return {name: t.detach().cpu().clone() for name, t in merge_inserted_experts(model.state_dict()).items()}


def model_from_full(cfg: ModelConfig, full: dict[str, torch.Tensor]) -> MoLM:
    """A model of config `cfg` holding the full state dict `full` (shapes checked by load_state_dict);
    the last `n_new_*_experts` rows of every expert tensor go to its `new_weight` parameter."""
    from molm_megatron.hf.modeling_moduleformer import split_inserted_experts

    model = MoLM(cfg)
    model.load_state_dict({name: t.contiguous() for name, t in split_inserted_experts(full, cfg).items()})
    return model


def folder_model_type(path: str | Path) -> str | None:
    """The `model_type` of a Hugging Face folder's config.json (None without one), read without
    building the config."""
    config = Path(path) / "config.json"
    return json.loads(config.read_text()).get("model_type") if config.is_file() else None


def hf_lm_config(path: str | Path) -> PretrainedConfig | None:
    """The Hugging Face config of a dense or EMoE GPT-2 / GPT-NeoX / Llama starting point (its
    folder, or a training checkpoint of one), reading config files only; None for any other path."""
    from molm_megatron.emoe.layer import ARCHITECTURES

    path = Path(path)
    if (path / "config.json").is_file():
        from transformers import AutoConfig

        if folder_model_type(path) not in ARCHITECTURES:
            return None
        return AutoConfig.from_pretrained(path, local_files_only=True)
    if path.is_dir() and ((path / "meta.json").is_file() or any(path.glob("step_*"))):
        from molm_megatron.emoe.training import hf_config_from_dict
        from molm_megatron.training.checkpoint import find_step_folder, read_meta, saved_model_config

        saved = saved_model_config(read_meta(find_step_folder(path)))
        if "hf_config" in saved:
            return hf_config_from_dict(saved["hf_config"])
    return None


def load_any_model(path: str | Path, seed: int = 0) -> MoLM | EMoECausalLM:
    """`load_model`'s starting points, and Hugging Face dense or EMoE folders (GPT-2, GPT-NeoX,
    Llama) and training checkpoints of them, as their trainer-facing module (fp32, the context
    length as block size; a checkpoint's keeps its block size and LoRA adapters)."""
    from molm_megatron.config import model_preset
    from molm_megatron.hf.convert import consolidate_checkpoint, import_hf, load_model_file

    if str(path).startswith("preset:"):
        torch.manual_seed(seed)
        return MoLM(model_preset(str(path)[len("preset:"):]))
    path = Path(path)
    if path.is_file():
        return load_model_file(path)
    if not path.is_dir():
        raise ValueError(f"{path}: no such file or folder (expected a checkpoint folder, a Hugging Face folder "
                         "or a model file)")
    if (path / "config.json").is_file():
        from molm_megatron.emoe.layer import ARCHITECTURES

        model_type = folder_model_type(path)
        if model_type in ARCHITECTURES:  # what hf_lm_config accepts, without building its config
            from molm_megatron.emoe.training import load_for_training

            return load_for_training(path)
        if model_type != "moduleformer":
            raise ValueError(f"{path}/config.json: model_type {model_type!r} is neither MoLM ('moduleformer') nor a "
                             "dense or EMoE gpt2, gpt_neox or llama model")
        return import_hf(path)
    if (path / "meta.json").is_file() or any(path.glob("step_*")):
        return consolidate_checkpoint(path)
    raise ValueError(f"{path}: neither a training checkpoint (meta.json or step_* folders) nor a Hugging Face "
                     "folder (config.json)")


def load_model(path: str | Path, seed: int = 0) -> MoLM:
    """A MoLM starting point on the CPU (see the module docstring for what `path` may be; `seed`
    initialises a `preset:NAME`). ValueError names the path when it is none of them, or when it
    holds a Hugging Face dense or EMoE model (`load_any_model` takes those)."""
    config = hf_lm_config(path) if not str(path).startswith("preset:") else None
    if config is not None:
        kind = "an EMoE" if getattr(config, "emoe", None) else "a dense"
        raise ValueError(f"{path} holds {kind} {config.model_type} model, not a MoLM one: expert insertion, "
                         "pruning and layer dropping apply to MoLM (finetune.py and the stats command take it)")
    return load_any_model(path, seed)
