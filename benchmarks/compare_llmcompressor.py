"""awqkit against llm-compressor's AWQ, side by side: quantize time, CPU time, peak RSS, perplexity.

    benchmarks/compare_llmcompressor.sh            # sets up both environments, then runs this
    benchmarks/compare_llmcompressor.sh --smoke    # the same code path at toy sizes

Both tools read the same calibration token windows (one .npy file per model), use the same bits,
group size, grid size and seed, and every output is scored by ``awqkit eval`` on the same
held-out windows, llm-compressor's first so each CI is a paired difference against it. Each
quantize run is its own process, started through harness.py's launcher: wall, CPU (user +
system) and peak RSS from ``os.wait4``, the peak that process's own and not this one's. awqkit's
stage seconds come from the record it writes into its output (awqkit-run.json), llm-compressor's
from ``llmcompressor_awq.py --timings``. Runs are interleaved and repeated, and the medians are
reported. llm-compressor runs in its own virtual environment (it pins an older transformers)
through ``llmcompressor_awq.py``.

Also printed: awqkit's stages against a FLOP floor from this machine's bf16 and fp32 matmul rates
(how its time grows with the work: ``python -m benchmarks.awqkit_scaling``). The comparison table
is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from awqkit.config import QuantizeConfig
from awqkit.markdown import markdown_table
from awqkit.runtime import cpu_name
from benchmarks.harness import (
    RATE_KEYS,
    ROOT,
    Run,
    Work,
    awqkit_command,
    check_launcher,
    child_env,
    contention_notes,
    decoder_linears,
    matmul_gflops,
    measured_before,
    median_run,
    model_folder,
    model_label,
    paired_ci,
    peaks,
    ratio,
    read_awqkit_record,
    rotated,
    rounding_s,
    run_measured,
    source_state,
    work_summary,
    write_report,
)

LLMC_PYTHON = ROOT / "benchmarks" / ".venv-llmc" / "bin" / "python"
LLMC = "llmc"  # the method name of llm-compressor's AWQ in every table

# awqkit methods: name -> `awqkit quantize` options, given after the common ones (the last wins).
# rtn: alpha 0 alone, s = 1. shared-*: one s per input, folded, chosen by the attention/MLP output
# error, which is what llm-compressor does, so they are the like-for-like match.
AWQKIT_METHODS = {
    "rtn": ["--n-grid", "0"],
    "nearest": ["--rounding", "nearest"],
    "greedy": ["--rounding", "greedy"],
    "shared-nearest": ["--scales", "shared", "--objective", "module", "--rounding", "nearest"],
    "shared-greedy": ["--scales", "shared", "--objective", "module", "--rounding", "greedy"],
    # the accuracy knobs, each on top of nearest or greedy rounding
    "clip": ["--rounding", "nearest", "--clip"],
    "duo": ["--rounding", "nearest", "--scaling", "duo"],
    "both": ["--rounding", "nearest", "--scaling", "both"],
    "greedy-clip": ["--rounding", "greedy", "--clip"],
    "greedy-both-clip": ["--rounding", "greedy", "--scaling", "both", "--clip"],
    "shared-greedy-clip": ["--scales", "shared", "--objective", "module", "--rounding", "greedy", "--clip"],
    "shared-greedy-both-clip": [
        "--scales", "shared", "--objective", "module", "--rounding", "greedy", "--scaling", "both", "--clip",
    ],
    # second order: the Gram matrix of each input (GPTQ rounding, the search error over every token)
    "gram": ["--rounding", "nearest", "--search-error", "gram"],
    "gptq": ["--rounding", "gptq"],
    "gptq-after": ["--rounding", "gptq", "--rounding-after-search"],
    "gptq-gram": ["--rounding", "gptq", "--search-error", "gram"],
    "gptq-clip": ["--rounding", "gptq", "--clip"],
    "shared-gptq": ["--scales", "shared", "--objective", "module", "--rounding", "gptq"],
    "shared-gptq-clip": ["--scales", "shared", "--objective", "module", "--rounding", "gptq", "--clip"],
    "shared-gptq-after-clip": [
        "--scales", "shared", "--objective", "module", "--rounding", "gptq", "--rounding-after-search", "--clip",
    ],
}  # fmt: skip
# llm-compressor's AWQ variants: name -> llmcompressor_awq.py --duo-scaling (llmc is its default, duo)
LLMC_METHODS = {LLMC: "true", "llmc-activation": "false", "llmc-both": "both"}


# ---------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class Settings:
    """Defaults sized for under 30 minutes on a 2-core machine (setup included); every size is an option."""

    models: tuple[str, ...] = ("smollm2", "gemma3")
    # SmolLM2's 576-wide inputs take no group of 128 in llm-compressor: 64 is the size both run
    group_sizes: tuple[int, ...] = (64, 128)
    methods: tuple[str, ...] = (LLMC, *AWQKIT_METHODS)
    bits: int = 4
    # small on purpose: llm-compressor's AWQ runs bf16 matmuls on CPU (~800 CPU-s at 16 x 256, n-grid 20)
    n_calib: int = 8
    seq_len: int = 64
    n_grid: int = 5
    seed: int = 42
    repeats: int = 3
    llmc_batch_size: int = 8
    # as saved (bf16), what a user gets; float32 runs its matmuls ~7x faster on AVX2-only CPUs
    llmc_dtype: str = "auto"
    # awqkit's --compute-dtype; auto: whichever of float32 and bfloat16 multiplies faster here
    compute_dtype: str = "auto"
    eval_windows: int = 8
    eval_seq_len: int = 512
    out: Path = ROOT / "benchmarks" / "out" / "compare-llmcompressor"
    # keep outputs an earlier run made with the same command (and its measurements); else rerun
    reuse: bool = False


SMOKE = {
    "n_calib": 4,
    "seq_len": 64,
    "n_grid": 2,
    "repeats": 1,
    "eval_windows": 2,
    "eval_seq_len": 128,
    "out": ROOT / "benchmarks" / "out" / "compare-llmcompressor-smoke",
}


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def _names(text: str) -> tuple[str, ...]:
    return tuple(x for x in text.split(",") if x)


def parse_args(argv: Sequence[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    d = Settings()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="toy sizes, one repeat: proves every step end to end")
    p.add_argument("--models", type=_names, default=d.models, help="shipped names (smollm2, gemma3) or model folders")
    p.add_argument("--group-sizes", type=_ints, default=d.group_sizes, help="pairs llm-compressor refuses are skipped")
    p.add_argument(
        "--methods", type=_names, default=d.methods, help=f"from {','.join([*LLMC_METHODS, *AWQKIT_METHODS])}"
    )
    p.add_argument("--bits", type=int, help=f"bits per weight, every method (default {d.bits})")
    p.add_argument("--n-calib", type=int, help=f"calibration windows for the comparison (default {d.n_calib})")
    p.add_argument("--seq-len", type=int, help=f"tokens per calibration window (default {d.seq_len})")
    p.add_argument(
        "--n-grid", type=int, help=f"awqkit n-grid: n + 1 scalings tried per linear, both tools (default {d.n_grid})"
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--repeats", type=int, help=f"timed runs per method (default {d.repeats})")
    p.add_argument(
        "--llmc-batch-size", type=int, default=d.llmc_batch_size, help="llm-compressor's windows per forward"
    )
    p.add_argument("--llmc-dtype", default=d.llmc_dtype, help="llm-compressor's load dtype: auto (as saved), float32")
    p.add_argument(
        "--compute-dtype",
        default=d.compute_dtype,
        choices=("auto", *RATE_KEYS),
        help="awqkit's; auto: the faster matmul here",
    )
    p.add_argument("--eval-windows", type=int, help=f"held-out windows per corpus (default {d.eval_windows})")
    p.add_argument("--eval-seq-len", type=int, help=f"tokens per held-out window (default {d.eval_seq_len})")
    p.add_argument(
        "--reuse", action="store_true", default=None,
        help="keep each output an earlier run made with the same command, with its measurements (adds methods cheaply)",
    )  # fmt: skip
    p.add_argument("--out", type=Path, help=f"outputs, logs and report.json (default {d.out.relative_to(ROOT)})")
    p.add_argument(
        "--json", type=Path, help="also write the report here (the full run's: docs/compare-llmcompressor.json)"
    )
    p.add_argument("--llmc-python", type=Path, default=LLMC_PYTHON, help="python of the llm-compressor environment")
    args = p.parse_args(argv)
    sizes = {**(SMOKE if args.smoke else {}), **{k: v for k, v in vars(args).items() if v is not None}}
    fields = {k: v for k, v in sizes.items() if k in Settings.__dataclass_fields__}
    settings = Settings(**fields)
    unknown = set(settings.methods) - {*LLMC_METHODS, *AWQKIT_METHODS}
    if unknown:
        p.error(f"unknown methods: {', '.join(sorted(unknown))}")
    return settings, args


# ---------------------------------------------------------------------------------------------
# Inputs: models, calibration windows, what the FLOP floor needs


def write_calibration_tokens(folder: Path, n_calib: int, seq_len: int, seed: int, path: Path) -> Path:
    """The windows both tools calibrate on, drawn once by awqkit from the Python docs."""
    from awqkit.data.tokens import calibration_data
    from awqkit.model.load import load_tokenizer

    config = QuantizeConfig(n_calib=n_calib, seq_len=seq_len, calib_data="python-doc", seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, calibration_data(load_tokenizer(str(folder)), config).numpy())
    return path


# ---------------------------------------------------------------------------------------------
# Quantize commands


def method_command(
    method: str, folder: Path, out: Path, tokens: Path, group: int, s: Settings, llmc_python: Path
) -> list[str]:
    if method in LLMC_METHODS:
        # llm-compressor's n_grid counts the scalings tried, awqkit's the intervals of [0, 1]:
        # n_grid + 1 gives both the same number of candidates (identity included)
        return [
            str(llmc_python), str(ROOT / "benchmarks" / "llmcompressor_awq.py"), str(folder), "--tokens", str(tokens),
            "--out", str(out), "--bits", str(s.bits), "--group-size", str(group), "--n-grid", str(s.n_grid + 1),
            "--seed", str(s.seed), "--batch-size", str(s.llmc_batch_size), "--dtype", s.llmc_dtype, "--timings", str(out.with_suffix(".timings.json")),
            "--duo-scaling", LLMC_METHODS[method],
        ]  # fmt: skip
    quant = ["--bits", str(s.bits), "--group-size", str(group), "--n-grid", str(s.n_grid), "--seed", str(s.seed),
             "--calib-tokens", str(tokens), "--compute-dtype", s.compute_dtype]  # fmt: skip
    return awqkit_command(folder, out, AWQKIT_METHODS[method], quant)


def run_method(
    method: str,
    folder: Path,
    out: Path,
    tokens: Path,
    group: int,
    s: Settings,
    llmc_python: Path,
    log: Path,
    reuse: bool = False,
) -> Run:
    """Quantize with ``method`` into ``out``; with ``reuse``, an output an earlier run made with the
    same command (recorded next to its log) is kept with that run's measurements."""
    command = method_command(method, folder, out, tokens, group, s, llmc_python)
    recorded = log.with_name(log.name + ".command.json")
    earlier = measured_before(method, log) if reuse and out.exists() and recorded.exists() else None
    if earlier is not None and json.loads(recorded.read_text()) == command:
        run = earlier
    else:
        if out.exists():
            shutil.rmtree(out)
        recorded.unlink(missing_ok=True)
        run = run_measured(method, command, log, env=child_env(command[0]))
        recorded.write_text(json.dumps(command))
    if method in LLMC_METHODS:
        run.stages = json.loads(out.with_suffix(".timings.json").read_text())
        return run
    return read_awqkit_record(run, out)


