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
"""

from __future__ import annotations

import dataclasses
import logging

from molm_megatron.config import FinetuneJobConfig
from molm_megatron.model import MoLM
from molm_megatron.modular.insert import count_trainable, grow_vocab, insert_experts, mask_frozen_rows, set_trainable
from molm_megatron.modular.weights import full_state_dict, load_model, model_from_full

logger = logging.getLogger(__name__)


def build_finetune_model(job: FinetuneJobConfig) -> MoLM:
    """The starting weights with the run's settings applied (a validated job), on the CPU in fp32,
    trainable tensors marked (`requires_grad`). Every rank builds the same model (insertion and a
    preset's initialisation are seeded by train.seed)."""
    f = job.finetune
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
