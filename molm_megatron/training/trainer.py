"""The pretraining loop: build (processes, groups, model, parallelism, DeepSpeed engine, data,
checkpoints, metrics), then train: step, save, maybe validate, log.

Data order is Transformer-XL's (Dai et al., 2019; DESIGN.md section 3): each data-parallel rank
reads `micro_batch_size` parallel streams in consecutive `block_size` windows, and every window
attends over the previous window's keys/values of the same row (`out.memory`); a row whose stream
restarts has its memory masked out. Micro-batches of one step continue each other the same way.

The LM loss of a step is normalised by the global number of valid label tokens (all micro-batches
of all data-parallel ranks), not averaged per micro-batch: each micro-batch contributes
`lm_loss_sum * dp * accum / N_global`, which DeepSpeed's 1/accum scaling and data-parallel mean
turn into exactly sum(CE) / N_global. Aux losses are per-micro-batch means, averaged the same way.

Legend: B micro-batch rows, T segment tokens, M memory tokens per row, E experts.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from molm_megatron.config import JobConfig, ModelConfig
from molm_megatron.model import MoLM
from molm_megatron.model.losses import AUX_LOSS_NAMES
from molm_megatron.training.checkpoint import CheckpointManager, rng_state, set_rng_state
from molm_megatron.training.metrics import (MetricsLogger, Progress, expert_load_metrics, memory_metrics,
                                            peak_flops_per_device)
from molm_megatron.training.optimizer import deepspeed_config, expert_params_as_moe, param_groups
from molm_megatron.training.schedule import lr_lambda, plan_batch

logger = logging.getLogger(__name__)

# EX_TEMPFAIL (sysexits.h): "try again later"; launch scripts requeue a job that exits with it.
EXIT_PREEMPTED = 75
EXIT_NONFINITE = 3
BUILD_DIR = Path(__file__).resolve().parents[2] / "build"


def resolve_device(name: str) -> torch.device:
    """`train.device` -> a torch device (this rank's GPU under a launcher)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device is 'cuda' but no CUDA device is visible")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_distributed(device: torch.device, backend: str) -> None:
    """Start torch.distributed through DeepSpeed from the launcher's environment.

    torchrun and the deepspeed launcher set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
    MASTER_PORT; a plain `python pretrain.py` sets none and runs as rank 0 of 1.
    """
    if "WORLD_SIZE" not in os.environ:
        with socket.socket() as s:  # a free port, so concurrent single-process runs do not collide
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # DeepSpeed JIT-compiles its ops into TORCH_EXTENSIONS_DIR: keep that inside our ignored build/.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(BUILD_DIR / "torch_extensions"))
    import deepspeed

    if device.type == "cpu":
        # DeepSpeed's CPU shared-memory all-reduce op costs a ~20 s JIT build and makes about one
        # run in three abort at exit ("terminate called without an active exception"); gloo alone
        # is correct and fast enough for CPU runs.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    else:
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def build_stream_data(job: JobConfig, cfg: ModelConfig, dp_rank: int, dp_size: int):
    """This rank's Transformer-XL stream loader over the blended training split, and a factory of
    one-pass validation iterators over the held-out split (None without validation)."""
    from molm_megatron.data import DataSpec, TransformerXLStreamLoader, build_token_sources, validation_batches

    d, t = job.data, job.train
    if not d.prefixes:
        raise ValueError("data.prefixes is empty: give the indexed datasets written by data_prep "
                         "(--data.prefixes PREFIX [PREFIX ...], without .bin/.idx)")
    spec = DataSpec(list(d.prefixes), list(d.weights) or [1.0] * len(d.prefixes), d.split)
    if spec.vocab_size > cfg.vocab_size:
        raise ValueError(f"the data's vocabulary ({spec.vocab_size} ids, from {d.prefixes[0]}.json) exceeds "
                         f"model.vocab_size ({cfg.vocab_size})")
    sources = build_token_sources(spec)
    loader = TransformerXLStreamLoader(sources["train"], t.micro_batch_size, cfg.block_size, dp_rank, dp_size, t.seed)
    if not t.eval_interval:
        return loader, None
    if sources["valid"] is None:
        raise ValueError(f"train.eval_interval is {t.eval_interval} but data.split ({d.split!r}) leaves the "
                         "validation split without documents")
    # Fail now, not at the first validation, when the held-out split is too short for the streams.
    TransformerXLStreamLoader(sources["valid"], t.micro_batch_size, cfg.block_size, dp_rank, dp_size).windows_per_epoch
    return loader, lambda: validation_batches(sources["valid"], t.micro_batch_size, cfg.block_size, dp_rank,
                                              dp_size, t.seed)


class Trainer:
    """Owns everything of a run; `train()` returns the process exit code (0, 75 preempted, 3 non-finite)."""

    def __init__(self, job: JobConfig):
        import deepspeed

        from molm_megatron import parallel

        self.job = job
        # First of all: a preemption signal during the (slow) build is kept and acted on at the
        # first step boundary, instead of killing the process without a checkpoint.
        self.stop_signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        self.cfg = job.validate()
        t = job.train
        self.device = resolve_device(t.device)
        self.bf16 = t.precision == "bf16" or (t.precision == "auto" and self.device.type == "cuda")
        init_distributed(self.device, job.parallel.backend)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        tp, ep = job.parallel.tensor_parallel_size, job.parallel.expert_parallel_size
        parallel.validate_layout(self.world_size, tp, ep, self.cfg)
        dp_size = self.world_size // tp
        self.plan = plan_batch(t.global_batch_tokens, t.micro_batch_size, self.cfg.block_size, dp_size)
        self.groups = parallel.init_parallel(tp, ep)
        if self.rank == 0:
            logger.info("resolved config:\n%s", yaml.safe_dump(job.to_dict(), sort_keys=False).rstrip())
            p = self.plan
            logger.info("global batch %d tokens = micro-batch %d x accumulation %d x data-parallel %d x seq %d; "
                        "world %d, %s, %s", p.global_batch_tokens, p.micro_batch_size, p.grad_accum_steps,
                        p.dp_size, p.seq_len, self.world_size, self.device.type, "bf16" if self.bf16 else "fp32")

        # Same seed on every rank: every layout starts from the same full weights, then shards them.
        torch.manual_seed(t.seed)
        # Full weights first, then each rank keeps its shards: expert parallelism, then tensor
        # parallelism around its dispatcher (the fixed order of parallel.parallelize).
        model = parallel.parallelize(MoLM(self.cfg), self.groups).to(self.device)
        # Dropout and sampled routing: one stream per data-parallel rank, shared by its TP ranks
        # (their activations are replicas and must be dropped identically).
        torch.manual_seed(t.seed + 1 + self.groups.dp_rank)

        # Expert tensors get their own groups: ZeRO reduces them over the expert-data-parallel group.
        groups = parallel.expert_param_groups(param_groups(model, job.optimizer.weight_decay))
        with expert_params_as_moe():
            self.engine, _, _, self.scheduler = deepspeed.initialize(
                model=model, model_parameters=groups,
                config=deepspeed_config(job, self.plan, self.device.type == "cuda", self.bf16),
                lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(job)),
                mpu=self.groups)

        self.loader, self.make_valid_loader = build_stream_data(
            job, self.cfg, dp_rank=self.groups.dp_rank, dp_size=dp_size)

        # Trainer state that survives a restart (with the engine's, the loader's and the RNGs').
        self.step = 0
        self.skipped_steps = 0
        self.consecutive_nonfinite = 0
        self.memory: list | None = None  # previous segment's (k, v) per layer, [B, M, nh, hs] each
        self.memory_valid_BM: torch.Tensor | None = None  # False where a restarted row's memory is stale

        layout = {"world_size": self.world_size, "tensor_parallel_size": job.parallel.tensor_parallel_size,
                  "expert_parallel_size": job.parallel.expert_parallel_size, "data_parallel_size": dp_size,
                  "zero_stage": job.parallel.zero_stage}
        self.checkpoints = CheckpointManager(job.checkpoint.dir, job.checkpoint.keep_last, layout) \
            if job.checkpoint.dir else None
        self._maybe_resume()

        self.metrics = MetricsLogger(job.metrics.dir, t.steps, job.metrics.tensorboard, enabled=self.rank == 0,
                                     aux_name=self.cfg.aux_loss_type)
        self.peak_flops = peak_flops_per_device(self.device, job.metrics.peak_tflops)
        self.flops_per_token = self.cfg.flops_per_token(self.cfg.block_size)

    # ---- state -------------------------------------------------------------------------------
    def _model_file(self) -> str | None:
        """This rank's model-weights file if it writes one: the first rank of each distinct
        (TP rank, EP rank) shard; none in ZeRO-3, whose fp32 partitions restore the weights."""
        if self.job.parallel.zero_stage == 3:
            return None
        return f"model_tp{self.groups.tp_rank:02d}_ep{self.groups.ep_rank:03d}.pt"

    def checkpoint_files(self) -> dict[str, object]:
        """The files this rank contributes to a checkpoint (name -> object for torch.save)."""
        e = self.engine
        memory = None if self.memory is None else [(k.cpu(), v.cpu()) for k, v in self.memory]
        state = {"optimizer": e.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "engine": {"global_steps": e.global_steps, "global_samples": e.global_samples,
                            "skipped_steps": e.skipped_steps},
                 "trainer": {"step": self.step, "skipped_steps": self.skipped_steps,
                             "consecutive_nonfinite": self.consecutive_nonfinite},
                 "loader": self.loader.state_dict(), "memory": memory,
                 "memory_valid": None if self.memory_valid_BM is None else self.memory_valid_BM.cpu(),
                 "rng": rng_state()}
        files = {f"rank_{self.rank:05d}.pt": state}
        if self._model_file() is not None and self.groups.edp_rank == 0:
            # With each sharded tensor's place in the full one (parallel.Shard as a dict), so a
            # converter can assemble full weights from the files alone, without process groups.
            shards = {name: [dataclasses.asdict(s) for s in p.shards]
                      for name, p in e.module.named_parameters() if getattr(p, "shards", ())}
            files[self._model_file()] = {"model": e.module.state_dict(), "shards": shards}
        return files

    def _maybe_resume(self) -> None:
        if self.checkpoints is None or (step := self.checkpoints.latest_step()) is None:
            return
        rank_file = f"rank_{self.rank:05d}.pt"
        names = [rank_file] + ([self._model_file()] if self._model_file() else [])
        # Onto the CPU: torch.set_rng_state takes a CPU tensor, and DeepSpeed/torch copy the rest
        # to the parameters' device as they load it.
        files = self.checkpoints.load(step, names, torch.device("cpu"))
        state, e = files[rank_file], self.engine
        if self._model_file():
            e.module.load_state_dict(files[self._model_file()]["model"])
        # ZeRO indexes the list by this rank's position in its data-parallel group; the other
        # entries are only read when the data-parallel size changed, which check_layout refuses.
        partitions = [None] * self.groups.dp_size
        partitions[self.groups.dp_rank] = state["optimizer"]
        e.optimizer.load_state_dict(partitions, load_optimizer_states=True, load_from_fp32_weights=True)
        self.scheduler.load_state_dict(state["scheduler"])
        for key, value in state["engine"].items():
            setattr(e, key, value)
        for key, value in state["trainer"].items():
            setattr(self, key, value)
        self.loader.load_state_dict(state["loader"])
        if state["memory"] is not None:
            self.memory = [(k.to(self.device), v.to(self.device)) for k, v in state["memory"]]
            self.memory_valid_BM = state["memory_valid"].to(self.device)
        set_rng_state(state["rng"])
        if self.rank == 0:
            logger.info("resumed from %s at step %d", self.checkpoints.directory, self.step)

    def save(self) -> None:
        if self.checkpoints is not None:
            self.checkpoints.save(self.step, self.checkpoint_files(), self.job.to_dict())

    def _on_signal(self, signum: int, frame) -> None:
        self.stop_signal = signum  # acted on at the next step boundary, once every rank agrees

    def _agree_to_stop(self) -> bool:
        """All ranks stop together: any rank that got SIGTERM/SIGUSR1 makes every rank stop."""
        flag = torch.tensor([0.0 if self.stop_signal is None else 1.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

    # ---- the loop ----------------------------------------------------------------------------
    def train(self) -> int:
        t, c = self.job.train, self.job.checkpoint
        progress = Progress(self.step, t.steps)
        last_log = (time.perf_counter(), self.step)
        while self.step < t.steps:
            if self._agree_to_stop():
                self.save()
                if self.rank == 0:
                    logger.info("preempted: checkpoint saved at step %d", self.step)
                return EXIT_PREEMPTED
            log_step = (self.step + 1) % self.job.metrics.log_interval == 0 or self.step == 0
            metrics = self.train_step(collect=log_step)
            self.step += 1
            if self.consecutive_nonfinite >= t.max_nonfinite_steps:
                self.save()
                if self.rank == 0:
                    logger.error("stopping: %d consecutive steps with non-finite loss or gradients "
                                 "(train.max_nonfinite_steps = %d); checkpoint saved at step %d",
                                 self.consecutive_nonfinite, t.max_nonfinite_steps, self.step)
                return EXIT_NONFINITE
            if self.step % c.interval == 0:
                self.save()
            if t.eval_interval and (self.step % t.eval_interval == 0 or self.step == t.steps):
                metrics.update(self.validate())
            if metrics:
                now = time.perf_counter()
                tokens_per_s = (self.step - last_log[1]) * self.plan.global_batch_tokens / (now - last_log[0])
                last_log = (now, self.step)
                metrics["throughput/tokens_per_s"] = tokens_per_s
                if self.peak_flops:
                    metrics["mfu"] = self.flops_per_token * tokens_per_s / (self.world_size * self.peak_flops)
                metrics.update(memory_metrics(self.device), **progress(self.step))
                self.metrics.log(metrics, self.step)
        self.save()
        return 0

    def _memory_inputs(self, reset_B: torch.Tensor) -> tuple[list | None, torch.Tensor | None]:
        """Memory and key mask [B, M + T] for the next window; restarted rows' memory is masked."""
        if self.memory is None:
            return None, None
        keep_BM = self.memory_valid_BM & ~reset_B[:, None]
        B, T = reset_B.shape[0], self.cfg.block_size
        return self.memory, torch.cat([keep_BM, keep_BM.new_ones(B, T)], dim=1)

    def _remember(self, memory: list, mask_BS: torch.Tensor | None) -> None:
        """Keep the new memory and which of its positions are valid (its last M of the mask)."""
        M = memory[0][0].shape[1]
        if mask_BS is None:
            mask_BS = torch.ones(memory[0][0].shape[0], self.cfg.block_size, dtype=torch.bool, device=self.device)
        self.memory, self.memory_valid_BM = memory, mask_BS[:, mask_BS.shape[1] - M:]

    def train_step(self, collect: bool) -> dict[str, float]:
        """One optimizer step over `grad_accum_steps` micro-batches; metrics only when `collect`."""
        engine, plan, model = self.engine, self.plan, self.engine.module
        lr = self.scheduler.get_last_lr()[0]  # the rate this step's update uses
        # Fetch the step's micro-batches first: the loss scale needs the global valid-token count.
        batches = [next(self.loader) for _ in range(plan.grad_accum_steps)]
        num_tokens = torch.stack([(b.labels != -100).sum() for b in batches]).sum().to(self.device, torch.float64)
        dist.all_reduce(num_tokens, group=self.groups.dp_group)
        scale = plan.dp_size * plan.grad_accum_steps / num_tokens.clamp(min=1).item()

        sums = torch.zeros(1 + len(AUX_LOSS_NAMES), dtype=torch.float64, device=self.device)
        counts: dict[str, torch.Tensor] = {}
        for batch in batches:
            input_ids, labels = batch.input_ids.to(self.device), batch.labels.to(self.device)
            memory, mask_BS = self._memory_inputs(batch.reset_memory.to(self.device))
            out = engine(input_ids, labels=labels, attention_mask=mask_BS, memory=memory,
                         collect_expert_stats=collect)
            loss = out.lm_loss_sum * scale + model.weighted_aux_loss(out.aux_losses)
            engine.backward(loss)
            engine.step()  # DeepSpeed applies the update at the last micro-batch only
            self._remember(out.memory, mask_BS)
            if collect:
                sums += torch.stack([out.lm_loss_sum.detach()] +
                                    [out.aux_losses[n].detach() for n in AUX_LOSS_NAMES]).double()
                for name, count_E in out.expert_stats.items():
                    counts[name] = counts.get(name, 0) + count_E

        if engine.was_step_applied():
            self.consecutive_nonfinite = 0
        else:  # DeepSpeed skipped the update: the global gradient norm was not finite
            self.skipped_steps += 1
            self.consecutive_nonfinite += 1
            self.memory = None  # never carry non-finite keys/values into the next window
        if not collect:
            return {}
        return self._step_metrics(sums, counts, num_tokens.item(), lr)

    def _step_metrics(self, sums: torch.Tensor, counts: dict[str, torch.Tensor], num_tokens: float,
                      lr: float) -> dict[str, float]:
        """Reduce the step's sums over the data-parallel group into the logged metrics."""
        names = sorted(counts)
        flat = torch.cat([sums] + [counts[n].double() for n in names])
        dist.all_reduce(flat, group=self.groups.dp_group)
        num_micro = self.plan.grad_accum_steps * self.plan.dp_size
        lm = flat[0].item() / max(num_tokens, 1.0)
        metrics = {"loss/lm": lm}
        for i, name in enumerate(AUX_LOSS_NAMES):
            metrics[f"loss/{name}"] = flat[1 + i].item() / num_micro
        aux = self.engine.module.weighted_aux_loss({n: torch.tensor(metrics[f"loss/{n}"]) for n in AUX_LOSS_NAMES})
        metrics["loss/total"] = lm + float(aux)
        offset = 1 + len(AUX_LOSS_NAMES)
        reduced, position = {}, offset
        for name in names:
            reduced[name] = flat[position:position + counts[name].numel()]
            position += counts[name].numel()
        metrics.update(expert_load_metrics(reduced))
        grad_norm = self.engine.get_global_grad_norm()
        metrics.update({"grad_norm": math.nan if grad_norm is None else float(grad_norm), "lr": lr,
                        "train/skipped_steps": float(self.skipped_steps),
                        "train/tokens": float(self.step * self.plan.global_batch_tokens)})
        return metrics

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Held-out loss and perplexity over `train.eval_steps` windows per rank, with memory."""
        self.engine.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        saved = (self.memory, self.memory_valid_BM)
        self.memory = self.memory_valid_BM = None
        # Every rank has the same number of windows, so all take part in each forward (EP all-to-all).
        for batch in itertools.islice(self.make_valid_loader(), self.job.train.eval_steps):
            memory, mask_BS = self._memory_inputs(batch.reset_memory.to(self.device))
            out = self.engine(batch.input_ids.to(self.device), labels=batch.labels.to(self.device),
                              attention_mask=mask_BS, memory=memory)
            self._remember(out.memory, mask_BS)
            totals += torch.stack([out.lm_loss_sum.double(), out.num_label_tokens.double()])
        self.memory, self.memory_valid_BM = saved
        dist.all_reduce(totals, group=self.groups.dp_group)
        self.engine.train()
        loss = (totals[0] / totals[1].clamp(min=1)).item()
        return {"valid/loss": loss, "valid/ppl": math.exp(min(loss, 700.0))}

    def close(self) -> None:
        """Flush the logs and release the parallel groups (the world group stays)."""
        from molm_megatron.parallel import destroy_parallel

        self.metrics.close()
        self.engine.destroy()
        destroy_parallel(self.groups)

