"""Pretrain a ModuleFormer (MoLM) model.

    python pretrain.py --config launch/configs/demo.yaml [--section.field VALUE ...]
    torchrun --nproc_per_node 8 pretrain.py --config ...      # or: deepspeed --num_gpus 8 pretrain.py ...

Settings: molm_megatron/config.py (`--help` lists every field). If `checkpoint.dir` holds a
complete checkpoint the run resumes from the newest one. Exit codes: 0 finished, 75 preempted by
SIGTERM/SIGUSR1 after saving a checkpoint (resubmit to continue), 3 stopped after too many
consecutive non-finite steps (after saving), 2 bad configuration.
"""

import sys

from molm_megatron.cli import run_job
from molm_megatron.config import JobConfig


def build(job: JobConfig):
    # Imported after parsing so that `--help` and config errors answer without loading DeepSpeed.
    from molm_megatron.training.trainer import Trainer

    return Trainer(job)


def main(argv: list[str]) -> int:
    return run_job(argv, JobConfig, "pretrain.py", build)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
