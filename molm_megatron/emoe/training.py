"""A Hugging Face GPT-2, GPT-NeoX or Llama model, EMoE or dense, as the shared trainer drives a model:
MoLM's forward signature and output fields, and a `training_spec()`.

`EMoECausalLM` wraps the Hugging Face model (an EMoE one from molm_megatron.emoe.modeling, or the
plain dense one: the dense fine-tuning baseline) so that the trainer, the expert statistics and the
evaluation call it like `MoLM`: `forward(input_ids, labels, attention_mask, memory=None,
collect_expert_stats=False)` returning a `MoLMOutput` (logits, lm_loss_sum, num_label_tokens,
lm_loss, loss, aux losses, expert statistics). Differences, by design:
- labels are MoLM's: already shifted (label t is the token after input t), -100 ignored;
- no Transformer-XL memory (the dense models keep their own positions): `memory` must be None
  and `out.memory` is None, so the trainer reads each window on its own;
- no auxiliary loss (every aux loss is zero): EMoE's gate has no parameters to balance;
- data-parallel only (ZeRO 1-3): the avg-k gate scores every expert from the mean of its keys, so
  expert parallelism would need every rank's keys, and the dense attention has no tensor-parallel plan.
`apply_lora` is the EMoE paper's second fine-tuning setting (peft LoRA on the attention
projections); `merged_model()` folds it into the weights for export.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from molm_megatron.config import TrainingSpec
from molm_megatron.emoe.layer import EMoEMLP, check_architecture
from molm_megatron.emoe.modeling import register_auto_classes
from molm_megatron.model.losses import AUX_LOSS_NAMES
from molm_megatron.model.model import MoLMOutput

# peft target modules per architecture: the attention projections (module-name suffixes;
# GPT-2 names its attention and FFN output projections both c_proj, hence the prefix).
LORA_TARGETS = {
    "gpt2": ["attn.c_attn", "attn.c_proj"],
    "gpt_neox": ["attention.query_key_value", "attention.dense"],
    "llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
}
# Keys of a config's dict that describe where and how it was loaded, not the model.
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "dtype", "torch_dtype")


def checked_block_size(config: PretrainedConfig, block_size: int | None, where: str = "model.block_size") -> int:
    """The training window: `block_size`, or the model's context length when None; ValueError when
    it exceeds the positions the model has."""
    positions = config.max_position_embeddings  # GPT-2's n_positions, through its attribute_map
    if block_size is None:
        return positions
    if not 0 < block_size <= positions:
        raise ValueError(f"{where} ({block_size}) must be between 1 and the model's context length "
                         f"({positions}, max_position_embeddings of its config.json)")
    return block_size


def lora_target_modules(config: PretrainedConfig, targets: list[str] | None, where: str = "finetune.lora_targets"
                        ) -> list[str]:
    """The LoRA targets (the architecture's attention projections when empty), checked on the model's
    module tree (built on the meta device: no weights): each must name a module, none may lie inside
    an EMoE FFN, whose sparse computation reads the weights directly and would ignore an adapter."""
    targets = list(targets or LORA_TARGETS[config.model_type])
    register_auto_classes()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = [name for name, _ in model.named_modules()]
    inside_emoe = [name for name, m in model.named_modules() if isinstance(m, EMoEMLP)]
    for target in targets:
        hits = [n for n in names if n == target or n.endswith("." + target)]
        if not hits:
            raise ValueError(f"{where}: {target!r} names no module of this {config.model_type} model")
        bad = [n for n in hits if any(n.startswith(layer + ".") for layer in inside_emoe)]
        if bad:
            raise ValueError(f"{where}: {target!r} reaches {bad[0]}, inside an EMoE FFN whose sparse computation "
                             "reads the weights directly; target the attention projections or dense layers")
    return targets


def hf_config_dict(config: PretrainedConfig) -> dict:
    """The config as it is saved with a checkpoint: its non-default fields (emoe entry included),
    without where it was loaded from."""
    d = config.to_diff_dict()
    for key in _VOLATILE_CONFIG_KEYS:
        d.pop(key, None)
    d["model_type"] = config.model_type
    return d


def hf_config_from_dict(saved: dict) -> PretrainedConfig:
    """The config `hf_config_dict` saved."""
    fields = dict(saved)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


class EMoECausalLM(nn.Module):
    """A Hugging Face dense or EMoE model behind MoLM's forward signature (module docstring)."""

    def __init__(self, hf_model: PreTrainedModel, block_size: int | None = None):
        """`block_size`: the training window (default: the model's context length)."""
        super().__init__()
        check_architecture(hf_model.config, type(hf_model).__name__)
        self.hf_model = hf_model
        self.config = hf_model.config
        self.block_size = checked_block_size(self.config, block_size)
        self.lora: dict | None = None  # apply_lora's settings, saved with checkpoints

    def unwrapped(self) -> PreTrainedModel:
        """The Hugging Face model itself (under peft's wrapper when LoRA was applied)."""
        m = self.hf_model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    def emoe_layers(self) -> dict[int, EMoEMLP]:
        """The EMoE layers by layer index (none in a dense model)."""
        base = self.unwrapped()
        return base.emoe_layers() if hasattr(base, "emoe_layers") else {}

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        memory: list | None = None,
        collect_expert_stats: bool = False,
        memory_length: int | None = None,
        all_aux_losses: bool = True,
    ) -> MoLMOutput:
        """input_ids [B, T]; labels [B, T] already shifted, -100 ignored; attention_mask [B, T]
        (1 = real token). memory, memory_length and all_aux_losses exist for the trainer's
        signature: these models keep no memory (memory must be None) and have no aux losses."""
        if memory is not None or memory_length:
            raise ValueError(f"{type(self.unwrapped()).__name__} keeps no Transformer-XL memory: give no memory "
                             "(memory length 0)")
        base = self.unwrapped()
        counting = collect_expert_stats and hasattr(base, "emoe_layers")  # a dense model has no experts
        if counting:
            base.collect_expert_counts(True)
            valid_T = None if attention_mask is None else attention_mask.reshape(-1).bool()
            for layer in base.emoe_layers().values():
                layer.count_mask_T = valid_T  # padding tokens are left out of the statistics
        try:
            logits = self.hf_model(input_ids=input_ids, attention_mask=attention_mask).logits
        finally:
            stats = base.expert_counts() if counting else {}
            if counting:
                base.collect_expert_counts(False)
        out = MoLMOutput(logits=logits)
        out.aux_losses = {name: logits.new_zeros((), dtype=torch.float32) for name in AUX_LOSS_NAMES}
        out.aux_loss = logits.new_zeros((), dtype=torch.float32)  # trained with the LM loss alone
        if collect_expert_stats:
            out.expert_stats = stats  # 'layer{N}.mlpf' -> tokens per expert, MoLM's key format
        if labels is not None:
            # fp32: bf16 logits lose the small probabilities of a large vocabulary.
            logits_f = logits.float() if logits.element_size() < 4 else logits
            out.lm_loss_sum = F.cross_entropy(logits_f.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                              ignore_index=-100, reduction="sum")
            out.num_label_tokens = (labels != -100).sum()
            out.lm_loss = out.lm_loss_sum / out.num_label_tokens.clamp(min=1)
            out.loss = out.lm_loss
        return out

    # ---- what the trainer asks ---------------------------------------------------------------
    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), counted as MoLM counts them
        (ModelConfig.flops_per_token): 6 x the matmul parameters a token passes (embedding lookups
        excluded, the head included even when tied; an EMoE FFN at k/N of its weights) plus the
        attention products, per layer 2 x 2 FLOPs x d x keys (half the window on average), times 3."""
        base = self.unwrapped()
        lookups = {id(m.weight) for m in base.modules() if isinstance(m, nn.Embedding)}
        matmul = sum(p.numel() for p in base.parameters() if p.dim() >= 2 and id(p) not in lookups)
        head = base.get_output_embeddings().weight
        if id(head) in lookups:  # tied: the embedding table is also the head's matmul
            matmul += head.numel()
        for layer in self.emoe_layers().values():
            ffn = sum(p.numel() for p in layer.parameters() if p.dim() >= 2)
            matmul -= ffn * (1 - layer.top_k / layer.num_experts)
        cfg = base.config
        attn = cfg.num_hidden_layers * 2 * 2 * cfg.hidden_size * (seq_len + 1) / 2
        return 6.0 * matmul + 3.0 * attn

    def saved_config(self) -> dict:
        """What a checkpoint records of this model (`from_saved_config` rebuilds it)."""
        return {"hf_config": hf_config_dict(self.config), "block_size": self.block_size, "lora": self.lora}

    def training_spec(self) -> TrainingSpec:
        return TrainingSpec(block_size=self.block_size, vocab_size=self.config.vocab_size,
                            vocab_source=f"the model's vocab_size (its config.json, {self.config.model_type})",
                            history_length=0, config=self.saved_config(),
                            flops_per_token=self.flops_per_token(self.block_size),
                            # ZeRO-3 gathers a module's weights when it is called; the gate and the sparse
                            # path read the FFN's weights without calling its projections.
                            zero3_leaf_modules=(EMoEMLP,))

    @classmethod
    def from_saved_config(cls, saved: dict) -> "EMoECausalLM":
        """The model a checkpoint's `saved_config()` describes, with fresh weights (fp32)."""
        config = hf_config_from_dict(saved["hf_config"])
        register_auto_classes()  # a config with an emoe entry builds the EMoE class
        model = cls(AutoModelForCausalLM.from_config(config, dtype=torch.float32), saved["block_size"])
        if saved["lora"]:
            apply_lora(model, **saved["lora"])
        return model

    def merged_model(self) -> PreTrainedModel:
        """The Hugging Face model with LoRA (if applied) merged into its weights; this module then
        holds it, without adapters."""
        if self.lora is not None:
            self.hf_model = self.hf_model.merge_and_unload()
            self.lora = None
        return self.hf_model


def load_for_training(folder: str | Path, dtype: torch.dtype | None = None,
                      block_size: int | None = None) -> EMoECausalLM:
    """A dense or EMoE folder as a module the trainer can drive (fp32 weights unless dtype is given;
    `block_size` defaults to the model's context length)."""
    register_auto_classes()
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    check_architecture(config, str(folder))
    block_size = checked_block_size(config, block_size)  # before loading any weight
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype or torch.float32)
    return EMoECausalLM(model, block_size)


def apply_lora(model: EMoECausalLM, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               target_modules: list[str] | None = None) -> EMoECausalLM:
    """LoRA (peft) on `target_modules` (default: the attention projections); everything else frozen.
    Targets inside an EMoE FFN are refused (lora_target_modules)."""
    from peft import LoraConfig, get_peft_model

    if model.lora is not None:
        raise ValueError("LoRA is applied already; merge it first (merged_model)")
    targets = lora_target_modules(model.config, target_modules)
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    model.hf_model = get_peft_model(model.hf_model, lora)
    model.lora = {"r": r, "alpha": alpha, "dropout": dropout, "target_modules": targets}
    return model
