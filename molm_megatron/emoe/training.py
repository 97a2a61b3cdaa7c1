"""An EMoE model as the shared trainer drives a model: MoLM's forward signature and output fields.

`EMoECausalLM` wraps a Hugging Face EMoE model (molm_megatron.emoe.modeling) so that the trainer
can call it like `MoLM`: `forward(input_ids, labels, attention_mask, memory=None,
collect_expert_stats=False)` returning a `MoLMOutput` (logits, lm_loss_sum, num_label_tokens,
lm_loss, loss, aux losses, expert statistics). Differences, by design:
- labels are MoLM's: already shifted (label t is the token after input t), -100 ignored;
- no Transformer-XL memory (the dense models keep their own positions): `memory` must be None
  and `out.memory` is None;
- EMoE has no auxiliary loss (every aux loss is zero).
`apply_lora` is the paper's second fine-tuning setting (peft LoRA on the attention projections).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, PreTrainedModel

from molm_megatron.emoe.convert import export_dense
from molm_megatron.emoe.modeling import emoe_settings, register_auto_classes
from molm_megatron.model.losses import AUX_LOSS_NAMES
from molm_megatron.model.model import MoLMOutput

# peft target modules per architecture: the attention projections (module-name suffixes;
# GPT-2 names its attention and FFN output projections both c_proj, hence the prefix).
LORA_TARGETS = {
    "gpt2": ["attn.c_attn", "attn.c_proj"],
    "gpt_neox": ["attention.query_key_value", "attention.dense"],
    "llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
}


class EMoECausalLM(nn.Module):
    """A Hugging Face EMoE model behind MoLM's forward signature (module docstring)."""

    def __init__(self, hf_model: PreTrainedModel):
        super().__init__()
        if emoe_settings(hf_model.config) is None:
            raise ValueError("EMoECausalLM needs an EMoE model (its config has no emoe entry)")
        self.hf_model = hf_model
        self.config = hf_model.config

    def emoe_model(self) -> PreTrainedModel:
        """The EMoE model itself (under a peft wrapper, when LoRA was applied)."""
        m = self.hf_model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

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
        signature: EMoE models keep no memory (memory must be None) and have no aux losses."""
        if memory is not None:
            raise ValueError("EMoE models keep no Transformer-XL memory: pass memory=None")
        base = self.emoe_model()
        layers = base.emoe_layers()
        if collect_expert_stats:
            base.collect_expert_counts(True)
            valid_T = None if attention_mask is None else attention_mask.reshape(-1).bool()
            for layer in layers.values():
                layer.count_mask_T = valid_T  # padding tokens are left out of the statistics
        try:
            logits = self.hf_model(input_ids=input_ids, attention_mask=attention_mask).logits
        finally:
            if collect_expert_stats:
                stats = base.expert_counts()
                base.collect_expert_counts(False)
        out = MoLMOutput(logits=logits)
        out.aux_losses = {name: logits.new_zeros((), dtype=torch.float32) for name in AUX_LOSS_NAMES}
        out.aux_loss = logits.new_zeros((), dtype=torch.float32)  # EMoE trains with the LM loss alone
        if collect_expert_stats:
            out.expert_stats = stats
        if labels is not None:
            # fp32: bf16 logits lose the small probabilities of a large vocabulary.
            logits_f = logits.float() if logits.element_size() < 4 else logits
            out.lm_loss_sum = F.cross_entropy(logits_f.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                              ignore_index=-100, reduction="sum")
            out.num_label_tokens = (labels != -100).sum()
            out.lm_loss = out.lm_loss_sum / out.num_label_tokens.clamp(min=1)
            out.loss = out.lm_loss
        return out

    def save_pretrained(self, out_dir: str | Path) -> None:
        """The EMoE folder (LoRA merged into the weights first when applied)."""
        m = self.hf_model
        if hasattr(m, "merge_and_unload"):
            m = m.merge_and_unload()
            self.hf_model = m
        m.save_pretrained(out_dir)

    def export_dense(self, out_dir: str | Path) -> Path:
        """The plain dense folder ("train as EMoE, ship dense")."""
        m = self.hf_model.merge_and_unload() if hasattr(self.hf_model, "merge_and_unload") else self.hf_model
        self.hf_model = m
        return export_dense(m, out_dir)


def load_for_training(folder: str | Path, dtype: torch.dtype | None = None) -> EMoECausalLM:
    """An EMoE folder as a module the trainer can drive (fp32 weights unless dtype is given)."""
    register_auto_classes()
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype or torch.float32)
    return EMoECausalLM(model)


def apply_lora(model: EMoECausalLM, r: int = 8, alpha: int = 16, dropout: float = 0.0,
               target_modules: list[str] | None = None) -> EMoECausalLM:
    """LoRA (peft) on the attention projections; everything else frozen. The EMoE FFNs are not
    targets: the sparse computation reads their weights directly."""
    from peft import LoraConfig, get_peft_model

    targets = target_modules or LORA_TARGETS[model.config.model_type]
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    model.hf_model = get_peft_model(model.hf_model, lora)
    return model
