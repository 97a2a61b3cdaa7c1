"""MoLM-Megatron: training ModuleFormer (MoLM) mixture-of-experts language models.

`import molm_megatron` registers `model_type: moduleformer` with transformers' AutoConfig and
AutoModelForCausalLM, so `AutoModelForCausalLM.from_pretrained(export)` loads our exports and the
published MoLM checkpoints without trust_remote_code; and the EMoE classes (molm_megatron.emoe),
so EMoE folders load with their gating (other GPT-2/GPT-NeoX/Llama folders load as before). Importing transformers takes seconds, so the
registration waits for it: it runs when transformers' auto modules are first imported (at once if
they already are), and `import molm_megatron` itself imports nothing heavy.
"""

from __future__ import annotations

import sys
import warnings

# megatron-core warns on import, four times, that Transformer Engine and Apex are missing. We use
# neither on purpose (PyTorch's fused AdamW and native norms replace them; README "Dependencies"),
# so the warning says nothing to our users. Only this message is silenced; any other warning of
# megatron-core still shows. Every module of ours that imports megatron-core sits in this package,
# so this runs before the first such import.
warnings.filterwarnings("ignore", message=r"Transformer Engine and Apex are not installed", category=UserWarning)

# The transformers modules that define AutoConfig and AutoModelForCausalLM.
_AUTO_MODULES = ("transformers.models.auto.configuration_auto", "transformers.models.auto.modeling_auto")


def _register(module_name: str) -> None:
    # The config needs only transformers' PretrainedConfig, loaded before configuration_auto; the
    # model (torch, our layers) is imported only once AutoModelForCausalLM exists.
    from transformers.models.auto.configuration_auto import AutoConfig

    from molm_megatron.hf.configuration_moduleformer import ModuleFormerConfig

    AutoConfig.register("moduleformer", ModuleFormerConfig, exist_ok=True)
    if module_name.endswith("modeling_auto"):
        from transformers.models.auto.modeling_auto import AutoModelForCausalLM

        from molm_megatron.hf.modeling_moduleformer import ModuleFormerForCausalLM

        AutoModelForCausalLM.register(ModuleFormerConfig, ModuleFormerForCausalLM, exist_ok=True)

        # Importing the EMoE module first can be what loads modeling_auto: that module is then
        # half-initialised here, and registers its classes itself once its body has run.
        emoe = sys.modules.get("molm_megatron.emoe.modeling")
        if emoe is None or hasattr(emoe, "register_auto_classes"):
            from molm_megatron.emoe.modeling import register_auto_classes

            register_auto_classes()


class _RegisterAfterImport:
    """A meta path finder (duck-typed: importlib.abc costs more to import than the rest of this
    file) that finds an auto module through the other finders and registers our classes once the
    module has run."""

    def find_spec(self, name, path, target=None):
        if name not in _AUTO_MODULES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            _register(name)

        spec.loader.exec_module = exec_and_register
        if all(m in sys.modules or m == name for m in _AUTO_MODULES):
            sys.meta_path.remove(self)  # the last one: the hook has nothing more to do
        return spec


def _install() -> None:
    if any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        return
    pending = [m for m in _AUTO_MODULES if m not in sys.modules]
    for name in _AUTO_MODULES:
        if name in sys.modules:
            _register(name)
    if pending:
        sys.meta_path.insert(0, _RegisterAfterImport())


_install()
