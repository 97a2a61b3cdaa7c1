"""A training micro-batch's forward and backward replayed as CUDA graphs (`train.cuda_graph`).

Eager MoLM training is host-bound: each MoA layer launches about sixty kernels through Python, and
at the paper's per-GPU shape the GPU waits for the CPU most of a step. Nothing on the model's CUDA
path reads a value back to the host, so `torch.cuda.make_graphed_callables` can capture the
forward (losses and expert counts included) and its backward once for the fixed micro-batch shape
and replay both. The parameter gradients still reach autograd's accumulation eagerly, so
DeepSpeed's gradient hooks, fp32 accumulation, clipping, non-finite check and optimizer step are
unchanged, and so are the logged metrics.

The graph is captured at the first window that has memory (the first window of a run has none and
runs eagerly, as does any window whose memory length differs from the captured one); validation
runs eagerly (no gradients).

Legend: B micro-batch rows, T segment tokens, M memory tokens, S = M + T keys.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.func import functional_call

from molm_megatron.model.model import MoLMOutput


class _FreshGrads(torch.autograd.Function):
    """Identity on the parameters whose backward hands autograd copies of their gradients.

    The graph returns each gradient in one of its static buffers; autograd's accumulation would
    adopt that buffer as `param.grad`, and DeepSpeed then zeroes, adds into or frees it while the
    next replay writes there. A copy per micro-batch keeps the two apart."""

    @staticmethod
    def forward(ctx, *params):
        return tuple(p.view_as(p) for p in params)

    @staticmethod
    def backward(ctx, *grads):
        return tuple(None if g is None else g.clone() for g in grads)


class GraphedTrainingForward:
    """Captures `model`'s training forward + backward for one (B, T, M) shape on first use.

    `applies(...)` says whether a micro-batch can replay the graph; inside `active()` the model's
    forward (what the DeepSpeed engine calls) replays it and returns a `MoLMOutput` with every
    field the trainer reads (all aux losses and expert counts; no logits).

    The graph is captured over aliases of the parameters (same storage, fresh autograd leaves)
    passed as inputs, and replayed with the parameters themselves: their gradient accumulators
    (which DeepSpeed's hooks keep alive, bound to the default stream) then run after the replay,
    outside any capture, instead of inside the capture stream, which CUDA refuses.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._names = [name for name, _ in model.named_parameters()]
        self._graphed = None
        self._shape: tuple[int, int, int] | None = None

    def applies(self, input_ids_BT: torch.Tensor, memory: list | None) -> bool:
        if memory is None or not self.model.training:
            return False
        return self._shape is None or self._shape == (*input_ids_BT.shape, memory[0][0].shape[1])

    def _step(self, input_ids_BT, labels_BT, mask_BS, *tensors):
        """The model's training forward with tensors in and out (what graphs need): `tensors` is
        the flat memory (k, v per layer) then the parameters in `named_parameters` order."""
        memory_flat, params = tensors[:len(tensors) - len(self._names)], tensors[len(tensors) - len(self._names):]
        # Everything a log step reports, on every step: in a graph these few kernels cost little,
        # and one graph serves log and plain steps alike.
        out = functional_call(self.model, dict(zip(self._names, params)), (input_ids_BT,),
                              dict(labels=labels_BT, attention_mask=mask_BS,
                                   memory=list(zip(memory_flat[0::2], memory_flat[1::2])),
                                   collect_expert_stats=True, all_aux_losses=True))
        new_memory = tuple(t for kv in out.memory for t in kv)
        return (out.lm_loss_sum, out.num_label_tokens, out.aux_loss, out.aux_losses, out.expert_stats, new_memory)

    def _capture(self, input_ids_BT, labels_BT, mask_BS, memory) -> None:
        # Dedicated input buffers: the graph reads its inputs from these addresses, and replays
        # copy each new micro-batch into them (k and v may be one tensor when they are the
        # normed hidden states themselves: two buffers keep the copies independent). Parameter
        # aliases share the parameters' storage, so replays copy nothing for them.
        aliases = [p.detach().requires_grad_(p.requires_grad) for p in self.model.parameters()]
        sample = (input_ids_BT.clone(), labels_BT.clone(), mask_BS.clone(),
                  *[t.detach().clone() for kv in memory for t in kv], *aliases)
        # allow_unused_input: an expert that no token chose this micro-batch has no gradient.
        self._graphed = torch.cuda.make_graphed_callables(self._step, sample, allow_unused_input=True)
        self._shape = (*input_ids_BT.shape, memory[0][0].shape[1])

    def _replay(self, input_ids, labels=None, attention_mask=None, memory=None, collect_expert_stats=False,
                memory_length=None, all_aux_losses=False) -> MoLMOutput:
        assert labels is not None and attention_mask is not None
        assert memory_length is None or memory_length == self.model.config.history_length
        if self._graphed is None:
            del self.model.forward  # the capture runs the real forward
            try:
                self._capture(input_ids, labels, attention_mask, memory)
            finally:
                self.model.forward = self._replay
        lm_loss_sum, num_label_tokens, aux_loss, aux_losses, expert_stats, new_memory = self._graphed(
            input_ids, labels, attention_mask, *[t for kv in memory for t in kv],
            *_FreshGrads.apply(*self.model.parameters()))
        # Graph outputs live in static buffers that the next replay overwrites. The memory needs
        # no copy: a replay first copies its inputs (this memory) into the graph's input buffers;
        # the losses and counts are read (backward, metrics) before the next replay.
        return MoLMOutput(logits=None, lm_loss_sum=lm_loss_sum, num_label_tokens=num_label_tokens,
                          lm_loss=lm_loss_sum / num_label_tokens.clamp(min=1), aux_loss=aux_loss,
                          aux_losses=aux_losses, expert_stats=expert_stats,
                          memory=list(zip(new_memory[0::2], new_memory[1::2])))

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Route the model's forward to the graph (an instance attribute shadows the method)."""
        self.model.forward = self._replay
        try:
            yield
        finally:
            del self.model.forward
