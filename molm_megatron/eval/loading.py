"""What an evaluation runs on: a model (from a Hugging Face folder or straight from a training
checkpoint, consolidated on the fly) and its tokenizer.

The weights are held once and seen through two interfaces that share every module:
`EvalModel.molm` (our MoLM: Transformer-XL memory, expert statistics) and `EvalModel.hf` (the
Hugging Face model that lm-evaluation-harness and `generate()` expect). Neither is a copy, so a
4B-parameter model costs its weights once. A dense or EMoE GPT-2 / GPT-NeoX / Llama folder (or a
checkpoint of one fine-tuned by finetune.py) is seen through its trainer-facing module instead of
a MoLM (molm_megatron.emoe.training.EMoECausalLM: the same forward, no memory, EMoE expert counts).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from molm_megatron.hf import ModuleFormerConfig, ModuleFormerForCausalLM
from molm_megatron.hf.convert import DTYPES, consolidate_checkpoint
from molm_megatron.emoe.layer import ARCHITECTURES
from molm_megatron.emoe.training import EMoECausalLM, load_for_training
from molm_megatron.model import MoLM
from molm_megatron.modular.weights import folder_model_type
from tokenizer.codegen import EOS_TOKEN, codegen_tokenizer
from tokenizer.loading import CODEGEN

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class EvalModel:
    molm: MoLM | EMoECausalLM
    hf: PreTrainedModel  # shares molm's modules
    tokenizer: PreTrainedTokenizerBase
    source: str  # "hf:<folder>" or "checkpoint:<folder>", recorded in every summary

    @property
    def device(self) -> torch.device:
        return next(self.molm.parameters()).device


def molm_view(hf: ModuleFormerForCausalLM) -> MoLM:
    """A MoLM whose modules are `hf`'s (built on the meta device, so nothing is allocated twice)."""
    with torch.device("meta"):
        molm = MoLM(hf.config.to_model_config())
    molm.transformer, molm.lm_head = hf.transformer, hf.lm_head
    return molm


def hf_view(molm: MoLM) -> ModuleFormerForCausalLM:
    """A Hugging Face model whose modules are `molm`'s."""
    with torch.device("meta"):
        hf = ModuleFormerForCausalLM(ModuleFormerConfig.from_model_config(molm.config))
    hf.transformer, hf.lm_head = molm.transformer, molm.lm_head
    return hf


def codegen_hf_tokenizer() -> PreTrainedTokenizerFast:
    """CodeGen's tokenizer (the published MoLM's) as a transformers tokenizer, built in memory."""
    return PreTrainedTokenizerFast(tokenizer_object=codegen_tokenizer(), bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
                                   unk_token=EOS_TOKEN, clean_up_tokenization_spaces=False)


def load_tokenizer_for(model_path: Path, tokenizer: str) -> PreTrainedTokenizerBase:
    """`tokenizer`: "auto" (the model folder's own tokenizer files, else CodeGen's), "codegen", or a
    Hugging Face tokenizer folder."""
    if tokenizer == "auto":
        has_own = all((model_path / name).is_file() for name in TOKENIZER_FILES)
        tokenizer = str(model_path) if has_own else CODEGEN
    if tokenizer == CODEGEN:
        return codegen_hf_tokenizer()
    folder = Path(tokenizer)
    if not (folder / "tokenizer.json").is_file():
        raise ValueError(f"--tokenizer {folder}: no tokenizer.json in it (a Hugging Face tokenizer folder, or "
                         f"{CODEGEN!r} for the built-in CodeGen tokenizer)")
    return AutoTokenizer.from_pretrained(folder)


def load_eval_model(path: str | Path, tokenizer: str = "auto", device: str = "auto",
                    dtype: str = "auto") -> EvalModel:
    """The model at `path` ready for evaluation (eval mode, on `device`, cast to `dtype`).

    path: a Hugging Face folder (config.json + safetensors, ours or a published MoLM, or a dense or
    EMoE GPT-2 / GPT-NeoX / Llama) or a training checkpoint (pretrain.py's or finetune.py's
    `checkpoint.dir`, its newest complete checkpoint, or one step_* folder; any TP/EP layout,
    consolidated here). device: auto | cpu | cuda[:N]. dtype: auto
    (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16.
    """
    path = Path(path)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected auto or one of {', '.join(sorted(DTYPES))}")
    if folder_model_type(path) in ARCHITECTURES:  # a dense or EMoE GPT-2 / GPT-NeoX / Llama folder
        molm = load_for_training(path)
        hf, source = molm.hf_model, f"hf:{path}"
    elif (path / "config.json").is_file():
        hf = ModuleFormerForCausalLM.from_pretrained(path)
        molm, source = molm_view(hf), f"hf:{path}"
    elif path.is_dir():
        molm = consolidate_checkpoint(path)  # raises, naming the folder, when it holds no complete checkpoint
        hf = hf_view(molm) if isinstance(molm, MoLM) else molm.merged_model()
        source = f"checkpoint:{path}"
    else:
        raise ValueError(f"--model {path}: not a folder (expected a Hugging Face folder with config.json or a "
                         "training checkpoint folder)")
    molm.to(device=device, dtype=DTYPES[dtype]).eval()
    hf.eval()
    tok = load_tokenizer_for(path, tokenizer)
    if len(tok) > molm.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tok)} ids but the model's vocab_size is {molm.config.vocab_size} "
                         f"({path}); pass the tokenizer the model was trained with (--tokenizer)")
    return EvalModel(molm, hf, tok, source)
