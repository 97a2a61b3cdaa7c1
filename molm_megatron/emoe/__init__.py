"""Emergent mixture of experts (EMoE; Qiu et al., "Unlocking Emergent Modularity in Large
Language Models", NAACL 2024): a dense GPT-2, GPT-NeoX/Pythia or Llama model whose FFNs are split
into experts by balanced clustering of their key vectors, gated by the averaged keys (no new
parameters).

- `convert` (CLI: `python -m molm_megatron.emoe convert`): dense folder -> EMoE folder.
- `EMoEMLP` (layer.py): the gated FFN, masked (reference) and sparse (scattered-expert kernels).
- The EMoE model classes (modeling.py), registered with AutoModelForCausalLM on import: an
  EMoE folder loads gated, any other folder as before.
- `export_dense`: an EMoE model (e.g. fine-tuned) as a plain dense folder.
- `load_for_training` (training.py): an EMoE folder as a module with MoLM's forward signature
  and output fields, for the shared trainer.
"""

from molm_megatron.emoe.convert import convert, export_dense
from molm_megatron.emoe.layer import ARCHITECTURES, EMoEMLP
from molm_megatron.emoe.modeling import (EMOE_CLASSES, EMoEGPT2LMHeadModel, EMoEGPTNeoXForCausalLM,
                                         EMoELlamaForCausalLM, EMoESettings, register_auto_classes)

register_auto_classes()

__all__ = ["ARCHITECTURES", "EMOE_CLASSES", "EMoEGPT2LMHeadModel", "EMoEGPTNeoXForCausalLM", "EMoELlamaForCausalLM",
           "EMoEMLP", "EMoESettings", "convert", "export_dense"]
