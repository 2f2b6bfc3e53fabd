"""awqkit on a randomly initialised mixture-of-experts model: time, peak RSS, and per expert the
output error of AWQ against round-to-nearest.

    PYTHONPATH=src:benchmarks .venv/bin/python benchmarks/moe_random.py            # ~320M Qwen3-MoE
    PYTHONPATH=src:benchmarks .venv/bin/python benchmarks/moe_random.py --smoke    # toy sizes

The model is a Qwen3-MoE (transformers' fused experts) with SmolLM2's tokenizer, written once by
``save_pretrained`` (per-expert tensor names, as on the Hub). Each run is its own process through
harness.py's launcher. Per-linear scales give every expert's gate, up and down projection its own
search, and awqkit.json records each one's output error on the search tokens: the same tokens
for RTN (``--n-grid 0``: s = 1, nearest) and AWQ, so their ratio is the error AWQ removes. Every
token goes through every expert during calibration (the default), so every expert is measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from pathlib import Path

import torch

from awqkit.markdown import markdown_table
from awqkit.pipeline import MEASUREMENTS
from awqkit.runtime import cpu_name
from benchmarks.harness import child_env, run_measured

HERE = Path(__file__).resolve().parent
SIZES = {  # Qwen3-MoE: hidden, layers, experts, experts per token, expert intermediate
    "full": dict(hidden_size=1024, num_hidden_layers=8, num_experts=16, num_experts_per_tok=2, moe_intermediate_size=512,
                 num_attention_heads=16, num_key_value_heads=4, head_dim=64, intermediate_size=2048),
    "smoke": dict(hidden_size=128, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=256),
}  # fmt: skip
RUNS = {  # name -> `awqkit quantize` options after the common ones
    "rtn": ["--n-grid", "0"],
    "awq": [],
    "awq-shared-ct": ["--scales", "shared", "--objective", "module", "--symmetric", "--format", "compressed-tensors"],
}


def write_model(folder: Path, size: dict, seed: int) -> None:
    """A random Qwen3-MoE in bf16 with SmolLM2's tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3MoeConfig

    from awqkit.model.shipped import shipped_model

    tokenizer = AutoTokenizer.from_pretrained(shipped_model("smollm2"))
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(vocab_size=len(tokenizer), norm_topk_prob=True, dtype="bfloat16", **size)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def count_params(folder: Path) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)).parameters())


def expert_errors(out: Path) -> dict[str, float]:
    layers = json.loads((out / "awqkit.json").read_text())["layers"]
    return {name: layer["error"] for name, layer in layers.items() if ".experts." in name}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--n-calib", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=HERE / "out" / "moe-random")
    p.add_argument("--json", type=Path, help="also write the report here")
    args = p.parse_args()
    size = SIZES["smoke" if args.smoke else "full"]
    n_calib, seq_len, group = (4, 64, 32) if args.smoke else (args.n_calib, args.seq_len, args.group_size)
    model = args.out / ("model-smoke" if args.smoke else "model")
    if not (model / "config.json").exists():
        write_model(model, size, args.seed)
    params = count_params(model)
    common = [
        "--n-calib",
        str(n_calib),
        "--seq-len",
        str(seq_len),
        "--group-size",
        str(group),
        "--seed",
        str(args.seed),
    ]
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "cpu": cpu_name(),
        "cores": os.cpu_count(), "model": size, "params": params, "n_calib": n_calib, "seq_len": seq_len,
        "group_size": group, "runs": {},
    }  # fmt: skip
    print(f"{report['date']}; {report['cpu']}, {report['cores']} cores; Qwen3-MoE {size}", flush=True)
    for name, options in RUNS.items():
        out = args.out / name
        command = [sys.executable, "-m", "awqkit", "--quiet", "quantize", str(model), "--out", str(out), "--overwrite",
                   *common, *options]  # fmt: skip
        run = run_measured(name, command, args.out / "logs" / f"{name}.log", env=child_env())
        stages = json.loads((out / MEASUREMENTS).read_text())["stages_s"]
        report["runs"][name] = {"options": options, "wall_s": run.wall_s, "cpu_s": run.cpu_s,
                                "peak_rss_gib": run.peak_rss_gib, "stages_s": stages}  # fmt: skip
        print(f"  {name}: {run.wall_s:.1f} s wall, {run.cpu_s:.1f} s CPU, {run.peak_rss_gib:.2f} GiB", flush=True)
    rtn, awq = expert_errors(args.out / "rtn"), expert_errors(args.out / "awq")
    ratios: dict[str, list[float]] = {}
    for name, error in awq.items():
        ratios.setdefault(name.rsplit(".", 1)[-1], []).append(error / rtn[name])
    report["awq_over_rtn_error"] = {proj: {"median": statistics.median(r), "min": min(r), "max": max(r), "n": len(r),
                                           "worse": sum(x > 1 for x in r)} for proj, r in ratios.items()}  # fmt: skip
    runs = [
        [name, f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}", f"{r['peak_rss_gib']:.2f}"]
        for name, r in report["runs"].items()
    ]
    print("\n" + markdown_table(["run", "wall s", "CPU s", "peak RSS GiB"], runs))
    rows = [[proj, str(s["n"]), f"{s['median']:.3f}", f"{s['min']:.3f}", f"{s['max']:.3f}", str(s["worse"])]
            for proj, s in report["awq_over_rtn_error"].items()]  # fmt: skip
    print(
        "\n"
        + markdown_table(["expert projection", "experts", "AWQ / RTN error, median", "min", "max", "AWQ worse"], rows)
    )
    for path in filter(None, [args.out / "report.json", args.json]):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
