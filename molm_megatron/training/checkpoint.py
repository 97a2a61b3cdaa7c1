"""Atomic, resumable checkpoints: files written by every rank into one folder per step. This
module alone names the files and reads them back (the trainer and hf/convert.py ask it).

Layout of `checkpoint.dir`:

    step_00000100/                  one complete checkpoint
        rank_00000.pt ...           per global rank, its named pieces of state (`Stateful`s): the
                                    trainer's counters, DeepSpeed's counters, the ZeRO optimizer
                                    partition as fragments of each parameter (fp32 master weights, Adam
                                    moments, step; training/optimizer_state.py), the LR scheduler, the
                                    data loader's stream positions, the Transformer-XL memory, the RNG
                                    states
        model_tp00_ep000.pt ...     model weights, one file per distinct (TP rank, EP rank) shard
                                    (ZeRO stages 1-2; stage 3's weights are its fp32 fragments):
                                    {"model": state dict, "shards": {name: [parallel.Shard as dict]}}
        meta.json                   step, parallel layout, the trained model's ModelConfig, the
                                    resolved job config, every file's size in bytes
        COMPLETE                    the completion marker, written last
    latest                          name of the newest complete checkpoint

Why not `engine.save_checkpoint`: DeepSpeed recognises experts only inside its own `MoE` layer
class and drops every parameter whose name contains "expert" from its model file otherwise; our
expert tensors (tagged by molm_megatron.parallel) would be lost. The files above hold the same
pieces through the engine's public state_dict methods.

A save writes everything into `step_N.tmp/`, writes the marker, renames the folder to `step_N`
(one atomic rename on a POSIX file system), then replaces `latest` through a temporary file. A
process killed at any point leaves the previous checkpoint complete and `latest` naming it; the
half-written `.tmp` folder is ignored and deleted by the next save. A save that fails on any rank
(a full disk) removes its `.tmp` folder on every rank's word and says why. Only folders holding
the marker count (torchtitan's `_find_load_step` trusts only folders with their metadata file); a
folder of the step about to be saved that lacks the marker is moved aside to `step_N.incomplete`,
never deleted. On resume a checkpoint whose files are damaged (truncated, unreadable, another
size than meta.json says) is skipped for the newest one that loads, and moved aside to
`step_N.damaged` so that it cannot shadow the new saves; when none loads the run is refused.

A checkpoint of another layout (world size, TP, EP, DP, ZeRO stage) resumes when the caller of
`restore` says how each piece moves (training/reshard.py): every rank then reads every rank file,
memory-mapped, so that only the parts it needs are read from disk.

Files are read with `torch.load(weights_only=True)`: tensors, containers, numbers and strings, plus
the DeepSpeed classes that the optimizer state of older checkpoints (DeepSpeed's own partition state
dict) holds (`SAFE_GLOBALS`). A file that needs anything else to unpickle is refused: loading a
checkpoint someone else made must not run their code.
All ranks must see one shared file system.
"""

from __future__ import annotations

import dataclasses
import errno
import importlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.distributed as dist

from molm_megatron.training.fragments import Fragment

logger = logging.getLogger(__name__)

MARKER = "COMPLETE"
META = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_MODEL_FILE = re.compile(r"^model_tp(\d{2})_ep(\d{3})\.pt$")
# (module, class) that DeepSpeed's ZeRO optimizer state_dict, the optimizer piece of older checkpoints,
# pickles: its loss scaler (a float and a bool inside), the fragment addresses of its flat partitions
# (two ints) and the stage (an int enum).
SAFE_GLOBALS = (("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
                ("deepspeed.utils.tensor_fragment", "fragment_address"),
                ("deepspeed.runtime.zero.config", "ZeroStageEnum"))


class Stateful(Protocol):
    """What a checkpoint piece provides (torch.distributed.checkpoint.stateful.Stateful)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(rank: int) -> str:
    """The file of one global rank's pieces of state."""
    return f"rank_{rank:05d}.pt"


def model_file(tp_rank: int, ep_rank: int) -> str:
    """The model-weights file of one (TP rank, EP rank) shard."""
    return f"model_tp{tp_rank:02d}_ep{ep_rank:03d}.pt"


class ModelState:
    """The model piece, kept in its own file: this rank's shard of the weights, with each sharded
    tensor's place in the full one (parallel.Shard as a dict), so that the full weights assemble
    from the files alone, without process groups (hf/convert.py)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def state_dict(self) -> dict:
        shards = {name: [dataclasses.asdict(s) for s in p.shards]
                  for name, p in self.module.named_parameters() if getattr(p, "shards", ())}
        return {"model": self.module.state_dict(), "shards": shards}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])


class RNGState:
    """Every random generator a step can draw from (dropout, sampled routing, data shuffles), as a
    checkpoint piece. NumPy's key array is stored as a tensor (a safe type for weights_only)."""

    def state_dict(self) -> dict[str, Any]:
        kind, key, pos, has_gauss, gauss = np.random.get_state()
        state = {"torch": torch.get_rng_state(), "numpy": (kind, torch.from_numpy(key.copy()), pos, has_gauss, gauss),
                 "python": random.getstate()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        kind, key, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, key.numpy(), pos, has_gauss, gauss))
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


