"""Fine-tune a ModuleFormer (MoLM) model: load concentration, continual learning by inserted
experts, or plain full fine-tuning (recipes in launch/configs/finetune_*.yaml).

    python finetune.py --config launch/configs/finetune_continual.yaml --finetune.init_from CKPT [--section.field VALUE ...]
    deepspeed --num_gpus 8 finetune.py --config ...          # or: torchrun --nproc_per_node 8 finetune.py ...

The pretraining engine runs it (one trainer, one checkpoint format, one metrics path); what differs
is where the weights come from (finetune.init_from), which tensors train (finetune.trainable) and
the losses (--model.concentration_loss_weight, --model.routing_reg_weight). Settings:
molm_megatron/config.py (`--help` lists every field). Exit codes as pretrain.py: 0 finished, 75
preempted after saving a checkpoint (rerun to resume), 3 too many non-finite steps, 2 bad input.
"""

import logging
import sys

from molm_megatron.cli import build_arg_parser, parse_job_config
from molm_megatron.config import FinetuneJobConfig

PROG = "finetune.py"


def main(argv: list[str]) -> int:
    try:
        job = parse_job_config(argv, root=FinetuneJobConfig, prog=PROG)
    except ValueError as e:
        build_arg_parser(FinetuneJobConfig, PROG).error(str(e))  # prints usage and the message, exits 2
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)
    for name in ("molm_megatron", "finetune"):  # our progress lines; libraries stay at warnings
        logging.getLogger(name).setLevel(logging.INFO)
    # Imported after parsing so that `--help` and config errors answer without loading DeepSpeed.
    from molm_megatron.modular.finetune import finetune_trainer

    try:
        trainer, _, _ = finetune_trainer(job)
    except ValueError as e:  # starting weights, world-dependent settings, data
        logging.getLogger("finetune").error("error: %s", e)
        return 2
    try:
        return trainer.train()
    finally:
        trainer.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
