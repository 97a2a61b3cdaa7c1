"""Hugging Face format of the published MoLM checkpoints: config, modeling, converters.

`import molm_megatron` (which any `import molm_megatron.hf` runs first) registers
`model_type: moduleformer` with AutoConfig / AutoModelForCausalLM, so exports load offline. The
classes below are imported on first use: importing this package stays as light as the config.
"""

from __future__ import annotations

import importlib

_LAZY = {"ModuleFormerConfig": "molm_megatron.hf.configuration_moduleformer",
         "ModuleFormerForCausalLM": "molm_megatron.hf.modeling_moduleformer"}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
