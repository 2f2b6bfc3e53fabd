"""awqkit's time and peak RSS as the work grows: SmolLM2 at growing calibration sizes, then a
randomly initialised Llama of ~1.5B parameters, one run each, against a FLOP floor from this
machine's fp32 and bf16 matmul rates, with the growth per unit of work fitted.

    python -m benchmarks.awqkit_scaling            # ~30 min on 2 cores
    python -m benchmarks.awqkit_scaling --smoke    # the same code path at toy sizes
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

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
    fit_line,
    largest_block_params,
    matmul_gflops,
    meta_model,
    model_folder,
    peaks,
    read_awqkit_record,
    rounding_s,
    run_measured,
    source_state,
    work_summary,
    write_report,
)
from benchmarks.make_random_llama import llama_config, write_random_llama
from benchmarks.make_random_llama import parse_args as random_llama_args


@dataclass(frozen=True)
class ScalingSettings:
    seed: int = 42
    # awqkit's --compute-dtype; auto: whichever of float32 and bfloat16 multiplies faster here
    compute_dtype: str = "auto"
    # awqkit nearest at growing calibration sizes on SmolLM2
    n_calib: tuple[int, ...] = (32, 128, 512)
    seq_len: int = 32
    n_grid: int = 5
    max_search_tokens: int = 512
    # the random Llama: hidden, intermediate, layers; 2048, 8192, 23 is 1.50B parameters with SmolLM2's vocabulary
    big_shape: tuple[int, int, int] = (2048, 8192, 23)
    big_n_calib: int = 4
    big_seq_len: int = 128
    big_n_grid: int = 2
    big_max_search_tokens: int = 256
    out: Path = ROOT / "benchmarks" / "out" / "awqkit-scaling"


SMOKE = {
    "n_calib": (4, 8),
    "seq_len": 32,
    "n_grid": 2,
    "max_search_tokens": 64,
    "big_shape": (256, 1024, 2),
    "big_n_calib": 2,
    "big_seq_len": 32,
    "big_n_grid": 2,
    "big_max_search_tokens": 32,
    "out": ROOT / "benchmarks" / "out" / "awqkit-scaling-smoke",
}


def parse_args(argv: Sequence[str] | None = None) -> tuple[ScalingSettings, argparse.Namespace]:
    d = ScalingSettings()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="toy sizes: proves every step end to end")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--compute-dtype", default=d.compute_dtype, choices=("auto", *RATE_KEYS))
    p.add_argument("--out", type=Path, help=f"outputs, logs and report.json (default {d.out.relative_to(ROOT)})")
    p.add_argument("--json", type=Path, help="also write the report here")
    args = p.parse_args(argv)
    sizes = {**(SMOKE if args.smoke else {}), **{k: v for k, v in vars(args).items() if v is not None}}
    return ScalingSettings(**{k: v for k, v in sizes.items() if k in ScalingSettings.__dataclass_fields__}), args


def random_llama(shape: tuple[int, int, int], tokenizer_from: Path, out: Path, seed: int) -> Path:
    """A randomly initialised Llama in bf16 with SmolLM2's tokenizer (make_random_llama.py, shard by
    shard), tied embeddings, 128-wide heads, a KV head per 4; written once and reused."""
    if (out / "config.json").exists():
        return out
    hidden, intermediate, layers = shape
    args = random_llama_args([
        str(out), "--hidden", str(hidden), "--intermediate", str(intermediate), "--layers", str(layers),
        "--heads", str(hidden // 128 or 1), "--kv-heads", str(max(hidden // 512, 1)), "--tie-word-embeddings",
        "--tokenizer", str(tokenizer_from), "--seed", str(seed),
    ])  # fmt: skip
    write_random_llama(llama_config(args), out, args.seed, args.max_shard_size, args.tokenizer)
    return out


def scaling_run(
    label: str, folder: Path, n_calib: int, seq_len: int, n_grid: int, search: int, s: ScalingSettings, rates: dict
) -> dict:
    where = s.out
    quant = ["--n-grid", str(n_grid), "--max-search-tokens", str(search), "--seed", str(s.seed),
             "--calib-data", "python-doc", "--n-calib", str(n_calib), "--seq-len", str(seq_len), "--group-size", "64",
             "--compute-dtype", s.compute_dtype]  # fmt: skip
    out = where / label
    run = run_measured(
        label, awqkit_command(folder, out, ["--rounding", "nearest"], quant), where / f"{label}.log", env=child_env()
    )
    read_awqkit_record(run, out)
    shutil.rmtree(out, ignore_errors=True)  # only the timings matter; a 1.5B output is 3 GB
    linears = decoder_linears(folder)
    work = Work(sum(i * o for i, o in linears), n_calib * seq_len, min(n_calib * seq_len, search), n_grid)
    params = sum(p.numel() for p in meta_model(folder).parameters())
    print(f"  {label}: {run.wall_s:.1f} s wall, {run.cpu_s:.1f} s CPU, {run.peak_rss_gib:.2f} GiB", flush=True)
    return {
        "label": label, "params": params, **work_summary(work, rates), "run": asdict(run),
        "model_gib": params * 2 / 2**30, "block_fp32_gib": largest_block_params(folder) * 4 / 2**30,
    }  # fmt: skip


def scaling(s: ScalingSettings, rates: dict) -> list[dict]:
    smollm2 = model_folder("smollm2")
    rows = []
    for n in s.n_calib:
        rows.append(scaling_run(f"smollm2-n{n}", smollm2, n, s.seq_len, s.n_grid, s.max_search_tokens, s, rates))
    big = random_llama(s.big_shape, smollm2, s.out / "random-llama-{}x{}x{}".format(*s.big_shape), s.seed)
    rows.append(
        scaling_run(
            f"random-llama-{s.big_shape[2]}L",
            big,
            s.big_n_calib,
            s.big_seq_len,
            s.big_n_grid,
            s.big_max_search_tokens,
            s,
            rates,
        )
    )
    return rows


def growth(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Seconds per unit of work for calibration (linear params x tokens) and search (x search tokens x grid)."""
    calibration = fit_line(
        [r["linear_params"] * r["tokens"] for r in rows], [r["run"]["stages"].get("calibration", 0.0) for r in rows]
    )
    search = fit_line(
        [r["linear_params"] * r["search_tokens"] * (r["n_grid"] + 1) for r in rows],
        [r["run"]["stages"].get("search", 0.0) + rounding_s(r["run"]["stages"]) for r in rows],
    )
    return {
        "calibration": {"fixed_s": calibration[0], "ns_per_param_token": calibration[1] * 1e9},
        "search": {"fixed_s": search[0], "ns_per_param_token_alpha": search[1] * 1e9},
    }