def llmc_refusal(linears: list[tuple[int, int]], group: int) -> str | None:
    """Why llm-compressor would refuse this group size (it needs every input width divisible)."""
    widths = sorted({i for i, _ in linears if i % group})
    return f"input widths {widths} are not multiples of {group}" if widths else None


# ---------------------------------------------------------------------------------------------
# Evaluation


def evaluate(models: list[Path], s: Settings, report: Path, log: Path) -> dict:
    """``awqkit eval`` on every output, in the dtype each was saved in (bf16) where bf16 multiplies
    faster, else in float32, which upcasts bf16 exactly and is the fast path on AVX2 CPUs."""
    command = [
        sys.executable, "-m", "awqkit.cli", "eval", *map(str, models), "--datasets", "fortunes,foldoc",
        "--seq-len", str(s.eval_seq_len), "--max-windows", str(s.eval_windows), "--dtype", eval_dtype(s),
        "--seed", str(s.seed), "--json", str(report), "--quiet", "--no-cache",
    ]  # fmt: skip
    run_measured("eval", command, log, env=child_env())
    return json.loads(report.read_text())


def eval_dtype(s: Settings) -> str:
    return "float32" if s.compute_dtype == "float32" else "auto"


def quality(report: dict, names: list[str]) -> dict[str, dict[str, dict]]:
    """method -> corpus -> ppl, and the paired NLL difference to the first model (CI, win share)."""
    out: dict[str, dict[str, dict]] = {name: {} for name in names}
    for corpus, data in report["datasets"].items():
        for name, result in zip(names, data["results"]):
            vs = result.get("vs_first") or {}
            out[name][corpus] = {
                "ppl": result["ppl"],
                "dnll": vs.get("mean_nll_diff"),
                "dnll_ci": vs.get("ci"),
                "wins": vs.get("win_share"),
                "windows": data["windows"],
            }
    return out