class DamagedCheckpoint(ValueError):
    """A checkpoint file that cannot be read (truncated, corrupt, missing); the message names it."""


def _safe_globals() -> list:
    out = []
    for module, name in SAFE_GLOBALS:
        try:
            out.append(getattr(importlib.import_module(module), name))
        except ImportError:  # without DeepSpeed (e.g. converting weights) no file needs them
            pass
    return out


def read_file(path: str | Path, map_location: torch.device | str = "cpu", mmap: bool = False) -> Any:
    """One checkpoint file, read safely (module docstring); errors name the file. With `mmap` its
    tensors are mapped, not read: their bytes come from disk when used.

    DamagedCheckpoint for a truncated or corrupt file; ValueError for one that needs a Python
    object outside the allow-list (possibly malicious: nothing of it is executed).
    """
    if not os.path.isfile(path):
        raise DamagedCheckpoint(f"{path}: missing")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        reason = str(e).split("WeightsUnpickler error: ")[-1].splitlines()[0]
        raise ValueError(f"{path}: refused to load: it needs a Python object outside the checkpoint allow-list "
                         f"({reason}); files written by this code never do, so it may run someone's code. "
                         "Load it only if you trust its source, outside this program") from None
    except (RuntimeError, OSError, EOFError) as e:
        raise DamagedCheckpoint(f"{path}: unreadable ({str(e).splitlines()[0]})") from None


