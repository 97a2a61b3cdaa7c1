"""Command line of EMoE: `python -m molm_megatron.emoe {convert,export-dense} --help`."""

from __future__ import annotations

import argparse
import sys

from molm_megatron.emoe.layer import ARCHITECTURES


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer indices like '0,2,4', got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m molm_megatron.emoe",
        description="Emergent MoE (Qiu et al., 2024): split the FFNs of a dense Hugging Face model into experts "
                    "by balanced k-means of their key vectors, gated by the averaged keys (no new parameters).")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser(
        "convert", help="dense folder -> EMoE folder",
        description=f"Convert a local dense Hugging Face folder ({', '.join(ARCHITECTURES)}) into an EMoE folder: "
                    "plain transformers loads it as the dense model (neurons permuted, same function); after "
                    "`import molm_megatron`, AutoModelForCausalLM loads it with the avg-k gating.")
    c.add_argument("--model", required=True, help="the dense model's local folder (config.json + weights)")
    c.add_argument("--out", required=True, help="the EMoE folder to write (must not exist)")
    c.add_argument("--experts", type=int, default=64, help="experts per converted FFN (d_ff must divide by it)")
    c.add_argument("--top-k", type=int, default=16, help="experts per token, weight 1 each (<= --experts)")
    c.add_argument("--layers", type=_int_list, default=None,
                   help="layers to convert, 0-based, e.g. '0,2,4' (default: all, or --layer-start/--layer-stride)")
    c.add_argument("--layer-start", type=int, default=None, help="first layer to convert (with --layer-stride)")
    c.add_argument("--layer-stride", type=int, default=None, help="convert every n-th layer from --layer-start")
    c.add_argument("--computation", choices=("sparse", "masked"), default="sparse",
                   help="sparse: only the chosen experts (scattered-expert kernels); masked: the dense FFN with "
                        "the unchosen neurons zeroed (the reference)")
    c.add_argument("--seed", type=int, default=0, help="seed of the balanced k-means")
    c.add_argument("--n-init", type=int, default=10, help="k-means restarts (the best is kept)")
    c.add_argument("--max-iter", type=int, default=300, help="k-means iterations per restart")
    c.add_argument("--cache-dir", default=None,
                   help="where k-means labels are kept per layer (default: <out>.labels); a rerun reuses them")
    e = sub.add_parser("export-dense", help="EMoE folder (e.g. fine-tuned) -> plain dense folder",
                       description="Write an EMoE folder's weights as a plain dense folder (no emoe entry): "
                                   "'train as EMoE, ship dense'.")
    e.add_argument("--model", required=True, help="the EMoE folder")
    e.add_argument("--out", required=True, help="the dense folder to write (must not exist)")
    args = parser.parse_args(argv)

    from molm_megatron.emoe.convert import convert, export_dense

    try:
        if args.command == "convert":
            convert(args.model, args.out, args.experts, args.top_k, args.layers, args.layer_start, args.layer_stride,
                    args.seed, args.n_init, args.max_iter, args.computation, args.cache_dir)
        else:
            from transformers import AutoModelForCausalLM

            import molm_megatron.emoe  # noqa: F401  (registers the EMoE classes)

            export_dense(AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True, dtype="auto"),
                         args.out)
            print(f"wrote {args.out}")
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
