"""EMoE models: the dense Hugging Face classes with their chosen FFNs as `EMoEMLP` layers.

An EMoE folder is a dense folder (same `model_type`, same keys; the FFN neurons permuted) whose
config.json carries an `emoe` entry (`EMoESettings`). Plain transformers ignores the entry and
loads the dense model. Importing `molm_megatron` (once transformers' auto classes are loaded) or
`molm_megatron.emoe` registers, for each supported
architecture, a class with the Auto classes that builds the EMoE model when the config has the
entry and hands every other folder to the dense class unchanged, so
`AutoModelForCausalLM.from_pretrained(folder)` gives the gated model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig,
                          GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel)

from molm_megatron.emoe.layer import ARCHITECTURES, COMPUTATIONS, EMoEMLP
from molm_megatron.outputs import atomic_write


@dataclass
class EMoESettings:
    """The `emoe` entry of an EMoE model's config.json."""

    num_experts: int = 64
    """Experts per converted FFN (each d_ff / num_experts neurons)."""
    top_k: int = 16
    """Experts each token uses (weight 1 each); top_k = num_experts is the dense model."""
    layers: list[int] = field(default_factory=list)
    """The converted layers (0-based); the others stay dense."""
    computation: str = "sparse"
    """"sparse" (only the chosen experts, scattered-expert kernels) or "masked" (the dense FFN
    with the unchosen experts' neurons zeroed; the reference)."""
    gate: str = "avg-k"
    """The gate: the mean of each expert's key vectors (and biases), from the current weights."""
    seed: int = 0
    """Seed of the balanced k-means that grouped the neurons."""

    @classmethod
    def from_dict(cls, d: dict, num_layers: int) -> "EMoESettings":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"config.json emoe: unknown fields {sorted(unknown)}")
        s = cls(**d)
        if s.gate != "avg-k":
            raise ValueError(f"config.json emoe.gate must be 'avg-k', got {s.gate!r}")
        if s.computation not in COMPUTATIONS:
            raise ValueError(f"config.json emoe.computation must be one of {COMPUTATIONS}, got {s.computation!r}")
        if not 1 <= s.top_k <= s.num_experts:
            raise ValueError(f"config.json emoe.top_k ({s.top_k}) must be between 1 and emoe.num_experts "
                             f"({s.num_experts})")
        bad = [i for i in s.layers if not 0 <= i < num_layers]
        if bad or not s.layers:
            raise ValueError(f"config.json emoe.layers {s.layers}: need at least one, each in [0, {num_layers})")
        return s


def emoe_settings(config: PretrainedConfig) -> EMoESettings | None:
    """The config's EMoE settings, or None for a dense config."""
    entry = getattr(config, "emoe", None)
    return None if not entry else EMoESettings.from_dict(dict(entry), config.num_hidden_layers)