def _fsync_write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _write_file(obj: Any, path: str) -> None:
    # Through a Python file object: a full disk then raises OSError(ENOSPC) instead of torch's
    # "unexpected pos" / "basic_ios::clear" messages that name neither the file nor the cause.
    with open(path, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:  # torch's zip writer fails on closing, after the OSError of the write
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise OSError(errno.EIO, f"torch.save failed: {e}", path) from e
        f.flush()
        os.fsync(f.fileno())


def _aside(path: str, suffix: str) -> str:
    """Rename `path` to `path + suffix` (numbered if taken); nothing is deleted."""
    target, n = path + suffix, 1
    while os.path.exists(target):
        n += 1
        target = f"{path}{suffix}.{n}"
    os.rename(path, target)
    return target


def _all_ranks(ok: bool) -> bool:
    """True when `ok` on every rank (one all-reduce; CPU tensor, so gloo groups only)."""
    flag = torch.tensor([1 if ok else 0])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def find_step_folder(checkpoint: str | Path) -> Path:
    """A step folder as given, or the newest complete one of a `checkpoint.dir`."""
    checkpoint = Path(checkpoint)
    if (checkpoint / META).exists():
        if not (checkpoint / MARKER).exists():
            raise ValueError(f"{checkpoint}: incomplete checkpoint (no {MARKER} marker)")
        return checkpoint
    step = CheckpointManager(str(checkpoint), keep_last=1, layout={}, rank=0, barrier=lambda: None).latest_step()
    if step is None:
        raise ValueError(f"{checkpoint}: no complete checkpoint (no step_* folder with a {MARKER} marker)")
    return checkpoint / step_dir_name(step)


def read_meta(folder: str | Path) -> dict:
    """A step folder's meta.json; ValueError naming the file when it is missing or not JSON."""
    path = Path(folder) / META
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedCheckpoint(f"{path}: unreadable ({e})") from None
    if not isinstance(meta, dict) or not {"step", "layout", "config"} <= set(meta):
        raise DamagedCheckpoint(f"{path}: not a checkpoint's meta.json (needs step, layout, config)")
    return meta


def saved_model_config(meta: dict) -> dict:
    """The ModelConfig fields of the trained model (older checkpoints: the job's model section)."""
    if "model" in meta:
        return dict(meta["model"])
    fields = dict(meta["config"]["model"])
    fields.pop("preset", None)
    return fields


@dataclasses.dataclass
class ModelShards:
    """The model files of one checkpoint: iterate for (path, {"model", "shards"}) one file at a time."""

    folder: Path
    model_config: dict
    """ModelConfig fields of the model the files hold."""
    layout: dict
    files: list[Path]

    def __iter__(self) -> Iterator[tuple[Path, dict]]:
        for path in self.files:
            yield path, read_file(path)

    def fragments(self) -> dict[str, list[Fragment]]:
        """Each tensor's shards, one per model file that holds it (files memory-mapped)."""
        out: dict[str, list[Fragment]] = {}
        for path in self.files:
            blob = read_file(path, mmap=True)
            for name, local in blob["model"].items():
                out.setdefault(name, []).append(Fragment.saved(blob["shards"].get(name, []), local.shape, 0, local))
        return out


def read_rank_states(folder: str | Path, world_size: int) -> list[tuple[Path, dict]]:
    """(path, contents) of every rank file of a step folder, in global rank order, memory-mapped."""
    paths = [Path(folder) / rank_file(rank) for rank in range(world_size)]
    return [(path, read_file(path, mmap=True)) for path in paths]


def read_model_shards(checkpoint: str | Path) -> ModelShards:
    """The model files of a `checkpoint.dir` (its newest complete checkpoint) or of one step folder,
    with the trained model's config. `files` is empty for ZeRO-3 (weights in the optimizer partitions)."""
    folder = find_step_folder(checkpoint)
    meta = read_meta(folder)
    files = sorted(p for p in folder.iterdir() if _MODEL_FILE.match(p.name))
    return ModelShards(folder, saved_model_config(meta), meta["layout"], files)


def _has_pieces(path: str | Path, state: dict, pieces: dict) -> dict:
    """`state` (a rank file's contents) if it holds every piece, else DamagedCheckpoint naming the file."""
    missing = [name for name in pieces if name not in state]
    if missing:
        raise DamagedCheckpoint(f"{path}: no {missing} state (pieces: {sorted(state)})")
    return state


def _format_layout(layout: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(layout.items()))


class CheckpointManager:
    """Save and find checkpoints in one folder; `layout` (parallel sizes) must match on load.

    `save`, `load` and `restore` are collective: every rank calls them with the same step.
    """

    def __init__(self, directory: str, keep_last: int, layout: dict[str, int], rank: int | None = None,
                 barrier: Callable[[], None] | None = None, all_ranks: Callable[[bool], bool] | None = None):
        """`rank`, `barrier` and `all_ranks` (True when a flag is True on every rank) default to
        torch.distributed's; given explicitly, a single process needs no process group."""
        self.directory, self.keep_last, self.layout = directory, keep_last, layout
        self.rank = dist.get_rank() if rank is None else rank
        self.barrier = dist.barrier if barrier is None else barrier
        if all_ranks is None:
            all_ranks = _all_ranks if barrier is None else (lambda ok: ok)
        self.all_ranks = all_ranks

    def folder(self, step: int) -> str:
        return os.path.join(self.directory, step_dir_name(step))

    # ---- finding -----------------------------------------------------------------------------
    def complete_steps(self) -> list[int]:
        """Steps of the complete checkpoints in the folder, ascending."""
        if not os.path.isdir(self.directory):
            return []
        steps = []
        for name in os.listdir(self.directory):
            match = _STEP_DIR.match(name)
            if match and os.path.exists(os.path.join(self.directory, name, MARKER)):
                steps.append(int(match.group(1)))
        return sorted(steps)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint. The folders' markers decide, not the `latest` file: a kill
        between the rename and the pointer update leaves a complete, newer folder."""
        steps = self.complete_steps()
        return steps[-1] if steps else None

    # ---- saving ------------------------------------------------------------------------------
    def save(self, step: int, files: dict[str, Any], config: dict, model_config: dict | None = None) -> None:
        """Write checkpoint `step` atomically (collective): each rank passes the files it owns
        (name -> object for torch.save); `model_config` (ModelConfig fields of the trained model)
        goes into meta.json. Skips a step that is already complete. ValueError when any rank
        fails to write; the partial save is removed then."""
        final = self.folder(step)
        tmp = final + ".tmp"
        if os.path.exists(os.path.join(final, MARKER)):
            return  # a resumed run that stops before its first step: this state is on disk already
        error = None
        if self.rank == 0:
            try:
                if os.path.exists(final):  # no marker: a copy cut short, or not ours; keep it, out of the way
                    logger.warning("%s has no %s marker: moved aside to %s", final, MARKER,
                                   _aside(final, ".incomplete"))
                shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
                os.makedirs(tmp)
            except OSError as e:
                error = e
        self._agree(error, step, tmp)
        error = None
        for name, obj in files.items():
            try:
                _write_file(obj, os.path.join(tmp, name))
            except OSError as e:
                error = e
                break
        self._agree(error, step, tmp)  # every rank's files are written before rank 0 commits
        error = None
        if self.rank == 0:
            try:
                sizes = {name: os.path.getsize(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
                meta = {"step": step, "layout": self.layout, "model": model_config, "config": config, "files": sizes}
                if model_config is None:
                    del meta["model"]
                _fsync_write(os.path.join(tmp, META), json.dumps(meta, indent=1))
                _fsync_write(os.path.join(tmp, MARKER), f"{step}\n")
            except OSError as e:
                error = e
        self._agree(error, step, tmp)
        if self.rank == 0:
            os.rename(tmp, final)
            self._point_latest(step)
            self._prune()
            logger.info("checkpoint saved at step %d in %s", step, final)
        self.barrier()  # nobody looks for checkpoints before the commit

    def save_state(self, step: int, pieces: dict[str, Stateful], model: Stateful | None, model_name: str | None,
                   config: dict, model_config: dict) -> None:
        """`save` of this rank's pieces (its rank file) and, on the ranks that write one, its model file."""
        files = {rank_file(self.rank): {name: piece.state_dict() for name, piece in pieces.items()}}
        if model is not None:
            files[model_name] = model.state_dict()
        self.save(step, files, config, model_config)

    def _agree(self, error: OSError | None, step: int, tmp: str) -> None:
        """All ranks learn whether a save phase failed anywhere; then every rank raises and rank 0
        removes the partial save (the previous checkpoint stays as it was)."""
        if self.all_ranks(error is None):
            return
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is None:
            raise ValueError(f"checkpoint save of step {step} in {self.directory} failed on another rank (its log "
                             "names the error); the partial save was removed, the previous checkpoint is kept")
        if error.errno == errno.ENOSPC:
            cause = f"no space left on {self.directory}"
        else:
            cause = f"{error.strerror or error} ({error.filename or tmp})"
        raise ValueError(f"checkpoint save of step {step} failed: {cause}; the partial save {tmp} was removed, the "
                         f"previous checkpoint is kept") from error

    def _point_latest(self, step: int) -> None:
        tmp = os.path.join(self.directory, "latest.tmp")
        _fsync_write(tmp, step_dir_name(step))
        os.replace(tmp, os.path.join(self.directory, "latest"))

    def _prune(self) -> None:
        """Delete complete checkpoints beyond the newest keep_last, and stale .tmp folders."""
        steps = self.complete_steps()
        for old in steps[:-self.keep_last]:
            # Rename first (atomic): a kill during the deletion leaves a `.tmp` folder, which is
            # ignored and swept, never a half-deleted folder that still looks complete.
            folder = self.folder(old)
            os.rename(folder, folder + ".tmp")
            shutil.rmtree(folder + ".tmp", ignore_errors=True)
        for name in os.listdir(self.directory):
            if name.endswith(".tmp") and name.startswith("step_"):
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    # ---- loading -----------------------------------------------------------------------------
    def read_meta(self, step: int) -> dict:
        return read_meta(self.folder(step))

    def check_layout(self, step: int) -> None:
        """Refuse a checkpoint written with another parallel layout, naming both layouts (`load` reads
        this rank's own files, which only a checkpoint of this layout has; `restore` can reshard)."""
        saved = self.read_meta(step)["layout"]
        if saved != self.layout:
            raise ValueError(
                f"checkpoint {self.folder(step)} was saved with parallel layout ({_format_layout(saved)}) but this "
                f"run has ({_format_layout(self.layout)}); ZeRO and expert shards are not converted: restart with "
                "the saved layout, or point checkpoint.dir to a new folder")

    def check_model(self, step: int, model_config: dict) -> None:
        """Refuse a checkpoint of another model (any ModelConfig field differs), naming each field."""
        saved = saved_model_config(self.read_meta(step))
        diff = [f"{k}: saved {saved.get(k, '(absent)')!r}, this run {model_config.get(k, '(absent)')!r}"
                for k in sorted(set(saved) | set(model_config)) if saved.get(k) != model_config.get(k)]
        if diff:
            raise ValueError(f"checkpoint {self.folder(step)} holds another model than this run builds ("
                             f"{'; '.join(diff)}): restart with the saved model settings, or point checkpoint.dir "
                             "to a new folder")

    def _check_sizes(self, step: int) -> None:
        """Every file meta.json lists has its recorded size (a truncated copy shows here first)."""
        for name, size in self.read_meta(step).get("files", {}).items():
            path = os.path.join(self.folder(step), name)
            if not os.path.isfile(path):
                raise DamagedCheckpoint(f"{path}: missing")
            if os.path.getsize(path) != size:
                raise DamagedCheckpoint(f"{path}: {os.path.getsize(path)} bytes, but meta.json records {size} "
                                        "(truncated or replaced)")

    def load(self, step: int, names: list[str], map_location: torch.device) -> dict[str, Any]:
        """Read this rank's files of checkpoint `step` after checking the layout and the file sizes."""
        self.check_layout(step)
        self._check_sizes(step)
        return {name: read_file(os.path.join(self.folder(step), name), map_location) for name in names}

    def restore(self, pieces: dict[str, Stateful], model: Stateful | None, model_name: str | None,
                model_config: dict, reshard: Callable[[list[dict]], dict[str, Any]] | None = None) -> int | None:
        """Load the newest checkpoint that reads on every rank into `pieces` (this rank's file) and
        `model` (its model file `model_name`, applied first); returns its step, None without one.

        A checkpoint of another layout is refused (ValueError naming both) unless `reshard` is given:
        it gets every rank file's pieces, in global rank order, and returns this rank's state of each
        piece to load (the model file is not read then: see training/reshard.py). Another model is
        refused. Damaged checkpoints are passed over, with a warning, for the newest older one that
        loads, and then moved aside (`.damaged`); when none loads, ValueError lists them and nothing is
        moved. Nothing is applied before every file of the chosen checkpoint has been read (and, for
        another layout, converted) on every rank: no run trains on after a partial load.
        """
        names = [rank_file(self.rank)] + ([model_name] if model_name else [])
        damaged: list[tuple[int, str]] = []
        for step in reversed(self.complete_steps()):
            problem = refusal = None
            try:
                self.check_model(step, model_config)
                saved_layout = self.read_meta(step)["layout"]
                if saved_layout == self.layout or reshard is None:
                    # Onto the CPU: torch.set_rng_state takes a CPU tensor, and DeepSpeed/torch copy
                    # the rest to the parameters' device as they load it.
                    files = self.load(step, names, torch.device("cpu"))
                    state = _has_pieces(os.path.join(self.folder(step), names[0]), files[names[0]], pieces)
                else:
                    self._check_sizes(step)
                    rank_states = [_has_pieces(path, saved, pieces)
                                   for path, saved in read_rank_states(self.folder(step), saved_layout["world_size"])]
                    files, state = {}, reshard(rank_states)
            except DamagedCheckpoint as e:
                problem = str(e)
            except ValueError as e:  # another layout or model, an unsafe file: refused, not passed over
                refusal = e
            if not self.all_ranks(problem is None and refusal is None):
                # Every rank raises together when any refused (a lone raise would hang the others).
                if not self.all_ranks(refusal is None):
                    raise refusal or ValueError(f"checkpoint {self.folder(step)} was refused on another rank "
                                                "(its log says why)")
                damaged.append((step, problem or "a file of another rank is damaged (that rank's log names it)"))
                logger.warning("checkpoint %s cannot be loaded: %s", self.folder(step), damaged[-1][1])
                continue
            if model is not None and model_name in files:
                model.load_state_dict(files[model_name])
            for name, piece in pieces.items():
                if name in state:  # a resharded resume may leave a piece as the run built it
                    piece.load_state_dict(state[name])
            if saved_layout != self.layout and self.rank == 0:
                logger.info("checkpoint %s was saved with parallel layout (%s): resharded to (%s)",
                            self.folder(step), _format_layout(saved_layout), _format_layout(self.layout))
            if damaged:
                if self.rank == 0:
                    for bad, _ in damaged:
                        logger.warning("resuming from the older %s instead: moved %s aside to %s", self.folder(step),
                                       self.folder(bad), _aside(self.folder(bad), ".damaged"))
                self.barrier()
            return step
        if damaged:
            listing = "; ".join(f"{step_dir_name(s)}: {why}" for s, why in damaged)
            raise ValueError(f"no checkpoint in {self.directory} can be loaded ({listing}). Restore the files, move "
                             "the damaged folders away to start from an older one, or point checkpoint.dir to a "
                             "new folder to start afresh")
        return None
