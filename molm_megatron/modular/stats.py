"""Expert statistics: how often each expert of each router is chosen on a dataset, per domain, and how
different the domains' expert distributions are (ModuleFormer, Shen et al. 2023, section 5.3 and
Fig. 2).

For every router (attention and MLP of every layer; of an EMoE model, the gate of every converted
FFN): count = tokens routed to expert e (each valid token makes k assignments), frequency = count /
assignments. Between domains a and b, per layer,
KL(P_a || P_b) of the MLP experts' frequency distributions, and its mean over layers. Frequencies
for the KL are smoothed additively (`smoothing` pseudo-counts per expert, 0.5 by default:
Jeffreys' prior), so an expert unused in one domain gives a finite divergence; the JSON records the
value used.

Outputs of `write_stats` (one folder, written under a temporary name and renamed):
`stats.json` (counts, frequencies, KL), `stats.csv` (one row per domain, router and expert) and
`heatmap.png` (MLP expert frequency per layer for each domain, and the layer-averaged KL matrix).

Legend: E experts of a router, B rows, T tokens of a window.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import torch

from molm_megatron.emoe.training import EMoECausalLM
from molm_megatron.eval.expert_stats import router_modules
from molm_megatron.model import MoLM
from molm_megatron.modular.output import atomic_folder
from molm_megatron.modular.weights import parse_router

STATS_VERSION = 1


def domain_prefixes(prefixes: list[str], split_output: str | None = None) -> dict[str, str]:
    """Domain name -> indexed-dataset prefix.

    `prefixes`: one domain each, named by the `domain` data_prep recorded in `<prefix>.json`, else
    by the file name. `split_output`: the output prefix P of a `data_prep --split-by-domain` run,
    whose domains are the `P_<domain>` datasets next to it.
    """
    found = list(prefixes)
    if split_output:
        base = Path(split_output)
        found += sorted(str(p)[: -len(".json")] for p in base.parent.glob(f"{base.name}_*.json")
                        if not p.name.endswith(".summary.json") and Path(str(p)[: -len(".json")] + ".idx").is_file())
        if len(found) == len(prefixes):
            raise ValueError(f"{split_output}: no per-domain datasets {base.name}_<domain>.bin/.idx/.json next to it "
                             "(written by data_prep with --split-by-domain)")
    if not found:
        raise ValueError("no data: give --data PREFIX [PREFIX ...] or --domains-of PREFIX")
    out: dict[str, str] = {}
    for prefix in found:
        meta_path = Path(prefix + ".json")
        if not meta_path.is_file():
            raise ValueError(f"{prefix}: no {meta_path.name} (not an indexed dataset written by data_prep)")
        name = json.loads(meta_path.read_text()).get("domain") or Path(prefix).name
        if name in out:
            raise ValueError(f"domain {name!r} appears twice ({out[name]} and {prefix})")
        out[name] = prefix
    return out


@torch.no_grad()
def count_experts(model: MoLM | EMoECausalLM, prefix: str, micro_batch_size: int, seq_len: int, max_batches: int,
                  device: torch.device) -> tuple[dict[str, torch.Tensor], int]:
    """Tokens routed to each expert of every router over one stream-ordered pass of the dataset
    `prefix` (at most `max_batches` windows of [micro_batch_size, seq_len], with Transformer-XL
    memory as in training); returns (router name -> int64 counts [E], tokens counted)."""
    from molm_megatron.data import IndexedTokenSource, validation_batches
    from molm_megatron.training.memory import StreamMemory

    meta = json.loads(Path(prefix + ".json").read_text())
    if meta["vocab_size"] > model.config.vocab_size:
        raise ValueError(f"{prefix}: the data's vocabulary ({meta['vocab_size']} ids) exceeds the model's "
                         f"(model.vocab_size {model.config.vocab_size}); was it made with another tokenizer?")
    source = IndexedTokenSource([prefix], meta["eod_id"])
    model.eval()
    counts: dict[str, torch.Tensor] = {}
    tokens, stream = 0, StreamMemory(device)
    for batch in itertools.islice(validation_batches(source, micro_batch_size, seq_len), max_batches):
        memory, mask_BS = stream.inputs(batch.reset_memory, seq_len)
        out = model(batch.input_ids.to(device), attention_mask=mask_BS, memory=memory, collect_expert_stats=True)
        stream.remember(out.memory, mask_BS)
        for name, count_E in out.expert_stats.items():
            counts[name] = counts.get(name, 0) + count_E.cpu().long()
        tokens += batch.input_ids.numel()
    if not tokens:
        raise ValueError(f"{prefix}: too short for one window of {micro_batch_size} x {seq_len} tokens")
    return counts, tokens


def frequencies(counts_E: torch.Tensor) -> list[float]:
    """count / assignments of one router."""
    total = int(counts_E.sum())
    return [c / total if total else 0.0 for c in counts_E.tolist()]


def kl_divergence(counts_p: list[int], counts_q: list[int], smoothing: float) -> float:
    """KL(P || Q) in nats of two routers' expert distributions, P = (count + s) / (sum + s E)."""
    if len(counts_p) != len(counts_q):
        raise ValueError(f"KL between routers of {len(counts_p)} and {len(counts_q)} experts")
    E = len(counts_p)
    sp, sq = sum(counts_p) + smoothing * E, sum(counts_q) + smoothing * E
    kl = 0.0
    for cp, cq in zip(counts_p, counts_q):
        p, q = (cp + smoothing) / sp, (cq + smoothing) / sq
        if p > 0:
            kl += p * math.log(p / q)
    return kl


