"""Optimizer parameter groups and the DeepSpeed configuration of a run.

AdamW (Loshchilov & Hutter, 2019) with decoupled weight decay. Which tensors decay: every tensor
of two or more dimensions (linear weights, the [E, in, out] expert tensors, the token embedding
and the untied head, as in Megatron-LM and nanoGPT); never LayerNorm weights or any bias. In this
model the one-dimensional tensors are exactly the norms and biases, also after tensor parallelism
shards them, so the rule needs no module names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from molm_megatron.config import JobConfig
from molm_megatron.training.schedule import BatchPlan


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups, 'decay' (ndim >= 2) and 'no_decay' (norms, biases, tensors marked
    `no_weight_decay`), trainable (requires_grad) params only: a frozen tensor gets no optimizer state.

    Expert parameters are split into their own groups afterwards by the parallel package (they are
    reduced over the expert-data-parallel group); the split keeps each group's weight decay.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            # `no_weight_decay`: a tensor of which only some rows train (modular.insert), whose frozen
            # rows decay would move.
            decays = param.dim() >= 2 and not getattr(param, "no_weight_decay", False)
            (decay if decays else no_decay).append(param)
    return [{"name": "decay", "params": decay, "weight_decay": weight_decay},
            {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]


def deepspeed_config(job: JobConfig, plan: BatchPlan, on_gpu: bool, bf16: bool) -> dict:
    """The DeepSpeed config dict: batch sizes, AdamW, clipping, ZeRO stage, precision.

    We log, schedule the LR and check for non-finite steps ourselves, so DeepSpeed's own printing
    is off and no scheduler is configured here (the trainer passes a LambdaLR).
    """
    o = job.optimizer
    adamw = {"lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps, "weight_decay": o.weight_decay,
             # torch.optim.AdamW instead of DeepSpeed's Adam op, whose CPU build is a ~40 s JIT
             # compile; on GPU torch's fused (single-kernel) AdamW is as fast as DeepSpeed's.
             "torch_adam": True}
    if on_gpu:
        adamw["fused"] = True
    zero: dict = {"stage": job.parallel.zero_stage}
    if job.parallel.zero_stage >= 2:
        # Contiguous gradient buffers avoid fragmentation; overlapping the reduction with the
        # backward pass only pays on GPUs (on CPU it adds threads competing for the same cores).
        zero.update(contiguous_gradients=True, overlap_comm=on_gpu)
    config = {
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum_steps,
        "train_batch_size": plan.global_batch_sequences,
        "optimizer": {"type": "AdamW", "params": adamw},
        "gradient_clipping": o.grad_clip,
        "zero_optimization": zero,
        # bf16 model and gradients with fp32 master weights and optimizer states inside ZeRO;
        # DeepSpeed skips (and counts) a step whose gradient norm is not finite.
        "bf16": {"enabled": bf16, "check_grad_overflow": True},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    if bf16 and job.parallel.zero_stage == 1:
        # Accumulate the micro-batches' gradients in fp32 (DeepSpeed's bf16 optimizer), not in the
        # bf16 .grad tensors: 24 micro-batches summed in bf16 keep 8 bits of mantissa. The fused
        # accumulation (training/microbatch.py) writes these fp32 buffers directly.
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


@contextlib.contextmanager
def expert_params_as_moe() -> Iterator[None]:
    """Make `deepspeed.initialize` treat tagged expert parameters as MoE parameters.

    DeepSpeed hands its ZeRO optimizer the expert-data-parallel groups only when the model holds an
    instance of its own `deepspeed.moe.layer.MoE` class. Our experts are plain tensors tagged by
    molm_megatron.parallel (`allreduce = False`, `group_name`), the same tags DeepSpeed's MoE sets,
    so for the engine's construction we extend its layer detection to those tags.
    """
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = DeepSpeedEngine._configure_distributed_model

    def configure(engine: DeepSpeedEngine, model: torch.nn.Module) -> None:
        original(engine, model)
        engine.has_moe_layers = engine.has_moe_layers or any(is_moe_param(p) for p in engine.module.parameters())

    DeepSpeedEngine._configure_distributed_model = configure
    try:
        yield
    finally:
        DeepSpeedEngine._configure_distributed_model = original
