"""Quantize a random Llama whose bf16 safetensors are larger than this machine's RAM, end to end.

    python -m benchmarks.larger_than_ram --model benchmarks/out/random-llama-13b
    python -m benchmarks.larger_than_ram --model ... --generate-only   # write the model, stop

The model has Llama-2-13B's width (hidden 5120, intermediate 13824, 40 heads, no GQA) with
SmolLM2's 49152-token vocabulary and tokenizer, at 43 layers rather than 40: 14.1 B parameters,
26.3 GiB of bf16 (40 layers would be 24.6 GiB, only 1 GiB above the 23.5 GiB of RAM here). It is
written shard by shard by make_random_llama.py, once, and reused if the folder exists. Generation
and quantization each run as their own process, measured with ``os.wait4`` (wall time, peak RSS).
Options this script does not know are passed to ``awqkit quantize`` after its small settings.

The output is then checked: its index lists exactly the tensors its shards hold, and covers the
input (every decoder linear as AWQ qweight/qzeros/scales, every other tensor by name); in the
block whose s is furthest from 1, the linears fed straight by a norm (q, k, gate: their weight is
only ever column-scaled by s) dequantize to the input weight times s from awq_scales.safetensors
within half a quantization step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from awqkit.formats.awq_gemm import awq_gemm_weight
from awqkit.model.shipped import shipped_model
from benchmarks.streaming_memory import run_measured

SHAPE = [
    "--layers",
    "43",
    "--hidden",
    "5120",
    "--intermediate",
    "13824",
    "--heads",
    "40",
    "--kv-heads",
    "40",
    "--vocab",
    "49152",
]
QUANTIZE = [
    "--format", "awq", "--scales", "shared", "--group-size", "128", "--n-calib", "4", "--seq-len", "64",
    "--n-grid", "2", "--max-search-tokens", "128", "--calib-data", "python-doc", "--seed", "0",
]  # fmt: skip
CHECKED = ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj")
AWQ_PARTS = ("qweight", "qzeros", "scales")


class Checkpoint:
    """The tensors of a safetensors folder (one file or index + shards), read one at a time."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.exists():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            with safe_open(folder / "model.safetensors", "pt") as f:
                self.weight_map = dict.fromkeys(f.keys(), "model.safetensors")

    def get(self, name: str) -> torch.Tensor:
        with safe_open(self.folder / self.weight_map[name], "pt") as f:
            return f.get_tensor(name)

    def stored_names(self) -> set[str]:
        """The tensors the files actually hold (the index may claim others)."""
        names: set[str] = set()
        for filename in set(self.weight_map.values()):
            with safe_open(self.folder / filename, "pt") as f:
                names.update(f.keys())
        return names


def check_index(source: Checkpoint, output: Checkpoint) -> list[str]:
    """Problems with the output's index: it must list what its files hold and cover the input."""
    problems = []
    stored = output.stored_names()
    if stored != set(output.weight_map):
        problems.append(
            f"index vs files: {len(set(output.weight_map) - stored)} listed but absent, {len(stored - set(output.weight_map))} unlisted"
        )
    for name in source.weight_map:
        is_linear = name.startswith("model.layers.") and name.endswith("_proj.weight")
        expected = [f"{name.removesuffix('.weight')}.{part}" for part in AWQ_PARTS] if is_linear else [name]
        problems += [f"missing from the output index: {n}" for n in expected if n not in output.weight_map]
    return problems


def most_scaled_block(scales: dict[str, torch.Tensor], layers: int) -> int:
    """The block whose checked linears' s is furthest from 1: alpha 0 (plain RTN, s = 1) is
    common on random weights with a coarse grid, and would leave the s of the check untested."""
    spread = [
        max(scales[f"model.layers.{b}.{linear}"].log().abs().max().item() for linear in CHECKED) for b in range(layers)
    ]
    return max(range(layers), key=spread.__getitem__)


