"""Per-linear vs shared (folded) AWQ scales, both objectives, nearest and greedy, next to RTN;
and what the packed exports cost on disk and change in the logits.

    python -m benchmarks.shared_scales --out benchmarks/out/shared-scales

Every method quantizes the same calibration windows; every checkpoint is scored on the same
held-out windows (awqkit eval, paired CIs against RTN). Packed formats are written from the same
run as the fake export of the last method, so their difference is the storage alone.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from awqkit.config import QuantizeConfig
from awqkit.data.tokens import calibration_data
from awqkit.eval.evaluate import EvalConfig, evaluate
from awqkit.eval.report import format_table
from awqkit.formats.awq_gemm import awq_gemm_weight
from awqkit.formats.folder import save_quantized
from awqkit.model.load import load_model, load_tokenizer
from awqkit.model.shipped import shipped_model
from awqkit.pipeline import quantize_model, run_record
from awqkit.tools.info import checkpoint_info

METHODS = {
    "rtn": dict(n_grid=0),
    "per-linear-nearest": dict(),
    "per-linear-greedy": dict(rounding="greedy"),
    "shared-linear-nearest": dict(scales="shared"),
    "shared-linear-greedy": dict(scales="shared", rounding="greedy"),
    "shared-module-nearest": dict(scales="shared", objective="module"),
    "shared-module-greedy": dict(scales="shared", objective="module", rounding="greedy"),
}
# SmolLM2's 576-wide inputs take no packed group of 128.
GROUP_SIZE = {"smollm2": 64, "gemma3": 128}


def load_awq_as_float(folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    """An AWQ GEMM checkpoint unpacked into its float architecture (transformers needs gptqmodel)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    group_size = config.quantization_config["group_size"]
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    state = load_file(folder / "model.safetensors")
    for name in [k.removesuffix(".qweight") for k in state if k.endswith(".qweight")]:
        parts = {key: state.pop(f"{name}.{key}") for key in ("qweight", "qzeros", "scales")}
        state[f"{name}.weight"] = awq_gemm_weight(parts, group_size).to(dtype)
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model


def logits_gap(reference: torch.nn.Module, other: torch.nn.Module, ids: torch.Tensor) -> dict:
    with torch.no_grad():
        a, b = reference(ids).logits.float(), other(ids).logits.float()
    nll = [torch.nn.functional.cross_entropy(x[0, :-1], ids[0, 1:]).item() for x in (a, b)]
    return {"max_abs": (a - b).abs().max().item(), "ref_max_abs": a.abs().max().item(), "nll": nll}


def run_model(name: str, out: Path, base: QuantizeConfig, eval_config: EvalConfig, methods: list[str]) -> dict:
    from transformers import AutoModelForCausalLM

    source = str(shipped_model(name))
    config = replace(base, group_size=GROUP_SIZE[name])
    tokenizer = load_tokenizer(source)
    windows = calibration_data(tokenizer, config)
    report: dict = {"model": name, "config": vars(config), "methods": {}}
    for method in methods:
        method_config = replace(config, **METHODS[method])
        model, _ = load_model(source, "auto", tokenizer)
        start = time.perf_counter()
        result = quantize_model(model, windows, method_config, progress=False)
        seconds = time.perf_counter() - start
        record = run_record(source, str(model.dtype).removeprefix("torch."), method_config, result.layers)
        formats = (
            ["fake", "awq", "compressed-tensors"]
            if method == methods[-1] and method_config.scales == "shared"
            else ["fake"]
        )
        for fmt in formats:
            folder = out / name / (method if fmt == "fake" else f"{method}-{fmt}")
            save_quantized(
                model, tokenizer, folder, record, result.scales, overwrite=True, format=fmt, quantized=result.quantized
            )
        alphas = [layer.alpha for layer in result.layers.values()]
        report["methods"][method] = {
            "seconds": seconds,
            "mean_alpha": sum(alphas) / len(alphas),
            "timings": result.timings,
        }
        print(f"{name} {method}: {seconds:.0f}s, mean alpha {sum(alphas) / len(alphas):.3f}", flush=True)

    last = out / name / methods[-1]
    if (out / name / f"{methods[-1]}-awq").exists():
        ids = windows[:1, :256]
        fake = AutoModelForCausalLM.from_pretrained(last, dtype="auto").eval()
        ct = AutoModelForCausalLM.from_pretrained(out / name / f"{methods[-1]}-compressed-tensors", dtype="auto").eval()
        awq = load_awq_as_float(out / name / f"{methods[-1]}-awq", fake.dtype)
        report["packed_vs_fake"] = {"awq": logits_gap(fake, awq, ids), "compressed-tensors": logits_gap(fake, ct, ids)}
        folders = {
            "original": Path(source),
            "fake": last,
            **{f: out / name / f"{methods[-1]}-{f}" for f in ("awq", "compressed-tensors")},
        }
        report["sizes"] = {k: vars(checkpoint_info(v)) for k, v in folders.items()}

    checkpoints = [str(out / name / m) for m in methods]
    evaluation = evaluate([checkpoints[0], source, *checkpoints[1:]], eval_config, progress=False)
    print(format_table(evaluation), flush=True)
    report["eval"] = evaluation
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/shared-scales"))
    parser.add_argument("--models", nargs="+", default=["smollm2", "gemma3"], choices=list(GROUP_SIZE))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--n-calib", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--n-grid", type=int, default=10)
    parser.add_argument("--max-search-tokens", type=int, default=2048)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    args = parser.parse_args()
    base = QuantizeConfig(
        n_calib=args.n_calib,
        seq_len=args.seq_len,
        n_grid=args.n_grid,
        max_search_tokens=args.max_search_tokens,
        calib_data="python-doc",
    )
    # fp32 forward of the bf16 weights: ~7x faster than bf16 on this AVX2-only CPU, exact upcast.
    eval_config = EvalConfig(seq_len=args.eval_seq_len, max_windows=args.eval_windows, dtype="float32", cache_dir=None)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        report = run_model(name, args.out, base, eval_config, args.methods)
        (args.out / f"{name}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
