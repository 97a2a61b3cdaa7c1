"""`python -m molm_megatron.modular stats|prune|drop-layers`: expert statistics, pruning by expert
frequency, and the layer-dropping baselines. `--help` on each command explains it.

    python -m molm_megatron.modular stats --model CKPT --domains-of data/pile --out stats/
    python -m molm_megatron.modular prune --model CKPT --from-stats stats/ --target-share 0.8 0.6 --out pruned/
    python -m molm_megatron.modular drop-layers --model CKPT --target-share 0.8 --mode uniform --out dropped/

Every command refuses an existing output folder unless --overwrite, and writes its outputs into a
temporary folder renamed at the end: a failure leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from molm_megatron.modular.output import atomic_folder, check_new_folder
from molm_megatron.modular.weights import expert_counts

MODEL_HELP = ("starting weights: a pretraining checkpoint folder (checkpoint.dir or one step_* folder, any "
              "parallel layout), a Hugging Face folder in the published MoLM format, or a model file")
STATS_MODEL_HELP = MODEL_HELP + ("; also an EMoE folder (python -m molm_megatron.emoe convert) or a finetune.py "
                                 "checkpoint of one: the gates of its converted FFNs are counted")


def _write_models(models: dict[str, tuple], out: Path, overwrite: bool, dtype: str | None) -> None:
    """Write each (model, record) into out/<name>/ (or out/ itself for the name ''): model.pt (a model
    file), hf/ (a Hugging Face folder) and manipulation.json (what was done); all or nothing."""
    from molm_megatron.hf.convert import DTYPES, export_hf, save_model_file

    with atomic_folder(out, overwrite) as tmp:
        for name, (model, record) in models.items():
            folder = tmp / name if name else tmp
            folder.mkdir(parents=True, exist_ok=True)
            save_model_file(model, folder / "model.pt")
            export_hf(model, folder / "hf", DTYPES.get(dtype))
            (folder / "manipulation.json").write_text(json.dumps(record, indent=1))


def _params_line(before: int, model) -> str:
    after = model.num_params()
    att, mlp = expert_counts(model.config)
    return (f"parameters {before:,} -> {after:,} ({after / before:.1%}); layers {model.config.n_layer}; "
            f"attention experts per layer {att}; MLP experts per layer {mlp}")


def cmd_stats(args: argparse.Namespace) -> None:
    from molm_megatron.modular.stats import domain_prefixes, expert_statistics, write_stats
    from molm_megatron.modular.weights import load_any_model

    out = Path(args.out)
    check_new_folder(out, args.overwrite)
    domains = domain_prefixes(args.data or [], args.domains_of)
    model = load_any_model(args.model)
    device = torch.device(args.device)
    stats = expert_statistics(model.to(device), domains, args.micro_batch_size,
                              args.seq_len or model.training_spec().block_size, args.max_batches, device,
                              args.smoothing)
    stats["source"] = str(args.model)
    write_stats(stats, out, args.overwrite)
    for domain, d in stats["domains"].items():
        print(f"{domain}: {d['tokens']:,} tokens ({d['prefix']})")
    for pair in stats["kl"]:
        print(f"KL({pair['a']} || {pair['b']}) mean over layers {pair['mean']:.4f}")
    print(f"wrote {out}/stats.json, stats.csv, heatmap.png")


def cmd_prune(args: argparse.Namespace) -> None:
    from molm_megatron.modular.prune import importance, prune_experts, select_by_share, select_by_threshold
    from molm_megatron.modular.stats import domain_frequencies, read_stats
    from molm_megatron.modular.weights import load_model

    out = Path(args.out)
    check_new_folder(out, args.overwrite)
    stats = read_stats(args.from_stats)
    model = load_model(args.model)
    if stats["model"]["vocab_size"] != model.config.vocab_size:
        raise ValueError(f"{args.from_stats}: statistics of a model with vocab_size {stats['model']['vocab_size']}, "
                         f"but {args.model} has {model.config.vocab_size}")
    scores = importance(domain_frequencies(stats, args.domain, str(args.from_stats)), args.norm)
    before = model.num_params()
    # Every selection first (each may refuse), then every model, then the writes.
    if args.threshold is not None:
        plans = {"": ({"threshold": args.threshold},
                      select_by_threshold(model, scores, args.threshold, args.min_experts, str(args.from_stats)))}
    else:
        plans = {("" if len(args.target_share) == 1 else f"share_{s:g}"):
                 ({"target_share": s}, select_by_share(model, scores, s, args.min_experts, str(args.from_stats)))
                 for s in args.target_share}
    models = {}
    for name, (how, keep) in plans.items():
        pruned = prune_experts(model, keep)
        record = {"source": str(args.model), "statistics": str(args.from_stats), "domain": args.domain,
                  "norm": args.norm, **how, "params_before": before, "params_after": pruned.num_params(),
                  "kept_experts": keep}
        models[name] = (pruned, record)
        print(f"{name or 'pruned'}: {_params_line(before, pruned)}")
    _write_models(models, out, args.overwrite, args.dtype)
    print(f"wrote {out}")


def cmd_drop_layers(args: argparse.Namespace) -> None:
    from molm_megatron.modular.prune import drop_layers, layers_for_share, layers_to_drop
    from molm_megatron.modular.weights import load_model

    out = Path(args.out)
    check_new_folder(out, args.overwrite)
    model = load_model(args.model)
    cfg = model.config
    drop = (layers_to_drop(cfg.n_layer, args.n, args.mode) if args.n is not None
            else layers_for_share(model, args.target_share, args.mode))
    smaller = drop_layers(model, drop)
    before = model.num_params()
    print(f"dropped layers {drop} ({args.mode}): {_params_line(before, smaller)}")
    record = {"source": str(args.model), "mode": args.mode, "dropped_layers": drop, "params_before": before,
              "params_after": smaller.num_params()}
    _write_models({"": (smaller, record)}, out, args.overwrite, args.dtype)
    print(f"wrote {out}")


def _add_model_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="dtype of the Hugging Face weights (default: keep)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m molm_megatron.modular", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("stats", help="expert frequencies per router on each domain, KL between domains",
                       description="Count the tokens routed to each expert of each router (attention and MLP, "
                                   "every layer) over each domain's data; frequency = count / assignments; "
                                   "KL(P_a || P_b) of the MLP experts between domains per layer and averaged. "
                                   "Writes stats.json, stats.csv and heatmap.png into --out.")
    s.add_argument("--model", required=True, help=STATS_MODEL_HELP)
    s.add_argument("--data", nargs="+", metavar="PREFIX", help="indexed datasets (data_prep outputs, without "
                   ".bin/.idx), one domain each, named by their recorded domain or file name")
    s.add_argument("--domains-of", metavar="PREFIX", help="the output prefix of a data_prep --split-by-domain run: "
                   "every PREFIX_<domain> dataset next to it is one domain")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--micro-batch-size", type=int, default=8, help="parallel streams per forward (default 8)")
    s.add_argument("--seq-len", type=int, default=0, help="tokens per window (default: the model's block_size)")
    s.add_argument("--max-batches", type=int, default=100, help="windows per domain at most (default 100)")
    s.add_argument("--smoothing", type=float, default=0.5, help="pseudo-count per expert in the KL's "
                   "distributions (default 0.5)")
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    s.set_defaults(run=cmd_stats)

    p = sub.add_parser("prune", help="remove rarely used experts into a smaller model",
                       description="Importance of an expert = its frequency in the statistics (one domain, or all "
                                   "domains' counts together) divided by its router's max or sum. Removes the "
                                   "experts under --threshold, or the least important ones until at most "
                                   "--target-share of the parameters remain (several shares: one model each, "
                                   "in --out/share_<s>/); every router keeps at least --min-experts. Writes "
                                   "model.pt (a model file, per-layer expert counts in its config), hf/ (a "
                                   "Hugging Face folder) and manipulation.json.")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--from-stats", required=True, help="stats.json (or its folder) written by the stats command "
                   "for this model")
    p.add_argument("--domain", default=None, help="domain of the statistics to use (default: all together)")
    p.add_argument("--norm", choices=("max", "sum"), default="max", help="normalise frequencies by the router's "
                   "max (the paper's default) or sum")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--threshold", type=float, help="remove experts whose normalised frequency is below this")
    how.add_argument("--target-share", type=float, nargs="+", help="share(s) of the parameters to keep, e.g. 0.8 0.6")
    p.add_argument("--min-experts", type=int, default=None, help="experts every router keeps at least "
                   "(default: its top-k)")
    _add_model_output_args(p)
    p.set_defaults(run=cmd_prune)

    d = sub.add_parser("drop-layers", help="the layer-dropping baselines: drop the top or evenly spread layers",
                       description="Drop the top n layers (--mode top) or n layers spread evenly (--mode uniform), "
                                   "n given or the fewest that leave at most --target-share of the parameters "
                                   "(to compare with pruning at the same share). Writes model.pt, hf/ and "
                                   "manipulation.json.")
    d.add_argument("--model", required=True, help=MODEL_HELP)
    d.add_argument("--mode", choices=("top", "uniform"), required=True, help="which layers go")
    n = d.add_mutually_exclusive_group(required=True)
    n.add_argument("--n", type=int, help="number of layers to drop")
    n.add_argument("--target-share", type=float, help="share of the parameters to keep")
    _add_model_output_args(d)
    d.set_defaults(run=cmd_drop_layers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except ValueError as e:
        parser.error(str(e))  # usage and the message, exit 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
