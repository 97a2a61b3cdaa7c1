"""The README's main command: from a fresh checkout to a trained, exported MoLM on this machine.

    bash launch/setup_env.sh && .venv/bin/python launch/quickstart.py

Five steps, each on the project's own path (nothing here re-implements them):
1. data: the Python standard library sources (on every machine) tokenized with the CodeGen
   tokenizer into an indexed dataset (`data_prep`);
2. pretrain: `launch/local.sh` (torchrun) runs `pretrain.py --config launch/configs/demo.yaml`
   on CPU, a few hundred steps of the `demo` preset;
3. validation perplexity of the held-out documents, as pretrain.py measured it (with memory);
4. export of the last checkpoint to the Hugging Face format of the published MoLM checkpoints,
   with the CodeGen tokenizer beside it;
5. a sample: `AutoModelForCausalLM` / `AutoTokenizer` from that folder, `generate()`.

Every output goes under --workdir; rerunning skips finished steps and resumes an interrupted
training run from its last checkpoint. Arguments it does not know go to pretrain.py
(`--train.micro_batch_size 4`, `--model.n_layer 2`, ...).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = "launch/configs/demo.yaml"


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="launch/quickstart.py",
        description="Prepare a small corpus (Python standard library sources), pretrain a small MoLM on it "
                    "through launch/local.sh and pretrain.py, report validation perplexity, export to the "
                    "Hugging Face format and generate a sample. Unknown arguments are passed to pretrain.py "
                    f"(its settings: python pretrain.py --help; the defaults here: {DEMO_CONFIG}).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--workdir", default="runs/quickstart",
                        help="folder of every output: data/, checkpoints/, metrics/, hf/")
    parser.add_argument("--preset", default="demo", help="model preset (molm_megatron/config.py)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps")
    parser.add_argument("--nproc", type=int, default=1,
                        help="training processes (torchrun; gloo on CPU); 1 is fastest on 2 cores")
    parser.add_argument("--data-bytes", type=int, default=2_000_000,
                        help="bytes of standard library sources to tokenize (about 3.3 bytes per token)")
    parser.add_argument("--prompt", default="def main(argv):\n", help="start of the generated sample")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="length of the generated sample")
    return parser.parse_known_args(argv)


def banner(step: int, text: str) -> None:
    print(f"\n[quickstart {step}/5] {text}", flush=True)


def prepare_data(workdir: Path, max_bytes: int) -> str:
    """The indexed dataset of stdlib sources; reused when it exists (data_prep writes it atomically)."""
    prefix = workdir / "data" / "stdlib"
    if prefix.with_suffix(".idx").exists() and prefix.with_suffix(".bin").exists():
        print(f"reusing {prefix}.bin/.idx")
        return str(prefix)
    from data_prep import prepare_text_files, stdlib_sources

    files = stdlib_sources(max_bytes)
    print(f"{len(files)} standard library files, {sum(f.stat().st_size for f in files) / 1e6:.1f} MB")
    summary = prepare_text_files(files, prefix)
    print(f"wrote {prefix}.bin/.idx: {summary.documents} documents, {summary.tokens:,} tokens "
          f"in {summary.seconds:.1f} s")
    return str(prefix)


def pretrain(workdir: Path, data: str, args: argparse.Namespace, extra: list[str]) -> None:
    """pretrain.py under torchrun through the local launcher; raises on a failed run."""
    # Warmup 10% of the run and three validation passes (the last at the final step), whatever
    # --steps is; flags the user passes through come last and win.
    cmd = ["bash", "launch/local.sh", "-n", str(args.nproc), "pretrain.py", "--config", DEMO_CONFIG,
           "--model.preset", args.preset, "--train.steps", str(args.steps),
           "--schedule.warmup_steps", str(max(1, args.steps // 10)),
           "--train.eval_interval", str(max(1, args.steps // 3)), "--data.prefixes", data,
           "--checkpoint.dir", str(workdir / "checkpoints"), "--metrics.dir", str(workdir / "metrics"), *extra]
    print(" ".join(cmd), flush=True)
    env = dict(os.environ, PYTHON=sys.executable, PYTHONUNBUFFERED="1")
    done = subprocess.run(cmd, cwd=ROOT, env=env)
    if done.returncode != 0:
        raise SystemExit(f"quickstart: pretraining exited with {done.returncode}; rerun to resume from the last "
                         f"checkpoint in {workdir / 'checkpoints'}")


def validation_perplexity(workdir: Path) -> tuple[int, float]:
    """(step, perplexity) of the last validation pass in metrics.jsonl."""
    path = workdir / "metrics" / "metrics.jsonl"
    last = None
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "valid/ppl" in record:
            last = (record["step"], record["valid/ppl"])
    if last is None:
        raise SystemExit(f"quickstart: {path} holds no validation pass; keep train.eval_interval > 0")
    return last


def export(workdir: Path) -> Path:
    """The latest checkpoint as a Hugging Face folder, with the tokenizer of its data (CodeGen's)."""
    from molm_megatron.hf.convert import checkpoint_to_hf

    # A rerun replaces its own earlier export (and nothing else: see molm_megatron.outputs).
    return checkpoint_to_hf(workdir / "checkpoints", workdir / "hf", overwrite=True)


def sample(hf_dir: Path, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of `prompt` by the exported model, loaded the way users load it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import molm_megatron  # noqa: F401  (registers model_type "moduleformer" with the Auto classes)

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    return tok.decode(out[0], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.chdir(ROOT)  # the launcher, configs and relative --workdir are repository-relative
    workdir = Path(args.workdir)
    start = time.perf_counter()

    banner(1, "data: Python standard library sources -> CodeGen tokens (data_prep)")
    data = prepare_data(workdir, args.data_bytes)

    banner(2, f"pretrain: preset {args.preset!r}, {args.steps} steps, {args.nproc} process(es) on "
              "launch/local.sh -> pretrain.py")
    pretrain(workdir, data, args, extra)

    banner(3, "validation perplexity (held-out documents)")
    step, ppl = validation_perplexity(workdir)
    print(f"validation perplexity {ppl:.2f} at step {step} (loss {math.log(ppl):.3f} nats/token; "
          f"a uniform guess over the 50295-token vocabulary scores 50295)")

    banner(4, "export to the Hugging Face format")
    hf_dir = export(workdir)
    print(f"wrote {hf_dir} (load with AutoModelForCausalLM.from_pretrained after `import molm_megatron`, or with trust_remote_code=True)")

    banner(5, "sample (greedy)")
    print(sample(hf_dir, args.prompt, args.max_new_tokens))
    print(f"\nquickstart done in {time.perf_counter() - start:.0f} s; outputs in {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
