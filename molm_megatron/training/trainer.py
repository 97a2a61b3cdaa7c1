"""The pretraining loop: build (processes, groups, model, parallelism, DeepSpeed engine, data,
checkpoints, metrics), then train: step, save, maybe validate, log.

Data order is Transformer-XL's (Dai et al., 2019; docs/design.md, Data order): each data-parallel rank
reads `micro_batch_size` parallel streams in consecutive `block_size` windows, and every window
attends over the previous window's keys/values of the same row (`out.memory`); a row whose stream
restarts has its memory masked out. Micro-batches of one step continue each other the same way.
A model without memory (a Hugging Face dense or EMoE model) reads the same windows, each on its own.

The LM loss of a step is normalised by the global number of valid label tokens (all micro-batches
of all data-parallel ranks), not averaged per micro-batch: each micro-batch contributes
`lm_loss_sum * dp * accum / N_global`, which DeepSpeed's 1/accum scaling and data-parallel mean
turn into exactly sum(CE) / N_global. Aux losses are per-micro-batch means, averaged the same way.

Legend: B micro-batch rows, T segment tokens, M memory tokens per row, E experts.
"""

from __future__ import annotations

import atexit
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

from molm_megatron.config import JobConfig, TrainingSpec
from molm_megatron.model import MoLM
from molm_megatron.model.losses import AUX_LOSS_NAMES
from molm_megatron.training.activation_checkpoint import apply_activation_checkpoint
from molm_megatron.training.checkpoint import CheckpointManager, ModelState, RNGState, model_file
from molm_megatron.training.memory import StreamMemory
from molm_megatron.training.microbatch import FusedMicrobatch, bf16_optimizer_of
from molm_megatron.training.metrics import (MetricsLogger, Progress, expert_load_metrics, memory_metrics,
                                            peak_flops_per_device, require_wandb)
from molm_megatron.training.optimizer import deepspeed_config, expert_params_as_moe, param_groups
from molm_megatron.training.optimizer_state import ZeroOptimizerState
from molm_megatron.training.reshard import resharded_state
from molm_megatron.training.schedule import SchedulerState, lr_lambda, plan_batch

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
    started_here = not dist.is_initialized()  # else a caller (or an earlier Trainer) owns the world group
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    if started_here and backend == "gloo":
        atexit.register(destroy_all_process_groups)


def destroy_all_process_groups() -> None:
    """Shut every process group down while the interpreter is still whole. Left to interpreter
    teardown, a Gloo worker thread can drop the last reference to a collective's tensor after
    Python has started finalising; taking the GIL then kills the thread inside a noexcept frame and
    the process aborts ("terminate called without an active exception") after a finished run.
    Registered for Gloo worlds only, where the abort happens and is tested; NCCL runs keep torch's
    own teardown."""
    if dist.is_initialized():
        dist.destroy_process_group()


def build_stream_data(job: JobConfig, spec: TrainingSpec, dp_rank: int, dp_size: int):
    """This rank's Transformer-XL stream loader over the blended training split, and a factory of
    one-pass validation iterators over the held-out split (None without validation)."""
    from molm_megatron.data import (DataSpec, TransformerXLStreamLoader, build_token_sources, load_data_spec,
                                    validation_batches)

    d, t = job.data, job.train
    if d.spec:
        data = load_data_spec(d.spec)
    elif not d.prefixes:
        raise ValueError("data.prefixes is empty: give the indexed datasets written by data_prep "
                         "(--data.prefixes PREFIX [PREFIX ...], without .bin/.idx), or a data-spec YAML "
                         "(--data.spec FILE)")
    else:
        data = DataSpec(list(d.prefixes), list(d.weights) or [1.0] * len(d.prefixes), d.split)
    if data.vocab_size > spec.vocab_size:
        raise ValueError(f"the data's vocabulary ({data.vocab_size} ids, from {data.prefixes[0]}.json) exceeds "
                         f"{spec.vocab_source} ({spec.vocab_size})")
    sources = build_token_sources(data)
    loader = TransformerXLStreamLoader(sources["train"], t.micro_batch_size, spec.block_size, dp_rank, dp_size, t.seed)
    if not t.eval_interval:
        return loader, None
    if sources["valid"] is None:
        raise ValueError(f"train.eval_interval is {t.eval_interval} but data.split ({data.split!r}) leaves the "
                         "validation split without documents")
    # Fail now, not at the first validation, when the held-out split is too short for the streams.
    TransformerXLStreamLoader(sources["valid"], t.micro_batch_size, spec.block_size, dp_rank, dp_size).windows_per_epoch
    return loader, lambda: validation_batches(sources["valid"], t.micro_batch_size, spec.block_size, dp_rank,
                                              dp_size, t.seed)


