"""Pretrain a ModuleFormer (MoLM) model.

    python pretrain.py --config launch/configs/demo.yaml [--section.field VALUE ...]
    torchrun --nproc_per_node 8 pretrain.py --config ...      # or: deepspeed --num_gpus 8 pretrain.py ...

Settings: molm_megatron/config.py (`--help` lists every field). If `checkpoint.dir` holds a
complete checkpoint the run resumes from the newest one. Exit codes: 0 finished, 75 preempted by
SIGTERM/SIGUSR1 after saving a checkpoint (resubmit to continue), 3 stopped after too many
consecutive non-finite steps (after saving), 2 bad configuration.
"""

import logging
import sys

from molm_megatron.cli import build_arg_parser, parse_job_config


def main(argv: list[str]) -> int:
    try:
        job = parse_job_config(argv)
    except ValueError as e:
        build_arg_parser().error(str(e))  # prints usage and the message, exits 2
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)
    for name in ("molm_megatron", "pretrain"):  # our progress lines; libraries stay at warnings
        logging.getLogger(name).setLevel(logging.INFO)
    # Imported after parsing so that `--help` and config errors answer without loading DeepSpeed.
    from molm_megatron.training.trainer import Trainer

    try:
        trainer = Trainer(job)
    except ValueError as e:  # world-dependent settings: batch arithmetic, layout, data
        logging.getLogger("pretrain").error("error: %s", e)
        return 2
    try:
        return trainer.train()
    finally:
        trainer.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
