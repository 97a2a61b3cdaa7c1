"""Experiment 5 (Qiu et al., "Unlocking Emergent Modularity in Large Language Models", NAACL 2024):
does fine-tuning a dense model as an emergent MoE (EMoE) beat dense fine-tuning, in domain and out of
domain, and does the gain survive shipping the EMoE weights as the dense model?

    python -m experiments.emoe --data build/experiments_data --out OUT/emoe --scale gpu

A small dense GPT-2 of the MoLM model's active size (experiments.common.dense_folder, random
initialisation) is trained by `finetune.py` on the three domains with the pretraining's schedule;
`python -m molm_megatron.hf.convert to-hf` makes it a Hugging Face folder and `python -m
molm_megatron.emoe convert` an EMoE folder (`Scale.emoe_experts` experts per FFN, `Scale.emoe_top_k`
per token, every other layer from layer 1). Both are fine-tuned on Python code with the same recipe
(launch/configs/finetune_emoe.yaml), once per seed; the fine-tuned EMoE is also exported dense
(`to-hf --dense`, "train as EMoE, ship dense"). `python -m molm_megatron.eval perplexity` scores
every model on held-out code (in domain) and held-out English prose and German (out of domain).
"""

from __future__ import annotations

import shutil
import sys

from experiments.common import (Context, dense_folder, dense_pretrain_args, experiment_main, figure, finetune_args,
                                mean_spread)

DOMAINS = ("code", "prose", "german")
TASK = "code"
ARMS = ("dense", "emoe", "emoe_shipped_dense")


def run(ctx: Context) -> dict:
    s, runner = ctx.scale, ctx.runner
    base = ctx.out / "runs" / "base"
    init = ctx.out / "dense_init"
    shutil.rmtree(init, ignore_errors=True)
    dense_folder(init, s, ctx.tokenizer, ctx.vocab_size, ctx.eod_id, s.seeds[0])
    runner.run("base", dense_pretrain_args(s, init, base, [ctx.train(d) for d in DOMAINS], s.seeds[0]))
    dense, emoe = ctx.out / "base_hf", ctx.out / "base_emoe"
    runner.run("base_hf", ["-m", "molm_megatron.hf.convert", "to-hf", "--checkpoint", str(base / "checkpoints"),
                           "--out", str(dense), "--overwrite"])
    shutil.rmtree(emoe, ignore_errors=True)  # convert writes a new folder only
    runner.run("base_emoe", ["-m", "molm_megatron.emoe", "convert", "--model", str(dense), "--out", str(emoe),
                             "--experts", str(s.emoe_experts), "--top-k", str(s.emoe_top_k), "--layer-start", "1",
                             "--layer-stride", "2", "--seed", str(s.seeds[0])])
    starts = {"dense": dense, "emoe": emoe}
    runner.run_many({f"{arm}_s{seed}": finetune_args("emoe", s, start, ctx.out / "runs" / f"{arm}_s{seed}",
                                                     [ctx.train(TASK)], seed, {},
                                                     {"block_size": s.model["block_size"]})
                     for seed in s.seeds for arm, start in starts.items() if (start / "config.json").is_file()})
    runner.run_many({f"emoe_shipped_dense_s{seed}": ["-m", "molm_megatron.hf.convert", "to-hf", "--checkpoint",
                                                     str(ctx.out / "runs" / f"emoe_s{seed}" / "checkpoints"), "--out",
                                                     str(ctx.out / f"emoe_shipped_dense_s{seed}"), "--dense",
                                                     "--overwrite"]
                     for seed in s.seeds if (ctx.out / "runs" / f"emoe_s{seed}" / "checkpoints" / "latest").exists()})
    models = {"base": dense}
    for seed in s.seeds:
        models[f"dense_s{seed}"] = ctx.out / "runs" / f"dense_s{seed}" / "checkpoints"
        models[f"emoe_s{seed}"] = ctx.out / "runs" / f"emoe_s{seed}" / "checkpoints"
        models[f"emoe_shipped_dense_s{seed}"] = ctx.out / f"emoe_shipped_dense_s{seed}"
    domains = [d for d in DOMAINS if d in s.eval_domains]
    ppl = ctx.heldout_perplexities(models, domains)
    arms = {arm: {d: mean_spread([ppl[f"{arm}_s{seed}"][d] for seed in s.seeds]) for d in domains} for arm in ARMS}
    arms = {"base (no fine-tuning)": {d: mean_spread([ppl["base"][d]]) for d in domains}, **arms}
    return {"arms": arms, "models": ppl, "task": TASK, "domains": domains, "experts": s.emoe_experts,
            "top_k": s.emoe_top_k}


def plot(results: dict, path) -> None:
    arms, domains = results["arms"], results["domains"]
    width = 0.8 / len(arms)
    with figure(path, figsize=(8, 4.5)) as (_, ax):
        for i, (arm, by_domain) in enumerate(arms.items()):
            means = [by_domain[d]["mean"] or 0.0 for d in domains]
            stds = [by_domain[d]["std"] or 0.0 for d in domains]
            ax.bar([j + i * width for j in range(len(domains))], means, width, yerr=stds, capsize=3, label=arm)
        ax.set_xticks([j + width * (len(arms) - 1) / 2 for j in range(len(domains))])
        ax.set_xticklabels([f"{d} ({'in domain' if d == results['task'] else 'out of domain'})" for d in domains])
        ax.set(yscale="log", ylabel="held-out perplexity",
               title=f"fine-tuning on {results['task']}: dense vs EMoE ({results['top_k']} of {results['experts']})")
        ax.legend(fontsize=8)


def main(argv: list[str] | None = None) -> int:
    return experiment_main("emoe", __doc__, run, plot, argv)


if __name__ == "__main__":
    sys.exit(main())
