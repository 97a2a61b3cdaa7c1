"""`ModuleFormerConfig`: the Hugging Face config of the published MoLM checkpoints
(`model_type: "moduleformer"`), field for field our `ModelConfig`."""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from molm_megatron.config import ModelConfig

_FIELDS = [f.name for f in dataclasses.fields(ModelConfig)]
# Shape fields the published config.json does not have (per-layer counts of a pruned model, inserted
# experts): written only when set, so a uniform model without inserted experts exports the published
# config; absent on load, they take their defaults.
_OPTIONAL_SHAPE_FIELDS = ("n_att_experts_per_layer", "n_mlp_experts_per_layer", "n_new_att_experts",
                          "n_new_mlp_experts")


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
        defaults = ModelConfig()
        for name in _FIELDS:
            if name in ("bos_token_id", "eos_token_id", "tie_word_embeddings"):
                continue  # PretrainedConfig owns these three
            setattr(self, name, kwargs.pop(name, getattr(defaults, name)))
        self.use_cache = kwargs.pop("use_cache", True)
        kwargs.setdefault("bos_token_id", defaults.bos_token_id)
        kwargs.setdefault("eos_token_id", defaults.eos_token_id)
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    def to_dict(self) -> dict:
        out = super().to_dict()
        defaults = ModelConfig()
        for name in _OPTIONAL_SHAPE_FIELDS:
            if name in out and out[name] == getattr(defaults, name):
                del out[name]
        return out

    def to_model_config(self) -> ModelConfig:
        """Our ModelConfig, validated."""
        cfg = ModelConfig(**{name: getattr(self, name) for name in _FIELDS})
        cfg.validate()
        return cfg

    @classmethod
    def from_model_config(cls, cfg: ModelConfig) -> "ModuleFormerConfig":
        return cls(**dataclasses.asdict(cfg))
