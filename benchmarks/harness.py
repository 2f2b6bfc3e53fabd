"""Measuring commands for the benchmarks: one process's wall, CPU and peak RSS; medians; tables.

    python -m benchmarks.harness        # checks the launcher: a child's peak RSS is its own

Peak RSS is ``ru_maxrss`` from ``os.wait4``, taken by a tiny launcher process (stdlib only, ~10
MB) that starts the command and waits for it. Started straight from a benchmark (a Python process
that imported torch and may hold GBs), a child's ``ru_maxrss`` would start at the benchmark's
peak: Linux folds the high-water mark of the memory a process had before exec (its parent's,
copied by fork or shared by vfork) into the peak it reports. The launcher's own memory is what
its child inherits instead, which is below any real command's peak.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from awqkit.config import ROUNDINGS
from awqkit.model.layout import block_linears, find_decoder
from awqkit.model.shipped import SHIPPED, shipped_model
from awqkit.pipeline import MEASUREMENTS

# Run as ``python -I -S -c LAUNCHER OUT.json COMMAND...``: no site-packages, no .pth imports.
LAUNCHER = """
import json, os, subprocess, sys, time
out, command = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
child = subprocess.Popen(command)
_, status, usage = os.wait4(child.pid, 0)
wall = time.perf_counter() - start
code = os.waitstatus_to_exitcode(status)
child.returncode = code
with open(out, "w") as f:
    json.dump({"wall_s": wall, "user_s": usage.ru_utime, "sys_s": usage.ru_stime,
               "maxrss_kib": usage.ru_maxrss, "exit": code}, f)
