"""What one optimizer step is: the batch arithmetic (tokens -> micro-batches) and the LR schedule.

The schedule is the one the ModuleFormer paper (Shen et al., 2023) trains with: linear warmup to
the peak, cosine decay to 10% of the peak (GPT-3, Brown et al. 2020, section B), then constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from molm_megatron.config import JobConfig


@dataclass(frozen=True)
class BatchPlan:
    """global_batch_tokens = micro_batch_size x grad_accum_steps x dp_size x seq_len."""

    micro_batch_size: int
    grad_accum_steps: int
    dp_size: int
    seq_len: int

    @property
    def global_batch_sequences(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.dp_size

    @property
    def global_batch_tokens(self) -> int:
        return self.global_batch_sequences * self.seq_len


def plan_batch(global_batch_tokens: int, micro_batch_size: int, seq_len: int, dp_size: int) -> BatchPlan:
    """Split a global batch given in tokens into micro-batches per rank and accumulation steps.

    `global_batch_tokens == 0` means one micro-batch per data-parallel rank. Raises ValueError,
    naming the fields and the nearest valid sizes, when the tokens do not divide evenly.
    """
    per_pass = micro_batch_size * seq_len * dp_size  # tokens of one micro-batch on every DP rank
    if global_batch_tokens == 0:
        return BatchPlan(micro_batch_size, 1, dp_size, seq_len)
    if global_batch_tokens % per_pass:
        lower = max(global_batch_tokens // per_pass, 1) * per_pass
        raise ValueError(
            f"train.global_batch_tokens ({global_batch_tokens}) must be a multiple of train.micro_batch_size "
            f"({micro_batch_size}) x model.block_size ({seq_len}) x data-parallel size ({dp_size}) = {per_pass} "
            f"tokens; nearest valid values: {lower} or {lower + per_pass}")
    return BatchPlan(micro_batch_size, global_batch_tokens // per_pass, dp_size, seq_len)


def lr_at(step: int, peak: float, warmup_steps: int, decay_steps: int, min_ratio: float) -> float:
    """Learning rate of optimizer step `step` (0-based: the first update uses lr_at(0)).

    Warmup: peak * (step + 1) / warmup_steps for step < warmup_steps, so the first update is not
    wasted at lr 0 and step warmup_steps - 1 reaches the peak. Then cosine from the peak at
    step warmup_steps - 1 to min_ratio * peak at step decay_steps, constant after that.
    """
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    floor = min_ratio * peak
    start = max(warmup_steps - 1, 0)  # the cosine starts where warmup left off (at the peak)
    if step >= decay_steps or decay_steps <= start:
        return floor
    progress = (step - start) / (decay_steps - start)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_lambda(job: JobConfig):
    """The schedule as a multiplier of the peak lr (torch LambdaLR form), closed over the config."""
    s = job.schedule
    decay = s.decay_steps or job.train.steps
    return lambda step: lr_at(step, 1.0, s.warmup_steps, decay, s.min_lr_ratio)


class SchedulerState:
    """The LR scheduler (torch LambdaLR over the ZeRO optimizer) as a checkpoint piece.

    Loading also gives the optimizer's parameter groups the scheduler's last learning rates (the
    optimizer piece holds fragments of tensors, no groups), and takes a checkpoint of another
    layout, whose parameters may fall into another number of groups (expert parallelism gives the
    experts their own): every group follows the one schedule from the same peak, so any saved
    group's values serve every group here.
    """

    def __init__(self, scheduler: torch.optim.lr_scheduler.LambdaLR):
        self.scheduler = scheduler

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        groups = self.scheduler.optimizer.param_groups
        if len(state["base_lrs"]) != len(groups):
            state = dict(state)
            for key in ("base_lrs", "_last_lr"):
                if len(set(state[key])) != 1:
                    raise ValueError(f"scheduler state: {key} differs between the checkpoint's parameter groups "
                                     f"({state[key]}), so this run's {len(groups)} groups cannot take it")
                state[key] = state[key][:1] * len(groups)
            state["lr_lambdas"] = [None] * len(groups)  # our schedule is a function: nothing of it is saved
        self.scheduler.load_state_dict(state)
        for group, lr in zip(groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
