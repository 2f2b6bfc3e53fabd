"""Peak RSS and wall time of ``awqkit quantize`` on random Llamas of one width at growing depth.

    python -m benchmarks.streaming_memory                          # 4, 16, 64 layers, fake format
    python -m benchmarks.streaming_memory --format awq --scales shared

Options this script does not know are passed to ``awqkit quantize`` after its own small
calibration settings (so they can also override them). The models come from
make_random_llama.py at its default width (hidden 512, intermediate 1408, 8 heads, 4 KV heads,
SmolLM2's 49152-token vocabulary and tokenizer). Each quantize is its own process: ``os.wait4``
gives its wall time, and its own record (awqkit-run.json) its peak RSS, read from Linux's VmHWM
(ru_maxrss would include this process's peak, which a child inherits through fork + exec). The
criterion of issue 10: peak RSS grows by less than 15% from the shallowest to the deepest model
while the model grows 16x.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from awqkit.model.shipped import shipped_model
from benchmarks.make_random_llama import llama_config, write_random_llama
from benchmarks.make_random_llama import parse_args as model_args

QUANTIZE = [
    "--n-calib", "8", "--seq-len", "128", "--n-grid", "4", "--max-search-tokens", "256",
    "--group-size", "64", "--calib-data", "python-doc", "--seed", "0",
]  # fmt: skip
MAX_RSS_GROWTH = 1.15


def run_measured(command: list[str], log: Path) -> tuple[float, float]:
    """Run ``command`` with its output in ``log``; (wall seconds, peak RSS MiB) of that process.

    ``os.wait4`` reports exactly this child's rusage, unlike RUSAGE_CHILDREN, whose peak RSS is
    the maximum over every child this process has waited for.
    """
    with log.open("w") as sink:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped already: Popen must not wait again
    if process.returncode != 0:
        raise RuntimeError(
            f"{command[:4]} failed (exit {process.returncode}); end of {log}:\n{log.read_text(errors='replace')[-3000:]}"
        )
    return wall, usage.ru_maxrss / 1024  # Linux reports ru_maxrss in KiB


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| layers | params | checkpoint MiB | wall s | peak RSS MiB | RSS / RSS at {} layers |".format(
            rows[0]["layers"]
        ),
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layers']} | {r['params'] / 1e6:.0f} M | {r['checkpoint_mib']:.0f} | {r['wall_s']:.1f} "
            f"| {r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] / rows[0]['peak_rss_mib']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--layers", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument(
        "--work", type=Path, default=Path("benchmarks/out/streaming-memory"), help="models, outputs and logs"
    )
    p.add_argument("--json", type=Path, default=Path("benchmarks/out/streaming-memory.json"))
    args, awqkit_args = p.parse_known_args()
    args.work.mkdir(parents=True, exist_ok=True)
    tokenizer = shipped_model("smollm2")

    rows = []
    for layers in args.layers:
        model = args.work / f"random-llama-{layers}L"
        config = llama_config(model_args([str(model), "--layers", str(layers), "--tokenizer", str(tokenizer)]))
        written = write_random_llama(config, model, seed=0, max_shard_size="2GB", tokenizer=tokenizer)
        out = args.work / f"random-llama-{layers}L-quantized"
        command = [
            sys.executable,
            "-m",
            "awqkit.cli",
            "quantize",
            str(model),
            "--out",
            str(out),
            "--overwrite",
            "--quiet",
            *QUANTIZE,
            *awqkit_args,
        ]
        wall, _ = run_measured(command, args.work / f"{layers}L.log")
        # awqkit's own record of its peak (VmHWM): os.wait4's ru_maxrss starts at this (large)
        # process's peak, which a child inherits through fork/vfork + exec.
        rss = json.loads((out / "awqkit-run.json").read_text())["peak_rss_gib"] * 1024
        shutil.rmtree(out)  # only the measurements matter
        rows.append(
            {
                "layers": layers,
                "params": written["params"],
                "checkpoint_mib": written["bytes"] / 2**20,
                "wall_s": wall,
                "peak_rss_mib": rss,
            }
        )
        print(f"  {layers} layers: {wall:.1f} s, {rss:.0f} MiB", file=sys.stderr, flush=True)

    first, last = rows[0], rows[-1]
    growth = last["peak_rss_mib"] / first["peak_rss_mib"]
    passed = growth < MAX_RSS_GROWTH
    report = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "awqkit_args": QUANTIZE + awqkit_args,
        "rows": rows,
        "rss_growth": growth,
        "passed": passed,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{report['date']}, {report['cpu']} ({report['cores']} cores); awqkit quantize {' '.join(report['awqkit_args'])}\n"
    )
    print(markdown_table(rows) + "\n")
    print(
        f"{'PASS' if passed else 'FAIL'}: peak RSS x{growth:.2f} from {first['layers']} to {last['layers']} layers "
        f"(criterion < x{MAX_RSS_GROWTH}) while the decoder grows x{last['layers'] / first['layers']:.0f} "
        f"(all parameters x{last['params'] / first['params']:.1f}); JSON: {args.json}"
    )
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
