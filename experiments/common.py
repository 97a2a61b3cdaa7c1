"""What every experiment shares: the scales (all settings in one place), the runner of the
product's commands (parallel, with a deadline, a failure recorded rather than raised), readers of
their outputs, and the results file.

An experiment never trains or evaluates by itself: it runs `pretrain.py`, `finetune.py`,
`python -m molm_megatron.eval`, `python -m molm_megatron.modular` as a user would, each with its
log file, and reads what they write (metrics.jsonl, summary.json, stats.json, manipulation.json).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from molm_megatron.outputs import atomic_write

REPO = Path(__file__).resolve().parents[1]
# Seconds a stopped command gets to save (pretrain.py/finetune.py checkpoint on SIGTERM) before SIGKILL.
GRACE_S = 30


def product_env() -> dict[str, str]:
    """The environment of a product command: the repository and its kernels importable, offline."""
    env = dict(os.environ)
    paths = [str(REPO), str(REPO / "kernels")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Several commands share the machine's cores: one thread each unless the caller says otherwise.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


# ---- scales -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scale:
    """Every setting of one scale. `model` holds ModelConfig fields over `preset` (vocab_size comes from
    the data); training fields are pretrain.py/finetune.py flags."""

    name: str
    preset: str
    model: dict
    steps: int  # pretraining optimizer steps
    micro_batch_size: int
    lr: float
    warmup_steps: int
    eval_interval: int  # pretraining validation, for the curves
    eval_steps: int
    finetune_steps: int
    finetune_lr: float
    seeds: tuple[int, ...]
    jobs: int  # product commands an experiment runs at once
    eval_domains: tuple[str, ...]  # held-out sets that experiments 2 and 5 score every model on
    eval_batch_size: int
    budget_s: float  # run_all's default wall-clock budget for every experiment together
    split: str  # data.split of every training run: train, validation, test shares of each domain's documents
    parallel_lanes: bool  # run_all runs its lanes at once (GPU) or one after the other (this CPU)
    # experiment 1: attention x load balancing; each variant name -> ModelConfig fields
    attention_variants: dict = field(default_factory=dict)
    extrapolation: tuple[int, ...] = (1, 2, 4)  # evaluation segment lengths, in training segments
    # experiment 2: continual learning
    insert_mlp_experts: int = 2
    insert_att_experts: int = 1
    routing_reg_weights: tuple[float, ...] = (0.0, 0.1)
    # experiment 3: pruning
    pruning_finetunes: tuple[str, ...] = ("plain", "concentration")
    prune_norms: tuple[str, ...] = ("max", "sum")
    drop_modes: tuple[str, ...] = ("top", "uniform")
    concentration_loss_weight: float = 0.05
    prune_shares: tuple[float, ...] = (0.9, 0.7, 0.5, 0.3)
    stats_batches: int = 50
    humaneval: bool = False
    # experiment 2's dense LoRA baseline and experiment 5 (EMoE)
    lora_rank: int = 8
    emoe_experts: int = 16
    emoe_top_k: int = 4


# The paper's Table 4 rows: stick-breaking + MI (ModuleFormer), without a balancing loss, with the
# switch loss and z-loss instead, and softmax attention with RoPE (with MI and without a loss).
ATTENTION_VARIANTS = {
    "stickbreaking_mi": {"attention": "stickbreaking", "aux_loss_type": "mi", "aux_loss_weight": 0.01},
    "stickbreaking_none": {"attention": "stickbreaking", "aux_loss_weight": 0.0},
    "stickbreaking_switch": {"attention": "stickbreaking", "aux_loss_type": "switch", "aux_loss_weight": 0.01,
                             "z_loss_weight": 0.001},
    "softmax_rope_mi": {"attention": "softmax_rope", "aux_loss_type": "mi", "aux_loss_weight": 0.01},
    "softmax_rope_none": {"attention": "softmax_rope", "aux_loss_weight": 0.0},
}

# A 2-core machine shared with other work, one command at a time: d = 128, 4 layers, 64-token segments,
# 512 tokens per step, a few minutes per run.
CPU = Scale(
    name="cpu", preset="demo",
    model={"n_embd": 128, "att_hidden": 128, "ffd_hidden": 512, "n_layer": 4, "n_att_experts": 8,
           "n_mlp_experts": 16, "gating_size": 64, "block_size": 64, "history_length": 64},
    steps=150, micro_batch_size=8, lr=2e-3, warmup_steps=15, eval_interval=25, eval_steps=4,
    finetune_steps=60, finetune_lr=1e-3, seeds=(0,), jobs=1, eval_domains=("code", "prose", "german"),
    eval_batch_size=8, budget_s=3 * 3600,
    split="95,5,0", parallel_lanes=False,
    attention_variants=dict(ATTENTION_VARIANTS), extrapolation=(1, 2, 4), insert_mlp_experts=4,
    insert_att_experts=2, routing_reg_weights=(0.0, 0.1, 1.0), prune_shares=(0.9, 0.75, 0.6, 0.45, 0.3),
    stats_batches=20)

SCALES = {
    # CI: the same code paths, a few steps each, one variant of each kind.
    "smoke": dataclasses.replace(
        CPU, name="smoke", preset="tiny",
        model={"n_layer": 2, "n_att_experts": 4, "n_mlp_experts": 8, "block_size": 32, "history_length": 32},
        steps=4, micro_batch_size=2, lr=1e-3, warmup_steps=1, eval_interval=2, eval_steps=1, finetune_steps=2,
        budget_s=1200, split="80,20,0", parallel_lanes=True,
        attention_variants={k: ATTENTION_VARIANTS[k] for k in ("stickbreaking_mi", "softmax_rope_mi")},
        extrapolation=(2,), insert_mlp_experts=2, insert_att_experts=1, routing_reg_weights=(0.1,),
        pruning_finetunes=("concentration",), prune_norms=("max",), drop_modes=("uniform",), prune_shares=(0.8,),
        stats_batches=2, eval_domains=("code",)),
    "cpu": CPU,
    # One H200 for 7.5 minutes in all, the experiments at once and up to 4 commands each (small models
    # are host-bound, so they share the GPU well): d = 256, 4 layers, 256-token segments with 256
    # tokens of memory, 8192 tokens per step.
    "gpu": dataclasses.replace(
        CPU, name="gpu",
        model={**CPU.model, "n_embd": 256, "att_hidden": 256, "ffd_hidden": 1024, "gating_size": 128,
               "block_size": 256, "history_length": 256},
        steps=500, micro_batch_size=32, lr=1e-3, warmup_steps=50, eval_interval=100, eval_steps=8,
        finetune_steps=200, finetune_lr=5e-4, seeds=(0, 1), jobs=4, budget_s=450, parallel_lanes=True,
        routing_reg_weights=(0.0, 0.01, 0.1, 1.0), stats_batches=100, humaneval=True),
}


# ---- running the product's commands -----------------------------------------------------------------


@dataclass
class Outcome:
    """How one command ended: rc 0 finished, 75 stopped at the deadline after saving, None skipped."""

    name: str
    args: list[str]
    rc: int | None
    seconds: float
    log: str

    @property
    def ok(self) -> bool:
        return self.rc in (0, 75)


class Runner:
    """Runs product commands (`python ARGS` in the repository) with a log each, at most `jobs` at
    once, none past `deadline` (time.monotonic()): a running one gets SIGTERM at the deadline (the
    trainers save a checkpoint and exit 75), one not yet started is skipped. Failures are recorded
    in `outcomes`, never raised."""

    def __init__(self, logs: Path, jobs: int, deadline: float):
        self.logs, self.jobs, self.deadline = logs, jobs, deadline
        logs.mkdir(parents=True, exist_ok=True)
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()

    def run(self, name: str, args: list[str]) -> Outcome:
        log = self.logs / f"{name}.log"
        start = time.monotonic()
        if start >= self.deadline:
            outcome = Outcome(name, args, None, 0.0, str(log))
        else:
            with open(log, "w") as f:
                f.write(f"$ python {' '.join(args)}\n")
                f.flush()
                proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=product_env(), stdout=f,
                                        stderr=subprocess.STDOUT, start_new_session=True)
                try:
                    rc = proc.wait(timeout=max(1.0, self.deadline - start))
                except subprocess.TimeoutExpired:
                    rc = stop(proc)
            outcome = Outcome(name, args, rc, time.monotonic() - start, str(log))
        with self._lock:
            self.outcomes.append(outcome)
        status = "skipped (budget spent)" if outcome.rc is None else f"exit {outcome.rc}"
        print(f"[{name}] {status} after {outcome.seconds:.0f}s", flush=True)
        return outcome

    def run_many(self, commands: dict[str, list[str]]) -> dict[str, Outcome]:
        """Run {name: args} with up to `jobs` at once; returns name -> Outcome."""
        with ThreadPoolExecutor(max_workers=max(1, self.jobs)) as pool:
            futures = {name: pool.submit(self.run, name, args) for name, args in commands.items()}
            return {name: f.result() for name, f in futures.items()}

    def records(self) -> list[dict]:
        return [dataclasses.asdict(o) | {"ok": o.ok} for o in self.outcomes]


def stop(proc: subprocess.Popen) -> int:
    """SIGTERM the command's process group, SIGKILL it after GRACE_S; its exit code."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


