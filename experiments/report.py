"""The result tables of EXPERIMENTS.md, made from the experiments' results.json files.

    python -m experiments.report --out OUT                      # OUT/EXPERIMENTS_results.md
    python -m experiments.report --out OUT --update EXPERIMENTS.md --figures experiments/results/gpu

With `--update`, each experiment's block between `<!-- results:<experiment>:<scale> -->` and
`<!-- /results:<experiment>:<scale> -->` in that file is replaced (appended at the end when the file
has no such block yet), and the experiment's plot and results.json are copied into `--figures`, which
the block's picture link points to.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
from pathlib import Path

EXPERIMENTS = ("attention", "modularity", "continual", "pruning", "emoe")
TITLES = {"attention": "Attention and load balancing", "modularity": "Domain modularity",
          "continual": "Inserting experts vs forgetting", "pruning": "Pruning", "emoe": "EMoE vs dense fine-tuning"}


def num(x, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def spread(s: dict, digits: int = 4) -> str:
    """mean ± std (n) of a mean_spread record."""
    if not s or s.get("mean") is None:
        return "-"
    return f"{s['mean']:.{digits}g}" + (f" ± {s['std']:.2g} (n={s['n']})" if s["n"] > 1 else "")


def settings_line(record: dict) -> str:
    s = record["scale"]
    tokens = s["micro_batch_size"] * s["model"]["block_size"]
    model = ", ".join(f"{k} {v}" for k, v in s["model"].items())
    return (f"preset `{s['preset']}` with {model}; pretraining {s['steps']} steps of {tokens} tokens "
            f"(micro-batch {s['micro_batch_size']}), peak LR {s['lr']:g}, warmup {s['warmup_steps']}; fine-tuning "
            f"{s['finetune_steps']} steps at LR {s['finetune_lr']:g}; seeds {list(s['seeds'])}")


def problems(record: dict) -> list[str]:
    """Lines naming the commands that failed, were stopped at the budget, or were skipped."""
    out = []
    for r in record["runs"]:
        if r["rc"] is None:
            out.append(f"`{r['name']}` skipped: the time budget was spent")
        elif r["rc"] == 75:
            out.append(f"`{r['name']}` stopped at the time budget (checkpoint saved; fewer steps than planned)")
        elif r["rc"] == -signal.SIGTERM:
            out.append(f"`{r['name']}` stopped at the time budget before it finished")
        elif r["rc"] != 0:
            out.append(f"`{r['name']}` failed with exit code {r['rc']} (log: {Path(r['log']).name})")
    if "error" in record["results"]:
        out.append("the experiment script failed: " + record["results"]["error"].strip().splitlines()[-1])
    return out


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def attention_table(r: dict) -> list[str]:
    mults = sorted({m for v in r["variants"].values() for m in v["extrapolation_ppl"]}, key=int)
    header = ["variant", "final validation ppl", "attention load balance", "MLP load balance",
              *[f"held-out {r['extrapolation_text']} ppl, {m}x segment" for m in mults]]
    rows = [[name, spread(v["final_valid_ppl"]), spread(v["att_load_balance"], 3),
             spread(v["mlp_load_balance"], 3), *[spread(v["extrapolation_ppl"].get(m)) for m in mults]]
            for name, v in r["variants"].items()]
    return table(header, rows) + ["", "Load balance: router load entropy over log E at the end of training (1 = "
                                      f"even). Extrapolation: segments of m x {r['training_segment']} tokens with as "
                                      "much memory."]


def modularity_table(r: dict) -> list[str]:
    pairs = sorted({p for m in r["models"].values() for p in m["kl"]})
    header = ["model", *[f"KL({p.replace('||', ' ‖ ')})" for p in pairs], "mean"]
    rows = []
    for name, m in r["models"].items():
        values = [m["kl"][p]["mean"] for p in pairs if p in m["kl"]]
        rows.append([name, *[num(m["kl"].get(p, {}).get("mean"), 3) for p in pairs],
                     num(sum(values) / len(values), 3) if values else "-"])
    return table(header, rows) + ["", "KL of the MLP experts' frequency distributions between held-out domains, "
                                      "mean over layers (nats; modular stats, 0.5 pseudo-counts per expert)."]


def continual_table(r: dict) -> list[str]:
    domains = [*r["old_domains"], r["new_domain"]]
    header = ["arm", *[f"{d} ppl ({'old' if d in r['old_domains'] else 'new'})" for d in domains],
              "share routed to new experts", "steps"]
    rows = [[name, *[num(a["ppl"].get(d)) for d in domains], num(a["new_share"], 3), num(a["final_step"])]
            for name, a in r["arms"].items()]
    return table(header, rows)


def pruning_table(r: dict) -> list[str]:
    lines = []
    for name, m in r["models"].items():
        lines += [f"Fine-tuned `{name}` (final concentration loss {num(m['concentration_loss'], 3)}):", ""]
        points = sorted(m["points"], key=lambda p: (p["kind"], -(p["params_share"] or 0)))
        lines += table(["method", "parameters kept", f"held-out {r['task']} ppl"],
                       [[p["variant"], num(p["params_share"], 3), num(p["ppl"])] for p in points])
        he = m.get("humaneval")
        if he:
            lines += ["", f"HumanEval (greedy, unpruned): pass@1 {num(he.get('pass@1'), 3)} on {he.get('problems')} "
                          f"problems."]
        lines.append("")
    return lines


def data_section(manifest: dict) -> str:
    rows = [[d, m["source"], f"{m['train_documents']} / {m['heldout_documents']}", f"{m['train_tokens']:,}",
             f"{m['heldout_tokens']:,}"] for d, m in manifest["domains"].items()]
    return "\n".join([f"Data of the `{manifest['scale']}` scale (vocabulary {manifest['vocab_size']}):", ""]
                     + table(["domain", "source", "source documents train / held out", "training tokens", "held-out tokens"],
                             rows)) + "\n"


def emoe_table(r: dict) -> list[str]:
    header = ["arm", *[f"{d} ppl ({'in domain' if d == r['task'] else 'out of domain'})" for d in r["domains"]]]
    return table(header, [[arm, *[spread(by[d]) for d in r["domains"]]] for arm, by in r["arms"].items()]) + [
        "", f"EMoE: {r['top_k']} of {r['experts']} experts per token in every other FFN layer; mean ± std over the "
            "fine-tuning seeds."]


TABLES = {"attention": attention_table, "modularity": modularity_table, "continual": continual_table,
          "pruning": pruning_table, "emoe": emoe_table}


def section(name: str, record: dict, figure: str | None) -> str:
    lines = [f"**{TITLES[name]}, scale `{record['scale']['name']}`.** Command: `{record['command']}`. "
             f"Device: {record['device']}. Date: {record['date']}.", "",
             f"Settings: {settings_line(record)}.", ""]
    if "error" not in record["results"]:
        lines += TABLES[name](record["results"]) + [""]
    if figure:
        lines += [f"![{name}]({figure})", ""]
    issues = problems(record)
    if issues:
        lines += ["Incomplete:"] + [f"- {line}" for line in issues] + [""]
    return "\n".join(lines).rstrip() + "\n"


def update_block(text: str, key: str, body: str) -> str:
    begin, end = f"<!-- results:{key} -->", f"<!-- /results:{key} -->"
    block = f"{begin}\n{body}{end}"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text)
    return text.rstrip() + "\n\n" + block + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="output folder of python -m experiments.run_all")
    p.add_argument("--update", type=Path, default=None, help="markdown file whose result blocks to replace")
    p.add_argument("--figures", type=Path, default=None, help="with --update: folder to copy plots and results.json to")
    args = p.parse_args(argv)
    if args.update and not args.figures:
        p.error("--update needs --figures (the folder its picture links point to)")
    sections, text = [], args.update.read_text() if args.update else None
    if (args.out / "data.json").is_file():
        manifest = json.loads((args.out / "data.json").read_text())
        sections.append(data_section(manifest))
        if text is not None:
            text = update_block(text, f"data:{manifest['scale']}", sections[-1])
    for name in EXPERIMENTS:
        path = args.out / name / "results.json"
        if not path.is_file():
            continue
        record = json.loads(path.read_text())
        figure = args.out / name / f"{name}.png"
        link = None
        if args.update:
            args.figures.mkdir(parents=True, exist_ok=True)
            if figure.is_file():
                shutil.copyfile(figure, args.figures / figure.name)
                link = os.path.relpath(args.figures / figure.name, args.update.parent)
            shutil.copyfile(path, args.figures / f"{name}.json")
        elif figure.is_file():
            link = os.path.relpath(figure, args.out)
        body = section(name, record, link)
        sections.append(body)
        if text is not None:
            text = update_block(text, f"{name}:{record['scale']['name']}", body)
    (args.out / "EXPERIMENTS_results.md").write_text("\n".join(sections))
    if args.update:
        args.update.write_text(text)
    print("\n".join(sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
