"""Module manipulation of MoLM models (ModuleFormer, Shen et al. 2023, sections 4.2, 4.3 and 5.3):
functions that take a model and return a new one, plus the expert statistics they are driven by.

- `insert`: continual learning by inserting experts, vocabulary growth, which tensors train;
- `prune`: removing rarely used experts by frequency, and the layer-dropping baselines;
- `stats`: expert frequencies per router on each domain, KL between domains;
- `weights`: the starting points (checkpoint folders, Hugging Face folders, model files) and the
  full-tensor view the transformations edit.

Command line: `python -m molm_megatron.modular stats|prune|drop-layers --help`.
"""

from molm_megatron.modular.insert import count_trainable, grow_vocab, insert_experts, mask_frozen_rows, set_trainable
from molm_megatron.modular.prune import (drop_layers, importance, layers_for_share, layers_to_drop, prune_experts,
                                         select_by_share, select_by_threshold)
from molm_megatron.modular.stats import expert_statistics, kl_divergence, read_stats, write_stats
from molm_megatron.modular.weights import full_state_dict, load_model, model_from_full

__all__ = [
    "count_trainable", "drop_layers", "expert_statistics", "full_state_dict", "grow_vocab", "importance",
    "insert_experts", "kl_divergence", "layers_for_share", "layers_to_drop", "load_model", "mask_frozen_rows",
    "model_from_full", "prune_experts", "read_stats", "select_by_share", "select_by_threshold", "set_trainable",
    "write_stats",
]
