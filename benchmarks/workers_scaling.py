"""How much faster N torchrun workers quantize than one, and that they write the same bytes.

    PYTHONPATH=src:benchmarks .venv/bin/python benchmarks/workers_scaling.py            # SmolLM2, 128 x 512
    PYTHONPATH=src:benchmarks .venv/bin/python benchmarks/workers_scaling.py --smoke    # toy sizes

Each configuration runs once with one worker and once with ``torchrun --standalone
--nproc-per-node N``, every worker on ``--threads`` threads (OMP_NUM_THREADS), each run its own
process through harness.py's launcher (wall, CPU, peak RSS of the whole process tree's largest
process). awqkit's stage seconds come from worker 0's record (awqkit-run.json). The outputs are
compared file by file: the speed-up counts only if the bytes are the one-worker bytes.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import sys
from pathlib import Path

from awqkit.markdown import markdown_table
from awqkit.pipeline import MEASUREMENTS
from awqkit.runtime import cpu_name
from benchmarks.harness import child_env, run_measured

HERE = Path(__file__).resolve().parent

# name -> `awqkit quantize` options: the default command (per-linear nearest), and the deployable
# one with the most search work (shared scales by module output, greedy rounding, AWQ GEMM)
CONFIGS = {
    "default": [],
    "shared-greedy-awq": ["--scales", "shared", "--objective", "module", "--rounding", "greedy", "--format", "awq"],
}  # fmt: skip


def quantize_command(workers: int, model: str, out: Path, sizes: list[str], options: list[str]) -> list[str]:
    cli = ["-m", "awqkit", "--quiet", "quantize", model, "--out", str(out), "--overwrite", *sizes, *options]
    if workers == 1:
        return [sys.executable, *cli]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(workers), *cli]


def output_hashes(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.name != MEASUREMENTS
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="a shipped name or a model folder")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="threads per worker")
    p.add_argument("--n-calib", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names from CONFIGS")
    p.add_argument("--smoke", action="store_true", help="4 x 64 calibration in batches of 2, n-grid 2: proves the path")
    p.add_argument("--out", type=Path, default=HERE / "out" / "workers-scaling")
    p.add_argument("--json", type=Path, help="also write the report here")
    args = p.parse_args()
    n_calib, seq_len = (4, 64) if args.smoke else (args.n_calib, args.seq_len)
    sizes = ["--n-calib", str(n_calib), "--seq-len", str(seq_len), "--group-size", str(args.group_size)]
    sizes += ["--n-grid", "2", "--batch-size", "2"] if args.smoke else []
    env = dict(child_env(), OMP_NUM_THREADS=str(args.threads))
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": cpu_name(), "cores": os.cpu_count(), "model": args.model, "threads_per_worker": args.threads,
        "n_calib": n_calib, "seq_len": seq_len, "group_size": args.group_size, "configs": {},
    }  # fmt: skip
    print(
        f"{report['date']}; {report['cpu']}, {report['cores']} cores; {args.model}, {n_calib} x {seq_len}", flush=True
    )
    rows = []
    for name in args.configs.split(","):
        runs = {}
        for workers in (1, args.workers):
            out = args.out / f"{name}-w{workers}"
            command = quantize_command(workers, args.model, out, sizes, CONFIGS[name])
            run = run_measured(f"{name} x{workers}", command, args.out / "logs" / f"{out.name}.log", env=env)
            run.stages = json.loads((out / MEASUREMENTS).read_text())["stages_s"]
            runs[workers] = (run, out)
            print(f"  {name}, {workers} worker(s): {run.wall_s:.1f} s wall, {run.cpu_s:.1f} s CPU", flush=True)
        (one, one_out), (many, many_out) = runs[1], runs[args.workers]
        same = output_hashes(one_out) == output_hashes(many_out)
        speedup = one.wall_s / many.wall_s
        report["configs"][name] = {
            "options": CONFIGS[name], "same_bytes": same, "speedup": speedup,
            "runs": {str(w): {"wall_s": r.wall_s, "cpu_s": r.cpu_s, "peak_rss_gib": r.peak_rss_gib, "stages_s": r.stages,
                              "others_cpu_s": r.others_cpu_s} for w, (r, _) in runs.items()},
        }  # fmt: skip
        stage = lambda r, k: f"{r.stages.get(k, 0.0):.1f}"  # noqa: E731
        for w, (r, _) in runs.items():
            rounding = "greedy" if "greedy" in r.stages else "nearest"
            rows.append([name, f"{w} x {args.threads}", f"{r.wall_s:.1f}", f"{r.cpu_s:.1f}", stage(r, "calibration"),
                         stage(r, "search"), stage(r, rounding), stage(r, "save"), f"{r.peak_rss_gib:.2f}",
                         f"{speedup:.2f}x" if w > 1 else "1", "yes" if same else "NO"])  # fmt: skip
    header = ["config", "workers x threads", "wall s", "CPU s", "calibration s", "search s", "rounding s", "save s",
              "peak RSS GiB (one process)", "speed-up", "same bytes"]  # fmt: skip
    print("\n" + markdown_table(header, rows))
    for path in filter(None, [args.out / "report.json", args.json]):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
    return 0 if all(c["same_bytes"] for c in report["configs"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
