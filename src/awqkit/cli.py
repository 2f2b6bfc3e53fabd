"""The awqkit command: argument parsing and printing over the Python API.

Each command imports its own modules when it runs, so `awqkit --help` and a usage error do not
wait seconds for torch and transformers to load.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import os
import signal
import sys
import typing
from pathlib import Path
from typing import Any, NoReturn

from awqkit.config import DEFAULT_MAX_SHARD_SIZE, QuantizeConfig
from awqkit.errors import WorkerStopped


def _config_from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """A config dataclass from the options named like its fields; ``overrides`` for the rest."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **overrides})


def add_config_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One option per field of the config dataclass ``cls``: its type, choices, default and help."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag, kind, help = "--" + f.name.replace("_", "-"), hints[f.name], f.metadata["help"]
        if kind is bool:
            parser.add_argument(flag, action="store_true", help=help)
        elif typing.get_origin(kind) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(kind), default=f.default, help=help)
        else:  # int, float, str or an optional one of them
            base = next(t for t in (int, float, str) if kind is t or t in typing.get_args(kind))
            parser.add_argument(flag, type=base, default=f.default, help=help, metavar=f.metadata["metavar"])


def _quantize_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a causal LM with AWQ and write a loadable folder")
    p.add_argument("model", help="Hugging Face model id or local folder")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    add_config_options(p, QuantizeConfig)
    p.add_argument("--dtype", default="auto", help="load dtype: auto (as saved), bfloat16, float16, float32")
    p.add_argument(
        "--device",
        default="auto",
        help="where each block, its activations and the search run: auto (an accelerator when torch sees one), "
        "cpu, cuda, cuda:N, xpu, mps",
    )
    p.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help="largest output shard, as save_pretrained's (e.g. 5GB, 500MB); whole blocks per shard",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing model folder at --out (never a file, the current folder or the input)",
    )


def _run_quantize(args: argparse.Namespace) -> int:
    from awqkit.pipeline import quantize

    config = _config_from_args(QuantizeConfig, args)
    result = quantize(
        args.model, args.out, config, dtype=args.dtype, device=args.device, max_shard_size=args.max_shard_size,
        overwrite=args.overwrite, progress=not args.quiet,
    )  # fmt: skip
    alphas = [layer.alpha for layer in result.layers.values()]
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, worker 0 wrote the folder
        fallbacks = [layer.fallback for layer in result.layers.values() if layer.fallback is not None]
        rtn = fallbacks.count("rtn")
        said = f"; {rtn} saw fewer than {config.min_tokens} tokens and got RTN" if rtn else ""
        if len(fallbacks) > rtn:
            said += f"; {len(fallbacks) - rtn} rounded to nearest where GPTQ's H could not be factored"
        print(f"wrote {args.out}: {len(alphas)} linears, mean alpha {sum(alphas) / len(alphas):.3f}{said}")
    return 0


def _eval_parser(sub: argparse._SubParsersAction) -> None:
    from awqkit.eval.evaluate import EvalConfig
    from awqkit.eval.windows import MODES

    defaults = EvalConfig()
    p = sub.add_parser("eval", help="perplexity of models on the same token windows, each compared with the first")
    p.add_argument("models", nargs="+", metavar="MODEL", help="Hugging Face model ids or local folders")
    p.add_argument(
        "--datasets",
        nargs="+",
        metavar="CORPUS",
        default=[",".join(defaults.datasets)],
        help="corpus names or paths (.txt/.gz/.jsonl/.parquet), comma- or space-separated",
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        default=defaults.mode,
        help="stream: the text tokenized once and cut into windows; samples: random paragraphs, one per window",
    )
    p.add_argument("--seq-len", type=int, default=defaults.seq_len, help="tokens per window, BOS included")
    p.add_argument("--n-samples", type=int, default=defaults.n_samples, help="paragraphs drawn in samples mode")
    p.add_argument("--seed", type=int, default=defaults.seed, help="for drawing samples and for the bootstrap")
    p.add_argument("--dtype", default=defaults.dtype, help="auto (as saved), bfloat16, float16, float32")
    p.add_argument("--max-windows", type=int, help="score only the first N windows per dataset")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="windows per forward pass")
    p.add_argument("--cache-dir", type=Path, default=defaults.cache_dir, help="per-window NLL cache, for resuming")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the per-window NLL cache")
    p.add_argument("--json", metavar="OUT", help="write the full report, per-window NLLs included")
    p.add_argument("--plot", metavar="OUT.png", help="write a bar chart of perplexities with 95%% CIs")


