"""Checkpoint folder semantics in one process: atomic commit, the `latest` pointer, pruning, a
failure between writing and renaming, and the refusal of another parallel layout."""

from __future__ import annotations

import os

import pytest
import torch

from molm_megatron.training.checkpoint import CheckpointManager

LAYOUT = {"world_size": 4, "tensor_parallel_size": 2, "expert_parallel_size": 2, "data_parallel_size": 2,
          "zero_stage": 1}


def manager(path, keep_last=2, layout=LAYOUT) -> CheckpointManager:
    return CheckpointManager(str(path), keep_last, layout, rank=0, barrier=lambda: None)


def save(m: CheckpointManager, step: int) -> None:
    m.save(step, {"rank_00000.pt": {"step": step, "w": torch.full((3,), float(step))}}, config={"train": {}})


def test_saves_commit_prune_and_point_latest(tmp_path):
    m = manager(tmp_path)
    for step in (10, 20, 30):
        save(m, step)
    assert m.complete_steps() == [20, 30]  # keep_last 2
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000020", "step_00000030"]
    assert (tmp_path / "latest").read_text() == "step_00000030"
    assert sorted(os.listdir(tmp_path / "step_00000030")) == ["COMPLETE", "meta.json", "rank_00000.pt"]
    state = m.load(30, ["rank_00000.pt"], torch.device("cpu"))["rank_00000.pt"]
    assert state["step"] == 30 and torch.equal(state["w"], torch.full((3,), 30.0))


def test_failure_between_writing_and_renaming_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    m = manager(tmp_path)
    save(m, 10)

    def crash(src, dst):  # the process dies after writing every file, before the commit
        raise OSError("killed")

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError):
        save(m, 20)
    monkeypatch.undo()
    assert (tmp_path / "step_00000020.tmp" / "rank_00000.pt").exists()  # the half-done save is there ...
    fresh = manager(tmp_path)  # ... but a restarted run does not trust it
    assert fresh.latest_step() == 10 and (tmp_path / "latest").read_text() == "step_00000010"
    assert fresh.load(10, ["rank_00000.pt"], torch.device("cpu"))["rank_00000.pt"]["step"] == 10
    save(fresh, 20)  # the next save replaces the stale temporary folder
    assert fresh.complete_steps() == [10, 20] and not (tmp_path / "step_00000020.tmp").exists()


def test_a_folder_without_its_marker_is_ignored(tmp_path):
    m = manager(tmp_path)
    save(m, 10)
    save(m, 20)
    os.remove(tmp_path / "step_00000020" / "COMPLETE")  # e.g. a copy that was cut short
    assert m.latest_step() == 10


def test_saving_a_step_that_is_complete_is_a_no_op(tmp_path):
    m = manager(tmp_path)
    save(m, 10)
    m.save(10, {"rank_00000.pt": {"step": -1}}, config={})
    assert m.load(10, ["rank_00000.pt"], torch.device("cpu"))["rank_00000.pt"]["step"] == 10


def test_another_layout_is_refused_naming_both(tmp_path):
    save(manager(tmp_path), 10)
    other = dict(LAYOUT, tensor_parallel_size=1, data_parallel_size=4)
    with pytest.raises(ValueError) as e:
        manager(tmp_path, layout=other).load(10, ["rank_00000.pt"], torch.device("cpu"))
    assert str(e.value) == (
        f"checkpoint {tmp_path}/step_00000010 was saved with parallel layout (data_parallel_size=2, "
        "expert_parallel_size=2, tensor_parallel_size=2, world_size=4, zero_stage=1) but this run has "
        "(data_parallel_size=4, expert_parallel_size=2, tensor_parallel_size=1, world_size=4, zero_stage=1); "
        "ZeRO and expert shards are not converted: restart with the saved layout, or point checkpoint.dir to a "
        "new folder")
