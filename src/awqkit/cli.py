"""The awqkit command: argument parsing and printing over the Python API."""

from __future__ import annotations

import argparse
import logging
import sys

from awqkit.pipeline import QuantizeConfig

DEFAULTS = QuantizeConfig()


def _quantize_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a causal LM with AWQ and write a loadable folder")
    p.add_argument("model", help="Hugging Face model id or local folder")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--bits", type=int, default=DEFAULTS.bits)
    p.add_argument("--group-size", type=int, default=DEFAULTS.group_size)
    p.add_argument("--n-grid", type=int, default=DEFAULTS.n_grid)
    p.add_argument("--n-calib", type=int, default=DEFAULTS.n_calib)
    p.add_argument("--seq-len", type=int, default=DEFAULTS.seq_len)
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument("--rounding", choices=["nearest", "greedy"], default=DEFAULTS.rounding)
    p.add_argument("--outlier-percent", type=float, default=DEFAULTS.outlier_percent)
    p.add_argument("--max-search-tokens", type=int, default=DEFAULTS.max_search_tokens)
    p.add_argument("--calib-data", default=DEFAULTS.calib_data, help="corpus name or path (.txt/.gz/.jsonl/.parquet)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="calibration windows per forward")
    p.add_argument("--dtype", default="auto", help="load dtype: auto (as saved), bfloat16, float16, float32")
    p.add_argument("--overwrite", action="store_true")


def _run_quantize(args: argparse.Namespace) -> int:
    from awqkit.pipeline import quantize

    config = QuantizeConfig(
        bits=args.bits,
        group_size=args.group_size,
        n_grid=args.n_grid,
        n_calib=args.n_calib,
        seq_len=args.seq_len,
        seed=args.seed,
        rounding=args.rounding,
        outlier_percent=args.outlier_percent,
        max_search_tokens=args.max_search_tokens,
        calib_data=args.calib_data,
        batch_size=args.batch_size,
    )
    result = quantize(args.model, args.out, config, dtype=args.dtype, overwrite=args.overwrite, progress=not args.quiet)
    alphas = [layer.alpha for layer in result.layers.values()]
    print(f"wrote {args.out}: {len(alphas)} linears, mean alpha {sum(alphas) / len(alphas):.3f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="awqkit", description=__doc__)
    parser.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    sub = parser.add_subparsers(dest="command", required=True)
    _quantize_parser(sub)
    return parser


COMMANDS = {"quantize": _run_quantize}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="awqkit: %(message)s")
    if args.quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"awqkit: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