sys.exit(0 if code == 0 else 1)
"""


@dataclass
class Run:
    """One process: wall and CPU (user + system) seconds, peak RSS from ``os.wait4`` through the launcher."""

    name: str
    wall_s: float
    cpu_s: float
    peak_rss_gib: float
    stages: dict[str, float] = field(default_factory=dict)
    # what the program itself recorded as its peak (awqkit: VmHWM), a cross-check; None when it records none
    self_peak_rss_gib: float | None = None
    # CPU seconds the rest of the machine used while it ran (/proc/stat less its own): other work on
    # the same cores slows a run, and much more than its share where both run OpenMP thread pools
    others_cpu_s: float | None = None

    @property
    def contended(self) -> bool:
        return self.others_cpu_s is not None and self.others_cpu_s > CONTENDED * self.wall_s


# Others' CPU seconds per wall second above which a run counts as sharing the machine (background: ~0.01)
CONTENDED = 0.1


def launcher_command(rusage_json: Path, command: Sequence[str]) -> list[str]:
    return [sys.executable, "-I", "-S", "-c", LAUNCHER, str(rusage_json), *map(str, command)]


def run_measured(name: str, command: Sequence[str], log: Path, env: dict[str, str] | None = None) -> Run:
    """Run ``command`` to completion through the launcher, its output in ``log``.

    Wall, CPU and peak RSS cover the command's process and the processes it waited for
    (``os.wait4``'s rusage), not the launcher, and not this process.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    rusage_json = log.with_name(log.name + ".rusage.json")
    rusage_json.unlink(missing_ok=True)
    busy_before = machine_busy_s()
    with log.open("w") as sink:
        result = subprocess.run(
            launcher_command(rusage_json, command), stdout=sink, stderr=subprocess.STDOUT, env=env, check=False
        )
    if not rusage_json.exists():
        raise RuntimeError(f"{name}: the launcher failed (exit {result.returncode}); end of {log}:\n{_tail(log)}")
    busy_after = machine_busy_s()
    usage = json.loads(rusage_json.read_text())
    if usage["exit"] != 0:
        raise RuntimeError(f"{name} failed (exit {usage['exit']}); end of {log}:\n{_tail(log)}")
    cpu = usage["user_s"] + usage["sys_s"]
    others = None if busy_before is None or busy_after is None else max(0.0, busy_after - busy_before - cpu)
    return Run(name, usage["wall_s"], cpu, usage["maxrss_kib"] / 2**20, others_cpu_s=others)


def measured_before(name: str, log: Path) -> Run | None:
    """The run ``run_measured`` recorded next to ``log``, if it finished (others' CPU not kept)."""
    rusage_json = log.with_name(log.name + ".rusage.json")
    if not rusage_json.exists():
        return None
    usage = json.loads(rusage_json.read_text())
    if usage["exit"] != 0:
        return None
    return Run(name, usage["wall_s"], usage["user_s"] + usage["sys_s"], usage["maxrss_kib"] / 2**20)


def machine_busy_s() -> float | None:
    """CPU seconds all cores have spent on anything but idling and I/O wait since boot (Linux)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, *rest = fields
    steal = rest[0] if rest else 0
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


def child_env(python: str | Path | None = None) -> dict[str, str]:
    """The environment for a command; for another environment's ``python``, without this one's packages."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if python is not None and str(python) != sys.executable:
        env.pop("VIRTUAL_ENV", None)
        env.pop("PYTHONPATH", None)
    return env


def check_launcher(parent_gib: float = 1.0) -> dict[str, float]:
    """Hold ``parent_gib`` here, then measure ``python -c pass``: its peak must be its own (tens of MB).

    Also measures it without the launcher, which shows the inherited peak the launcher avoids.
    """
    held = bytearray(int(parent_gib * 2**30))
    for i in range(0, len(held), 4096):  # touch every page, so it is resident
        held[i] = 1
    with tempfile.TemporaryDirectory() as tmp:
        run = run_measured("python -c pass", [sys.executable, "-c", "pass"], Path(tmp) / "pass.log")
        process = subprocess.Popen([sys.executable, "-c", "pass"])
        _, _, direct = os.wait4(process.pid, 0)
        process.returncode = 0  # reaped by wait4
    del held
    return {
        "parent_held_gib": parent_gib,
        "child_peak_mib": run.peak_rss_gib * 1024,
        "child_peak_mib_direct": direct.ru_maxrss / 1024,
    }


# ---------------------------------------------------------------------------------------------
# Statistics


def median_run(runs: list[Run]) -> dict[str, Any]:
    """Median wall, CPU and stage seconds over repeats; peak RSS is the largest."""
    stages = sorted({k for r in runs for k in r.stages})
    own = [r.self_peak_rss_gib for r in runs if r.self_peak_rss_gib is not None]
    others = [r.others_cpu_s for r in runs if r.others_cpu_s is not None]
    return {
        "wall_s": statistics.median(r.wall_s for r in runs),
        "cpu_s": statistics.median(r.cpu_s for r in runs),
        "peak_rss_gib": max(r.peak_rss_gib for r in runs),
        "self_peak_rss_gib": max(own) if own else None,
        "others_cpu_s": max(others) if others else None,
        "stages": {k: statistics.median(r.stages.get(k, 0.0) for r in runs) for k in stages},
        "runs": [asdict(r) for r in runs],
    }


def rotated(items: Sequence[str], shift: int) -> list[str]:
    """Each repeat starts with a different item, so none always runs first (cold caches)."""
    shift %= len(items)
    return [*items[shift:], *items[:shift]]


def fit_line(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least-squares y = a + b x; with one point, the line through the origin."""
    import numpy as np

    if len(x) < 2:
        return 0.0, y[0] / x[0]
    b, a = np.polyfit(np.asarray(x), np.asarray(y), 1)
    return float(a), float(b)


def matmul_gflops(dtype: Any, tokens: int = 1024, width: int = 1024, min_seconds: float = 1.0) -> float:
    """This machine's rate for a linear layer's product X W^T in one torch dtype, all threads torch uses.

    The layout matters: on AVX2 CPUs a bf16 ``a @ b`` of two row-major matrices runs ~10x slower
    than the same product as ``F.linear`` (the oneDNN path), and linears are what models run.
    """
    x, w = torch.randn(tokens, width, dtype=dtype), torch.randn(2 * width, width, dtype=dtype)
    torch.nn.functional.linear(x, w)  # warm-up: thread pool, kernel selection
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        torch.nn.functional.linear(x, w)
        count += 1
    return 2 * tokens * width * 2 * width * count / (time.perf_counter() - start) / 1e9


# ---------------------------------------------------------------------------------------------
# Tables


def ratio(value: float, reference: float | None) -> str:
    return f"{value / reference:.3f}" if reference else "-"


def paired_ci(q: dict) -> str:
    """A paired difference of mean NLL against the reference: value [95% CI], share of windows won."""
    if q.get("dnll") is None:
        return "(reference)"
    low, high = q["dnll_ci"]
    return f"{q['dnll']:+.4f} [{low:+.4f}, {high:+.4f}], wins {q['wins']:.0%}"


# ---------------------------------------------------------------------------------------------
# awqkit runs: models, commands, records, the FLOP floor of their work


ROOT = Path(__file__).resolve().parent.parent


def model_folder(name: str) -> Path:
    return shipped_model(name) if name in SHIPPED else Path(name)


def model_label(name: str) -> str:
    return name if name in SHIPPED else Path(name).name


def meta_model(folder: Path) -> torch.nn.Module:
    """The model without weights: shapes for FLOP counts and divisibility checks, at no cost."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))


def decoder_linears(folder: Path) -> list[tuple[int, int]]:
    """(in, out) of every linear awqkit quantizes."""
    blocks = find_decoder(meta_model(folder)).blocks
    return [(m.in_features, m.out_features) for block in blocks for m in block_linears(block).values()]


def largest_block_params(folder: Path) -> int:
    return max(sum(p.numel() for p in block.parameters()) for block in find_decoder(meta_model(folder)).blocks)


@dataclass(frozen=True)
class Work:
    """The matmul FLOPs of an awqkit run: a calibration forward and an alpha search."""

    linear_params: int
    tokens: int
    search_tokens: int
    n_grid: int

    @property
    def calibration_flop(self) -> float:
        return 2.0 * self.linear_params * self.tokens

    @property
    def search_flop(self) -> float:
        # one X (W - W_hat)^T product per alpha on the search tokens
        return (self.n_grid + 1) * 2.0 * self.search_tokens * self.linear_params

    def floor_s(self, gflops: float) -> float:
        return (self.calibration_flop + self.search_flop) / (gflops * 1e9)


# awqkit --compute-dtype -> its key in the measured matmul rates
RATE_KEYS = {"float32": "fp32", "bfloat16": "bf16"}


def read_awqkit_record(run: Run, out: Path) -> Run:
    """awqkit's own record of the run (awqkit-run.json in its output): its stage seconds
    (calibration data, calibration, which reads the blocks, search, the rounding, save) and its
    peak RSS (VmHWM), kept next to the launcher's as a cross-check."""
    record = json.loads((out / MEASUREMENTS).read_text())
    run.stages = dict(record["stages_s"])
    run.self_peak_rss_gib = record["peak_rss_gib"]
    return run


def rounding_s(stages: dict[str, float]) -> float:
    """The rounding stage, which awqkit times apart from the search and names after the rounding."""
    return next((stages[name] for name in ROUNDINGS if name in stages), 0.0)


def awqkit_command(folder: Path, out: Path, options: list[str], quant: list[str]) -> list[str]:
    # --quiet: the stage timings are read from the run's awqkit-run.json, not from its log
    return [sys.executable, "-m", "awqkit.cli", "quantize", str(folder), "--out", str(out), "--overwrite", "--quiet",
            *quant, *options]  # fmt: skip


def work_summary(work: Work, rates: dict[str, float]) -> dict[str, Any]:
    return {
        **asdict(work),
        "calibration_flop": work.calibration_flop,
        "search_flop": work.search_flop,
        "floor_s": {dtype: work.floor_s(rate) for dtype, rate in rates.items()},
    }


def peaks(timing: dict) -> str:
    """The launcher's peak (os.wait4) next to awqkit's own record of it (VmHWM): they should agree."""
    own = timing.get("self_peak_rss_gib")
    return f"{timing['peak_rss_gib']:.2f} / {own:.2f}" if own is not None else f"{timing['peak_rss_gib']:.2f}"


# ---------------------------------------------------------------------------------------------
# Reports


def write_report(report: dict, started: float, out: Path, copy: Path | None) -> None:
    report["total_s"] = time.perf_counter() - started
    text = json.dumps(report, indent=1) + "\n"
    (out / "report.json").write_text(text)
    if copy:
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(text)


def source_state() -> dict[str, Any]:
    """The commit the benchmark ran on and the files of src/ that differed from it (awqkit runs from the tree)."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD"), "src_changes": git("status", "--porcelain", "--", "src").splitlines()}


def contention_notes(runs: list[Run]) -> list[str]:
    """Runs during which other processes used the CPUs (their timings are not this tool's alone)."""
    checked = [r for r in runs if r.others_cpu_s is not None]
    if not checked:
        return []
    scope = f"{len(checked)} runs checked"
    if len(checked) < len(runs):
        scope += f"; {len(runs) - len(checked)} runs of an earlier report carry no such record"
    busy = [r for r in checked if r.contended]
    if not busy:
        return [f"machine quiet: other processes used under {CONTENDED:.0%} of a core during each run ({scope})"]
    worst = ", ".join(f"{r.name} ({r.others_cpu_s:.0f} CPU-s beside {r.wall_s:.0f} s)" for r in busy)
    return [
        f"NOT QUIET: other processes used the CPUs during {len(busy)} runs ({scope}), whose times are inflated: {worst}"
    ]


def main() -> int:
    check = check_launcher()
    print(json.dumps(check))
    ok = check["child_peak_mib"] < 200
    print(f"{'PASS' if ok else 'FAIL'}: `python -c pass` through the launcher peaks at {check['child_peak_mib']:.0f} MiB "
          f"while this process holds {check['parent_held_gib']:.1f} GiB (started directly: {check['child_peak_mib_direct']:.0f} MiB)")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
