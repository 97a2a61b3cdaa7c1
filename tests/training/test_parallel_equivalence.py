"""Every parallel layout trains exactly like one process on the same data.

One 4-process torchrun launch (tests/training/equivalence_worker.py) trains the tiny preset for
5 steps in four layouts with the real Trainer and DeepSpeed; a naive single-process PyTorch loop
(tests/training/reference.py: no DeepSpeed, plain AdamW, float64 clipping norm) that emulates the
same data-parallel ranks is the oracle. Per step the LM loss, the MI loss and the global gradient
norm must agree, and so must every final parameter, at float32 tolerance. The data are real text
small enough that the Transformer-XL streams restart inside the run (split 60,40,0: 1665 training
tokens, an epoch of 6 windows of 4 streams), exercising the reset-memory masking.
"""

from __future__ import annotations

import sys

import pytest
import torch

from molm_megatron.config import model_preset
from tests.training.procs import run
from tests.training.reference import reference_run

# name: (tp, ep, zero stage, micro-batch, accumulation, extra flags); data-parallel size = 4 / tp.
LAYOUTS = {
    "tp2_ep2_dp2_zero1": (2, 2, 1, 2, 2, ()),
    "tp2_ep2_dp2_zero2": (2, 2, 2, 2, 1, ()),
    "ep2_dp4_zero2": (1, 2, 2, 1, 2, ()),  # expert-data-parallel size 2: expert grads reduced over 2 ranks
    "dp4_zero3": (1, 1, 3, 1, 1, ()),
    # bf16 weights with ZeRO-1: DeepSpeed's bf16 optimizer, the micro-batches' gradients added in
    # fp32 by the fused accumulation; with whole-block activation recomputation.
    "ep2_dp4_zero1_bf16": (1, 2, 1, 1, 2, ("--train.precision", "bf16", "--train.activation_checkpoint", "full")),
}
# Tolerances against the float32 reference: float32 layouts agree to rounding; bf16 weights and
# activations round to 8 bits of mantissa (~4e-3 relative), far under the factor ~1.5 a
# micro-batch's gradients counted twice would make in the norm.
TOLERANCES = {"fp32": {"loss/lm": (1e-6, 0.0), "loss/mi": (0.0, 1e-6), "grad_norm": (2e-6, 0.0), "params": 2e-5},
              "bf16": {"loss/lm": (5e-3, 0.0), "loss/mi": (0.0, 2e-3), "grad_norm": (2e-2, 0.0), "params": 1e-2}}
STEPS, SEED = 5, 7


@pytest.fixture(scope="module")
def layout_results(small_data, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("equivalence")
    specs = [":".join(map(str, (name, tp, ep, zero, micro, accum, *extra)))
             for name, (tp, ep, zero, micro, accum, extra) in LAYOUTS.items()]
    log = work / "log.txt"
    code = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
                "tests/training/equivalence_worker.py", str(work / "results.pt"), small_data, *specs], log, timeout=400)
    assert code == 0, log.read_text()[-6000:]
    return torch.load(work / "results.pt", weights_only=False)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(layout_results, small_data, name):
    tp, ep, zero, micro, accum, extra = LAYOUTS[name]
    tol = TOLERANCES["bf16" if "bf16" in extra else "fp32"]
    dp = 4 // tp
    got = layout_results[name]
    assert got["exit_code"] == 0
    assert got["plan"] == (micro, accum, dp)
    cfg = model_preset("tiny", vocab_size=50295, block_size=64, history_length=64)
    ref = reference_run(cfg, small_data, "60,40,0", dp, micro, accum, STEPS, SEED)
    assert [m["step"] for m in got["metrics"]] == list(range(1, STEPS + 1))
    # The MI loss is a difference of two entropies near log E = 1.4 (H(e|x) - H(e) ~ -1e-4): its
    # float32 error is absolute, about 1e-7 of the entropies, not relative to the small result.
    for key in ("loss/lm", "loss/mi", "grad_norm"):
        rtol, atol = tol[key]
        values = torch.tensor([m[key] for m in got["metrics"]], dtype=torch.float64)
        torch.testing.assert_close(values, torch.tensor(ref[key], dtype=torch.float64), rtol=rtol, atol=atol,
                                   msg=lambda m: f"{name} {key}: {m}")
    assert set(got["params"]) == set(ref["params"])
    for key, value in ref["params"].items():
        torch.testing.assert_close(got["params"][key], value, rtol=0, atol=tol["params"],
                                   msg=lambda m: f"{name} {key}: {m}")
    # The last checkpoint, consolidated from its shard files alone (ZeRO-3: from the fp32
    # partitions of its rank files), holds exactly these weights.
    assert set(got["consolidated"]) == set(got["params"])
    for key, value in got["params"].items():
        assert torch.equal(got["consolidated"][key], value), f"{name} {key}"
