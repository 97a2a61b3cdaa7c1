"""Resuming a checkpoint in another parallel layout (molm_megatron/training/reshard.py).

End to end (pretrain.py under torchrun, real DeepSpeed over gloo, real text): an uninterrupted run
on two data-parallel ranks with ZeRO-2 is the oracle. Its checkpoint of step 5 resumes as ZeRO-3 on
two ranks (to step 8), that one as TP2 x EP2 with ZeRO-1 on four ranks (to step 10), and that one
on a single process with ZeRO-2 and twice the micro-batch (to step 12). Every resumed step logs the
oracle's losses and gradient norm within float32 tolerance and its learning rate exactly, and the
last checkpoint consolidates to the oracle's final weights. The Transformer-XL streams restart
every 3 steps (6 windows, 2 per step) and every resume point lies inside an epoch, so the first
resumed step already attends over the memory carried over. With bf16 weights (DeepSpeed's bf16
optimizer, ZeRO-1), a two-rank run resumes with TP2, against its own uninterrupted run at bf16
tolerance.

Single-process checks: fragments reassemble a tensor and name what they miss, the stream mapping
and its refusal, memory rows following their streams, the schedule across group counts.
"""

from __future__ import annotations

import shutil
import sys
from typing import NamedTuple

import pytest
import torch

from molm_megatron.data.stream_loader import TransformerXLStreamLoader
from molm_megatron.hf.convert import consolidate_checkpoint
from molm_megatron.training.fragments import Fragment, assemble
from molm_megatron.training.memory import rows_state
from molm_megatron.training.schedule import SchedulerState
from tests.training.procs import run
from tests.training.test_pretrain import rows

STEPS = 12


class Segment(NamedTuple):
    procs: int
    source: tuple[str, int] | None
    """(run, step) whose checkpoint it resumes from; None: a run from scratch (an oracle)."""
    last: int
    micro: int
    flags: list[str]
    oracle: str = "oracle"


BF16 = ["--train.precision", "bf16", "--parallel.zero_stage", "1"]  # DeepSpeed's bf16 optimizer
SEGMENTS = {
    "oracle": Segment(2, None, STEPS, 2, ["--parallel.zero_stage", "2", "--checkpoint.interval", "5"]),
    "zero3": Segment(2, ("oracle", 5), 8, 2, ["--parallel.zero_stage", "3"]),
    "tp2_ep2": Segment(4, ("zero3", 8), 10, 2, ["--parallel.zero_stage", "1", "--parallel.tensor_parallel_size", "2",
                                                "--parallel.expert_parallel_size", "2"]),
    "single": Segment(1, ("tp2_ep2", 10), STEPS, 4, ["--parallel.zero_stage", "2"]),  # the same 4 streams
    # bf16 weights with fp32 masters: other ZeRO classes, compared at bf16 tolerance.
    "bf16": Segment(2, None, 4, 2, BF16 + ["--checkpoint.interval", "2"], oracle="bf16"),
    "bf16_tp2": Segment(2, ("bf16", 2), 4, 4, BF16 + ["--parallel.tensor_parallel_size", "2"], oracle="bf16"),
}
# (relative, absolute) tolerances against the oracle, per metric.
TOLERANCES = {"oracle": {"loss/lm": (2e-6, 0.0), "grad_norm": (2e-6, 0.0), "loss/mi": (0.0, 1e-6)},
              "bf16": {"loss/lm": (1e-4, 0.0), "grad_norm": (3e-3, 0.0), "loss/mi": (0.0, 1e-4)}}


def flags(data: str) -> list[str]:
    # 512 tokens per step: 4 streams of 64 tokens, 2 windows each (accumulation 2 on 2 ranks).
    return ["pretrain.py", "--config", "launch/configs/tiny_cpu.yaml", "--data.prefixes", data, "--data.split",
            "80,20,0", "--train.global_batch_tokens", "512", "--schedule.warmup_steps", "3",
            "--schedule.decay_steps", "40", "--train.eval_interval", "0", "--metrics.log_interval", "1",
            "--metrics.tensorboard", "false", "--checkpoint.interval", "1000"]


