"""The model a fine-tuning run trains: the starting weights, the run's loss settings, an optional
larger vocabulary and inserted experts, and which tensors train (finetune.py hands it to the
pretraining engine, `Trainer(job, model)`).

The three recipes (launch/configs/finetune_*.yaml; ModuleFormer, Shen et al. 2023, appendix C.4 and
D.1: constant learning rate, 5e-5 for fine-tuning, 3e-4 for continual training):
1. load concentration: every tensor trains, loss + w * H(e) per router (model.concentration_loss_weight);
2. continual learning: new experts inserted, only they and their router rows train (routing
   regularisation model.routing_reg_weight * sum of ||W_e_new||), optionally the token embedding
   and the rows of a grown vocabulary;
3. plain full fine-tuning.

A Hugging Face dense or EMoE GPT-2 / GPT-NeoX / Llama folder (molm_megatron.emoe), or a checkpoint
of one, trains through the same engine behind its trainer-facing module (EMoECausalLM): every
tensor, or LoRA adapters alone (the EMoE paper's two settings; finetune.lora_rank).
"""

from __future__ import annotations

import dataclasses
import logging

from transformers import PretrainedConfig

from molm_megatron.config import FinetuneJobConfig
from molm_megatron.data.spec import job_data_ids
from molm_megatron.emoe.training import EMoECausalLM, apply_lora, checked_block_size, lora_target_modules
from molm_megatron.model import MoLM
from molm_megatron.modular.insert import count_trainable, grow_vocab, insert_experts, mask_frozen_rows, set_trainable
from molm_megatron.modular.weights import full_state_dict, hf_lm_config, load_any_model, load_model, model_from_full

logger = logging.getLogger(__name__)


def build_finetune_model(job: FinetuneJobConfig) -> MoLM | EMoECausalLM:
    """The starting weights with the run's settings applied (a validated job), on the CPU in fp32,
    trainable tensors marked (`requires_grad`). Every rank builds the same model (insertion and a
    preset's initialisation are seeded by train.seed)."""
    f = job.finetune
    hf_config = hf_lm_config(f.init_from) if not f.init_from.startswith("preset:") else None
    if hf_config is not None:
        return build_hf_finetune_model(job, hf_config)
    if f.lora_rank:
        raise ValueError(f"finetune.lora_rank ({f.lora_rank}): LoRA applies to Hugging Face dense or EMoE models "
                         f"(GPT-2, GPT-NeoX, Llama); finetune.init_from {f.init_from} is a MoLM model")
    model = load_model(f.init_from, seed=job.train.seed).float()
    # Loss weights, dropout, k, memory length: the job's, over the starting weights' own. The MI
    # loss of pretraining is off unless asked for.
    cfg = dataclasses.replace(model.config, **{"aux_loss_weight": 0.0, **job.model.overrides})
    cfg.validate()
    model = model_from_full(cfg, full_state_dict(model))  # rebuilt: modules read k and dropout at init
    old_vocab = cfg.vocab_size
    if f.tokenizer:
        from tokenizer.loading import load_tokenizer

        model = grow_vocab(model, load_tokenizer(f.tokenizer).vocab_size, seed=job.train.seed)
    if f.insert_mlp_experts or f.insert_att_experts:
        model = insert_experts(model, f.insert_mlp_experts, f.insert_att_experts, seed=job.train.seed + 1)
    set_trainable(model, f.trainable, f.train_embedding, old_vocab)
    return model


def build_hf_finetune_model(job: FinetuneJobConfig, config: PretrainedConfig) -> EMoECausalLM:
    """A Hugging Face dense or EMoE starting point (its `config`), every setting checked before the
    weights are read: all tensors train, or only LoRA adapters (finetune.lora_rank)."""
    f, p = job.finetune, job.parallel
    kind = f"{'an EMoE' if getattr(config, 'emoe', None) else 'a dense'} {config.model_type} model"
    where = f"finetune.init_from {f.init_from} is {kind}"
    other = sorted(set(job.model.overrides) - {"block_size"})
    if other:
        raise ValueError(f"model.{other[0]}: {where}; of the model settings only model.block_size (the training "
                         "window) applies to it")
    for name in ("insert_mlp_experts", "insert_att_experts", "tokenizer", "train_embedding"):
        if getattr(f, name):
            raise ValueError(f"finetune.{name}: {where}; inserted experts and grown vocabularies apply to MoLM models")
    if f.trainable != "all":
        raise ValueError(f"finetune.trainable {f.trainable!r}: {where}; it trains every tensor, or LoRA adapters "
                         "alone with finetune.lora_rank")
    if p.tensor_parallel_size > 1 or p.expert_parallel_size > 1:
        raise ValueError(f"parallel.tensor_parallel_size ({p.tensor_parallel_size}) and "
                         f"parallel.expert_parallel_size ({p.expert_parallel_size}) must be 1: {where}, which trains "
                         "data-parallel only (ZeRO 1-3): the avg-k gate reads every expert's keys, and the dense "
                         "attention has no tensor-parallel plan")
    data = job_data_ids(job)
    if data is not None and data[1] > config.vocab_size:
        raise ValueError(f"the data's vocabulary ({data[1]} ids, from {data[0]}.json) exceeds the model's vocab_size "
                         f"({config.vocab_size}); {where}: tokenize the data with the model's tokenizer (data_prep "
                         "--tokenizer MODEL_FOLDER)")
    t = job.train
    if t.activation_checkpoint != "none":
        raise ValueError(f"train.activation_checkpoint {t.activation_checkpoint!r}: {where}, which has no MoA layers "
                         "or MoLM blocks to recompute")
    if t.cuda_graph:
        raise ValueError(f"train.cuda_graph: {where}, which keeps no Transformer-XL memory; graphs are captured "
                         "for windows with memory only, so nothing would be captured")
    block_size = checked_block_size(config, job.model.overrides.get("block_size"))
    targets = lora_target_modules(config, f.lora_targets) if f.lora_rank else None
    model = load_any_model(f.init_from)
    model.merged_model()  # a checkpoint's own adapters become weights; this run adds its own
    model.block_size = block_size
    if f.lora_rank:
        apply_lora(model, f.lora_rank, f.lora_alpha, f.lora_dropout, targets)
    return model


def finetune_trainer(job: FinetuneJobConfig):
    """The pretraining engine's Trainer on the fine-tuning model, with the row masks of a grown
    vocabulary in place; logs and returns (trainer, trainable parameters, total parameters)."""
    from molm_megatron.training.trainer import Trainer

    model = build_finetune_model(job)
    trainable, total = count_trainable(model)
    trainer = Trainer(job, model)
    mask_frozen_rows(trainer.engine.module)  # on the parallelised tensors: the shards know their rows
    if trainer.rank == 0:
        logger.info("trainable parameters %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return trainer, trainable, total
