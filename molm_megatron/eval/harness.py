"""lm-evaluation-harness on MoLM, offline: our adapter and local YAML tasks.

`MoLMHarnessLM` is the harness's own `HFLM` (its request batching, tokenisation, caching,
`generate_until` through Hugging Face `generate()`) with one change: the forward that scores
tokens. By default it runs the model the way it was trained: a long input is cut into
`segment_length` (block_size) windows, each attending over the previous `memory_length`
(history_length) keys of the same row (Transformer-XL memory). `segment_length=0` runs one forward
over the whole input instead, as the published inference code does (no positional encoding bounds
it, but the model never saw more than history_length + block_size keys in training).

Tasks are local YAML files in the harness's format with `dataset_path: json` and `data_files`;
relative data files are resolved against the YAML file's folder (the harness would resolve them
against the working directory). Nothing is downloaded.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from lm_eval.models.huggingface import HFLM

from molm_megatron.eval.expert_stats import ExpertCounter
from molm_megatron.eval.loading import EvalModel
from molm_megatron.eval.perplexity import segment_lengths
from molm_megatron.model import MoLM


@torch.no_grad()
def segment_logits(model: MoLM, input_ids_BT: torch.Tensor, segment_length: int, memory_length: int,
                   attention_mask_BT: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 logits [B, T, V] of a right-padded batch, computed in consecutive `segment_length`
    windows with `memory_length` tokens of Transformer-XL memory (one forward when segment_length
    is 0 or covers T)."""
    T = input_ids_BT.shape[1]
    if segment_length <= 0 or T <= segment_length:
        return model(input_ids_BT, attention_mask=attention_mask_BT).logits.float()
    memory, logits = None, []
    for start in range(0, T, segment_length):
        window = slice(start, start + segment_length)
        mask = None if attention_mask_BT is None else attention_mask_BT[:, window]
        out = model(input_ids_BT[:, window], attention_mask=mask, memory=memory, memory_length=memory_length)
        memory = out.memory
        logits.append(out.logits.float())
    return torch.cat(logits, dim=1)


class MoLMHarnessLM(HFLM):
    """HFLM over our model's shared HF/MoLM views, scoring with `segment_logits`; with an
    ExpertCounter, counts the routing of every real (non-padding) token it scores."""

    def __init__(self, model: EvalModel, batch_size: int = 8, max_length: int = 2048,
                 segment_length: int | None = None, memory_length: int | None = None,
                 counter: ExpertCounter | None = None):
        super().__init__(pretrained=model.hf, tokenizer=model.tokenizer, backend="causal", batch_size=batch_size,
                         max_length=max_length, device=str(model.device), softmax_dtype=torch.float32)
        self.molm = model.molm
        self.segment_length, self.memory_length = segment_lengths(model.molm, segment_length, memory_length)
        self.counter = counter
        self._routes: dict[str, torch.Tensor] = {}
        self._row = 0

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        if self.counter is None:
            return segment_logits(self.molm, inps, self.segment_length, self.memory_length)
        with self.counter.capture():
            logits = segment_logits(self.molm, inps, self.segment_length, self.memory_length)
        self._routes, self._row = self.counter.routes(inps.shape[0]), 0
        return logits

    def _select_cont_toks(self, logits: torch.Tensor, contlen: int | None = None,
                          inplen: int | None = None) -> torch.Tensor:
        # The harness calls this once per row of the batch just scored, in order, with the row's
        # unpadded length: the one place that says which tokens of a batch were real.
        if self.counter is not None and self._routes:
            self.counter.add({name: e[self._row, :inplen] for name, e in self._routes.items()})
            self._row += 1
        return super()._select_cont_toks(logits, contlen=contlen, inplen=inplen)


def expand_task_paths(paths: list[str | Path]) -> list[Path]:
    """Task YAML files: each path is a YAML file or a folder whose *.yaml files are taken (sorted)."""
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(sorted(p.glob("*.yaml")))
        elif p.is_file():
            found.append(p)
        else:
            raise ValueError(f"--tasks {p}: no such YAML file or folder (built-in harness tasks need the Hugging "
                             "Face hub; give local YAML tasks with dataset_path: json and data_files)")
    if not found:
        raise ValueError(f"--tasks {[str(p) for p in paths]}: no .yaml files found")
    return found


def load_local_task(path: Path) -> dict:
    """A task YAML as the harness's config dict, its relative `data_files` made relative to the YAML."""
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(path)
    if "task" not in cfg:
        raise ValueError(f"{path}: not a task config (no 'task' field)")
    cfg = copy.deepcopy(cfg)
    files = cfg.get("dataset_kwargs", {}).get("data_files")
    if files is None:
        return cfg

    def resolve(f: str) -> str:
        full = f if Path(f).is_absolute() else str(path.parent / f)
        if not Path(full).is_file():
            raise ValueError(f"{path}: data file {f!r} not found (looked for {full})")
        return full

    if isinstance(files, dict):
        files = {split: [resolve(f) for f in v] if isinstance(v, list) else resolve(v) for split, v in files.items()}
    elif isinstance(files, list):
        files = [resolve(f) for f in files]
    else:
        files = resolve(files)
    cfg["dataset_kwargs"]["data_files"] = files
    return cfg


def run_lm_eval(lm: HFLM, task_paths: list[str | Path], out_dir: Path, num_fewshot: int | None = None,
                limit: int | None = None, seed: int = 0, model_name: str = "molm") -> dict:
    """simple_evaluate on local tasks; the harness's results JSON and per-task samples are written by its
    own EvaluationTracker under out_dir/<model_name, sanitized>/, as its CLI does. Returns the results
    dict (without the samples)."""
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    tasks = [load_local_task(p) for p in expand_task_paths(task_paths)]
    tracker = EvaluationTracker(output_path=str(out_dir))
    # model_args only names the model in the harness's records and output folder: lm is built already.
    results = simple_evaluate(model=lm, model_args={"pretrained": model_name}, tasks=tasks, num_fewshot=num_fewshot,
                              limit=limit, log_samples=True,
                              evaluation_tracker=tracker, task_manager=TaskManager(include_defaults=False),
                              random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                              fewshot_random_seed=seed)
    samples = results.pop("samples")
    tracker.save_results_aggregated(results=results, samples=samples)
    for task_name in results["configs"]:
        tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    return results
