"""Experiment 1 (ModuleFormer, Table 4): stick-breaking vs softmax attention with RoPE, and the MI
loss vs no load-balancing loss vs the switch loss with z-loss; same model size, data and steps.

    python -m experiments.attention --data build/experiments_data --out OUT/attention --scale gpu

Every variant (`Scale.attention_variants`) is pretrained by `pretrain.py` on the blend of the three
domains (code, English prose, German; equal weights), once per seed. Outputs per run: pretrain.py's
validation perplexity curve (its held-out split, every eval_interval steps) and the load entropy of
the routers at the end. Length extrapolation: the `_mi` variants' final checkpoints are scored by
`python -m molm_megatron.eval perplexity` on held-out English prose in Transformer-XL segments of
1x, 2x and 4x the training segment with as much memory (at 1x this is the training protocol; at m x
a query reaches back 2m segments, where training reached 2).
"""

from __future__ import annotations

import math
import sys

from experiments.common import (Context, experiment_main, figure, last_value, layer_mean, mean_spread,
                                perplexity_args, perplexity_of, pretrain_args, read_metrics, validation_curve)

DOMAINS = ("code", "prose", "german")
EXTRAPOLATION_TEXT = "prose"


def run(ctx: Context) -> dict:
    s = ctx.scale
    block = s.model["block_size"]
    data = [ctx.train(d) for d in DOMAINS]
    # Seed-major: every variant's first seed runs before any second seed, so a budget that runs out
    # cuts seeds, not variants.
    runs = {f"{variant}_s{seed}": (variant, seed) for seed in s.seeds for variant in s.attention_variants}
    ctx.runner.run_many({name: pretrain_args(s, ctx.vocab_size, ctx.out / "runs" / name, data,
                                             seed, s.attention_variants[variant])
                         for name, (variant, seed) in runs.items()})
    evals = {}
    for name, (variant, seed) in runs.items():
        if not variant.endswith("_mi") or not (ctx.out / "runs" / name / "checkpoints" / "latest").exists():
            continue
        for m in s.extrapolation:
            evals[f"{name}_x{m}"] = perplexity_args(s, ctx.out / "runs" / name / "checkpoints",
                                                    ctx.heldout_text(EXTRAPOLATION_TEXT), ctx.tokenizer,
                                                    ctx.out / "eval" / f"{name}_x{m}", m * block, m * block)
    ctx.runner.run_many(evals)

    per_run = {}
    for name, (variant, seed) in runs.items():
        metrics = read_metrics(ctx.out / "runs" / name)
        per_run[name] = {
            "variant": variant, "seed": seed, "final_step": last_value(metrics, "step"),
            "valid_curve": validation_curve(metrics),
            "att_load_entropy": layer_mean(metrics, ".attn/load_entropy"),
            "mlp_load_entropy": layer_mean(metrics, ".mlpf/load_entropy"),
            "tokens_per_s": last_value(metrics, "throughput/tokens_per_s"),
            "extrapolation": {m: perplexity_of(ctx.out / "eval" / f"{name}_x{m}") for m in s.extrapolation},
        }
    n_att, n_mlp = s.model["n_att_experts"], s.model["n_mlp_experts"]
    variants = {}
    for variant in s.attention_variants:
        rs = [r for r in per_run.values() if r["variant"] == variant]
        finals = [r["valid_curve"][-1][1] if r["valid_curve"] else None for r in rs]
        variants[variant] = {
            "settings": s.attention_variants[variant],
            "final_valid_ppl": mean_spread(finals),
            # Entropy over log E: 1 is a perfectly even load.
            "att_load_balance": mean_spread([r["att_load_entropy"] / math.log(n_att)
                                             if r["att_load_entropy"] is not None else None for r in rs]),
            "mlp_load_balance": mean_spread([r["mlp_load_entropy"] / math.log(n_mlp)
                                             if r["mlp_load_entropy"] is not None else None for r in rs]),
            "extrapolation_ppl": {m: mean_spread([r["extrapolation"][m] for r in rs]) for m in s.extrapolation},
        }
    return {"runs": per_run, "variants": variants, "extrapolation_text": EXTRAPOLATION_TEXT,
            "training_segment": block, "data": list(DOMAINS)}


def plot(results: dict, path) -> None:
    with figure(path, ncols=2, figsize=(12, 4.5)) as (_, (curves, extra)):
        for variant in results["variants"]:
            rs = [r for r in results["runs"].values() if r["variant"] == variant and r["valid_curve"]]
            if not rs:
                continue
            steps = sorted(set.intersection(*(set(s for s, _ in r["valid_curve"]) for r in rs)))
            by_step = [[dict(r["valid_curve"])[s] for r in rs] for s in steps]
            line, = curves.plot(steps, [sum(v) / len(v) for v in by_step], label=f"{variant} (n={len(rs)})")
            curves.fill_between(steps, [min(v) for v in by_step], [max(v) for v in by_step], color=line.get_color(),
                                alpha=0.2)
        curves.set(xlabel="step", ylabel="validation perplexity", yscale="log",
                   title="pretraining: validation perplexity (mean, min-max over seeds)")
        curves.legend(fontsize=8)
        for variant, v in results["variants"].items():
            points = [(int(m), e) for m, e in v["extrapolation_ppl"].items() if e["mean"] is not None]
            if points:
                extra.errorbar([m for m, _ in points], [e["mean"] for _, e in points],
                               yerr=[e["std"] for _, e in points], marker="o", capsize=3, label=variant)
        extra.set_xscale("log", base=2)
        extra.set(xlabel="evaluation segment (and memory) / training segment",
                  ylabel=f"held-out {results['extrapolation_text']} perplexity",
                  title="length extrapolation (mean, std over seeds)")
        extra.legend(fontsize=8)


def main(argv: list[str] | None = None) -> int:
    return experiment_main("attention", __doc__, run, plot, argv)


if __name__ == "__main__":
    sys.exit(main())
