"""MoLM-Megatron: training system for ModuleFormer (MoLM) mixture-of-experts language models."""

import warnings

# megatron-core warns on import, four times, that Transformer Engine and Apex are missing. We use
# neither on purpose (PyTorch's fused AdamW and native norms replace them; README "Dependencies"),
# so the warning says nothing to our users. Only this message is silenced; any other warning of
# megatron-core still shows. Every module of ours that imports megatron-core sits in this package,
# so this runs before the first such import.
warnings.filterwarnings("ignore", message=r"Transformer Engine and Apex are not installed", category=UserWarning)
