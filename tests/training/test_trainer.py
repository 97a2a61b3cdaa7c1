"""The Trainer given a built model: it trains that model (not the job's preset), the checkpoint's
meta.json records the trained model's config, a resume with the same model continues it, the
checkpoint consolidates into that model, and a run that would build another model is refused
naming each differing field (exit 2)."""

from __future__ import annotations

import json
import sys

import torch

from molm_megatron.hf.convert import consolidate_checkpoint
from tests.training.given_model_worker import FLAGS
from tests.training.procs import run


def test_a_given_model_is_trained_saved_resumed_and_guarded(small_data, tmp_path):
    ckpt = tmp_path / "ckpt"
    log = tmp_path / "worker.log"
    code = run([sys.executable, "tests/training/given_model_worker.py", str(tmp_path / "out.pt"), small_data,
                str(ckpt)], log, timeout=300)
    assert code == 0, log.read_text()[-3000:]
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert got["kept_initial_weights"] and got["resumed_at"] == 2
    meta = json.loads((ckpt / "step_00000003" / "meta.json").read_text())
    assert meta["model"] == got["config"] and meta["model"]["n_layer"] == 1 and meta["config"]["model"]["n_layer"] == 2
    consolidated = consolidate_checkpoint(ckpt).state_dict()  # rebuilt from meta.json's model alone
    assert consolidated.keys() == got["final"].keys()
    assert all(torch.equal(consolidated[k], v) for k, v in got["final"].items())

    # pretrain.py builds the job's 2-layer preset, with the data's end-of-document id as bos/eos (the
    # given model kept the tiny preset's 511): refused, naming every field, nothing trained.
    code = run([sys.executable, "pretrain.py", *FLAGS, "--data.prefixes", small_data, "--checkpoint.dir", str(ckpt),
                "--train.steps", "4"], tmp_path / "refused.log", timeout=120)
    text = (tmp_path / "refused.log").read_text()
    assert code == 2, text[-3000:]
    assert (f"error: checkpoint {ckpt}/step_00000003 holds another model than this run builds (bos_token_id: saved "
            "511, this run 50256; eos_token_id: saved 511, this run 50256; n_layer: saved 1, this run 2; "
            "n_mlp_experts: saved 4, this run 8)") in text
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_00000002", "step_00000003"]
