"""Evaluation throughput: MoLM against a dense model of similar active size under the same harness.

molm-350m-4b-shaped random weights (our adapter: lm-evaluation-harness's HFLM scoring in
Transformer-XL segments, the Triton kernels on CUDA) against a Pythia-1.4B-shaped GPT-NeoX
(transformers, random weights, the harness's plain HFLM), with the same tokenizer (CodeGen's),
batch size, context limit, dtype and requests:
1. loglikelihood: `--requests` multiple-choice-like requests (a context of real text from the
   standard library and a short continuation) through `HFLM.loglikelihood`; tokens/s counts every
   scored input token;
2. HumanEval sampling: the first `--prompts` HumanEval prompts, `--samples` completions each at
   temperature 0.8, exactly `--max-new-tokens` new tokens (no stop sequences, so both models do the
   same work), batched with the KV cache through `generate()`; samples/s and new tokens/s.
Each measurement follows a warm-up pass on a few requests; wall-clock time with CUDA synchronised.

Usage: python -m benchmarks.eval_bench [--tiny] [--device auto] [--dtype auto] [--batch-size 32]
       [--requests 512] [--prompts 32] [--samples 8] [--max-new-tokens 128] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from molm_megatron.config import model_preset

# Pythia-1.4B (EleutherAI/pythia-1.4b config.json): 24 layers, width 2048, 16 heads, rotary on 25%.
PYTHIA_1_4B = dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, intermediate_size=8192,
                   vocab_size=50304, rotary_pct=0.25, max_position_embeddings=2048, use_parallel_residual=True)
PYTHIA_TINY = dict(PYTHIA_1_4B, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256)


def build_models(tiny: bool, device: str, dtype: torch.dtype):
    """(our EvalModel, the GPT-NeoX model), random weights, on `device` in `dtype`."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from molm_megatron.eval.loading import EvalModel, hf_view, codegen_hf_tokenizer
    from molm_megatron.model import MoLM

    cfg = model_preset("tiny", vocab_size=50295, bos_token_id=50256, eos_token_id=50256) if tiny \
        else model_preset("molm-350m-4b")
    torch.manual_seed(0)
    with torch.device(device):  # initialised in place: a 4B-parameter model is slow to build on the CPU
        molm = MoLM(cfg).to(dtype).eval()
        neox = GPTNeoXForCausalLM(GPTNeoXConfig(**(PYTHIA_TINY if tiny else PYTHIA_1_4B))).to(dtype).eval()
    tok = codegen_hf_tokenizer()
    return EvalModel(molm, hf_view(molm).eval(), tok, "random molm"), neox, tok


def loglikelihood_requests(count: int, context_chars: int, tok) -> list:
    """(context, continuation) requests from standard library sources: a context of about
    `context_chars` characters and the next 40 as the continuation."""
    from lm_eval.api.instance import Instance

    from molm_megatron.data.corpus import stdlib_sources

    step = context_chars + 40
    parts, size = [], 0
    for path in stdlib_sources():
        if size >= count * step:
            break
        parts.append(path.read_text(encoding="utf-8", errors="replace"))
        size += len(parts[-1])
    text = "".join(parts)
    pairs = [(text[i:i + context_chars], text[i + context_chars:i + step]) for i in range(0, count * step, step)]
    return [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(lm, hf, tok, requests, prompts, args) -> dict:
    from molm_megatron.eval.humaneval import sample_completions

    def score(reqs):
        return lm.loglikelihood(reqs, disable_tqdm=True)

    def generate(ps, n):
        return sample_completions(hf, tok, ps, n=n, temperature=0.8, top_p=0.95,
                                  max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=0, stops=())

    score(requests[:args.batch_size])  # warm-up: kernels compiled, allocator primed
    scored_tokens = sum(len(tok(r.args[0] + r.args[1]).input_ids) - 1 for r in requests)
    ll_s = timed(lambda: score(requests), args.device)
    generate(prompts[:2], 2)
    out: list = []
    gen_s = timed(lambda: out.extend(generate(prompts, args.samples)), args.device)
    samples = len(prompts) * args.samples
    new_tokens = sum(len(tok(c, add_special_tokens=False).input_ids) for cs in out for c in cs)
    return {"loglikelihood_tokens_per_s": scored_tokens / ll_s, "loglikelihood_seconds": ll_s,
            "loglikelihood_tokens": scored_tokens, "humaneval_samples_per_s": samples / gen_s,
            "humaneval_new_tokens_per_s": new_tokens / gen_s, "humaneval_seconds": gen_s,
            "humaneval_samples": samples}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.eval_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes of both models (a CPU smoke test)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16")
    parser.add_argument("--batch-size", type=int, default=32, help="the harness's batch size and the sampling batch")
    parser.add_argument("--max-length", type=int, default=2048, help="the harness's context limit")
    parser.add_argument("--requests", type=int, default=512, help="loglikelihood requests")
    parser.add_argument("--context-chars", type=int, default=1200, help="characters of context per request")
    parser.add_argument("--prompts", type=int, default=32, help="HumanEval prompts")
    parser.add_argument("--samples", type=int, default=8, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per completion")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"

    from lm_eval.models.huggingface import HFLM

    from molm_megatron.eval.harness import MoLMHarnessLM
    from molm_megatron.eval.humaneval import read_problems

    ours, neox, tok = build_models(args.tiny, args.device, getattr(torch, args.dtype))
    requests = loglikelihood_requests(args.requests, args.context_chars, tok)
    prompts = [p["prompt"] for p in read_problems(limit=args.prompts)]
    settings = dict(batch_size=args.batch_size, max_length=args.max_length)
    results = {"settings": {k: v if not isinstance(v, Path) else str(v) for k, v in vars(args).items()},
               "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}
    results["molm"] = measure(MoLMHarnessLM(ours, **settings), ours.hf, tok, requests, prompts, args)
    baseline = HFLM(pretrained=neox, tokenizer=tok, backend="causal", device=args.device,
                    softmax_dtype=torch.float32, **settings)
    results["pythia"] = measure(baseline, neox, tok, requests, prompts, args)

    names = ("molm-350m-4b" if not args.tiny else "molm tiny", "pythia-1.4b" if not args.tiny else "neox tiny")
    print(f"\n{'model':<14} {'loglik tok/s':>14} {'HumanEval samples/s':>20} {'new tok/s':>12}")
    for key, name in zip(("molm", "pythia"), names):
        r = results[key]
        print(f"{name:<14} {r['loglikelihood_tokens_per_s']:>14.0f} {r['humaneval_samples_per_s']:>20.2f} "
              f"{r['humaneval_new_tokens_per_s']:>12.0f}")
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