# ---------------------------------------------------------------------------------------------
# The comparison


def compare_pair(
    name: str, folder: Path, group: int, methods: list[str], s: Settings, llmc_python: Path, rates: dict
) -> dict:
    where = s.out / f"{model_label(name)}-w{s.bits}-g{group}"
    tokens = write_calibration_tokens(folder, s.n_calib, s.seq_len, s.seed, where / "calib-tokens.npy")
    runs: dict[str, list[Run]] = {m: [] for m in methods}
    for repeat in range(s.repeats):
        for method in rotated(methods, repeat):
            log = where / "logs" / f"{method}-{repeat}.log"
            run = run_method(method, folder, where / method, tokens, group, s, llmc_python, log, s.reuse)
            runs[method].append(run)
            print(
                f"  {model_label(name)} g{group} {method} #{repeat + 1}: {run.wall_s:.1f} s wall, {run.cpu_s:.1f} s CPU, {run.peak_rss_gib:.2f} GiB",
                flush=True,
            )
    # llm-compressor first: every CI is the paired difference against it
    order = sorted(methods, key=lambda m: m != LLMC) + ["original"]
    report = evaluate(
        [where / m if m != "original" else folder for m in order], s, where / "eval.json", where / "logs" / "eval.log"
    )
    linear_params = sum(i * o for i, o in decoder_linears(folder))
    medians = {m: median_run(r) for m, r in runs.items()}
    for method in medians.keys() - LLMC_METHODS.keys():
        medians[method]["work"] = work_summary(method_work(method, linear_params, s), rates)
    return {
        "model": model_label(name),
        "folder": str(folder),
        "group_size": group,
        "methods": medians,
        "quality": quality(report, order),
    }