@pytest.fixture(scope="module")
def segments(small_data, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("reshard")
    for name, seg in SEGMENTS.items():
        out = work / name
        out.mkdir()
        if seg.source:
            run_name, step = seg.source
            (out / "ckpt").mkdir()
            shutil.copytree(work / run_name / "ckpt" / f"step_{step:08d}", out / "ckpt" / f"step_{step:08d}")
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(seg.procs)]
        code = run(launcher + flags(small_data) + seg.flags + [
            "--train.micro_batch_size", str(seg.micro), "--train.steps", str(seg.last), "--checkpoint.dir",
            str(out / "ckpt"), "--metrics.dir", str(out)], out / "log.txt", timeout=300)
        assert code == 0, (out / "log.txt").read_text()[-4000:]
    return {name: work / name for name in SEGMENTS}


@pytest.mark.parametrize("name", [name for name, seg in SEGMENTS.items() if seg.source])
def test_a_resume_in_another_layout_continues_the_uninterrupted_run(segments, name):
    seg = SEGMENTS[name]
    start = seg.source[1]
    log = (segments[name] / "log.txt").read_text()
    assert f"checkpoint {segments[name]}/ckpt/step_{start:08d} was saved with parallel layout" in log
    assert f"resumed from {segments[name]}/ckpt at step {start}" in log
    got, want = rows(segments[name]), rows(segments[seg.oracle])
    assert sorted(got) == list(range(start + 1, seg.last + 1))
    for key, (rtol, atol) in TOLERANCES[seg.oracle].items():
        if key == "loss/mi" and seg.micro != SEGMENTS[seg.oracle].micro:
            continue  # a statistic of each micro-batch's tokens: comparable at the oracle's micro-batch only
        torch.testing.assert_close(torch.tensor([got[s][key] for s in sorted(got)], dtype=torch.float64),
                                   torch.tensor([want[s][key] for s in sorted(got)], dtype=torch.float64),
                                   rtol=rtol, atol=atol, msg=lambda m: f"{name} {key}: {m}")
    assert [got[s]["lr"] for s in sorted(got)] == [want[s]["lr"] for s in sorted(got)]


def test_the_last_resumed_checkpoint_holds_the_oracle_weights(segments):
    got = consolidate_checkpoint(segments["single"] / "ckpt").state_dict()
    want = consolidate_checkpoint(segments["oracle"] / "ckpt").state_dict()
    assert got.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=2e-5, msg=lambda m: f"{key}: {m}")


# ---- single process ----------------------------------------------------------------------------

def test_fragments_of_any_cut_reassemble_and_gaps_are_reported():
    full = torch.randn(6, 4, 5)
    # A TP-style split of dim 2 into shards [6, 4, 3] and [6, 4, 2], each flattened and cut where ZeRO
    # partitions might cut it; elements 20-47 of the second shard are in no fragment.
    pieces = []
    for start, length, cuts in ((0, 3, (0, 30, 31, 72)), (3, 2, (0, 20))):
        shard = full.narrow(2, start, length)
        flat = shard.reshape(-1)
        shards = [{"axis": "tp", "dim": 2, "full_size": 5, "start": start, "length": length}]
        for a, b in zip(cuts, cuts[1:]):
            pieces.append(Fragment.saved(shards, shard.shape, a, flat[a:b]))
    got, held = assemble(pieces)
    assert held.narrow(2, 0, 3).all() and torch.equal(got.narrow(2, 0, 3), full.narrow(2, 0, 3))
    assert (~held.narrow(2, 3, 2)).reshape(-1).nonzero().flatten().tolist() == list(range(20, 48))
    assert torch.equal(got.narrow(2, 3, 2).reshape(-1)[:20], full.narrow(2, 3, 2).reshape(-1)[:20])
    # Rows of the full tensor (dim 0) that each fragment reaches; asked for rows 0-1, assemble reads
    # only the fragments that reach them.
    assert [p.rows for p in pieces] == [range(0, 3), range(2, 3), range(2, 6), range(0, 3)]
    part, held_rows = assemble(pieces, rows=range(0, 2))
    assert torch.equal(part[:2].narrow(2, 0, 3), full[:2].narrow(2, 0, 3))
    assert not held_rows[3:].narrow(2, 0, 3).any()


