"""Rank side of test_parallel_equivalence.py: one 4-process launch trains several parallel layouts
in turn (the real Trainer, groups torn down between layouts) and rank 0 saves, per layout, the
logged per-step metrics, the final full-size parameters (gathered over the process groups) and
the final checkpoint consolidated from its files.

    torchrun --nproc_per_node 4 tests/training/equivalence_worker.py OUT.pt DATA_PREFIX LAYOUT ...

LAYOUT is `name:tp:ep:zero:micro_batch:accum[:extra flag:value ...]`.
"""

from __future__ import annotations

import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist

from molm_megatron.cli import parse_job_config
from molm_megatron.hf.convert import consolidate_checkpoint
from molm_megatron.parallel import full_state_dict
from molm_megatron.training.trainer import Trainer

STEPS = 5
COMMON = ["--model.preset", "tiny", "--model.vocab_size", "50295", "--model.block_size", "64",
          "--model.history_length", "64", "--train.steps", str(STEPS), "--schedule.warmup_steps", "2",
          "--metrics.log_interval", "1", "--metrics.tensorboard", "false", "--data.split", "60,40,0",
          "--train.seed", "7"]


def run_layout(spec: str, prefix: str, workdir: str) -> dict | None:
    name, tp, ep, zero, micro, accum, *extra = spec.split(":")
    dp = int(os.environ["WORLD_SIZE"]) // int(tp)
    tokens = int(micro) * int(accum) * dp * 64
    job = parse_job_config(COMMON + [
        "--parallel.tensor_parallel_size", tp, "--parallel.expert_parallel_size", ep,
        "--parallel.zero_stage", zero, "--train.micro_batch_size", micro,
        "--train.global_batch_tokens", str(tokens), "--data.prefixes", prefix,
        "--metrics.dir", os.path.join(workdir, name), "--checkpoint.dir", os.path.join(workdir, name, "ckpt"),
        *extra])
    trainer = Trainer(job)
    try:
        code = trainer.train()
        # ZeRO-3 holds each parameter partitioned over the data-parallel ranks: gather first.
        with deepspeed.zero.GatheredParameters(list(trainer.engine.module.parameters()), enabled=zero == "3"):
            params = full_state_dict(trainer.engine.module, trainer.groups)
    finally:
        trainer.close()
    if dist.get_rank() != 0:
        return None
    with open(os.path.join(workdir, name, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    # The final checkpoint's shard files (ZeRO-3: its rank files' fp32 partitions), consolidated
    # without process groups (the HF converter's path).
    consolidated = consolidate_checkpoint(os.path.join(workdir, name, "ckpt")).state_dict()
    return {"exit_code": code, "metrics": metrics, "params": {k: v.cpu().float() for k, v in params.items()},
            "consolidated": consolidated,
            "plan": (trainer.plan.micro_batch_size, trainer.plan.grad_accum_steps, trainer.plan.dp_size)}


def main() -> None:
    out, prefix, layouts = sys.argv[1], sys.argv[2], sys.argv[3:]
    results = {}
    # Beside the results file: one folder all ranks share (checkpoints are written by every rank).
    workdir = os.path.join(os.path.dirname(os.path.abspath(out)), "work")
    for spec in layouts:
        results[spec.split(":")[0]] = run_layout(spec, prefix, workdir)
    if dist.get_rank() == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main()