def method_work(method: str, linear_params: int, s: Settings) -> Work:
    tokens = s.n_calib * s.seq_len
    n_grid = 0 if method == "rtn" else s.n_grid
    return Work(linear_params, tokens, min(tokens, QuantizeConfig().max_search_tokens), n_grid)


def compare(s: Settings, llmc_python: Path, rates: dict, notes: list[str]) -> list[dict]:
    methods = list(s.methods)
    pairs = []
    for name in s.models:
        folder = model_folder(name)
        linears = decoder_linears(folder)
        for group in s.group_sizes:
            refusal = llmc_refusal(linears, group) if LLMC_METHODS.keys() & set(methods) else None
            if refusal:
                notes.append(f"skipped {model_label(name)} at group {group}: llm-compressor refuses it ({refusal})")
                continue
            print(f"comparing {model_label(name)} at group {group}: {', '.join(methods)}", flush=True)
            pairs.append(compare_pair(name, folder, group, methods, s, llmc_python, rates))
    return pairs


# ---------------------------------------------------------------------------------------------
# Tables


def comparison_table(pairs: list[dict]) -> str:
    rows = []
    for pair in pairs:
        reference = pair["methods"].get(LLMC)
        for method in [*pair["methods"], "original"]:
            q = pair["quality"][method]
            timing = pair["methods"].get(method)
            cells = ["-"] * 6
            if timing:
                cells = [
                    f"{timing['wall_s']:.1f}", f"{timing['cpu_s']:.1f}", f"{timing['peak_rss_gib']:.2f}",
                    *(ratio(timing[k], reference and reference[k]) for k in ("wall_s", "cpu_s", "peak_rss_gib")),
                ]  # fmt: skip
            rows.append([pair["model"], str(pair["group_size"]), method, *cells,
                         f"{q['fortunes']['ppl']:.2f}", paired_ci(q["fortunes"]), f"{q['foldoc']['ppl']:.2f}", paired_ci(q["foldoc"])])  # fmt: skip
    first = next(iter(pairs[0]["quality"])) if pairs else LLMC  # every CI is against the first model
    header = ["model", "group", "method", "wall s", "CPU s", "peak RSS GiB", "wall / llmc", "CPU / llmc", "RSS / llmc",
              "fortunes ppl", f"dNLL vs {first} [95% CI]", "foldoc ppl", f"dNLL vs {first} [95% CI]"]  # fmt: skip
    return markdown_table(header, rows)