def _run_eval(args: argparse.Namespace) -> int:
    from awqkit.eval.evaluate import EvalConfig, evaluate
    from awqkit.eval.report import format_table, plot_report
    from awqkit.io.publish import check_output_file

    for output in filter(None, (args.json, args.plot)):
        check_output_file(output)
    if args.plot:
        if importlib.util.find_spec("matplotlib") is None:
            raise ImportError("--plot draws with matplotlib: pip install 'awqkit[plot]'")
    config = _config_from_args(
        EvalConfig,
        args,
        datasets=tuple(name for spec in args.datasets for name in spec.split(",") if name),
        cache_dir=None if args.no_cache else args.cache_dir,
    )
    report = evaluate(args.models, config, progress=not args.quiet)
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot_report(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _diff_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "diff",
        help="compare two safetensors checkpoints tensor by tensor (exit 0: identical, 1: differ, 2: error)",
    )
    p.add_argument("a", metavar="A", help="checkpoint folder or .safetensors file")
    p.add_argument("b", metavar="B", help="checkpoint folder or .safetensors file")
    p.add_argument("--json", metavar="OUT", help="write every tensor's numbers and the per-layer summary")


def _run_diff(args: argparse.Namespace) -> int:
    from awqkit.io.publish import check_output_file
    from awqkit.tools.diff import diff_checkpoints, format_diff

    if args.json:
        check_output_file(args.json)
    diff = diff_checkpoints(args.a, args.b)
    print(format_diff(diff))
    if args.json:
        Path(args.json).write_text(json.dumps(diff.to_json(), indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0 if diff.identical else 1


def _info_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="format, bits, group size, size and bits per weight of a checkpoint folder")
    p.add_argument("folder", metavar="DIR")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def _run_info(args: argparse.Namespace) -> int:
    from awqkit.tools.info import checkpoint_info, format_info, info_json

    info = checkpoint_info(args.folder)
    print(json.dumps(info_json(info), indent=1) if args.json else format_info(info))
    return 0


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one stderr line and exit 2, like every other failure (--help has the usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="awqkit", description=__doc__)
    parser.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_quantize_parser, _eval_parser, _diff_parser, _info_parser):
        add(sub)
    # --quiet also works after the command; SUPPRESS keeps a top-level --quiet from being reset.
    for command in sub.choices.values():
        command.add_argument(
            "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars or log lines"
        )
    return parser


COMMANDS = {"quantize": _run_quantize, "eval": _run_eval, "diff": _run_diff, "info": _run_info}


class _StoppedByTorchrun(Exception):
    """SIGTERM from torchrun's agent: another worker failed, so this one is stopped."""


def _stopped_by_torchrun(signum: int, frame: Any) -> None:
    raise _StoppedByTorchrun


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help (0) or a usage error (2, one line already printed)
        return done.code if isinstance(done.code, int) else 2
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="awqkit: %(message)s")
    if args.quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    # Bad input, file system trouble (OSError covers missing, existing, not-a-folder and
    # permission errors; ValueError covers malformed JSON) and a package a checkpoint's format
    # needs but is not installed (ImportError) end as one line; anything else is a bug and keeps
    # its traceback.
    from safetensors import SafetensorError

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # torchrun stops the other workers with SIGTERM when one fails: say so, once each, in one line.
        signal.signal(signal.SIGTERM, _stopped_by_torchrun)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, OSError, SafetensorError, ImportError) as error:
        # Some messages (transformers' among them) span lines; the contract is one line.
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"awqkit: error: {message or type(error).__name__}", file=sys.stderr)
        return 2
    except WorkerStopped as error:  # under torchrun
        print(f"awqkit: error: worker {os.environ.get('RANK')}: {error}", file=sys.stderr)
        return 2
    except _StoppedByTorchrun:
        print(
            f"awqkit: error: worker {os.environ.get('RANK')}: stopped by torchrun, another worker of this run stopped",
            file=sys.stderr,
        )
        return 143
    except KeyboardInterrupt:
        # A quantize run keeps its finished blocks: the same command continues from them.
        print("awqkit: interrupted; run the same command again to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
