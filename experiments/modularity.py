"""Experiment 4 (ModuleFormer, Fig. 2): do experts specialise by domain? The KL divergence between
the MLP-expert distributions of code, English prose and German, for models pretrained with the MI
loss, the switch loss and no load-balancing loss.

    python -m experiments.modularity --data build/experiments_data --out OUT/modularity --scale gpu \
        [--models-from OUT/attention]

The models are experiment 1's stick-breaking runs (first seed) when `--models-from` holds them;
otherwise `pretrain.py` trains them here with the same settings. `python -m molm_megatron.modular
stats` counts expert use on each domain's held-out set and writes the KL per layer, its mean and
the heatmaps (stats/<model>/heatmap.png).
"""

from __future__ import annotations

import sys
from pathlib import Path

from experiments.common import Context, experiment_main, figure, pretrain_args

DOMAINS = ("code", "prose", "german")
VARIANTS = ("stickbreaking_mi", "stickbreaking_switch", "stickbreaking_none")


def run(ctx: Context) -> dict:
    s, runner, models_from = ctx.scale, ctx.runner, ctx.options.get("models_from")
    seed = s.seeds[0]
    variants = [v for v in VARIANTS if v in s.attention_variants]
    checkpoints = {}
    train = {}
    for v in variants:
        found = models_from / "runs" / f"{v}_s{seed}" / "checkpoints" if models_from else None
        if found is not None and (found / "latest").exists():
            checkpoints[v] = found
        else:
            run_dir = ctx.out / "runs" / v
            train[v] = pretrain_args(s, ctx.vocab_size, run_dir, [ctx.train(d) for d in DOMAINS],
                                     seed, s.attention_variants[v])
            checkpoints[v] = run_dir / "checkpoints"
    runner.run_many(train)
    runner.run_many({f"{v}_stats": ["-m", "molm_megatron.modular", "stats", "--model", str(ckpt), "--data",
                                    *[str(ctx.heldout(d)) for d in DOMAINS], "--max-batches", str(s.stats_batches),
                                    "--out", str(ctx.out / "stats" / v), "--overwrite"]
                     for v, ckpt in checkpoints.items() if (ckpt / "latest").exists()})
    from molm_megatron.modular.stats import read_stats  # torch: only once the runs are done

    results = {}
    for v, ckpt in checkpoints.items():
        path = ctx.out / "stats" / v / "stats.json"
        if not path.is_file():
            continue
        stats = read_stats(path)
        results[v] = {"model": str(ckpt), "kl": {f"{p['a']}||{p['b']}": {"mean": p["mean"], "per_layer": p["per_layer"]}
                                                 for p in stats["kl"]},
                      "tokens": {d: stats["domains"][d]["tokens"] for d in stats["domains"]}}
    return {"models": results, "domains": list(DOMAINS), "seed": seed}


def plot(results: dict, path) -> None:
    models = results["models"]
    pairs = sorted({pair for r in models.values() for pair in r["kl"]})
    width = 0.8 / max(1, len(models))
    with figure(path, figsize=(max(6, 1.2 * len(pairs)), 4.5)) as (_, ax):
        for i, (name, r) in enumerate(models.items()):
            ax.bar([j + i * width for j in range(len(pairs))], [r["kl"].get(p, {}).get("mean", 0.0) for p in pairs],
                   width, label=name)
        ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(pairs))])
        ax.set_xticklabels([p.replace("||", " || ") for p in pairs], rotation=30, ha="right", fontsize=8)
        ax.set(ylabel="KL of MLP expert distributions, mean over layers (nats)",
               title="domain specialisation of experts (higher: more modular)")
        ax.legend(fontsize=8)


def add_args(p) -> None:
    p.add_argument("--models-from", type=Path, default=None,
                   help="output folder of experiment 1 (python -m experiments.attention) whose checkpoints to reuse")


def main(argv: list[str] | None = None) -> int:
    return experiment_main("modularity", __doc__, run, plot, argv, add_args)


if __name__ == "__main__":
    sys.exit(main())