def stages_table(pairs: list[dict], rates: dict, compute_dtype: str) -> str:
    """awqkit's stages; the rounding stage is named after the rounding (nearest or greedy)."""
    key = RATE_KEYS[compute_dtype]
    rows = []
    for pair in pairs:
        for method, timing in pair["methods"].items():
            if method in LLMC_METHODS:
                continue
            st, floor = timing["stages"], timing["work"]["floor_s"][key]
            rounding = rounding_s(st)
            compute = st.get("calibration", 0.0) + st.get("search", 0.0) + rounding + st.get("clip", 0.0)
            cells = [st.get(k, 0.0) for k in ("calibration data", "calibration", "search")] + [
                rounding,
                st.get("save", 0.0),
            ]
            rows.append([pair["model"], str(pair["group_size"]), method, *(f"{c:.1f}" for c in cells), *(f"{timing['work']['floor_s'][k]:.1f}" for k in ("fp32", "bf16")),
                         f"{compute / floor:.1f}", f"{timing['wall_s'] / floor:.1f}", peaks(timing)])  # fmt: skip
    header = ["model", "group", "method", "calib data s", "calibration s (reads the blocks)", "search s", "rounding s", "save s",
              f"floor fp32 s ({rates['fp32']:.0f} GFLOP/s)", f"floor bf16 s ({rates['bf16']:.0f} GFLOP/s)",
              f"(calibration + search + rounding) / {key} floor", f"wall / {key} floor", "peak RSS GiB: wait4 / awqkit's VmHWM"]  # fmt: skip
    return markdown_table(header, rows)


def llmc_stages_table(pairs: list[dict]) -> str:
    rows = [[p["model"], str(p["group_size"]), *(f"{p['methods'][LLMC]['stages'].get(k, 0.0):.1f}" for k in ("load", "oneshot", "save"))]
            for p in pairs if LLMC in p["methods"]]  # fmt: skip
    return markdown_table(["model", "group", "load s", "oneshot (AWQ + quantize) s", "save (compress) s"], rows)


