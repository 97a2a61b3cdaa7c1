"""The single-device MoLM model: router, MoA, SMoE, blocks, losses, generate."""

from molm_megatron.model.model import MoA, MoE, MoLM, MoLMOutput, MoLMTransformer, ParallelExperts, Router

__all__ = ["MoA", "MoE", "MoLM", "MoLMOutput", "MoLMTransformer", "ParallelExperts", "Router"]
