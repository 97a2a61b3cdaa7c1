"""Dense Hugging Face folder -> EMoE folder, and an EMoE model -> a plain dense folder.

`convert` clusters the chosen layers' FFN neurons (molm_megatron.emoe.cluster), permutes them
so each expert is a contiguous slice (the dense function is unchanged), and saves the dense
architecture with the `emoe` entry in config.json: plain transformers loads it as the dense
model, `molm_megatron.emoe` as the gated one. `export_dense` ("train as EMoE, ship dense")
writes a fine-tuned EMoE model's weights as a plain dense folder.
"""

from __future__ import annotations

import copy
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from molm_megatron.emoe.cluster import cached_labels, expert_permutation
from molm_megatron.emoe.layer import ARCHITECTURES, check_architecture, keys_FD, kernel_activation, permute_neurons_
from molm_megatron.emoe.modeling import EMOE_CLASSES, EMoESettings, emoe_settings
from molm_megatron.outputs import write_folder

# Files of a model folder that the converter rewrites (weights, configs); the rest (tokenizer
# files, README, ...) are copied as they are.
_REWRITTEN_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack")
_REWRITTEN_NAMES = ("config.json", "generation_config.json")


def d_ff_of(config: PretrainedConfig) -> int:
    """The FFN width of a supported dense config."""
    if config.model_type == "gpt2":
        return config.n_inner or 4 * config.n_embd
    return config.intermediate_size


def resolve_layers(num_layers: int, layers: list[int] | None, start: int | None, stride: int | None) -> list[int]:
    """The layers to convert: an explicit list, or start, start + stride, ... (default: all)."""
    if layers is not None and (start is not None or stride is not None):
        raise ValueError("give either --layers or --layer-start/--layer-stride, not both")
    if layers is None:
        start, stride = 0 if start is None else start, 1 if stride is None else stride
        if stride < 1:
            raise ValueError(f"--layer-stride must be >= 1, got {stride}")
        layers = list(range(start, num_layers, stride))
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad or not layers:
        raise ValueError(f"layer indices {bad or layers} out of range: the model has {num_layers} layers "
                         f"(0..{num_layers - 1})")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layer indices repeat: {layers}")
    return sorted(layers)


def check_conversion(config: PretrainedConfig, settings: EMoESettings) -> None:
    """Every error a conversion can raise on its settings, before any work."""
    check_architecture(config)
    if getattr(config, "emoe", None):
        raise ValueError("the model is already an EMoE model (its config.json has an emoe entry)")
    kernel_activation(getattr(config, ARCHITECTURES[config.model_type].activation_field))
    if config.model_type == "llama" and getattr(config, "mlp_bias", False):
        raise ValueError("Llama with mlp_bias=true is not supported by EMoE's GLU form")
    d_ff = d_ff_of(config)
    if settings.num_experts < 1 or d_ff % settings.num_experts:
        raise ValueError(f"d_ff ({d_ff}) must be divisible by --experts ({settings.num_experts})")
    if not 1 <= settings.top_k <= settings.num_experts:
        raise ValueError(f"--top-k ({settings.top_k}) must be between 1 and --experts ({settings.num_experts})")
    EMoESettings.from_dict(asdict(settings), config.num_hidden_layers)


def _write_folder(out: Path, write: Callable[[Path], None]) -> Path:
    """Write a new folder atomically, with umask permissions (molm_megatron.outputs). Refuses to
    replace an existing path."""
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new --out (nothing is overwritten)")
    return write_folder(out, write, "EMoE folder", owned_files=())


def _copy_side_files(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if f.is_file() and f.name not in _REWRITTEN_NAMES and not f.name.endswith(_REWRITTEN_SUFFIXES) \
                and not f.name.endswith(".index.json"):
            shutil.copy2(f, dst / f.name)


def convert(
    model_dir: str | Path,
    out_dir: str | Path,
    num_experts: int = 64,
    top_k: int = 16,
    layers: list[int] | None = None,
    layer_start: int | None = None,
    layer_stride: int | None = None,
    seed: int = 0,
    n_init: int = 10,
    max_iter: int = 300,
    computation: str = "sparse",
    cache_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Convert a local dense Hugging Face folder (GPT-2, GPT-NeoX/Pythia, Llama) into an EMoE
    folder at out_dir (which must not exist). cache_dir keeps the k-means labels per layer
    (default: `<out_dir>.labels` beside the output), so a rerun skips the clustering."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir / 'config.json'} not found: --model must be a local Hugging Face folder")
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    check_architecture(config)
    chosen = resolve_layers(config.num_hidden_layers, layers, layer_start, layer_stride)
    settings = EMoESettings(num_experts=num_experts, top_k=top_k, layers=chosen, computation=computation, seed=seed)
    check_conversion(config, settings)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; choose a new --out (nothing is overwritten)")
    cache = Path(cache_dir) if cache_dir is not None else out_dir.with_name(out_dir.name + ".labels")

    spec = ARCHITECTURES[config.model_type]
    dense_class = EMOE_CLASSES[config.model_type].dense_class
    t0 = time.perf_counter()
    model = dense_class.from_pretrained(model_dir, local_files_only=True, dtype="auto")
    log(f"loaded {config.model_type} from {model_dir} in {time.perf_counter() - t0:.1f}s; converting "
        f"{len(chosen)} layers to {num_experts} experts of {d_ff_of(config) // num_experts} neurons (top-{top_k})")
    blocks = model.get_submodule(spec.blocks)
    total = time.perf_counter()
    for n, i in enumerate(chosen, 1):
        t = time.perf_counter()
        mlp = blocks[i].mlp
        labels, hit = cached_labels(cache, i, keys_FD(getattr(mlp, spec.first), spec.conv1d), num_experts, seed,
                                    n_init, max_iter)
        permute_neurons_(mlp, spec, expert_permutation(labels))
        log(f"[{n}/{len(chosen)}] layer {i}: {'labels from cache' if hit else 'balanced k-means'} "
            f"{time.perf_counter() - t:.1f}s")
    log(f"clustered {len(chosen)} layers in {time.perf_counter() - total:.1f}s")
    model.config.emoe = asdict(settings)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        _copy_side_files(model_dir, tmp)

    _write_folder(out_dir, write)
    log(f"wrote {out_dir}")
    return out_dir


def dense_copy(model: PreTrainedModel) -> PreTrainedModel:
    """An EMoE model (e.g. fine-tuned) as the plain dense model: the same weights, the config
    without the emoe entry. A dense model is returned as it is."""
    if emoe_settings(model.config) is None:
        return model
    config = copy.deepcopy(model.config)
    del config.emoe
    # Built in the model's dtype: a default-dtype (fp32) copy would round fp64/bf16 weights.
    dense = EMOE_CLASSES[config.model_type].dense_class(config).to(next(model.parameters()).dtype)
    missing, unexpected = dense.load_state_dict(model.state_dict(), strict=False)
    # Tied embeddings (GPT-2's lm_head) may be absent from one side; anything else is an error.
    tied = set(getattr(dense, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise ValueError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    return dense


def export_dense(model: PreTrainedModel, out_dir: str | Path) -> Path:
    """Save an EMoE model (e.g. fine-tuned) as a plain dense folder (`dense_copy`) that plain
    transformers loads as the dense architecture."""
    if emoe_settings(model.config) is None:
        raise ValueError("export_dense needs an EMoE model (its config has no emoe entry)")
    return _write_folder(Path(out_dir), dense_copy(model).save_pretrained)
