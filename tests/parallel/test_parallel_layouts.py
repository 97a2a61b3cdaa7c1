"""Tensor and expert parallel layouts reproduce the single-process model (docs/design.md, "Parallelism").

Two process launches over gloo (2 ranks, then 4) run every multi-rank check of
tests/parallel/parallel_checks.py; each test below asserts on one check's numbers. The oracle is
the plain MoLM run in one process on the same data with the same initial weights.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch.multiprocessing as mp

from molm_megatron.parallel import validate_layout
from molm_megatron.parallel.sharding import shard_range
from tests.parallel import parallel_checks
from tests.parallel.parallel_checks import tiny_config

LAUNCH_TIMEOUT_S = 240  # a hang (a rank skipping a collective) fails the test instead of blocking CI
FP32_REL = 2e-5  # max |grad - oracle| / max |oracle| per parameter, fp32
FP32_ABS = 2e-5


def launch(suite: str, world_size: int, tmp_path) -> list[dict]:
    """Run one suite on `world_size` spawned ranks; return each rank's results."""
    out_dir = str(tmp_path)
    ctx = mp.start_processes(parallel_checks.worker, nprocs=world_size, join=False, start_method="spawn",
                             args=(world_size, os.path.join(out_dir, "store"), suite, out_dir))
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                partial = [f for f in os.listdir(out_dir) if f.endswith(".json")]
                raise AssertionError(f"suite {suite} did not finish in {LAUNCH_TIMEOUT_S}s (a hang?); "
                                     f"ranks that finished: {partial}")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    results = []
    for rank in range(world_size):
        with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
            results.append(json.load(f))
    return results


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return launch("world2", 2, tmp_path_factory.mktemp("world2"))


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return launch("world4", 4, tmp_path_factory.mktemp("world4"))


def assert_matches_oracle(results: list[dict], check: str, expect_sharded: bool = True) -> None:
    for rank, r in enumerate(results):
        r = r[check]
        where = f"{check} rank {rank}"
        assert r["params_without_grad"] == [], where
        assert r["loss_diff"] < FP32_ABS and r["lm_loss_sum_diff"] < 1e-3, (where, r)  # the sum is over ~20 tokens
        assert r["aux_diff"] < FP32_ABS, (where, r)
        assert r["logits_diff"] < FP32_ABS, (where, r)
        assert r["grad_max_rel_diff"] < FP32_REL, (where, r["grad_worst_param"], r["grad_max_rel_diff"])
        assert r["state_keys_match"] and r["state_diff"] == 0.0 and r["reload_diff"] == 0.0, (where, r)
        assert (r["num_sharded"] > 0) == expect_sharded, where


# ---- 2 ranks ---------------------------------------------------------------------------------

def test_tp2_matches_single_process(world2):
    assert_matches_oracle(world2, "tp2")
    # 509 = 255 + 254: the vocabulary split is uneven and the logits stay split.
    assert [r["tp2"]["local_vocab"] for r in world2] == [255, 254]


def test_ep2_matches_single_process_with_uneven_splits(world2):
    assert_matches_oracle(world2, "ep2")
    # Each rank sends a different number of assignments to experts 0-3 (rank 0) and 4-7 (rank 1).
    counts = world2[0]["ep2"]["counts"][0]
    splits = [(sum(c[:4]), sum(c[4:])) for c in counts]
    assert any(a != b for a, b in splits), splits


def test_ep2_rank_receiving_no_tokens_still_matches(world2):
    assert_matches_oracle(world2, "ep2_starved")
    counts = world2[0]["ep2_starved"]["counts"][0]
    assert all(sum(c[4:]) == 0 for c in counts), counts  # EP rank 1 received nothing in layer 0
    assert all(sum(c[:4]) > 0 for c in counts), counts


def test_expert_params_are_tagged_for_deepspeed(world2):
    r = world2[1]["ep2_param_groups"]
    assert r["expert_names"] == [f"transformer.h.{i}.mlpf.{w}.weight" for i in range(2)
                                 for w in ("experts", "output_experts")]
    assert r["group_names"] == ["ep_size_2"]
    assert r["moe_groups"] == [["ep_size_2", 0.01, 4]]  # the decay group's copy, holding the 4 expert weights
    assert r["expert_shape"] == [4, 64, 128]  # 8 experts / 2 ranks
    assert r["dense_params"] > 0


def test_expert_count_not_divisible_is_refused(world2):
    assert world2[0]["ep2_bad_experts"]["error"] == (
        "transformer.h.0.mlpf: parallel.expert_parallel_size (2) must divide model.n_mlp_experts (5)")


def test_tp2_with_inserted_experts_matches_single_process(world2):
    assert_matches_oracle(world2, "tp2_inserted")


