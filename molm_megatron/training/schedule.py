"""What one optimizer step is: the batch arithmetic (tokens -> micro-batches) and the LR schedule.

The schedule is the one the ModuleFormer paper (Shen et al., 2023) trains with: linear warmup to
the peak, cosine decay to 10% of the peak (GPT-3, Brown et al. 2020, section B), then constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