# ---- product command lines --------------------------------------------------------------------------


def flags(section: str, fields: dict) -> list[str]:
    """`--section.field VALUE` for each field (booleans as true/false)."""
    return [flag for k, v in fields.items()
            for flag in (f"--{section}.{k}", str(v).lower() if isinstance(v, bool) else str(v))]


def train_flags(scale: Scale, run_dir: Path, data: list[Path], steps: int, seed: int) -> list[str]:
    """Flags shared by pretrain.py and finetune.py runs: data (every experiment mixes its domains in
    equal weights), batch, validation, checkpoint, metrics."""
    return ["--data.prefixes", *map(str, data), "--data.weights", *["1"] * len(data), "--data.split", scale.split,
            "--train.steps", str(steps), "--train.micro_batch_size", str(scale.micro_batch_size),
            "--train.global_batch_tokens", "0", "--train.seed", str(seed),
            "--train.eval_interval", str(min(scale.eval_interval, steps)), "--train.eval_steps", str(scale.eval_steps),
            "--checkpoint.dir", str(run_dir / "checkpoints"), "--checkpoint.interval", str(steps),
            "--checkpoint.keep_last", "1", "--metrics.dir", str(run_dir), "--metrics.log_interval",
            str(max(1, min(10, steps // 10))), "--metrics.tensorboard", "false", "--parallel.zero_stage", "1"]


def pretrain_args(scale: Scale, vocab_size: int, run_dir: Path, data: list[Path], seed: int,
                  model: dict) -> list[str]:
    """pretrain.py on the demo recipe (launch/configs/demo.yaml) with the scale's model and batch."""
    fields = {"preset": scale.preset, **scale.model, "vocab_size": vocab_size, **model}
    return ["pretrain.py", "--config", "launch/configs/demo.yaml",
            *flags("model", fields),
            "--optimizer.lr", str(scale.lr), "--schedule.warmup_steps", str(min(scale.warmup_steps, scale.steps)),
            *train_flags(scale, run_dir, data, scale.steps, seed)]


def finetune_args(recipe: str, scale: Scale, init_from: Path, run_dir: Path, data: list[Path],
                  seed: int, finetune: dict, model: dict) -> list[str]:
    """finetune.py with one of the product's recipes (launch/configs/finetune_<recipe>.yaml) and
    `finetune` / `model` section fields over it."""
    return ["finetune.py", "--config", f"launch/configs/finetune_{recipe}.yaml", "--finetune.init_from", str(init_from),
            "--optimizer.lr", str(scale.finetune_lr), *flags("finetune", finetune), *flags("model", model),
            *train_flags(scale, run_dir, data, scale.finetune_steps, seed)]


def dense_folder(out: Path, scale: Scale, tokenizer: Path, vocab_size: int, eod_id: int, seed: int) -> Path:
    """A randomly initialised GPT-2 of the MoLM model's active size per token, with the data's tokenizer,
    as a Hugging Face folder: the starting point of the dense models we train (finetune.py takes dense
    folders). Per layer GPT-2's 4 d^2 attention equals MoLM's k_att query and output projections of
    width d, and its MLP of width k_mlp x ffd_hidden the k_mlp chosen experts."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from molm_megatron.config import model_preset
    from tokenizer.loading import copy_tokenizer_files

    cfg = model_preset(scale.preset, **scale.model, vocab_size=vocab_size)
    torch.manual_seed(seed)
    gpt2 = GPT2Config(vocab_size=vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                      n_head=max(1, cfg.n_embd // 64), n_inner=cfg.k_mlp * cfg.ffd_hidden, bos_token_id=eod_id,
                      eos_token_id=eod_id, tie_word_embeddings=False)
    GPT2LMHeadModel(gpt2).save_pretrained(out)
    copy_tokenizer_files(tokenizer, out)
    return out


def dense_pretrain_args(scale: Scale, init_from: Path, run_dir: Path, data: list[Path],
                        seed: int) -> list[str]:
    """finetune.py training a dense Hugging Face model from `init_from` with the pretraining's schedule,
    learning rate, batch and steps (launch/configs/finetune_emoe.yaml, full training)."""
    return ["finetune.py", "--config", "launch/configs/finetune_emoe.yaml", "--finetune.init_from", str(init_from),
            "--model.block_size", str(scale.model["block_size"]), "--optimizer.lr", str(scale.lr),
            "--schedule.warmup_steps", str(min(scale.warmup_steps, scale.steps)), "--schedule.min_lr_ratio", "0.1",
            *train_flags(scale, run_dir, data, scale.steps, seed)]


def perplexity_args(scale: Scale, model: Path, text: Path, tokenizer: Path, out: Path,
                    segment_length: int | None = None, memory_length: int | None = None) -> list[str]:
    """The product's Transformer-XL segment perplexity (pretrain.py's validation protocol) of a text."""
    args = ["-m", "molm_megatron.eval", "perplexity", "--model", str(model), "--text", str(text), "--tokenizer",
            str(tokenizer), "--protocol", "segments", "--batch-size", str(scale.eval_batch_size), "--out", str(out),
            "--overwrite"]
    if segment_length is not None:
        args += ["--segment-length", str(segment_length)]
    if memory_length is not None:
        args += ["--memory-length", str(memory_length)]
    return args


# ---- reading the outputs ----------------------------------------------------------------------------


def read_metrics(run_dir: Path) -> list[dict]:
    """The JSON lines of a run's metrics.jsonl (empty when it wrote none)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def validation_curve(metrics: list[dict]) -> list[tuple[int, float]]:
    """(step, validation perplexity) of a run, in step order (a resumed run's repeats: the last)."""
    return sorted({m["step"]: m["valid/ppl"] for m in metrics if "valid/ppl" in m}.items())


def last_value(metrics: list[dict], key: str) -> float | None:
    values = [m[key] for m in metrics if key in m]
    return values[-1] if values else None


def layer_mean(metrics: list[dict], suffix: str) -> float | None:
    """Mean over routers of the last logged per-router metric whose key ends in `suffix` (e.g.
    ".attn/load_entropy", "mlpf/new_share"); None when it was never logged."""
    last = next((m for m in reversed(metrics) if any(k.endswith(suffix) for k in m)), None)
    if last is None:
        return None
    values = [v for k, v in last.items() if k.endswith(suffix)]
    return sum(values) / len(values)


def perplexity_of(out: Path) -> float | None:
    """Token perplexity from an eval perplexity summary.json (None when the evaluation did not finish)."""
    path = out / "summary.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())["segments"]["token_perplexity"]


def mean_spread(values: list[float | None]) -> dict:
    """Mean, sample standard deviation, min, max and count of the values that exist."""
    xs = [v for v in values if v is not None]
    if not xs:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs), "n": len(xs)}


def read_manifest(data: Path) -> dict:
    path = data / "manifest.json"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: prepare the data first (python -m experiments.data --out {data})")
    return json.loads(path.read_text())


# ---- results ----------------------------------------------------------------------------------------


def device_description() -> str:
    """The accelerator (torch's name for it) or the CPU model and core count."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
        version = f" (torch {torch.__version__})"
    except ImportError:
        version = ""
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"CPU: {cpu}, {os.cpu_count()} cores{version}"


def write_results(out: Path, experiment: str, scale: Scale, command: list[str], results: dict, runner: Runner) -> Path:
    """out/results.json: what ran (command, device, date, settings, every command's outcome) and the results."""
    record = {"experiment": experiment, "command": " ".join(command), "device": device_description(),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
              "scale": dataclasses.asdict(scale), "results": results, "runs": runner.records()}
    return atomic_write(out / "results.json", lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"))


# ---- one experiment's command line ------------------------------------------------------------------


@dataclass
class Context:
    """What an experiment's `run` gets: the prepared data, its output folder, the scale, the runner."""

    data: Path
    out: Path
    scale: Scale
    runner: Runner
    manifest: dict
    options: dict = field(default_factory=dict)  # the experiment's own command-line options

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    @property
    def tokenizer(self) -> Path:
        return self.data / "tokenizer"

    @property
    def eod_id(self) -> int:
        """The data's end-of-document id (data_prep's record of its tokenizer)."""
        domain = next(iter(self.manifest["domains"]))
        return json.loads((self.data / f"train_{domain}.json").read_text())["eod_id"]

    def train(self, domain: str) -> Path:
        """The indexed training set of a domain (experiments.data)."""
        return self.data / f"train_{domain}"

    def heldout(self, domain: str) -> Path:
        """The indexed held-out set of a domain."""
        return self.data / f"heldout_{domain}"

    def heldout_text(self, domain: str) -> Path:
        """The held-out documents of a domain as one text file."""
        return self.data / f"heldout_{domain}.txt"

    def heldout_perplexities(self, models: dict[str, Path], domains: list[str]) -> dict[str, dict[str, float | None]]:
        """Each model's (a checkpoint folder's or a Hugging Face folder's) held-out perplexity on
        each domain, the evaluations run in parallel; None where the model or its evaluation did not
        finish."""
        ready = {name: path for name, path in models.items()
                 if (path / "latest").exists() or (path / "config.json").exists()}
        self.runner.run_many({f"{name}_{d}": perplexity_args(self.scale, path, self.heldout_text(d), self.tokenizer,
                                                             self.out / "eval" / f"{name}_{d}")
                              for name, path in ready.items() for d in domains})
        return {name: {d: perplexity_of(self.out / "eval" / f"{name}_{d}") for d in domains} for name in models}


def experiment_main(name: str, doc: str, run, plot, argv: list[str] | None, add_args=None) -> int:
    """Parse `--data --out --scale --budget-s --jobs` (and the experiment's own options, `add_args`),
    run the experiment (its commands stop at the budget), write out/results.json and out/<name>.png.
    Exit 0 when every command finished or was stopped at the budget after saving, 1 otherwise (the
    results hold what did finish)."""
    import argparse
    import traceback

    p = argparse.ArgumentParser(prog=f"python -m experiments.{name}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="folder written by python -m experiments.data")
    p.add_argument("--out", required=True, type=Path, help="output folder of this experiment")
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu", help="settings (experiments/common.py)")
    p.add_argument("--budget-s", type=float, default=3600.0, help="wall-clock seconds for the whole experiment; "
                   "commands still running then are stopped (trainers save first), later ones skipped")
    p.add_argument("--jobs", type=int, default=None, help="commands at once (default: the scale's)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: the scale's)")
    if add_args is not None:
        add_args(p)
    args = p.parse_args(argv)
    scale = SCALES[args.scale]
    if args.seeds:
        scale = dataclasses.replace(scale, seeds=tuple(args.seeds))
    args.out.mkdir(parents=True, exist_ok=True)
    runner = Runner(args.out / "logs", args.jobs or scale.jobs, time.monotonic() + args.budget_s)
    common = {"data", "out", "scale", "budget_s", "jobs", "seeds"}
    ctx = Context(args.data, args.out, scale, runner, read_manifest(args.data),
                  {k: v for k, v in vars(args).items() if k not in common})
    try:
        results = run(ctx)
    except Exception:  # the commands' outcomes are still worth writing
        results = {"error": traceback.format_exc()}
        print(results["error"], file=sys.stderr)
    command = ["python", "-m", f"experiments.{name}", *(sys.argv[1:] if argv is None else argv)]
    path = write_results(args.out, name, scale, command, results, runner)
    try:
        if "error" not in results:
            plot(results, args.out / f"{name}.png")
    except Exception:
        print(f"plot of {name} failed:\n{traceback.format_exc()}", file=sys.stderr)
    print(f"wrote {path}")
    return 0 if "error" not in results and all(o.ok for o in runner.outcomes) else 1


@contextlib.contextmanager
def figure(path: Path, **subplots):
    """A matplotlib figure and its axes (`plt.subplots(**subplots)`), saved to `path` at the end."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(**subplots)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
