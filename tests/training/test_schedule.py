"""The LR schedule and the batch arithmetic against hand-computed values, and the error text."""

from __future__ import annotations

import math

import pytest

from molm_megatron.cli import parse_job_config
from molm_megatron.training.schedule import lr_at, lr_lambda, plan_batch


def test_warmup_is_linear_from_the_first_step():
    # peak 3e-4, 4 warmup steps: 3e-4 * (s + 1) / 4
    assert [lr_at(s, 3e-4, 4, 10, 0.1) for s in range(4)] == pytest.approx([0.75e-4, 1.5e-4, 2.25e-4, 3e-4])


def test_cosine_decays_to_ten_percent_then_stays():
    peak, warmup, decay = 3e-4, 4, 10
    # The cosine runs from step warmup - 1 = 3 (the peak) to step 10 (the floor 3e-5) over 7 steps.
    # Step 5: progress 2/7, lr = 3e-5 + 2.7e-4 * (1 + cos(2*pi/7)) / 2 = 3e-5 + 2.7e-4 * 0.811745 = 2.491711e-4
    assert lr_at(5, peak, warmup, decay, 0.1) == pytest.approx(2.4917115e-4, rel=1e-6)
    # Halfway (progress 1/2 needs step 6.5; check the symmetric pair around it sums to peak + floor).
    assert lr_at(6, peak, warmup, decay, 0.1) + lr_at(7, peak, warmup, decay, 0.1) == pytest.approx(3.3e-4)
    assert lr_at(3, peak, warmup, decay, 0.1) == pytest.approx(3e-4)
    assert lr_at(10, peak, warmup, decay, 0.1) == pytest.approx(3e-5)
    assert lr_at(500, peak, warmup, decay, 0.1) == pytest.approx(3e-5)
    values = [lr_at(s, peak, warmup, decay, 0.1) for s in range(3, 11)]
    assert all(a > b for a, b in zip(values, values[1:]))  # strictly decreasing between peak and floor


def test_no_warmup_starts_at_the_peak():
    assert lr_at(0, 1.0, 0, 4, 0.0) == pytest.approx(1.0)
    assert lr_at(2, 1.0, 0, 4, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))


def test_lr_lambda_uses_train_steps_when_decay_steps_is_zero():
    job = parse_job_config(["--train.steps", "20", "--schedule.warmup_steps", "5"])
    f = lr_lambda(job)
    assert f(4) == pytest.approx(1.0) and f(20) == pytest.approx(0.1)
    assert f(12) == pytest.approx(lr_at(12, 1.0, 5, 20, 0.1))


def test_batch_plan_splits_tokens_into_micro_batches_and_accumulation():
    # The paper's 3M-token batch on 32 GPUs: 3145728 = 8 x 24 x 32 x 512.
    plan = plan_batch(3145728, micro_batch_size=8, seq_len=512, dp_size=32)
    assert (plan.micro_batch_size, plan.grad_accum_steps, plan.dp_size) == (8, 24, 32)
    assert plan.global_batch_sequences == 6144 and plan.global_batch_tokens == 3145728
    assert plan_batch(0, 4, 64, 2).grad_accum_steps == 1  # 0: one micro-batch per rank


def test_batch_plan_error_names_fields_and_nearest_values():
    with pytest.raises(ValueError) as e:
        plan_batch(3000000, micro_batch_size=8, seq_len=512, dp_size=32)
    assert str(e.value) == ("train.global_batch_tokens (3000000) must be a multiple of train.micro_batch_size (8) x "
                            "model.block_size (512) x data-parallel size (32) = 131072 tokens; nearest valid values: "
                            "2883584 or 3014656")
