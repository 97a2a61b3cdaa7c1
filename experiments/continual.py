"""Experiment 2 (ModuleFormer, Tables 5-6): learning a new language by inserting experts, against
forgetting.

    python -m experiments.continual --data build/experiments_data --out OUT/continual --scale gpu

`pretrain.py` trains a base model on English: code and prose (equal weights). `finetune.py` then
continues on German alone (the hardest case for forgetting) for the same number of steps and at
the same learning rate in every arm:

- `frozen`: no training (the base model itself);
- `full`: full fine-tuning (launch/configs/finetune_full.yaml);
- `inserted_reg<w>`: new MLP and attention experts in every layer with the partially trainable
  router, everything else frozen (launch/configs/finetune_continual.yaml), routing regularisation
  weight w (`Scale.routing_reg_weights`);
- the paper's dense baseline: a GPT-2 of the same active size per token (experiments.common.dense_folder)
  pretrained by `finetune.py` on the same English data with the same schedule (`dense_frozen`), then
  fine-tuned fully (`dense_full`, launch/configs/finetune_emoe.yaml) or with LoRA of rank
  `Scale.lora_rank` on its attention projections (`dense_lora`, finetune_emoe_lora.yaml).

Each model's perplexity on held-out English prose and code (stability: lower is less forgetting)
and held-out German (plasticity) comes from `python -m molm_megatron.eval perplexity` (segments
with memory, the training protocol).
"""

from __future__ import annotations

import shutil
import sys

from experiments.common import (Context, dense_folder, dense_pretrain_args, experiment_main, figure, finetune_args,
                                last_value, layer_mean, pretrain_args, read_metrics)

OLD, NEW = ("prose", "code"), "german"


def arms(ctx: Context) -> dict[str, tuple[str, dict, dict]]:
    """Fine-tuning arm -> (recipe, finetune fields, model fields)."""
    s = ctx.scale
    out = {"full": ("full", {"trainable": "all"}, {})}
    for w in s.routing_reg_weights:
        out[f"inserted_reg{w:g}"] = ("continual", {"insert_mlp_experts": s.insert_mlp_experts,
                                                   "insert_att_experts": s.insert_att_experts, "trainable": "new"},
                                     {"routing_reg_weight": w})
    return out


def dense_arms(ctx: Context) -> dict[str, tuple[str, dict, dict]]:
    """The dense baselines of the same active size: full fine-tuning and LoRA (peft), as arms."""
    block = {"block_size": ctx.scale.model["block_size"]}
    return {"dense_full": ("emoe", {}, block), "dense_lora": ("emoe_lora", {"lora_rank": ctx.scale.lora_rank}, block)}


def run(ctx: Context) -> dict:
    s, runner = ctx.scale, ctx.runner
    seed = s.seeds[0]
    base, dense_base = ctx.out / "runs" / "base", ctx.out / "runs" / "dense_base"
    init = ctx.out / "dense_init"
    shutil.rmtree(init, ignore_errors=True)
    dense_folder(init, s, ctx.tokenizer, ctx.vocab_size, ctx.eod_id, seed)
    old = [ctx.train(d) for d in OLD]
    runner.run_many({"base": pretrain_args(s, ctx.vocab_size, base, old, seed, {}),
                     "dense_base": dense_pretrain_args(s, init, dense_base, old, seed)})
    models = {"frozen": base / "checkpoints", "dense_frozen": dense_base / "checkpoints"}
    finetunes = {}
    moe_arms, baseline_arms = arms(ctx), dense_arms(ctx)
    for start, group in ((base, moe_arms), (dense_base, baseline_arms)):
        if not (start / "checkpoints" / "latest").exists():
            continue
        for name, (recipe, finetune, model) in group.items():
            finetunes[name] = finetune_args(recipe, s, start / "checkpoints", ctx.out / "runs" / name,
                                            [ctx.train(NEW)], seed, finetune, model)
            models[name] = ctx.out / "runs" / name / "checkpoints"
    runner.run_many(finetunes)
    domains = [d for d in (*OLD, NEW) if d in s.eval_domains]
    ppl = ctx.heldout_perplexities(models, domains)
    results = {}
    for name in models:
        metrics = read_metrics(ctx.out / "runs" / name) if not name.endswith("frozen") else []
        results[name] = {
            "settings": {**moe_arms, **baseline_arms}.get(name, ("none", {}, {})),
            "final_step": last_value(metrics, "step"),
            "new_share": layer_mean(metrics, "mlpf/new_share"),
            "ppl": {domain: ppl[name].get(domain) for domain in (*OLD, NEW)},
        }
    return {"arms": results, "old_domains": list(OLD), "new_domain": NEW, "seed": seed}


def plot(results: dict, path) -> None:
    with figure(path, figsize=(7, 5)) as (_, ax):
        for name, r in results["arms"].items():
            old = [r["ppl"][d] for d in results["old_domains"]]
            new = r["ppl"][results["new_domain"]]
            if new is None or None in old:
                continue
            ax.scatter(sum(old) / len(old), new, s=40)
            ax.annotate(name, (sum(old) / len(old), new), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set(xscale="log", yscale="log", title="continual learning: lower left is better",
               xlabel=f"old domains ({', '.join(results['old_domains'])}): mean held-out perplexity (stability)",
               ylabel=f"new domain ({results['new_domain']}): held-out perplexity (plasticity)")


def main(argv: list[str] | None = None) -> int:
    return experiment_main("continual", __doc__, run, plot, argv)


if __name__ == "__main__":
    sys.exit(main())