def check_block(
    source: Checkpoint, output: Checkpoint, scales: dict[str, torch.Tensor], block: int, group_size: int
) -> dict[str, float]:
    """Per checked linear, max over elements of |dequantized - W * s| / (half a step): must be <= 1.

    Slack: AWQ stores the step in fp16 (relative error 2**-11, times |q - zero| <= 15) and the fold
    may round s and W * s to bf16 (2**-9 each, relative to W * s).
    """
    ratios = {}
    for linear in CHECKED:
        name = f"model.layers.{block}.{linear}"
        parts = {part: output.get(f"{name}.{part}") for part in AWQ_PARTS}
        dequantized = awq_gemm_weight(parts, group_size)
        w_s = source.get(f"{name}.weight").float() * scales[name].float()[None, :]
        step = parts["scales"].float().T.repeat_interleave(group_size, dim=1)
        bound = 0.5 * step + 15 * step * 2**-11 + w_s.abs() * 2**-8
        ratios[linear] = ((dequantized - w_s).abs() / bound).max().item()
    return ratios


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument(
        "--model", type=Path, default=Path("benchmarks/out/random-llama-13b"), help="written here unless it exists"
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/random-llama-13b-awq"))
    p.add_argument("--generate-only", action="store_true", help="write the model (measured) and stop")
    args, awqkit_args = p.parse_known_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary: dict = {"model": str(args.model)}

    if not args.model.exists():
        command = [sys.executable, str(Path(__file__).with_name("make_random_llama.py")), str(args.model), *SHAPE,
                   "--tokenizer", str(shipped_model("smollm2")), "--max-shard-size", "2GB"]  # fmt: skip
        summary["generate_s"], rss_mib = run_measured(command, args.model.with_name(args.model.name + ".generate.log"))
        summary["generate_peak_rss_gib"] = rss_mib / 1024
        print(
            f"generated {args.model} in {summary['generate_s']:.0f} s, peak RSS {summary['generate_peak_rss_gib']:.2f} GiB",
            flush=True,
        )
    config = json.loads((args.model / "config.json").read_text())
    source = Checkpoint(args.model)
    on_disk = sum((args.model / f).stat().st_size for f in set(source.weight_map.values()))
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    summary |= {"layers": config["num_hidden_layers"], "safetensors_gib": on_disk / 2**30, "ram_gib": ram / 2**30}
    print(
        f"{args.model}: {config['num_hidden_layers']} layers, {on_disk / 2**30:.2f} GiB of safetensors, RAM {ram / 2**30:.2f} GiB",
        flush=True,
    )
    if args.generate_only:
        return

    command = [sys.executable, "-m", "awqkit.cli", "quantize", str(args.model), "--out", str(args.out), "--overwrite", "--quiet",
               *QUANTIZE, *awqkit_args]  # fmt: skip
    summary["quantize_s"], _ = run_measured(command, args.out.with_name(args.out.name + ".log"))
    # awqkit's own record of its peak (VmHWM); ru_maxrss would start at this process's peak.
    summary["quantize_peak_rss_gib"] = json.loads((args.out / "awqkit-run.json").read_text())["peak_rss_gib"]
    print(
        f"quantized in {summary['quantize_s'] / 60:.1f} min, peak RSS {summary['quantize_peak_rss_gib']:.2f} GiB",
        flush=True,
    )

    output = Checkpoint(args.out)
    group_size = json.loads((args.out / "config.json").read_text())["quantization_config"]["group_size"]
    scales = load_file(args.out / "awq_scales.safetensors")
    block = most_scaled_block(scales, config["num_hidden_layers"])
    problems = check_index(source, output)
    ratios = check_block(source, output, scales, block, group_size)
    problems += [
        f"block {block} {linear}: error {r:.3f} x the half-step bound" for linear, r in ratios.items() if r > 1
    ]
    checked_s = torch.cat([scales[f"model.layers.{block}.{linear}"] for linear in CHECKED])
    summary |= {
        "awqkit_args": QUANTIZE + awqkit_args, "checked_block": block, "checked_s_range": [checked_s.min().item(), checked_s.max().item()],
        "error_vs_bound": ratios, "problems": problems,
    }  # fmt: skip
    (args.out.with_name(args.out.name + ".json")).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print("PASS" if not problems else "FAIL:\n  " + "\n  ".join(problems))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