class EngineCounters:
    """DeepSpeed's step and sample counters as a checkpoint piece."""

    KEYS = ("global_steps", "global_samples", "skipped_steps")

    def __init__(self, engine):
        self.engine = engine

    def state_dict(self) -> dict:
        return {key: getattr(self.engine, key) for key in self.KEYS}

    def load_state_dict(self, state: dict) -> None:
        for key in self.KEYS:
            setattr(self.engine, key, state[key])


class Trainer:
    """Owns everything of a run; `train()` returns the process exit code (0, 75 preempted, 3 non-finite)."""

    def __init__(self, job: JobConfig, model: torch.nn.Module | None = None):
        """`model`: a built model with full (unsharded) weights, identical on every rank: a MoLM (e.g.
        loaded from one file, with experts inserted or pruned) or a Hugging Face dense/EMoE model behind
        MoLM's forward (molm_megatron.emoe.training.EMoECausalLM); its `training_spec()` says what is
        trained, saved and checked on resume. None builds `job.model` from the seed."""
        import deepspeed

        from molm_megatron import parallel
        from molm_megatron.data.spec import adopt_data_eod

        self.job = job
        # First of all: a preemption signal during the (slow) build is kept and acted on at the
        # first step boundary, instead of killing the process without a checkpoint.
        self.stop_signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        if model is None:
            adopt_data_eod(job)  # bos/eos = the data's end-of-document id, what exports stop generating at
            cfg = job.validate()
            self.spec = cfg.training_spec()
        else:
            job.validate()
            self.spec = model.training_spec()
        if job.metrics.wandb:
            require_wandb()  # on every rank, before any process group: all exit 2 together
        t = job.train
        self.device = resolve_device(t.device)
        self.bf16 = t.precision == "bf16" or (t.precision == "auto" and self.device.type == "cuda")
        init_distributed(self.device, job.parallel.backend)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        tp, ep = job.parallel.tensor_parallel_size, job.parallel.expert_parallel_size
        if self.spec.parallel_config is None and (tp > 1 or ep > 1):
            raise ValueError(f"parallel.tensor_parallel_size ({tp}) and parallel.expert_parallel_size ({ep}) must be "
                             f"1: {type(model).__name__} trains data-parallel only (ZeRO 1-3)")
        parallel.validate_layout(self.world_size, tp, ep, self.spec.parallel_config)
        dp_size = self.world_size // tp
        self.plan = plan_batch(t.global_batch_tokens, t.micro_batch_size, self.spec.block_size, dp_size)
        self.groups = parallel.init_parallel(tp, ep)
        if self.rank == 0:
            logger.info("resolved config:\n%s", yaml.safe_dump(job.to_dict(), sort_keys=False).rstrip())
            p = self.plan
            logger.info("global batch %d tokens = micro-batch %d x accumulation %d x data-parallel %d x seq %d; "
                        "world %d, %s, %s", p.global_batch_tokens, p.micro_batch_size, p.grad_accum_steps,
                        p.dp_size, p.seq_len, self.world_size, self.device.type, "bf16" if self.bf16 else "fp32")

        # Same seed on every rank: every layout starts from the same full weights, then shards them.
        torch.manual_seed(t.seed)
        if model is None:
            model = MoLM(cfg)
        model.train()  # a loaded Hugging Face model comes in eval mode (dropout off)
        if job.parallel.zero_stage == 3 and self.spec.zero3_leaf_modules:
            deepspeed.utils.set_z3_leaf_modules(model, list(self.spec.zero3_leaf_modules))
        # Full weights first, then each rank keeps its shards: expert parallelism, then tensor
        # parallelism around its dispatcher (the fixed order of parallel.parallelize); activation
        # checkpointing wraps the (possibly parallelised) layers last.
        model = parallel.parallelize(model, self.groups).to(self.device)
        apply_activation_checkpoint(model, t.activation_checkpoint)
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

        self.microbatch = self._fused_microbatch()

        self.loader, self.make_valid_loader = build_stream_data(
            job, self.spec, dp_rank=self.groups.dp_rank, dp_size=dp_size)

        # Trainer state that survives a restart (with the engine's, the loader's and the RNGs').
        self.step = 0
        self.skipped_steps = 0
        self.consecutive_nonfinite = 0
        self.memory = StreamMemory(self.device)
        # What a checkpoint holds, by name (each rank's file; loaded in this order, after the model).
        self.pieces = {"optimizer": ZeroOptimizerState(self.engine, self.groups.dp_rank, dp_size),
                       "scheduler": SchedulerState(self.scheduler), "engine": EngineCounters(self.engine),
                       "trainer": self, "loader": self.loader, "memory": self.memory, "rng": RNGState()}

        layout = {"world_size": self.world_size, "tensor_parallel_size": job.parallel.tensor_parallel_size,
                  "expert_parallel_size": job.parallel.expert_parallel_size, "data_parallel_size": dp_size,
                  "zero_stage": job.parallel.zero_stage}
        self.checkpoints = CheckpointManager(job.checkpoint.dir, job.checkpoint.keep_last, layout,
                                             all_ranks=self._all_ranks) if job.checkpoint.dir else None
        self._maybe_resume()

        m = job.metrics
        self.metrics = MetricsLogger(m.dir, t.steps, m.tensorboard, enabled=self.rank == 0, aux_name=self.spec.aux_loss_name,
                                     wandb=m.wandb, wandb_project=m.wandb_project, wandb_mode=m.wandb_mode,
                                     run_config=job.to_dict())
        self.peak_flops = peak_flops_per_device(self.device, job.metrics.peak_tflops)
        self.flops_per_token = self.spec.flops_per_token

    # ---- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The trainer's own counters (a checkpoint piece)."""
        return {"step": self.step, "skipped_steps": self.skipped_steps,
                "consecutive_nonfinite": self.consecutive_nonfinite}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.skipped_steps = state["step"], state["skipped_steps"]
        self.consecutive_nonfinite = state["consecutive_nonfinite"]

    def _model_file(self) -> str | None:
        """This rank's model-weights file: its (TP rank, EP rank) shard's; none in ZeRO-3, whose
        weights are the fp32 masters of the optimizer piece."""
        if self.job.parallel.zero_stage == 3:
            return None
        return model_file(self.groups.tp_rank, self.groups.ep_rank)

    def _fused_microbatch(self) -> FusedMicrobatch | None:
        """The fused fp32 gradient accumulation (and CUDA graphs) where DeepSpeed uses its bf16
        optimizer (bf16 with ZeRO-1); None: DeepSpeed's own backward."""
        t = self.job.train
        if t.cuda_graph and self.device.type != "cuda":
            raise ValueError(f"train.cuda_graph needs a CUDA device; train.device {t.device!r} resolved to "
                             f"{self.device.type}")
        if not bf16_optimizer_of(self.engine) and not t.cuda_graph:
            return None
        # With train.cuda_graph, JobConfig.validate required bf16 with ZeRO-1 (and the device check
        # above a resolved CUDA device); FusedMicrobatch refuses any other optimizer.
        return FusedMicrobatch(self.engine, self.plan.grad_accum_steps, t.cuda_graph)

    def _maybe_resume(self) -> None:
        if self.checkpoints is None:
            return
        model = ModelState(self.engine.module) if self._model_file() else None
        step = self.checkpoints.restore(
            self.pieces, model, self._model_file(), self.spec.config,
            reshard=lambda rank_states: resharded_state(rank_states, self.pieces["optimizer"], self.loader))
        if step is not None and self.rank == 0:
            logger.info("resumed from %s at step %d", self.checkpoints.directory, self.step)

    def save(self) -> None:
        if self.checkpoints is None:
            return
        # The first rank of each distinct (TP rank, EP rank) shard writes it.
        writes_model = self._model_file() is not None and self.groups.edp_rank == 0
        self.checkpoints.save_state(self.step, self.pieces, ModelState(self.engine.module) if writes_model else None,
                                    self._model_file(), self.job.to_dict(), self.spec.config)

    def _all_ranks(self, ok: bool) -> bool:
        """True when `ok` on every rank (on this rank's device: NCCL reduces no CPU tensors)."""
        flag = torch.tensor([1.0 if ok else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return flag.item() > 0

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

    def train_step(self, collect: bool) -> dict[str, float]:
        """One optimizer step over `grad_accum_steps` micro-batches; metrics only when `collect`."""
        engine, plan = self.engine, self.plan
        lr = self.scheduler.get_last_lr()[0]  # the rate this step's update uses
        # Fetch the step's micro-batches first (one host-to-device copy): the loss scale needs the
        # global valid-token count.
        batches = [next(self.loader) for _ in range(plan.grad_accum_steps)]
        ids_ABT, labels_ABT, resets_AB = (self._to_device(torch.stack([getattr(b, name) for b in batches]))
                                          for name in ("input_ids", "labels", "reset_memory"))
        num_tokens = (labels_ABT != -100).sum().to(torch.float64)
        dist.all_reduce(num_tokens, group=self.groups.dp_group)
        scale = plan.dp_size * plan.grad_accum_steps / num_tokens.clamp(min=1).item()

        # [lm loss sum, weighted aux loss, each aux loss]
        sums = torch.zeros(2 + len(AUX_LOSS_NAMES), dtype=torch.float64, device=self.device)
        counts: dict[str, torch.Tensor] = {}
        for input_ids, labels, reset_B in zip(ids_ABT, labels_ABT, resets_AB):
            memory, mask_BS = self.memory.inputs(reset_B, self.spec.block_size)
            # Steps that log nothing compute only the weighted aux losses.
            if self.microbatch is None:
                out = engine(input_ids, labels=labels, attention_mask=mask_BS, memory=memory,
                             collect_expert_stats=collect, all_aux_losses=collect)
                engine.backward(out.lm_loss_sum * scale + out.aux_loss)
            else:
                out = self.microbatch.run(input_ids, labels, mask_BS, memory, scale, collect)
            engine.step()  # DeepSpeed applies the update at the last micro-batch only
            self.memory.remember(out.memory, mask_BS)
            if collect:
                sums += torch.stack([out.lm_loss_sum.detach(), out.aux_loss.detach()] +
                                    [out.aux_losses[n].detach() for n in AUX_LOSS_NAMES]).double()
                for name, count_E in out.expert_stats.items():
                    counts[name] = counts.get(name, 0) + count_E

        if engine.was_step_applied():
            self.consecutive_nonfinite = 0
        else:  # DeepSpeed skipped the update: the global gradient norm was not finite
            self.skipped_steps += 1
            self.consecutive_nonfinite += 1
            self.memory.reset()  # never carry non-finite keys/values into the next window
        if not collect:
            return {}
        return self._step_metrics(sums, counts, num_tokens.item(), lr)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        # Pinned and asynchronous: a copy from pageable memory would wait for the queued GPU work.
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device)

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
            metrics[f"loss/{name}"] = flat[2 + i].item() / num_micro
        # The model's weighted aux loss, averaged like each aux loss (it is linear in them).
        metrics["loss/total"] = lm + flat[1].item() / num_micro
        offset = 2 + len(AUX_LOSS_NAMES)
        reduced, position = {}, offset
        for name in names:
            reduced[name] = flat[position:position + counts[name].numel()]
            position += counts[name].numel()
        metrics.update(expert_load_metrics(reduced, self.spec.new_experts))
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
        stream = StreamMemory(self.device)  # its own: the training streams' memory stays as it is
        # Every rank has the same number of windows, so all take part in each forward (EP all-to-all).
        for batch in itertools.islice(self.make_valid_loader(), self.job.train.eval_steps):
            memory, mask_BS = stream.inputs(batch.reset_memory, self.spec.block_size)
            out = self.engine(batch.input_ids.to(self.device), labels=batch.labels.to(self.device),
                              attention_mask=mask_BS, memory=memory)
            stream.remember(out.memory, mask_BS)
            totals += torch.stack([out.lm_loss_sum.double(), out.num_label_tokens.double()])
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