def test_ep2_with_inserted_experts_matches_single_process(world2):
    assert_matches_oracle(world2, "ep2_inserted")


def test_expert_parallel_needs_inserted_experts_divisible_by_ep(world2):
    assert world2[0]["ep2_bad_inserted"]["error"] == (
        "transformer.h.0.mlpf: parallel.expert_parallel_size (2) must divide model.n_new_mlp_experts (1)")


# ---- 4 ranks ---------------------------------------------------------------------------------

def test_ep2_dp2_matches_single_process(world4):
    assert_matches_oracle(world4, "ep2_dp2")


def test_tp2_ep2_matches_single_process(world4):
    assert_matches_oracle(world4, "tp2_ep2")
    assert_matches_oracle(world4, "tp2_ep2_starved")
    counts = world4[0]["tp2_ep2_starved"]["counts"][1]
    assert all(sum(c[4:]) == 0 for c in counts), counts  # EP rank 1 (ranks 2, 3) got nothing in layer 1


@pytest.mark.parametrize("check, expected", [
    # DeepSpeed's docstring layouts: E + D (tp 1) and E + M + D (tp 2), world 4.
    ("ep2_dp2", {"tp": [[0], [1], [2], [3]], "dp": [[0, 1, 2, 3]] * 4,
                 "ep": [[0, 1], [0, 1], [2, 3], [2, 3]], "edp": [[0, 2], [1, 3], [0, 2], [1, 3]]}),
    ("tp2_ep2", {"tp": [[0, 1], [0, 1], [2, 3], [2, 3]], "dp": [[0, 2], [1, 3], [0, 2], [1, 3]],
                 "ep": [[0, 2], [1, 3], [0, 2], [1, 3]], "edp": [[0], [1], [2], [3]]}),
])
def test_groups_agree_between_megatron_and_deepspeed(world4, check, expected):
    for rank, r in enumerate(world4):
        facts = r[check]["facts"]
        for axis, tables in expected.items():
            assert facts[axis] == tables[rank], (check, rank, axis)
        assert facts["deepspeed_ep"] == facts["ep"] and facts["deepspeed_edp"] == facts["edp"]
        assert facts["deepspeed_same_group"] and facts["megatron_tp_rank"] and facts["megatron_dp_size"]


# ---- single process --------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    ((4, 3, 1), "parallel.tensor_parallel_size (3) must divide the world size (4)"),
    ((4, 1, 3), "parallel.expert_parallel_size (3) must divide the data-parallel size = world size 4 / "
                "parallel.tensor_parallel_size 1 (4)"),
    ((8, 2, 3), "parallel.expert_parallel_size (3) must divide the data-parallel size = world size 8 / "
                "parallel.tensor_parallel_size 2 (4)"),
    ((4, 0, 1), "parallel.tensor_parallel_size must be >= 1, got 0"),
])
def test_layout_validation_messages(args, message):
    with pytest.raises(ValueError) as e:
        validate_layout(*args)
    assert str(e.value) == message


def test_layout_validation_against_the_model():
    with pytest.raises(ValueError) as e:
        validate_layout(6, 1, 6, tiny_config())
    assert str(e.value) == "parallel.expert_parallel_size (6) must divide model.n_mlp_experts (8)"
    with pytest.raises(ValueError) as e:
        validate_layout(3, 3, 1, tiny_config())
    assert str(e.value) == "parallel.tensor_parallel_size (3) must divide model.ffd_hidden (128)"
    validate_layout(8, 2, 4, tiny_config())  # 2 x 4 ranks, 8 experts, width 128: fine
    with pytest.raises(ValueError) as e:
        validate_layout(2, 1, 2, tiny_config(n_mlp_experts_per_layer=[8, 5]))
    assert str(e.value) == "parallel.expert_parallel_size (2) must divide model.n_mlp_experts_per_layer[1] (5)"
    validate_layout(2, 1, 2, tiny_config(n_new_mlp_experts=2))  # old and new experts split separately
    with pytest.raises(ValueError) as e:
        validate_layout(2, 1, 2, tiny_config(n_mlp_experts=9, n_new_mlp_experts=3))
    assert str(e.value).startswith("parallel.expert_parallel_size (2) must divide model.n_new_mlp_experts (3)")


def test_shard_range_is_balanced_and_covers():
    for size, world in ((509, 2), (509, 4), (8, 8), (7, 3)):
        ranges = [shard_range(size, r, world) for r in range(world)]
        assert [s for s, _ in ranges] == [sum(n for _, n in ranges[:r]) for r in range(world)]
        assert sum(n for _, n in ranges) == size
        assert max(n for _, n in ranges) - min(n for _, n in ranges) <= 1
