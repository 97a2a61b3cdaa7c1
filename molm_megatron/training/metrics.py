"""Training metrics: one flat dict of namespaced keys, fanned out to stdout, JSON lines, TensorBoard
and optionally Weights & Biases (`metrics.wandb`, as Megatron-LM and torchtitan offer).

Keys: `loss/lm`, `loss/<aux name>` (mi, concentration, switch, z, routing_reg), `loss/total`,
`experts/layer{N}.{attn,mlpf}/load_{entropy,max,min}` (and `new_share` with inserted experts),
`throughput/tokens_per_s`, `mfu`, `grad_norm`, `lr`, `memory/...`, `train/...` (counters), `valid/...` (held-out loss, perplexity).

MFU (model FLOPs utilisation, Chowdhery et al. 2022, PaLM appendix B) = achieved model FLOP/s over
the peak of the devices used: `cfg.flops_per_token(seq_len) * tokens_per_s / (world_size * peak)`,
where flops_per_token counts 6 x the active matmul parameters plus the stick-breaking attention
products over the segment and its memory (forward + backward; no recomputation counted).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import resource
import sys
import time

import torch

# Dense bf16 tensor-core peaks (no sparsity) from the vendors' data sheets, FLOP/s per device.
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12}
# CPU: a nominal 1e11 FLOP/s per process (about one AVX2 core at 3 GHz: 2 FMA units x 8 fp32
# lanes x 2 FLOPs x 3e9 = 96 GFLOP/s). CPU MFU is a sanity figure, not a performance claim.
CPU_PEAK_FLOPS = 1e11


def peak_flops_per_device(device: torch.device, peak_tflops: float = 0.0) -> float:
    """Peak dense bf16 FLOP/s of one device: the configured value, else the table above (0 if unknown)."""
    if peak_tflops:
        return peak_tflops * 1e12
    if device.type != "cuda":
        return CPU_PEAK_FLOPS
    name = torch.cuda.get_device_name(device)
    # Longest key first so that "GH200" is not read as "H200".
    for key in sorted(GPU_PEAK_FLOPS, key=len, reverse=True):
        if key in name:
            return GPU_PEAK_FLOPS[key]
    return 0.0


def expert_load_metrics(counts: dict[str, torch.Tensor], num_new: dict[str, int] | None = None) -> dict[str, float]:
    """Per router: entropy of the token-count distribution over experts (nats; log E is uniform) and
    the most and least loaded expert's count relative to the mean (1.0 = perfectly balanced). With
    inserted experts (`num_new`: router kind 'attn' / 'mlpf' -> how many, the last ones), also
    `new_share`, the share of assignments routed to them (what routing regularisation limits)."""
    out = {}
    for name, count_E in counts.items():
        count_E = count_E.double()
        total = count_E.sum().clamp(min=1.0)
        p_E = count_E / total
        entropy = -(p_E * p_E.clamp(min=1e-30).log()).sum()
        mean = total / count_E.numel()
        out[f"experts/{name}/load_entropy"] = entropy.item()
        out[f"experts/{name}/load_max"] = (count_E.max() / mean).item()
        out[f"experts/{name}/load_min"] = (count_E.min() / mean).item()
        n_new = (num_new or {}).get(name.split(".")[-1], 0)
        if n_new:
            out[f"experts/{name}/new_share"] = (count_E[-n_new:].sum() / total).item()
    return out


def memory_metrics(device: torch.device) -> dict[str, float]:
    """Peak memory of this process: GPU allocator peaks on CUDA, the resident-set peak on CPU."""
    if device.type == "cuda":
        return {"memory/max_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "memory/max_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    # ru_maxrss is in KiB on Linux.
    return {"memory/max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


class Progress:
    """Step rate and ETA over the steps this process has run (a resumed run starts a new clock)."""

    def __init__(self, start_step: int, total_steps: int):
        self.start_step, self.total_steps = start_step, total_steps
        self.start_time = time.perf_counter()

    def __call__(self, step: int) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start_time
        done = step - self.start_step
        rate = done / elapsed if elapsed > 0 and done > 0 else 0.0
        eta = (self.total_steps - step) / rate if rate else math.inf
        return {"progress/steps_per_s": rate, "progress/eta_s": eta}


def _format_line(metrics: dict[str, float], step: int, total_steps: int, aux_name: str) -> str:
    """One human-readable line with the load-balancing loss in use; the JSON line holds every key."""
    parts = [f"step {step}/{total_steps}"]
    for key, label, fmt in (("loss/lm", "loss", "{:.4f}"), (f"loss/{aux_name}", aux_name, "{:.4f}"),
                            ("valid/loss", "valid", "{:.4f}"),
                            ("valid/ppl", "ppl", "{:.2f}"), ("lr", "lr", "{:.2e}"),
                            ("grad_norm", "gnorm", "{:.3f}"), ("throughput/tokens_per_s", "tok/s", "{:,.0f}"),
                            ("mfu", "mfu", "{:.1%}"), ("memory/max_allocated_gib", "mem", "{:.1f} GiB"),
                            ("memory/max_rss_gib", "rss", "{:.1f} GiB"), ("train/skipped_steps", "skipped", "{:.0f}"),
                            ("progress/steps_per_s", "step/s", "{:.2f}")):
        if key in metrics:
            parts.append(f"{label} {fmt.format(metrics[key])}")
    if math.isfinite(metrics.get("progress/eta_s", math.inf)):
        parts.append(f"eta {datetime.timedelta(seconds=round(metrics['progress/eta_s']))}")
    return " | ".join(parts)


def require_wandb() -> None:
    """ValueError naming the package when `metrics.wandb` is asked for but wandb is not installed
    (it is optional: requirements.txt leaves it out). Cheap: nothing is imported."""
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        raise ValueError("metrics.wandb is true but the Python package `wandb` is not installed: "
                         "pip install wandb, or leave metrics.wandb false")


class MetricsLogger:
    """`log(metrics, step)` writes one stdout line, one JSON line, TensorBoard scalars and, when asked,
    a Weights & Biases record (rank 0 only). An empty `directory` writes no files (stdout only)."""

    def __init__(self, directory: str, total_steps: int, tensorboard: bool, enabled: bool, aux_name: str = "mi",
                 wandb: bool = False, wandb_project: str = "molm", wandb_mode: str = "",
                 run_config: dict | None = None):
        """`wandb_mode` '' leaves the choice to wandb (WANDB_MODE, `wandb offline`); `run_config` is
        the resolved job tree recorded with the W&B run."""
        self.enabled, self.total_steps, self.aux_name = enabled, total_steps, aux_name
        self.jsonl = self.writer = self.wandb_run = None
        if not enabled:
            return
        if directory:
            os.makedirs(directory, exist_ok=True)
            # Append: a resumed run continues the same file (its steps follow the checkpoint's).
            self.jsonl = open(os.path.join(directory, "metrics.jsonl"), "a")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(log_dir=os.path.join(directory, "tensorboard"))
        if wandb:
            require_wandb()
            import wandb as wandb_module  # optional dependency: imported only when enabled

            # A resumed run starts a new W&B run whose steps continue the checkpoint's.
            self.wandb_run = wandb_module.init(project=wandb_project, dir=directory or None, config=run_config,
                                               mode=wandb_mode or None)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        print(_format_line(metrics, step, self.total_steps, self.aux_name), file=sys.stdout, flush=True)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
            self.jsonl.flush()
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
