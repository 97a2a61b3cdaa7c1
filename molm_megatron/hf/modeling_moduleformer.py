"""`ModuleFormerForCausalLM`: the Hugging Face model of the published MoLM checkpoints.

It holds our own `MoLMTransformer` under `transformer` and an untied `lm_head`, so its keys are the
published ones and its logits are the training model's by construction. The key map to and from the
training model is the identity except for the two lists below: the unused published buffers, and
the inserted experts (continual learning), which the training model keeps in tensors of their own
and the published format holds as the last rows of each expert tensor. `generate()` uses HF's
DynamicCache, which keeps every token, as the published model's cache does.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from molm_megatron.config import ModelConfig
from molm_megatron.hf.configuration_moduleformer import ModuleFormerConfig
from molm_megatron.model.model import LMHead, MoLM, MoLMTransformer, init_weights

# Published keys that our model does not have: two unused attention buffers per layer (a causal
# mask and a cumulative-sum matrix that the published code precomputes). Written on save so the
# published code loads our exports without missing keys; ignored on load.
UNUSED_PUBLISHED_BUFFERS = (r"transformer\.h\.\d+\.attn\.mask", r"transformer\.h\.\d+\.attn\.cum_weight")

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


class ModuleFormerPreTrainedModel(PreTrainedModel):
    config_class = ModuleFormerConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["Block"]
    _keys_to_ignore_on_load_unexpected = list(UNUSED_PUBLISHED_BUFFERS)

    def _init_weights(self, module: nn.Module) -> None:
        init_weights(module, self.config.initializer_range)


class ModuleFormerForCausalLM(ModuleFormerPreTrainedModel, GenerationMixin):
    def __init__(self, config: ModuleFormerConfig):
        super().__init__(config)
        # Inserted experts as ordinary ones: the published keys; the computation is the same.
        self.transformer = MoLMTransformer(published_layout(config.to_model_config()))
        self.lm_head = LMHead(config.n_embd, config.vocab_size)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """HF-style causal LM: `labels` are the inputs (shifted inside, as HF models do)."""
        use_cache = self.config.use_cache if use_cache is None else use_cache
        B, T = input_ids.shape
        memory = None
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            # DynamicCache layers hold [B, nh, S, hs]; our memory is [B, S, nh, hs].
            memory = [(layer.keys.transpose(1, 2), layer.values.transpose(1, 2)) for layer in past_key_values.layers]
        # memory_length=T returns exactly this call's keys/values, which the cache appends.
        h, _, new_memory = self.transformer(input_ids, attention_mask, memory, T)
        logits = self.lm_head(h)
        if use_cache:
            past_key_values = DynamicCache(config=self.config) if past_key_values is None else past_key_values
            for i, (k, v) in enumerate(new_memory):
                past_key_values.update(k.transpose(1, 2), v.transpose(1, 2), i)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                               labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values if use_cache else None)

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