def settings_lines(s: Settings) -> list[str]:
    return [
        (f"comparison: {s.bits}-bit asymmetric, groups {','.join(map(str, s.group_sizes))}, n-grid {s.n_grid}, seed {s.seed}, "
         f"{s.n_calib} x {s.seq_len} calibration tokens from python-doc (same file for both tools), {s.repeats} interleaved repeats (medians; peak RSS is the max)"),
        ("measured: each quantize is its own process, started through a stdlib-only launcher; wall, CPU (user + system) and peak RSS (ru_maxrss) from os.wait4; "
         "awqkit's stages from its awqkit-run.json"),
        f"awqkit: --compute-dtype {s.compute_dtype} (calibration forward and search products; quantization arithmetic float32)",
        f"evaluation: awqkit eval, dtype {eval_dtype(s)} (auto: as saved, bf16), first {s.eval_windows} windows x {s.eval_seq_len} tokens of fortunes and foldoc; CIs are paired vs llm-compressor",
        f"llm-compressor: AWQModifier(n_grid={s.n_grid + 1}: identity + {s.n_grid} duo-scaling ratios, as many candidates as awqkit's {s.n_grid + 1}) + QuantizationModifier(W4A16 asym, min-max), batch {s.llmc_batch_size}, load dtype {s.llmc_dtype}; its min-max observer keeps 0 inside every group's range, awqkit's does not",
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The report


# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    s, args = parse_args(argv)
    s.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    print(f"{date}; {cpu_name()}, {os.cpu_count()} cores", flush=True)
    # a child's peak RSS must be its own, not this process's: checked before anything is measured
    launcher = check_launcher()
    if launcher["child_peak_mib"] > 200:
        raise SystemExit(f"the launcher does not isolate peak RSS: {launcher}")
    rates = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}
    if s.compute_dtype == "auto":
        s = replace(s, compute_dtype=max(RATE_KEYS, key=lambda dtype: rates[RATE_KEYS[dtype]]))
    print(
        f"matmul rates: fp32 {rates['fp32']:.1f} GFLOP/s, bf16 {rates['bf16']:.1f} GFLOP/s; awqkit computes in {s.compute_dtype}",
        flush=True,
    )
    notes: list[str] = []
    report: dict[str, Any] = {
        "date": date, "cpu": cpu_name(), "cores": os.cpu_count(), "launcher_check": launcher, "source": source_state(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(s).items()}, "matmul_gflops": rates,
        "notes": notes, "pairs": [],
    }  # fmt: skip
    pairs = report["pairs"] = compare(s, args.llmc_python, rates, notes)
    notes += contention_notes([Run(**r) for p in pairs for m in p["methods"].values() for r in m["runs"]])
    if report["source"]["src_changes"]:
        notes.append(
            f"awqkit ran from a tree whose src/ differed from {report['source']['commit'][:12]}: {report['source']['src_changes']}"
        )
    if source_state() != report["source"]:
        notes.append(f"SOURCE CHANGED DURING THE RUN: started at {report['source']}, ended at {source_state()}")
    write_report(report, started, s.out, args.json)

    print("\n" + "\n".join(f"- {line}" for line in [*settings_lines(s), *notes]))
    print("\nawqkit stages (medians) against the FLOP floor\n\n" + stages_table(pairs, rates, s.compute_dtype))
    if any(LLMC in p["methods"] for p in pairs):
        print("\nllm-compressor stages (medians)\n\n" + llmc_stages_table(pairs))
    print(
        f"\nwrote {s.out / 'report.json'}{f' and {args.json}' if args.json else ''}; total {report['total_s'] / 60:.1f} min"
    )
    print("\nquantize time, memory and held-out perplexity (medians)\n\n" + comparison_table(pairs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
