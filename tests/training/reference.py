"""A naive single-process pretraining loop: the oracle the distributed engine is compared with.

Plain PyTorch only (no DeepSpeed, no torch.distributed, no molm_megatron.training except the LR
formula, which test_schedule pins to hand-computed values). It emulates `dp` data-parallel ranks
by running each rank's stream loader in turn, each with its own Transformer-XL memory, and
builds the gradient the engine must produce:

    grad of  sum_{r, m} CE_sum(r, m) / N_global  +  sum_k w_k * mean_{r, m} aux_k(r, m)

then clips the global norm (float64) to `grad_clip` and takes a torch AdamW step (decay on tensors of two
or more dimensions only), with the LR of `lr_at`.
"""

from __future__ import annotations

import torch

from molm_megatron.config import ModelConfig
from molm_megatron.data import DataSpec, TransformerXLStreamLoader, build_token_sources
from molm_megatron.model import MoLM
from molm_megatron.training.schedule import lr_at


def reference_run(cfg: ModelConfig, prefix: str, split: str, dp: int, micro_batch: int, accum: int, steps: int,
                  seed: int, lr: float = 3e-4, warmup: int = 2, decay_steps: int | None = None,
                  min_ratio: float = 0.1, weight_decay: float = 0.01, grad_clip: float = 1.0) -> dict:
    """Returns per-step 'loss/lm', 'loss/<aux>', 'grad_norm' lists and the final 'params'."""
    torch.manual_seed(seed)
    model = MoLM(cfg)
    source = build_token_sources(DataSpec([prefix], [1.0], split))["train"]
    loaders = [TransformerXLStreamLoader(source, micro_batch, cfg.block_size, r, dp, seed) for r in range(dp)]
    memory: list = [None] * dp  # per emulated rank: (per-layer (k, v), valid mask [B, M])
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": weight_decay},
                             {"params": vectors, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95), eps=1e-8)
    decay_steps = steps if decay_steps is None else decay_steps
    log: dict[str, list] = {"loss/lm": [], f"loss/{cfg.aux_loss_type}": [], "grad_norm": []}
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr, warmup, decay_steps, min_ratio)
        batches = [[next(loaders[r]) for _ in range(accum)] for r in range(dp)]
        n_global = sum(int((b.labels != -100).sum()) for rank in batches for b in rank)
        lm_sum, aux_sum = 0.0, 0.0
        opt.zero_grad()
        for r in range(dp):
            for b in batches[r]:
                mask = mem = None
                if memory[r] is not None:
                    mem, valid = memory[r]
                    valid = valid & ~b.reset_memory[:, None]
                    mask = torch.cat([valid, torch.ones_like(b.input_ids, dtype=torch.bool)], dim=1)
                out = model(b.input_ids, labels=b.labels, attention_mask=mask, memory=mem)
                loss = out.lm_loss_sum / n_global + out.aux_loss / (dp * accum)
                loss.backward()
                full_mask = mask if mask is not None else torch.ones_like(b.input_ids, dtype=torch.bool)
                M = out.memory[0][0].shape[1]
                memory[r] = (out.memory, full_mask[:, full_mask.shape[1] - M:])
                lm_sum += out.lm_loss_sum.item()
                aux_sum += out.aux_losses[cfg.aux_loss_type].item()
        # The norm in float64: a float32 sum over the 3M-entry embedding gradient is off by ~1e-5.
        norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters()))
        coef = min(1.0, grad_clip / (norm.item() + 1e-6))  # the clip_grad_norm_ formula
        for p in model.parameters():
            p.grad.mul_(coef)
        opt.step()
        log["loss/lm"].append(lm_sum / n_global)
        log[f"loss/{cfg.aux_loss_type}"].append(aux_sum / (dp * accum))
        log["grad_norm"].append(norm.item())
    log["params"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return log
