"""Experiment 3 (ModuleFormer, Figs. 3-5): pruning experts by their frequency after fine-tuning with
and without the load-concentration loss, against dropping layers, at the same share of parameters.

    python -m experiments.pruning --data build/experiments_data --out OUT/pruning --scale gpu

`pretrain.py` trains a base model on the three domains (code, English prose, German). `finetune.py`
fine-tunes it on Python code, every tensor training, once plainly (finetune_full.yaml) and once with
the load-concentration loss H(e) per router (finetune_concentration.yaml, weight
`Scale.concentration_loss_weight`). For each fine-tuned model:

- `python -m molm_megatron.modular stats` counts expert use on the code training set;
- `modular prune` removes the least used experts (importance = frequency over the router's max, or
  over its sum) until each target share of the parameters (`Scale.prune_shares`) remains; every
  router keeps its top-k;
- `modular drop-layers` drops the top n layers, or n layers spread uniformly, n = 1 .. n_layer - 1;
- `python -m molm_megatron.eval perplexity` scores every resulting model on held-out code.

Shares count every parameter, the token embedding and the head included. With `Scale.humaneval`,
the unpruned models also run HumanEval greedily (pass@1); at this scale expect 0.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from experiments.common import (Context, Scale, experiment_main, figure, finetune_args, last_value, perplexity_args,
                                perplexity_of, pretrain_args, read_metrics)

DOMAINS = ("code", "prose", "german")
TASK = "code"


def finetune_arms(scale: Scale) -> dict[str, tuple[str, dict]]:
    """The fine-tuning arms the scale asks for: name -> (recipe, model fields)."""
    arms = {"plain": ("full", {}),
            "concentration": ("concentration", {"concentration_loss_weight": scale.concentration_loss_weight})}
    return {name: arms[name] for name in scale.pruning_finetunes}


def prune_with_retry(ctx: Context, name: str, model: Path, stats: Path, norm: str, out: Path) -> list[float]:
    """`modular prune` at the scale's shares; a share the top-k floor makes unreachable is dropped
    (prune refuses the whole call, naming it) and the rest tried again. Returns the shares written."""
    shares = sorted(ctx.scale.prune_shares, reverse=True)
    while shares:
        outcome = ctx.runner.run(name, ["-m", "molm_megatron.modular", "prune", "--model", str(model), "--from-stats",
                                        str(stats), "--norm", norm, "--target-share", *map(str, shares),
                                        "--out", str(out), "--overwrite"])
        if outcome.ok:
            return shares
        if outcome.rc is None or "unreachable" not in Path(outcome.log).read_text():
            return []
        shares = shares[:-1]
    return []


def pruned_folders(out: Path, shares: list[float]) -> dict[float, Path]:
    """Share -> folder of `modular prune` output (one share: the folder itself; several: share_<s>/)."""
    if len(shares) == 1:
        return {shares[0]: out}
    return {s: out / f"share_{s:g}" for s in shares}


def params_share(folder: Path) -> float | None:
    path = folder / "manipulation.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record["params_after"] / record["params_before"]


def run(ctx: Context) -> dict:
    s, runner = ctx.scale, ctx.runner
    seed = s.seeds[0]
    base = ctx.out / "runs" / "base"
    runner.run("base", pretrain_args(s, ctx.vocab_size, base, [ctx.train(d) for d in DOMAINS], seed, {}))
    if not (base / "checkpoints" / "latest").exists():
        return {"error": "the base model did not train; see logs/base.log"}
    finetunes = finetune_arms(s)
    runner.run_many({name: finetune_args(recipe, s, base / "checkpoints", ctx.out / "runs" / name, [ctx.train(TASK)],
                                         seed, {}, model)
                     for name, (recipe, model) in finetunes.items()})

    models: dict[str, dict] = {}  # fine-tuned model -> {variant: (share, folder, kind)}
    for name in finetunes:
        ckpt = ctx.out / "runs" / name / "checkpoints"
        if not (ckpt / "latest").exists():
            continue
        stats = ctx.out / "stats" / name
        runner.run(f"{name}_stats", ["-m", "molm_megatron.modular", "stats", "--model", str(ckpt), "--data",
                                     str(ctx.train(TASK)), "--max-batches", str(s.stats_batches), "--out", str(stats),
                                     "--overwrite"])
        variants = {"unpruned": (1.0, ckpt)}
        if (stats / "stats.json").is_file():
            for norm in s.prune_norms:
                out = ctx.out / "pruned" / f"{name}_{norm}"
                for share, folder in pruned_folders(out, prune_with_retry(ctx, f"{name}_prune_{norm}", ckpt, stats,
                                                                          norm, out)).items():
                    variants[f"prune_{norm}_{share:g}"] = (params_share(folder), folder / "hf")
        n_layer = s.model["n_layer"]
        drops = {f"drop_{mode}_{n}": (mode, n) for mode in s.drop_modes for n in range(1, n_layer)}
        runner.run_many({f"{name}_{v}": ["-m", "molm_megatron.modular", "drop-layers", "--model", str(ckpt), "--mode",
                                         mode, "--n", str(n), "--out", str(ctx.out / "dropped" / f"{name}_{v}"),
                                         "--overwrite"]
                         for v, (mode, n) in drops.items()})
        for v in drops:
            folder = ctx.out / "dropped" / f"{name}_{v}"
            variants[v] = (params_share(folder), folder / "hf")
        models[name] = variants

    runner.run_many({f"{name}_{v}_eval": perplexity_args(s, folder, ctx.heldout_text(TASK), ctx.tokenizer,
                                                         ctx.out / "eval" / name / v)
                     for name, variants in models.items() for v, (share, folder) in variants.items()
                     if share is not None})
    if s.humaneval:
        runner.run_many({f"{name}_humaneval": ["-m", "molm_megatron.eval", "humaneval", "--model",
                                               str(variants["unpruned"][1]), "--tokenizer", str(ctx.tokenizer), "--n",
                                               "1", "--temperature", "0", "--max-new-tokens", "128", "--batch-size",
                                               "64", "--out", str(ctx.out / "humaneval" / name), "--overwrite"]
                         for name, variants in models.items()})

    results = {}
    for name, variants in models.items():
        metrics = read_metrics(ctx.out / "runs" / name)
        rows = []
        for v, (share, _) in variants.items():
            kind = "unpruned" if v == "unpruned" else "_".join(v.split("_")[:2])
            rows.append({"variant": v, "kind": kind, "params_share": share,
                         "ppl": perplexity_of(ctx.out / "eval" / name / v)})
        results[name] = {"final_step": last_value(metrics, "step"),
                         "concentration_loss": last_value(metrics, "loss/concentration"),
                         "points": rows, "humaneval": humaneval_of(ctx.out / "humaneval" / name)}
    return {"models": results, "task": TASK, "seed": seed}


def humaneval_of(out: Path) -> dict | None:
    path = out / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return {k: summary[k] for k in ("pass@1", "problems", "passed") if k in summary}


def plot(results: dict, path) -> None:
    models = results["models"]
    with figure(path, ncols=max(1, len(models)), figsize=(6.5 * max(1, len(models)), 4.5), squeeze=False) as (_, axes):
        for ax, (name, r) in zip(axes[0], models.items()):
            kinds: dict[str, list] = {}
            for p in r["points"]:
                if p["ppl"] is not None and p["params_share"] is not None:
                    kinds.setdefault(p["kind"], []).append((p["params_share"], p["ppl"]))
            unpruned = kinds.pop("unpruned", [])
            for kind, points in sorted(kinds.items()):
                points = sorted(points) + unpruned
                ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=kind)
            ax.set(yscale="log", xlabel="share of parameters remaining", title=f"fine-tuned {name}",
                   ylabel=f"held-out {results['task']} perplexity")
            ax.invert_xaxis()
            ax.legend(fontsize=8)


def main(argv: list[str] | None = None) -> int:
    return experiment_main("pruning", __doc__, run, plot, argv)


if __name__ == "__main__":
    sys.exit(main())