class EMoEMixin:
    """What the three EMoE classes share: building the layers, dispatch of dense folders to the
    dense class, and saving with the dense architecture name. `dense_class` is set by each."""

    dense_class: type[PreTrainedModel]

    def _init_emoe(self) -> None:
        s = emoe_settings(self.config)
        spec = ARCHITECTURES[self.config.model_type]
        activation = getattr(self.config, spec.activation_field)
        blocks = self.get_submodule(spec.blocks)
        for i in s.layers:
            blocks[i].mlp = EMoEMLP(blocks[i].mlp, spec, activation, s.num_experts, s.top_k, s.computation)

    def emoe_layers(self) -> dict[int, EMoEMLP]:
        """The EMoE layers by layer index."""
        blocks = self.get_submodule(ARCHITECTURES[self.config.model_type].blocks)
        return {i: b.mlp for i, b in enumerate(blocks) if isinstance(b.mlp, EMoEMLP)}

    def set_emoe(self, top_k: int | None = None, computation: str | None = None) -> None:
        """Change k or the computation of every EMoE layer, and the config (so a save keeps it)."""
        entry = dict(self.config.emoe)
        entry["top_k"] = entry["top_k"] if top_k is None else top_k
        entry["computation"] = entry["computation"] if computation is None else computation
        for layer in self.emoe_layers().values():
            layer.set_routing(entry["top_k"], entry["computation"])
        self.config.emoe = entry

    def collect_expert_counts(self, on: bool = True) -> None:
        """Start (and reset) or stop counting tokens per expert in every EMoE layer."""
        for layer in self.emoe_layers().values():
            layer.collect_counts, layer.counts_E, layer.count_mask_T = on, None, None

    def expert_counts(self) -> dict[str, torch.Tensor]:
        """Tokens routed to each expert since `collect_expert_counts()`: 'layer{N}.mlpf' -> [E]
        (the key format of MoLM's expert statistics)."""
        return {f"layer{i}.mlpf": (layer.counts_E if layer.counts_E is not None
                                   else torch.zeros(layer.num_experts, dtype=torch.long))
                for i, layer in self.emoe_layers().items()}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        config = kwargs.get("config")
        if not isinstance(config, PretrainedConfig):
            config = AutoConfig.from_pretrained(pretrained_model_name_or_path)
        if emoe_settings(config) is None:
            return cls.dense_class.from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def _from_config(cls, config, **kwargs):
        if emoe_settings(config) is None:
            return cls.dense_class._from_config(config, **kwargs)
        return super()._from_config(config, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Saves as the dense architecture would (keys, `architectures`), plus the emoe entry."""
        super().save_pretrained(save_directory, *args, **kwargs)
        path = Path(save_directory) / "config.json"
        cfg = json.loads(path.read_text())
        cfg["architectures"] = [self.dense_class.__name__]
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n"))


class EMoEGPT2LMHeadModel(EMoEMixin, GPT2LMHeadModel):
    dense_class = GPT2LMHeadModel

    def __init__(self, config: GPT2Config):
        super().__init__(config)
        self._init_emoe()


class EMoEGPTNeoXForCausalLM(EMoEMixin, GPTNeoXForCausalLM):
    dense_class = GPTNeoXForCausalLM

    def __init__(self, config: GPTNeoXConfig):
        super().__init__(config)
        self._init_emoe()


class EMoELlamaForCausalLM(EMoEMixin, LlamaForCausalLM):
    dense_class = LlamaForCausalLM

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self._init_emoe()


EMOE_CLASSES: dict[str, type[PreTrainedModel]] = {
    "gpt2": EMoEGPT2LMHeadModel, "gpt_neox": EMoEGPTNeoXForCausalLM, "llama": EMoELlamaForCausalLM}


def register_auto_classes() -> None:
    """Route AutoModelForCausalLM through the EMoE classes for the three architectures (they
    hand configs without an `emoe` entry to the dense classes, so other folders load as before).

    `AutoModelForCausalLM.register` silently ignores transformers' own config classes (it keeps
    remote code from remapping native models), and an EMoE folder must keep the native config
    (model_type "gpt2", ...) for plain transformers to load it as dense. So the entry goes into
    the mapping's table of registered models directly, the table `register` itself fills."""
    mapping = AutoModelForCausalLM._model_mapping
    if not isinstance(getattr(mapping, "_extra_content", None), dict):
        raise RuntimeError("this transformers version has no AutoModelForCausalLM registration table; "
                           "load EMoE folders with the EMoE classes (molm_megatron.emoe.EMOE_CLASSES)")
    for config_class, model_class in ((GPT2Config, EMoEGPT2LMHeadModel), (GPTNeoXConfig, EMoEGPTNeoXForCausalLM),
                                      (LlamaConfig, EMoELlamaForCausalLM)):
        mapping._extra_content[config_class] = model_class
    _share_checkpoint_key_renames()


def _share_checkpoint_key_renames() -> None:
    """Give each EMoE class the checkpoint key renames of its dense class (transformers >= 5
    renames keys on load and back on save, e.g. GPT-NeoX's `embed_out` <-> `lm_head`; it looks
    them up by class name, and skips classes defined outside transformers unless registered)."""
    try:
        from transformers.conversion_mapping import (get_checkpoint_conversion_mapping,
                                                     register_checkpoint_conversion_mapping)
    except ImportError:  # transformers < 5 renames nothing
        return
    for model_type, model_class in EMOE_CLASSES.items():
        renames = (get_checkpoint_conversion_mapping(model_class.dense_class.__name__)
                   or get_checkpoint_conversion_mapping(model_type))
        if renames:
            register_checkpoint_conversion_mapping(model_class.__name__, renames, overwrite=True)


# Importing this module may itself have loaded modeling_auto (the registration hook in
# molm_megatron/__init__.py then skipped the half-initialised module): register here too.
register_auto_classes()
