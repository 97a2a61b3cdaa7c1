"""One micro-batch's forward and backward with its gradients added straight into DeepSpeed's fp32
buffers, run eagerly or replayed as a CUDA graph (`train.cuda_graph`). Used whenever DeepSpeed
runs its bf16 optimizer: bf16 weights with ZeRO-1, gradients accumulated in fp32.

Fused accumulation. DeepSpeed's own backward would take a micro-batch in three passes over every
parameter: zero the bf16 gradients, let autograd add the micro-batch's gradients into them, then
add an fp32 copy of each into the fp32 buffer: about 28 bytes of memory traffic per parameter and
micro-batch, and four kernels per tensor. (Its first pass also needs DeepSpeed to find the model's
output tensors, which it does not inside our output dataclass, so its bf16 gradients would carry
over from one micro-batch to the next.) Nearly all of MoLM's
parameters are experts (4.0 of the 4.14B of molm-350m-4b), each with a full-size gradient in every
micro-batch, so at a few thousand tokens per micro-batch that traffic rivals the arithmetic. Here
autograd returns the micro-batch's bf16 gradients (`torch.autograd.grad`) and one type-promoting
add per tensor accumulates them into the same fp32 buffers (12 bytes per parameter). The numbers
are DeepSpeed's: each bf16 gradient added in fp32. Everything else stays DeepSpeed's: the
data-parallel reduction at the accumulation boundary, the norm, clipping, AdamW on the fp32 master
weights, the copy back to bf16, the checkpointed state.

The expert tensors (nearly all the parameters) do better still: their gradient kernel adds its
fp32 result into the buffer itself (molm_kernels' `accumulate_weight_grads`, Megatron-LM's gradient
accumulation fusion), so their gradients are never written in bf16 at all.

CUDA graphs. Eager, a micro-batch of molm-350m-4b is thousands of kernel launches made from Python
and the GPU waits for the host between them. Nothing on the path reads a value back to the host
(molm_kernels' routing offsets come from searchsorted, expert counts are a scatter-add), so the
whole micro-batch (forward, losses, backward, fp32 accumulation) is captured once and replayed
with each new micro-batch copied into the graph's static inputs. The capture runs over aliases of
the parameters (same storage, fresh autograd leaves, the parameters' tensor hooks copied): an
autograd node made outside the capture stream never enters it. One graph per (logging step or
not, memory length), all in one memory pool. The first micro-batch of each runs eagerly, and so
does a window without memory (a run's first).

Legend: B rows, T window tokens, M memory tokens, S = M + T keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import molm_kernels

# Runs on the capture's stream before it (after the eager micro-batch that compiled everything):
# the stream's cuBLAS workspace and allocator state are set up outside the capture.
WARMUP_RUNS = 1


def bf16_optimizer_of(engine) -> bool:
    """Whether DeepSpeed chose its bf16 optimizer (bf16 weights, ZeRO-1, fp32 accumulation), the one
    whose fp32 gradient buffers the fused accumulation writes."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    return isinstance(engine.optimizer, BF16_Optimizer)


