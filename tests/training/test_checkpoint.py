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


# ---- damaged and hostile checkpoints ---------------------------------------------------------

class Holder:
    """A checkpoint piece holding whatever state it was given last."""

    def __init__(self):
        self.state = None

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = state


def save_pieces(m: CheckpointManager, step: int, model_config=None) -> None:
    piece = Holder()
    piece.state = {"step": step, "w": torch.full((1000,), float(step))}
    m.save_state(step, {"trainer": piece}, None, None, config={"train": {}},
                 model_config=model_config or {"n_layer": 2})


def restore(m: CheckpointManager, model_config=None) -> tuple[int | None, Holder]:
    piece = Holder()
    return m.restore({"trainer": piece}, None, None, model_config or {"n_layer": 2}), piece


def test_an_incomplete_folder_of_the_next_step_never_blocks_a_save(tmp_path):
    m = manager(tmp_path)
    save(m, 10)
    (tmp_path / "step_00000020").mkdir()  # e.g. a copy cut short: no marker
    (tmp_path / "step_00000020" / "rank_00000.pt").write_bytes(b"partial")
    assert m.latest_step() == 10
    save(m, 20)
    assert m.complete_steps() == [10, 20]
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000010", "step_00000020", "step_00000020.incomplete"]
    assert (tmp_path / "step_00000020.incomplete" / "rank_00000.pt").read_bytes() == b"partial"  # kept, not deleted


@pytest.mark.parametrize("damage", ["truncate", "corrupt", "remove"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, caplog):
    m = manager(tmp_path, keep_last=3)
    save_pieces(m, 10)
    save_pieces(m, 20)
    path = tmp_path / "step_00000020" / "rank_00000.pt"
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "corrupt":  # same size, so only the read itself can tell
        path.write_bytes(data[:100] + bytes(len(data) - 200) + data[-100:])
    else:
        path.unlink()
    step, piece = restore(manager(tmp_path, keep_last=3))
    assert step == 10 and piece.state["step"] == 10 and torch.equal(piece.state["w"], torch.full((1000,), 10.0))
    assert f"checkpoint {tmp_path}/step_00000020 cannot be loaded: {path}" in caplog.text
    # Moved aside, so the next save of step 20 writes a fresh checkpoint instead of skipping.
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000010", "step_00000020.damaged"]


def test_garbage_meta_is_named_and_passed_over_and_no_loadable_checkpoint_is_refused(tmp_path):
    m = manager(tmp_path, keep_last=3)
    save_pieces(m, 10)
    save_pieces(m, 20)
    (tmp_path / "step_00000020" / "meta.json").write_text("{not json")
    (tmp_path / "step_00000010" / "rank_00000.pt").write_bytes(b"PK\x03\x04 garbage")
    with pytest.raises(ValueError) as e:
        restore(manager(tmp_path, keep_last=3))
    text = str(e.value)
    assert text.startswith(f"no checkpoint in {tmp_path} can be loaded (step_00000020: {tmp_path}/step_00000020/"
                           "meta.json: unreadable (Expecting property name")
    assert f"step_00000010: {tmp_path}/step_00000010/rank_00000.pt: " in text
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000010", "step_00000020"]  # nothing moved


def test_another_model_is_refused_naming_each_field(tmp_path):
    save_pieces(manager(tmp_path), 10, model_config={"n_layer": 2, "n_embd": 64, "vocab_size": 512})
    with pytest.raises(ValueError) as e:
        restore(manager(tmp_path), model_config={"n_layer": 3, "n_embd": 64, "vocab_size": 50295})
    assert str(e.value) == (
        f"checkpoint {tmp_path}/step_00000010 holds another model than this run builds (n_layer: saved 2, this run 3; "
        "vocab_size: saved 512, this run 50295): restart with the saved model settings, or point checkpoint.dir to "
        "a new folder")


class Payload:
    """Unpickling this runs `touch <path>`: what a hostile checkpoint would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_a_checkpoint_carrying_a_malicious_pickle_is_refused_unexecuted(tmp_path):
    from molm_megatron.training.checkpoint import read_model_shards

    m = manager(tmp_path)
    save_pieces(m, 10)
    pwned = tmp_path / "pwned"
    torch.save({"trainer": Payload(pwned)}, tmp_path / "step_00000010" / "rank_00000.pt")
    meta = tmp_path / "step_00000010" / "meta.json"
    meta.write_text(meta.read_text().replace('"files"', '"unchecked"'))  # a forger would fix the sizes
    with pytest.raises(ValueError) as e:
        restore(manager(tmp_path))
    assert str(e.value).startswith(f"{tmp_path}/step_00000010/rank_00000.pt: refused to load: it needs a Python "
                                   "object outside the checkpoint allow-list")
    assert not pwned.exists()
    # The converter reads model files the same way.
    torch.save({"model": Payload(pwned), "shards": {}}, tmp_path / "step_00000010" / "model_tp00_ep000.pt")
    with pytest.raises(ValueError, match="refused to load"):
        list(read_model_shards(tmp_path))
    assert not pwned.exists()


def test_checkpoint_folders_and_files_get_the_umask_permissions(tmp_path):
    old = os.umask(0o002)  # a group-shared cluster folder
    try:
        save(manager(tmp_path), 10)
    finally:
        os.umask(old)
    folder = tmp_path / "step_00000010"
    assert folder.stat().st_mode & 0o777 == 0o775
    assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()} == dict.fromkeys(
        ["COMPLETE", "meta.json", "rank_00000.pt"], 0o664)


def test_a_full_disk_names_the_folder_removes_the_partial_save_and_keeps_the_previous(tmp_path):
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs (a full disk on demand) needs root")
    try:
        m = manager(disk / "ckpt")
        m.save(10, {"rank_00000.pt": {"w": torch.zeros(100)}}, config={"train": {}})
        with pytest.raises(ValueError) as e:
            m.save(20, {"rank_00000.pt": {"w": torch.zeros(200_000)}}, config={"train": {}})
        assert str(e.value) == (f"checkpoint save of step 20 failed: no space left on {disk}/ckpt; the partial save "
                                f"{disk}/ckpt/step_00000020.tmp was removed, the previous checkpoint is kept")
        assert sorted(os.listdir(disk / "ckpt")) == ["latest", "step_00000010"]
        assert m.load(10, ["rank_00000.pt"], torch.device("cpu"))["rank_00000.pt"]["w"].shape == (100,)
    finally:
        subprocess.run(["umount", str(disk)], check=True)
