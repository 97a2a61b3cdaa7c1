"""Fine-tune a ModuleFormer (MoLM) model: load concentration, continual learning by inserted
experts, or plain full fine-tuning (recipes in launch/configs/finetune_*.yaml); or a Hugging Face
dense or EMoE GPT-2 / GPT-NeoX / Llama model, fully or with LoRA (finetune_emoe*.yaml).

    python finetune.py --config launch/configs/finetune_continual.yaml --finetune.init_from CKPT [--section.field VALUE ...]
    deepspeed --num_gpus 8 finetune.py --config ...          # or: torchrun --nproc_per_node 8 finetune.py ...

The pretraining engine runs it (one trainer, one checkpoint format, one metrics path); what differs
is where the weights come from (finetune.init_from), which tensors train (finetune.trainable) and
the losses (--model.concentration_loss_weight, --model.routing_reg_weight). Settings:
molm_megatron/config.py (`--help` lists every field). Exit codes as pretrain.py: 0 finished, 75
preempted after saving a checkpoint (rerun to resume), 3 too many non-finite steps, 2 bad input.
"""

import sys

from molm_megatron.cli import run_job
from molm_megatron.config import FinetuneJobConfig


def build(job: FinetuneJobConfig):
    # Imported after parsing so that `--help` and config errors answer without loading DeepSpeed.
    from molm_megatron.modular.finetune import finetune_trainer

    trainer, _, _ = finetune_trainer(job)
    return trainer


def main(argv: list[str]) -> int:
    return run_job(argv, FinetuneJobConfig, "finetune.py", build)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