def loader_state(dp_rank: int, dp_size: int, micro_batch_size: int, positions: list[int]) -> dict:
    return {"version": 1, "micro_batch_size": micro_batch_size, "seq_len": 64, "dp_rank": dp_rank, "dp_size": dp_size,
            "seed": 1234, "epoch": 2, "step": 3, "stream_positions": positions, "epoch_tokens": 5000}


def test_streams_follow_their_global_index_and_another_stream_count_is_refused():
    # Saved by TP2 x DP2 (four ranks; TP peers hold equal states), micro-batch 2: streams 0-3.
    saved = [loader_state(r // 2, 2, 2, [10 * (r // 2), 10 * (r // 2) + 1]) for r in range(4)]
    one = TransformerXLStreamLoader(None, micro_batch_size=4, seq_len=64)  # its source is read only when iterated
    assert one.stream_origins(saved) == [(0, 0), (0, 1), (2, 0), (2, 1)]
    assert one.reshard_state(saved)["stream_positions"] == [0, 1, 10, 11]
    # Two layers; the second's values are its keys, saved as None.
    memory = [{"kv": [(torch.full((2, 3, 1, 2), float(r)), -torch.full((2, 3, 1, 2), float(r))),
                      (torch.arange(2.0).view(2, 1, 1, 1).expand(2, 3, 1, 2) + 10 * r, None)],
               "valid": torch.tensor([[True] * 3, [False] * 3])} for r in range(4)]
    state = rows_state(memory, one.stream_origins(saved))
    assert state["kv"][0][0][:, 0, 0, 0].tolist() == [0.0, 0.0, 2.0, 2.0]
    assert state["kv"][0][1][:, 0, 0, 0].tolist() == [-0.0, -0.0, -2.0, -2.0]
    assert state["kv"][1][0][:, 0, 0, 0].tolist() == [0.0, 1.0, 20.0, 21.0] and state["kv"][1][1] is None
    assert state["valid"][:, 0].tolist() == [True, False, True, False]
    one.micro_batch_size = 2
    with pytest.raises(ValueError) as e:
        one.stream_origins(saved)
    assert str(e.value) == (
        "stream loader state: the checkpoint reads 4 streams (data-parallel size 2 x train.micro_batch_size 2) but "
        "this run reads 2 (data-parallel size 1 x train.micro_batch_size 2); the token stream would be cut into "
        "other parts, where the saved positions mean nothing. Keep data-parallel size x train.micro_batch_size at "
        "4 (here: train.micro_batch_size 4), or start a new checkpoint.dir")


def test_the_schedule_moves_between_parameter_group_counts_and_sets_the_optimizer_lr():
    def scheduler(groups: int) -> torch.optim.lr_scheduler.LambdaLR:
        params = [[torch.nn.Parameter(torch.zeros(1))] for _ in range(groups)]
        return torch.optim.lr_scheduler.LambdaLR(torch.optim.AdamW([{"params": p} for p in params], lr=0.1),
                                                 lambda step: 1.0 / (step + 1))

    three = scheduler(3)
    for _ in range(4):
        three.optimizer.step()
        three.step()
    two = scheduler(2)
    SchedulerState(two).load_state_dict(SchedulerState(three).state_dict())
    assert [g["lr"] for g in two.optimizer.param_groups] == [three.optimizer.param_groups[0]["lr"]] * 2
    assert two.last_epoch == three.last_epoch == 4
    state = SchedulerState(three).state_dict()
    state["base_lrs"][0] = 0.5
    with pytest.raises(ValueError, match=r"scheduler state: base_lrs differs between the checkpoint's parameter groups"):
        SchedulerState(two).load_state_dict(state)