def mlp_routers(routers: list[str]) -> list[str]:
    """The MLP routers ('layer{N}.mlpf') among `routers`, in their order: one per layer that has
    MLP experts (every layer of a MoLM, the converted layers of an EMoE model)."""
    return [r for r in routers if r.endswith(".mlpf")]


def domain_kl(domain_counts: dict[str, dict[str, list[int]]], routers: list[str], smoothing: float) -> list[dict]:
    """KL(P_a || P_b) of the MLP routers for every ordered pair of domains: per layer (`layers`
    names each entry's layer) and averaged."""
    mlp = mlp_routers(routers)
    layers = [parse_router(r)[0] for r in mlp]
    pairs = []
    for a, b in itertools.permutations(domain_counts, 2):
        per_layer = [kl_divergence(domain_counts[a][r], domain_counts[b][r], smoothing) for r in mlp]
        pairs.append({"a": a, "b": b, "layers": layers, "per_layer": per_layer, "mean": sum(per_layer) / len(mlp)})
    return pairs


def expert_statistics(model: MoLM | EMoECausalLM, domains: dict[str, str], micro_batch_size: int, seq_len: int,
                      max_batches: int, device: torch.device, smoothing: float = 0.5) -> dict:
    """The statistics of `model` (a MoLM, or an EMoE model's trainer-facing module) on each domain
    (name -> prefix) as a JSON-ready dict."""
    routers = list(router_modules(model))
    if not mlp_routers(routers):
        raise ValueError(f"the model has no MLP experts to count (a dense {model.config.model_type} model?)")
    result = {"version": STATS_VERSION, "model": {"vocab_size": model.config.vocab_size},
              "routers": routers, "smoothing": smoothing, "domains": {}}
    counts = {}
    for name, prefix in domains.items():
        c, tokens = count_experts(model, prefix, micro_batch_size, seq_len, max_batches, device)
        counts[name] = {router: c[router].tolist() for router in result["routers"]}
        result["domains"][name] = {"prefix": prefix, "tokens": tokens, "counts": counts[name],
                                   "frequency": {router: frequencies(c[router]) for router in result["routers"]}}
    result["kl"] = domain_kl(counts, routers, smoothing)
    return result


def read_stats(path: str | Path) -> dict:
    """A stats.json (or the folder holding it); ValueError naming the file when it is not one."""
    path = Path(path)
    if path.is_dir():
        path = path / "stats.json"
    try:
        stats = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read expert statistics ({e})") from None
    if not isinstance(stats, dict) or stats.get("version") != STATS_VERSION or not stats.get("domains"):
        raise ValueError(f"{path}: not expert statistics written by `python -m molm_megatron.modular stats`")
    return stats


def domain_frequencies(stats: dict, domain: str | None, where: str) -> dict[str, list[float]]:
    """Router -> expert frequencies of one domain, or of all domains' counts together (None)."""
    domains = stats["domains"]
    if domain is not None:
        if domain not in domains:
            raise ValueError(f"{where}: unknown domain {domain!r}; the statistics have {', '.join(domains)}")
        return domains[domain]["frequency"]
    out = {}
    for router in stats["routers"]:
        summed = torch.tensor([domains[d]["counts"][router] for d in domains]).sum(0)
        out[router] = frequencies(summed)
    return out


def write_stats(stats: dict, out_dir: str | Path, overwrite: bool = False) -> Path:
    """stats.json, stats.csv and heatmap.png in `out_dir`, all or nothing (temporary folder, rename)."""
    with atomic_folder(out_dir, overwrite) as tmp:
        (tmp / "stats.json").write_text(json.dumps(stats, indent=1))
        with open(tmp / "stats.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["domain", "layer", "router", "expert", "count", "frequency"])
            for domain, d in stats["domains"].items():
                for router in stats["routers"]:
                    layer, kind = parse_router(router)
                    for e, (c, fr) in enumerate(zip(d["counts"][router], d["frequency"][router])):
                        w.writerow([domain, layer, kind, e, c, f"{fr:.6g}"])
        _heatmap(stats, tmp / "heatmap.png")
    return Path(out_dir)


def _heatmap(stats: dict, path: Path) -> None:
    """One panel per domain (MLP expert frequency, layers x experts), plus the mean-KL matrix."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    domains, mlp = list(stats["domains"]), mlp_routers(stats["routers"])
    panels = len(domains) + (1 if len(domains) > 1 else 0)
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 0.35 * len(mlp) + 2.5), squeeze=False)
    for ax, domain in zip(axes[0], domains):
        rows = [stats["domains"][domain]["frequency"][r] for r in mlp]
        width = max(len(r) for r in rows)
        grid = [r + [float("nan")] * (width - len(r)) for r in rows]  # pruned layers may be narrower
        im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set(title=f"{domain}: MLP expert frequency", xlabel="expert", ylabel="layer", yticks=range(len(mlp)))
        ax.set_yticklabels([parse_router(r)[0] for r in mlp])
        fig.colorbar(im, ax=ax)
    if len(domains) > 1:
        mean = {(p["a"], p["b"]): p["mean"] for p in stats["kl"]}
        grid = [[0.0 if a == b else mean[(a, b)] for b in domains] for a in domains]
        ax = axes[0][-1]
        im = ax.imshow(grid, cmap="magma")
        ax.set(title="KL(P_row || P_col), mean over layers", xticks=range(len(domains)), yticks=range(len(domains)))
        ax.set_xticklabels(domains, rotation=45, ha="right")
        ax.set_yticklabels(domains)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
