"""awqkit's GGUF export run by llama.cpp itself: held-out perplexity of the AWQ-greedy Q4_1 file
next to plain round-to-nearest Q4_1 (same block type, same file size) and the fake-quant model.

    benchmarks/gguf_llamacpp.sh            # builds llama-cpp-python in its own venv, then runs this

Per model: three `awqkit quantize` runs (shared scales, group 32, calibrated on python-doc):
AWQ greedy to GGUF, the same to the fake (float) format, and --n-grid 0 (RTN, s = 1) to GGUF.
llama.cpp scores the GGUF files on held-out windows (fortunes) given as token ids, so both sides
predict the same tokens; transformers scores the fake-quant model. Also checks that llama.cpp's
tokenizer, read from the GGUF, splits a probe text into the ids transformers' tokenizer gives.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from awqkit.data.corpora import load_corpus
from awqkit.eval.evaluate import window_nll
from awqkit.eval.stats import paired_difference, perplexity
from awqkit.eval.windows import eval_windows
from awqkit.model.load import load_tokenizer
from awqkit.model.shipped import shipped_model
from awqkit.runtime import cpu_name

HERE = Path(__file__).resolve().parent
PROBE = "The quick brown fox, it's said, jumps over 13 lazy dogs.\n\nHello world!"


def quantize(model: str, out: Path, options: list[str], args: argparse.Namespace) -> Path:
    record = out / "awqkit.json"
    if args.reuse and record.exists():  # an earlier run's output, kept if its settings are these
        config = json.loads(record.read_text())["config"]
        if (config["n_calib"], config["seq_len"], config["n_grid"]) == (args.n_calib, args.seq_len, args.n_grid):
            return out
    command = [
        sys.executable, "-m", "awqkit.cli", "--quiet", "quantize", model, "--out", str(out), "--overwrite",
        "--scales", "shared", "--objective", "module", "--group-size", "32", "--calib-data", "python-doc",
        "--n-calib", str(args.n_calib), "--seq-len", str(args.seq_len), "--n-grid", str(args.n_grid), *options,
    ]  # fmt: skip
    subprocess.run(command, check=True)
    return out


def llamacpp_nll(gguf: Path, windows: Path, python: Path, out: Path) -> dict:
    command = [
        str(python),
        str(HERE / "gguf_score.py"),
        str(gguf),
        "--windows",
        str(windows),
        "--probe",
        PROBE,
        "--out",
        str(out),
    ]
    subprocess.run(command, check=True)
    return json.loads(out.read_text())


def compare(model: str, args: argparse.Namespace) -> dict:
    where = args.out / model
    where.mkdir(parents=True, exist_ok=True)
    folder = shipped_model(model)
    tokenizer = load_tokenizer(str(folder))
    windows = eval_windows(tokenizer, load_corpus("fortunes"), args.eval_seq_len, args.eval_windows)
    np.save(where / "windows.npy", windows.numpy())
    runs = {
        "awq-greedy gguf": quantize(model, where / "greedy-gguf", ["--rounding", "greedy", "--format", "gguf"], args),
        "awq-greedy fake": quantize(model, where / "greedy-fake", ["--rounding", "greedy", "--format", "fake"], args),
        "rtn gguf": quantize(model, where / "rtn-gguf", ["--n-grid", "0", "--format", "gguf"], args),
    }
    nll, sizes, probe = {}, {}, {}
    for name, out in runs.items():
        if name.endswith("gguf"):
            scored = llamacpp_nll(
                out / "model.gguf", where / "windows.npy", args.llamacpp_python, where / f"{name}.json"
            )
            nll[name], probe[name] = np.array(scored["window_nll"]), scored["probe_ids"]
            sizes[name] = (out / "model.gguf").stat().st_size
        else:
            from transformers import AutoModelForCausalLM

            fake = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
            nll[name] = window_nll(fake, windows).numpy()
    reference = nll["rtn gguf"]
    weights = np.full(len(reference), args.eval_seq_len - 1.0)
    rows = {}
    for name, values in nll.items():
        diff = paired_difference(values, reference, weights)
        rows[name] = {"ppl": perplexity(values), "dnll_vs_rtn": diff.mean_nll_diff, "ci": diff.ci, "wins": diff.win_share,
                      "file_bytes": sizes.get(name)}  # fmt: skip
    hf_ids = tokenizer(PROBE, add_special_tokens=False)["input_ids"]
    return {"model": model, "rows": rows, "tokenizer_agrees": {k: v == hf_ids for k, v in probe.items()}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2,gemma3")
    p.add_argument("--n-calib", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--n-grid", type=int, default=20)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--llamacpp-python", type=Path, default=HERE / ".venv-llamacpp" / "bin" / "python")
    p.add_argument("--out", type=Path, default=HERE / "out" / "gguf-llamacpp")
    p.add_argument("--json", type=Path, help="also write the report here")
    p.add_argument("--reuse", action="store_true", help="keep outputs of an earlier run with the same settings")
    args = p.parse_args()
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    report = {"date": date, "cpu": cpu_name(), "settings": {k: str(v) for k, v in vars(args).items()},
              "models": [compare(m, args) for m in args.models.split(",")]}  # fmt: skip
    text = json.dumps(report, indent=2) + "\n"
    (args.out / "report.json").write_text(text)
    if args.json:
        args.json.write_text(text)
    print(f"{date}; {cpu_name()}")
    print("| model | file | llama.cpp tokenizer = HF | ppl (fortunes) | dNLL vs RTN Q4_1 [95% CI] | size MiB |")
    print("|---|---|---|---|---|---|")
    for entry in report["models"]:
        for name, row in entry["rows"].items():
            agrees = entry["tokenizer_agrees"].get(name, "-")
            size = f"{row['file_bytes'] / 2**20:.1f}" if row["file_bytes"] else "-"
            print(f"| {entry['model']} | {name} | {agrees} | {row['ppl']:.3f} | {row['dnll_vs_rtn']:+.4f} "
                  f"[{row['ci'][0]:+.4f}, {row['ci'][1]:+.4f}] | {size} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