class FusedMicrobatch:
    """Forward, backward and fp32 accumulation of one micro-batch; the engine's `step()` follows."""

    def __init__(self, engine, grad_accum_steps: int, cuda_graph: bool):
        if not bf16_optimizer_of(engine):
            raise ValueError("the fused accumulation writes the fp32 gradient buffers of DeepSpeed's bf16 optimizer, "
                             "used with train.precision bf16 and parallel.zero_stage 1")
        opt = engine.optimizer
        self.engine, self.model, self.optimizer = engine, engine.module, opt
        # The optimizer's trainable bf16 tensors and their fp32 gradient views, in the same order.
        self.slots = [(i, j) for i, group in enumerate(opt.bf16_groups) for j in range(len(group))]
        self.params = [opt.bf16_groups[i][j] for i, j in self.slots]
        self.hp_grads = [opt.fp32_groups_gradients[i][j].view(p.shape) for (i, j), p in zip(self.slots, self.params)]
        # engine.backward divides the loss by the accumulation steps; so do we.
        self.inv_accum = 1.0 / grad_accum_steps
        self.cuda_graph = cuda_graph
        self.graphs: dict[tuple[bool, int], CapturedMicrobatch] = {}

    def run(self, input_ids: torch.Tensor, labels: torch.Tensor, mask_BS: torch.Tensor | None, memory: list | None,
            scale: float, collect: bool):
        """The model's output for the micro-batch, its gradients of
        `(lm_loss_sum * scale + aux_loss) / grad_accum_steps` added to the fp32 buffers. Logging
        steps (`collect`) compute every aux loss and the expert counts."""
        key = (collect, memory[0][0].shape[1]) if self.cuda_graph and memory is not None else None
        if key in self.graphs:
            out, present = self.graphs[key].replay(input_ids, labels, mask_BS, memory, scale)
        else:
            out, present = self._forward_backward(self.model, self.params, self.hp_grads, input_ids, labels, mask_BS,
                                                  memory, scale, collect)
            if key is not None:
                # This eager run compiled and autotuned every kernel the capture records, the
                # accumulating ones included, on real buffers; the next micro-batch replays.
                self.graphs[key] = self._capture(input_ids, labels, mask_BS, memory, collect)
        flags = self.optimizer.fp32_groups_has_gradients
        for (i, j), has in zip(self.slots, present):
            if has:
                flags[i][j] = True  # what DeepSpeed's own accumulation records; its norm reads only these
        if self.engine.enable_backward_allreduce:
            self.engine.allreduce_gradients()  # a no-op until the accumulation boundary (ZeRO-1)
        return out

    def _forward_backward(self, model: Callable, params: list[torch.Tensor], targets: list[torch.Tensor] | None,
                          input_ids, labels, mask_BS, memory, scale, collect: bool):
        out = model(input_ids, labels=labels, attention_mask=mask_BS, memory=memory,
                    collect_expert_stats=collect, all_aux_losses=collect)
        loss = (out.lm_loss_sum * scale + out.aux_loss) * self.inv_accum
        # The expert weights' gradient kernels add into their fp32 buffers themselves (and return
        # no gradient); the other gradients come back in bf16 and are added here.
        with molm_kernels.accumulate_weight_grads([] if targets is None else list(zip(params, targets))) as added:
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        present = [g is not None or i in added for i, g in enumerate(grads)]
        if targets is not None:
            pairs = [(t, g) for t, g in zip(targets, grads) if g is not None]
            torch._foreach_add_([t for t, _ in pairs], [g for _, g in pairs])  # fp32 += bf16, one kernel per tensor
        return out, present

    def _capture(self, input_ids, labels, mask_BS, memory, collect: bool) -> CapturedMicrobatch:
        static = StaticInputs.like(input_ids, labels, mask_BS, memory)
        model, aliases = parameter_aliases(self.model)
        by_id = {id(p): name for name, p in self.model.named_parameters()}
        alias_params = [aliases[by_id[id(p)]] for p in self.params]

        def run(targets):
            return self._forward_backward(model, alias_params, targets, static.input_ids, static.labels, static.mask_BS,
                                          static.memory, static.scale, collect)

        device = input_ids.device
        rng = torch.cuda.get_rng_state(device)  # the warm-up must not advance dropout's or sampling's stream
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                run(None)  # nothing accumulated: this micro-batch is in the buffers already
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.set_rng_state(rng, device)
        graph = torch.cuda.CUDAGraph()
        pool = next(iter(self.graphs.values())).graph.pool() if self.graphs else None
        with torch.cuda.graph(graph, pool=pool, stream=side):
            out, present = run(self.hp_grads)
        return CapturedMicrobatch(graph, static, out, present, aliases)


def parameter_aliases(model: torch.nn.Module) -> tuple[Callable, dict[str, torch.Tensor]]:
    """`model` called over aliases of its parameters, and the aliases by name: same storage (an
    update of a parameter is seen through its alias), but fresh autograd leaves whose gradient
    nodes are made where the call runs, each with its parameter's tensor hooks (e.g. the
    frozen-row masks of a grown vocabulary)."""
    aliases = {}
    for name, p in model.named_parameters():
        alias = p.detach().requires_grad_(p.requires_grad)
        for hook in (p._backward_hooks or {}).values():
            alias.register_hook(hook)
        aliases[name] = alias

    def call(*args, **kwargs):
        return torch.func.functional_call(model, aliases, args, kwargs)

    return call, aliases


@dataclass
class StaticInputs:
    """The buffers a captured micro-batch reads; each replay copies the next micro-batch into them."""

    input_ids: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T]
    mask_BS: torch.Tensor | None
    memory: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (k, v), [B, M, nh, hs]
    scale: torch.Tensor  # 0-dim fp32: the step's loss scale (it depends on the step's token count)

    @classmethod
    def like(cls, input_ids, labels, mask_BS, memory) -> StaticInputs:
        static_memory = []
        for k, v in memory:
            k_static = k.clone()  # one buffer where keys and values are one tensor (MoLM's identity K/V)
            static_memory.append((k_static, k_static if v is k else v.clone()))
        return cls(input_ids.clone(), labels.clone(), None if mask_BS is None else mask_BS.clone(), static_memory,
                   torch.zeros((), dtype=torch.float32, device=input_ids.device))

    def fill(self, input_ids, labels, mask_BS, memory, scale: float) -> None:
        if (mask_BS is None) != (self.mask_BS is None):
            raise ValueError("a captured micro-batch was replayed with and without an attention mask")
        self.input_ids.copy_(input_ids, non_blocking=True)
        self.labels.copy_(labels, non_blocking=True)
        if mask_BS is not None:
            self.mask_BS.copy_(mask_BS, non_blocking=True)
        for (k, v), (k_new, v_new) in zip(self.memory, memory):
            k.copy_(k_new, non_blocking=True)
            if v is not k:
                v.copy_(v_new, non_blocking=True)
        self.scale.fill_(scale)


@dataclass
class CapturedMicrobatch:
    """A captured micro-batch: its graph, static inputs and outputs (overwritten by every replay)."""

    graph: torch.cuda.CUDAGraph
    static: StaticInputs
    out: object  # the model's output object, its tensors the graph's static outputs
    present: list[bool]  # which trainable tensors received a gradient
    aliases: dict[str, torch.Tensor]  # kept alive with the graph that reads them

    def replay(self, input_ids, labels, mask_BS, memory, scale: float):
        self.static.fill(input_ids, labels, mask_BS, memory, scale)
        self.graph.replay()
        return self.out, self.present
