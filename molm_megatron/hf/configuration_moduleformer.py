"""`ModuleFormerConfig`: the Hugging Face config of the published MoLM checkpoints
(`model_type: "moduleformer"`), field for field our `ModelConfig`.

This file needs transformers alone: every export carries a copy of it (with
modeling_moduleformer_standalone.py as its modeling_moduleformer.py), so the export loads with
`trust_remote_code=True` where our package is not installed. tests/hf keep CONFIG_DEFAULTS equal
to ModelConfig's fields and defaults.
"""

from __future__ import annotations

import dataclasses
import importlib

from transformers import PretrainedConfig

CONFIG_DEFAULTS = {
    "vocab_size": 50295, "block_size": 512, "history_length": 512, "n_embd": 1024, "n_layer": 24,
    "n_head": 1, "att_hidden": 1024, "ffd_hidden": 2048, "gating_size": 256, "n_att_experts": 16,
    "k_att": 2, "n_mlp_experts": 32, "k_mlp": 2, "n_att_experts_per_layer": [], "n_mlp_experts_per_layer": [],
    "n_new_att_experts": 0, "n_new_mlp_experts": 0, "attention": "stickbreaking", "rope_theta": 10000.0,
    "activation_function": "gelu_new", "sample_topk": 0,
    "aux_loss_type": "mi", "aux_loss_weight": 0.0, "concentration_loss_weight": 0.0, "z_loss_weight": 0.0,
    "routing_reg_weight": 0.0, "gate_type": "mlp", "embd_pdrop": 0.0, "attn_pdrop": 0.0, "resid_pdrop": 0.0,
    "moe_pdrop": 0.0, "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "bos_token_id": 50256,
    "eos_token_id": 50256, "tie_word_embeddings": False,
}
"""Every field with its default (ModelConfig's). Per-layer counts (a pruned model) include inserted
experts (continual learning), which the published tensors hold as their last rows."""
OPTIONAL_FIELDS = ("n_att_experts_per_layer", "n_mlp_experts_per_layer", "n_new_att_experts", "n_new_mlp_experts",
                   "attention", "rope_theta")
"""Fields the published config.json does not have: written only when set, so a uniform model without
inserted experts exports the published config; absent on load, they take their defaults. (`attention`
other than stick-breaking is refused by the export and by the standalone modeling code.)"""
PRETRAINED_CONFIG_FIELDS = ("bos_token_id", "eos_token_id", "tie_word_embeddings")
"""Fields that PretrainedConfig itself owns."""
REQUIRED_FIELDS = ("vocab_size", "n_embd", "n_layer", "n_head", "att_hidden", "ffd_hidden", "gating_size",
                   "n_att_experts", "k_att", "n_mlp_experts", "k_mlp")
"""Fields that fix the weights' shapes: a config.json without one is refused, since a default
would build layers that the checkpoint does not fill (left randomly initialised)."""


def check_required_fields(config_dict: dict) -> None:
    """Raise ValueError naming the shape fields missing from a moduleformer config.json."""
    missing = [name for name in REQUIRED_FIELDS if name not in config_dict]
    if missing:
        raise ValueError(f"config.json of a moduleformer model lacks {', '.join(missing)}: these fix the "
                         "shapes of the weights and have no safe default")


class ModuleFormerConfig(PretrainedConfig):
    model_type = "moduleformer"
    keys_to_ignore_at_inference = ["past_key_values"]
    # Names users of other HF models expect (the generation cache needs num_hidden_layers).
    attribute_map = {
        "hidden_size": "n_embd",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
    }

    def __init__(self, **kwargs):
        for name, default in CONFIG_DEFAULTS.items():
            if name in PRETRAINED_CONFIG_FIELDS:
                kwargs.setdefault(name, default)
            else:
                # A copy of list defaults (per-layer fields): instances must not share one list.
                setattr(self, name, kwargs.pop(name, list(default) if isinstance(default, list) else default))
        self.use_cache = kwargs.pop("use_cache", True)
        super().__init__(**kwargs)

    def experts(self, kind: str, layer: int) -> int:
        """Experts of the `kind` ("att" or "mlp") router in `layer` (per-layer counts if given)."""
        per_layer = getattr(self, f"n_{kind}_experts_per_layer")
        return per_layer[layer] if per_layer else getattr(self, f"n_{kind}_experts")

    def to_dict(self) -> dict:
        out = super().to_dict()
        for name in OPTIONAL_FIELDS:
            if name in out and out[name] == CONFIG_DEFAULTS[name]:
                del out[name]
        return out

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> "ModuleFormerConfig":
        """From a config.json's dict; the fields that fix the weights' shapes must be present."""
        check_required_fields(config_dict)
        return super().from_dict(config_dict, **kwargs)

    def to_model_config(self):
        """Our training ModelConfig, validated (needs molm_megatron)."""
        # Not an import statement: transformers refuses remote code that imports a package it cannot
        # find, and an export's copy of this file must load where molm_megatron is absent.
        ModelConfig = importlib.import_module("molm_megatron.config").ModelConfig

        cfg = ModelConfig(**{name: getattr(self, name) for name in CONFIG_DEFAULTS})
        cfg.validate()
        return cfg

    @classmethod
    def from_model_config(cls, cfg) -> "ModuleFormerConfig":
        """From our training ModelConfig (a dataclass)."""
        return cls(**dataclasses.asdict(cfg))
