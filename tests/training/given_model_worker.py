"""Process side of test_trainer.py: a Trainer given a built model (of another shape than the job's
preset, as after expert insertion or pruning) trains it, saves it, and resumes it.

    python tests/training/given_model_worker.py OUT.pt DATA_PREFIX CHECKPOINT_DIR
"""

from __future__ import annotations

import dataclasses
import sys

import torch

from molm_megatron.cli import parse_job_config
from molm_megatron.config import model_preset
from molm_megatron.model import MoLM
from molm_megatron.training.trainer import Trainer

# The job's model section says 2 layers; the given model has 1 and other expert counts.
FLAGS = ["--model.preset", "tiny", "--model.vocab_size", "50295", "--model.block_size", "64",
         "--model.history_length", "64", "--train.micro_batch_size", "2", "--schedule.warmup_steps", "1",
         "--train.eval_interval", "0", "--metrics.dir", "", "--data.split", "80,20,0"]
GIVEN = dict(vocab_size=50295, block_size=64, history_length=64, n_layer=1, n_mlp_experts=4)


def main(out: str, prefix: str, checkpoint_dir: str) -> None:
    common = FLAGS + ["--data.prefixes", prefix, "--checkpoint.dir", checkpoint_dir]
    torch.manual_seed(99)  # not the job's seed: the trainer must keep these weights, not rebuild them
    model = MoLM(model_preset("tiny", **GIVEN))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(parse_job_config(common + ["--train.steps", "2"]), model)
    kept = all(torch.equal(initial[k], v) for k, v in trainer.engine.module.state_dict().items())
    trainer.train()
    trainer.close()

    trainer = Trainer(parse_job_config(common + ["--train.steps", "3"]), MoLM(model_preset("tiny", **GIVEN)))
    resumed_at = trainer.step
    trainer.train()
    final = {k: v.clone() for k, v in trainer.engine.module.state_dict().items()}
    trainer.close()
    torch.save({"kept_initial_weights": kept, "resumed_at": resumed_at, "final": final,
                "config": dataclasses.asdict(model.config)}, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
