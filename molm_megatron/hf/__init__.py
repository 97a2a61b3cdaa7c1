"""Hugging Face format of the published MoLM checkpoints; importing molm_megatron.hf registers
`moduleformer` with AutoConfig / AutoModelForCausalLM so exports load offline."""

from transformers import AutoConfig, AutoModelForCausalLM

from molm_megatron.hf.configuration_moduleformer import ModuleFormerConfig
from molm_megatron.hf.modeling_moduleformer import ModuleFormerForCausalLM

AutoConfig.register("moduleformer", ModuleFormerConfig, exist_ok=True)
AutoModelForCausalLM.register(ModuleFormerConfig, ModuleFormerForCausalLM, exist_ok=True)

__all__ = ["ModuleFormerConfig", "ModuleFormerForCausalLM"]
