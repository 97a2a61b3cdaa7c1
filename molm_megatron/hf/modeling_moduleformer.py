"""`ModuleFormerForCausalLM`: the Hugging Face model of the published MoLM checkpoints.

It holds our own `MoLMTransformer` under `transformer` and an untied `lm_head`, so its keys are the
published ones and its logits are the training model's by construction. The key map to and from the
training model is the identity except for the two lists below: the unused published buffers, and
the inserted experts (continual learning), which the training model keeps in tensors of their own
and the published format holds as the last rows of each expert tensor. The HF side (cache, loss,
strict loading) is the export's own class in modeling_moduleformer_standalone.py, which this one
derives from. `generate()` uses HF's DynamicCache, which keeps every token, as the published
model's cache does.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from molm_megatron.config import ModelConfig
from molm_megatron.hf import modeling_moduleformer_standalone as standalone
from molm_megatron.hf.configuration_moduleformer import ModuleFormerConfig
from molm_megatron.model.model import LMHead, MoLM, MoLMTransformer, init_weights

# Published keys that our model does not have: two unused attention buffers per layer (a causal
# mask and a cumulative-sum matrix that the published code precomputes). Written on save so the
# published code loads our exports without missing keys; ignored on load.
UNUSED_PUBLISHED_BUFFERS = standalone.UNUSED_PUBLISHED_BUFFERS

# Inserted experts: the training model's separate tensor (suffix of a router or MoE key) -> the
# published tensor whose last rows (dim 0, after the old experts) it becomes. The config keeps
# n_new_att_experts / n_new_mlp_experts, so a reload splits them off again.
INSERTED_EXPERT_KEYS = {
    "gate.new_weight": "gate.w_gate.3.weight",
    "experts.new_weight": "experts.weight",
    "output_experts.new_weight": "output_experts.weight",
}


def published_layout(cfg: ModelConfig) -> ModelConfig:
    """The same model with its inserted experts stored as ordinary ones (one tensor per published key)."""
    return dataclasses.replace(cfg, n_new_att_experts=0, n_new_mlp_experts=0)


def merge_inserted_experts(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A training state dict in the published layout: each `new_weight` appended to its published key."""
    out = dict(state_dict)
    for key in list(out):
        for ours, published in INSERTED_EXPERT_KEYS.items():
            if key.endswith("." + ours):
                target = key[: -len(ours)] + published
                out[target] = torch.cat([out[target], out.pop(key)])
    return out


def split_inserted_experts(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of merge_inserted_experts: the last n_new rows of each published expert tensor
    become the training model's `new_weight` (n_new from the config)."""
    out = dict(state_dict)
    for i in range(cfg.n_layer):
        for moe, n_new in ((f"transformer.h.{i}.attn.q_proj.", cfg.n_new_att_experts),
                           (f"transformer.h.{i}.mlpf.", cfg.n_new_mlp_experts)):
            if not n_new:
                continue
            for ours, published in INSERTED_EXPERT_KEYS.items():
                full = out[moe + published]
                out[moe + published], out[moe + ours] = full[:-n_new], full[-n_new:]
    return out


class ModuleFormerForCausalLM(standalone.ModuleFormerForCausalLM):
    """The export's own class (cache, loss, strict loading) with our training layers inside."""

    def build_layers(self, config: ModuleFormerConfig) -> tuple[nn.Module, nn.Module]:
        # Inserted experts as ordinary ones: the published keys; the computation is the same.
        return MoLMTransformer(published_layout(config.to_model_config())), LMHead(config.n_embd, config.vocab_size)

    def run_layers(self, input_ids, attention_mask, memory):
        # memory_length=T returns exactly this call's keys/values, which the cache appends.
        h, _, new_memory = self.transformer(input_ids, attention_mask, memory, input_ids.shape[1])
        return h, new_memory

    def _init_weights(self, module: nn.Module) -> None:
        init_weights(module, self.config.initializer_range)

    @classmethod
    def from_molm(cls, model: MoLM) -> "ModuleFormerForCausalLM":
        """An HF model holding a copy of a training model's weights (key for key, inserted experts
        appended to the published tensors)."""
        hf = cls(ModuleFormerConfig.from_model_config(model.config))
        hf.load_state_dict(merge_inserted_experts(model.state_dict()))
        return hf.to(next(model.parameters()).dtype)

    def to_molm(self) -> MoLM:
        """A training model with this model's weights."""
        model = MoLM(self.config.to_model_config())
        model.load_state_dict(split_inserted_experts(self.state_dict(), model.config))
        return model.to(self.dtype)

    def save_pretrained(self, save_directory, state_dict: dict | None = None, **kwargs):
        """HF's save_pretrained, plus the published checkpoints' two precomputed attention buffers
        per layer (a causal mask and a strictly-lower cumulative-sum matrix)."""
        state_dict = dict(self.state_dict() if state_dict is None else state_dict)
        cfg = self.config
        n = cfg.history_length + cfg.block_size
        mask = torch.tril(torch.ones(n, n, dtype=torch.int8))
        cum_weight = torch.tril(torch.ones(n, n, dtype=self.dtype), -1)
        for i in range(cfg.n_layer):
            # Own copies per layer: safetensors refuses tensors that share storage.
            state_dict[f"transformer.h.{i}.attn.mask"] = mask.clone()
            state_dict[f"transformer.h.{i}.attn.cum_weight"] = cum_weight.clone()
        return super().save_pretrained(save_directory, state_dict=state_dict, **kwargs)
