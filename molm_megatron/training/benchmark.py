"""Training benchmark: throughput, MFU and peak memory of the real loop, then where a step's time goes.

    python -m molm_megatron.training.benchmark --out DIR [--profile-steps N] -- [pretrain.py flags ...]
    python -m molm_megatron.training.benchmark --out DIR --finetune -- [finetune.py flags ...]

First the ordinary `Trainer.train()` runs (its metrics.jsonl has tokens/s, MFU and memory per log
step). Then `--timed-steps` more steps that log nothing are timed alone (breakdown.json's
`timed_tokens_per_s`, `timed_mfu`, `peak_allocated_gib`: the figures to quote), then
`--profile-steps` under torch.profiler, where every kernel's device time is charged, once, to a
category by the operation that launched it (the busiest kernels are listed too):

- attention: the stick-breaking kernels (custom ops molm_kernels::sb_fwd / sb_bwd);
- experts: the scattered expert matmuls of MoA and SMoE (molm_kernels::scatter_mm / expert_xty);
- routing: everything launched inside Router.forward and molm_kernels.route, and the backward of those
  forward operations (linked by autograd sequence number);
- optimizer: everything inside the DeepSpeed step at the accumulation boundary (ZeRO gradient
  copy, norm, clipping, AdamW, bf16 copy-back);
- other: the rest (embedding, head and cross entropy, norms, residuals, memory concatenation).

With --finetune the fine-tuning job runs (finetune.py's model and frozen tensors) and breakdown.json
also holds its trainable and total parameters, to compare with pretraining the same shape.
Shares are of the summed kernel time; the step's wall time is reported beside it (their gap is time
the GPU waits for the CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

import molm_kernels
from molm_megatron.cli import parse_job_config
from molm_megatron.model.model import Router

CATEGORIES = ("attention", "experts", "routing", "optimizer", "other")
_OP_CATEGORY = {"molm_kernels::sb_fwd": "attention", "molm_kernels::sb_bwd": "attention",
                "molm_kernels::scatter_mm": "experts", "molm_kernels::expert_xty": "experts"}


@contextlib.contextmanager
def _labelled(engine):
    """Wrap routing and the optimizer step in profiler ranges, undone on exit."""
    router_forward, route, engine_step = Router.forward, molm_kernels.route, engine.step

    def labelled(name, fn):
        def wrapper(*args, **kwargs):
            with record_function(name):
                return fn(*args, **kwargs)
        return wrapper

    Router.forward = labelled("routing", router_forward)
    molm_kernels.route = labelled("routing", route)
    engine.step = labelled("optimizer", engine_step)
    try:
        yield
    finally:
        Router.forward, molm_kernels.route = router_forward, route
        del engine.step  # back to the bound method of the class


def _category(event, routing_seq: set[int]) -> str:
    node = event
    while node is not None:
        if node.name in _OP_CATEGORY:
            return _OP_CATEGORY[node.name]
        if "_StickBreakingBackward" in node.name:  # the kernels' autograd.Function backward
            return "attention"
        if "_ParallelLinearBackward" in node.name:
            return "experts"
        if node.name in ("routing", "optimizer"):
            return node.name
        if node.name.startswith("autograd::engine::evaluate_function") and node.sequence_nr in routing_seq:
            return "routing"
        node = node.cpu_parent
    return "other"


def time_breakdown(events, device_time: bool) -> dict[str, float]:
    """Milliseconds per category: on a GPU each kernel's device time once, charged to the operation
    that launched it; on CPU, self CPU time.

    The profiler lists every kernel twice: as a device event of its own, and among the `kernels` of
    the operation that launched it. The device events give the total, the launching operations the
    category; kernels with no launching operation (a CUDA-graph replay's) count as "other". The
    device timeline also holds the labelled ranges (`record_function`) spanning their kernels:
    they are not kernels.
    """
    routing_seq = set()
    for e in events:
        node = e.cpu_parent
        while node is not None and e.sequence_nr >= 0:
            if node.name == "routing":
                routing_seq.add(e.sequence_nr)
                break
            node = node.cpu_parent
    out = dict.fromkeys(CATEGORIES, 0.0)
    host_events = [e for e in events if e.device_type == DeviceType.CPU]
    if not device_time:
        for e in host_events:
            out[_category(e, routing_seq)] += e.self_cpu_time_total / 1e3
        return out
    for e in host_events:
        launched = sum(k.duration for k in e.kernels)
        if launched:
            out[_category(e, routing_seq)] += launched / 1e3
    total = sum(e.time_range.elapsed_us() for e in events if _is_kernel(e)) / 1e3
    out["other"] += max(total - sum(out.values()), 0.0)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m molm_megatron.training.benchmark", description=__doc__.split("\n\n")[0],
        usage="%(prog)s --out DIR [--profile-steps N] [--finetune] -- [pretrain.py or finetune.py flags ...]")
    parser.add_argument("--out", required=True, help="folder for breakdown.json and the profiler's kernel table")
    # One step already holds every micro-batch of the accumulation; the profiler's Python-side
    # event processing grows with the launches (tens of thousands per step), so keep this small.
    parser.add_argument("--timed-steps", type=int, default=2,
                        help="steps timed after training, without the profiler and without logging (the clean "
                             "tokens/s and MFU of breakdown.json; 0: none)")
    parser.add_argument("--profile-steps", type=int, default=1,
                        help="steps run under the profiler after those (0: no breakdown)")
    parser.add_argument("--finetune", action="store_true",
                        help="benchmark finetune.py instead: its flags after --, the model from finetune.init_from "
                             "(preset:NAME for a random one); breakdown.json adds the trainable share")
    args, rest = parser.parse_known_args(argv)
    for flag in ("timed_steps", "profile_steps"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    flags = [a for a in rest if a != "--"]
    os.makedirs(args.out, exist_ok=True)
    if args.finetune:
        from molm_megatron.config import FinetuneJobConfig
        from molm_megatron.modular.finetune import finetune_trainer

        job = parse_job_config(flags, root=FinetuneJobConfig, prog="finetune.py")
        trainer, trainable, total = finetune_trainer(job)
        params = {"trainable_params": trainable, "total_params": total, "trainable_share": trainable / total}
    else:
        from molm_megatron.training.trainer import Trainer

        job = parse_job_config(flags)
        trainer, params = Trainer(job), {}
    try:
        start = time.perf_counter()
        code = trainer.train()
        result = {"exit_code": code, "train_seconds": time.perf_counter() - start, "job": job.to_dict(), **params}
        if args.timed_steps:
            result.update(_timed(trainer, args.timed_steps))
        if args.profile_steps:
            result.update(_profile(trainer, args.profile_steps, args.out))
        else:
            print("profiling skipped (--profile-steps 0): throughput and MFU are in the run's metrics.jsonl")
        with open(os.path.join(args.out, "breakdown.json"), "w") as f:
            json.dump(result, f, indent=1)
    finally:
        trainer.close()
    return code


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(trainer, steps: int) -> dict:
    """`steps` more training steps that log nothing, timed from the host with the device drained
    before and after: tokens/s, MFU (ModelConfig.flops_per_token over the device's peak) and peak memory."""
    _sync(trainer.device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(collect=False)
    _sync(trainer.device)
    seconds = (time.perf_counter() - start) / steps
    tokens_per_s = trainer.plan.global_batch_tokens / seconds
    result = {"timed_step_s": seconds, "timed_tokens_per_s": tokens_per_s}
    if trainer.peak_flops:
        result["timed_mfu"] = trainer.flops_per_token * tokens_per_s / (trainer.world_size * trainer.peak_flops)
    if trainer.device.type == "cuda":
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated(trainer.device) / 2**30
    print("timed: " + ", ".join(f"{k} {v:,.4g}" for k, v in result.items()))
    return result


def _profile(trainer, steps: int, out: str) -> dict:
    """`steps` (>= 1) more training steps under torch.profiler: wall time and kernel time per category."""
    device = trainer.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with _labelled(trainer.engine), profile(activities=activities) as prof:
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(collect=False)
        _sync(device)
        step_ms = (time.perf_counter() - t0) * 1e3 / steps
    events = prof.events()
    per_step = {k: v / steps for k, v in time_breakdown(events, device.type == "cuda").items()}
    total = sum(per_step.values())
    share = {k: v / total if total else 0.0 for k, v in per_step.items()}
    sort_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with open(os.path.join(out, "kernels.txt"), "w") as f:
        f.write(prof.key_averages().table(sort_by=sort_key, row_limit=40))
    tokens_per_s = trainer.plan.global_batch_tokens / (step_ms / 1e3)
    print(f"step wall {step_ms:.1f} ms ({tokens_per_s:,.0f} tokens/s), summed kernel time {total:.1f} ms")
    for k in CATEGORIES:
        print(f"  {k:10s} {per_step[k]:8.2f} ms  {share[k]:6.1%}")
    top = top_kernels(events, steps)
    for name, ms, calls in top:
        print(f"  {ms:8.2f} ms {calls:7.0f} calls  {name[:100]}")
    return {"step_wall_ms": step_ms, "tokens_per_s": tokens_per_s, "kernel_ms_per_step": per_step, "share": share,
            "top_kernels": top}


def _is_kernel(event) -> bool:
    """A kernel, copy or memset on the device, not a labelled range drawn on the device timeline."""
    return event.device_type != DeviceType.CPU and not event.is_user_annotation


def top_kernels(events, steps: int, n: int = 25) -> list[tuple[str, float, float]]:
    """(kernel name, device ms per step, launches per step) of the n kernels with the most device
    time (each kernel counted once, from its device event)."""
    totals: dict[str, list[float]] = {}
    for e in events:
        if _is_kernel(e):
            entry = totals.setdefault(e.name, [0.0, 0.0])
            entry[0] += e.time_range.elapsed_us() / 1e3 / steps
            entry[1] += 1 / steps
    return sorted(((name, ms, calls) for name, (ms, calls) in totals.items()), key=lambda r: -r[1])[:n]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