def scaling_table(rows: list[dict], compute_dtype: str) -> str:
    key = RATE_KEYS[compute_dtype]
    body = []
    for r in rows:
        st = r["run"]["stages"]
        body.append([r["label"], f"{r['params'] / 1e6:.0f} M", f"{r['tokens']}", f"{r['search_tokens']} x {r['n_grid'] + 1}",
                     f"{r['run']['wall_s']:.1f}", f"{st.get('calibration', 0.0):.1f}", f"{st.get('search', 0.0) + rounding_s(st):.1f}",
                     f"{r['floor_s'][key]:.1f}", peaks(r["run"]), f"{r['model_gib']:.2f}", f"{r['block_fp32_gib']:.2f}"])  # fmt: skip
    header = ["run", "params", "calib tokens", "search tokens x alphas", "wall s", "calibration s", "search s",
              f"{key} floor s", "peak RSS GiB: wait4 / awqkit's VmHWM", "model bf16 GiB", "one block fp32 GiB"]  # fmt: skip
    return markdown_table(header, body)


def main(argv: Sequence[str] | None = None) -> int:
    s, args = parse_args(argv)
    s.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    print(f"{date}; {cpu_name()}, {os.cpu_count()} cores", flush=True)
    launcher = check_launcher()  # a child's peak RSS must be its own, not this process's
    if launcher["child_peak_mib"] > 200:
        raise SystemExit(f"the launcher does not isolate peak RSS: {launcher}")
    rates = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}
    if s.compute_dtype == "auto":
        s = replace(s, compute_dtype=max(RATE_KEYS, key=lambda dtype: rates[RATE_KEYS[dtype]]))
    print(
        f"matmul rates: fp32 {rates['fp32']:.1f}, bf16 {rates['bf16']:.1f} GFLOP/s; awqkit computes in {s.compute_dtype}"
    )
    rows = scaling(s, rates)
    fitted = growth(rows)
    notes = contention_notes([Run(**r["run"]) for r in rows])
    report = {
        "date": date, "cpu": cpu_name(), "cores": os.cpu_count(), "launcher_check": launcher, "source": source_state(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(s).items()}, "matmul_gflops": rates,
        "notes": notes, "scaling": rows, "growth": fitted,
    }  # fmt: skip
    write_report(report, started, s.out, args.json)
    print("\n".join(f"- {line}" for line in notes))
    print("\nawqkit scaling (one run each)\n\n" + scaling_table(rows, s.compute_dtype))
    print(f"\ngrowth: calibration {fitted['calibration']['ns_per_param_token']:.3f} ns per linear-param x token "
          f"(+{fitted['calibration']['fixed_s']:.1f} s), search {fitted['search']['ns_per_param_token_alpha']:.3f} ns "
          f"per linear-param x search token x alpha (+{fitted['search']['fixed_s']:.1f} s)")  # fmt: skip
    print(f"\nwrote {s.out / 'report.json'}{f' and {args.json}' if args.json else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
