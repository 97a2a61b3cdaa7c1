"""Activation recomputation changes no number, and settings of the speed features that cannot
apply are refused naming the field. (The fused fp32 gradient accumulation of bf16 ZeRO-1 runs,
with recomputation on, is checked against the single-process reference loop in
test_parallel_equivalence.py.)

Activation recomputation (none / moa / full) gives the same loss, memory and gradients as keeping
the activations: in-process, the tiny model with memory, a reset memory row, padding and sampled
routing (the recomputation must draw the same samples).
"""

from __future__ import annotations

import pytest
import torch

from molm_megatron.cli import parse_job_config
from molm_megatron.config import model_preset
from molm_megatron.model import MoLM
from molm_megatron.training.activation_checkpoint import apply_activation_checkpoint
from molm_megatron.training.microbatch import parameter_aliases


def loss_and_grads(mode: str):
    torch.manual_seed(0)
    model = MoLM(model_preset("tiny", sample_topk=1)).double().train()
    apply_activation_checkpoint(model, mode)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 500, (2, 12), generator=gen)
    mem_ids = torch.randint(0, 500, (2, 12), generator=gen)
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :5] = 0  # a reset memory row and padding
    torch.manual_seed(2)  # sampled routing draws from the global stream
    with torch.no_grad():
        memory = model(mem_ids).memory
    out = model(ids, labels=ids.roll(-1, 1), attention_mask=mask, memory=memory)
    out.loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["moa", "full"])
def test_activation_recomputation_changes_no_number(mode):
    want_out, want = loss_and_grads("none")
    got_out, got = loss_and_grads(mode)
    assert torch.equal(got_out.loss, want_out.loss)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(got_out.memory, want_out.memory))
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want), \
        [n for n in want if not torch.equal(got[n], want[n])]


def test_activation_recomputation_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match="train.activation_checkpoint must be one of none, moa, full; got 'attn'"):
        apply_activation_checkpoint(MoLM(model_preset("tiny")), "attn")


@pytest.mark.parametrize("flags, message", [
    (["--train.cuda_graph", "true", "--train.device", "cpu"],
     "train.cuda_graph needs a CUDA device, bf16 with ZeRO-1, tensor and expert parallel size 1; train.device is "
     "'cpu'"),
    (["--train.cuda_graph", "true", "--parallel.zero_stage", "2"], "; parallel.zero_stage is 2"),
    (["--train.cuda_graph", "true", "--parallel.expert_parallel_size", "2"], "; parallel.expert_parallel_size is 2"),
    (["--train.activation_checkpoint", "attn"],
     "train.activation_checkpoint must be one of none, moa, full; got 'attn'"),
])
def test_settings_that_cannot_apply_are_refused(flags, message):
    with pytest.raises(ValueError) as err:
        parse_job_config(["--model.preset", "tiny", "--parallel.zero_stage", "1", *flags]).validate()
    assert message in str(err.value)


def test_parameter_aliases_compute_the_models_gradients_with_its_hooks():
    # What a CUDA-graph capture differentiates: the model over aliases of its parameters.
    torch.manual_seed(0)
    model = MoLM(model_preset("tiny")).double()
    head = model.lm_head.weight
    head.register_hook(lambda g: g * 2.0)  # as modular.insert's frozen-row masks do
    ids = torch.randint(0, 500, (2, 8))
    model(ids, labels=ids.roll(-1, 1)).loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}

    call, aliases = parameter_aliases(model)
    names = list(aliases)
    grads = torch.autograd.grad(call(ids, labels=ids.roll(-1, 1)).loss, [aliases[n] for n in names])
    assert all(torch.equal(g, want[n]) for n, g in zip(names, grads))
    assert aliases["lm_head.weight"].data_ptr() == head.data_ptr()  # same storage: updates are seen
    with torch.no_grad():
        head.add_(1.0)
    assert torch.equal(aliases["lm_head.weight"], head)
