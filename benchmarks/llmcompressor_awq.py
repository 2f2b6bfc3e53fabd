"""llm-compressor's AWQ (W4A16, asymmetric, group-wise) on a local model folder, for the benchmark.

Runs inside benchmarks/.venv-llmc (llm-compressor pins an older transformers than awqkit), as a
subprocess of compare_llmcompressor.py. It calibrates on the token windows of a .npy file, the
same windows awqkit reads, and writes a folder that plain transformers loads.

    python benchmarks/llmcompressor_awq.py MODEL --tokens calib.npy --out DIR --group-size 64
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="local Hugging Face model folder")
    p.add_argument("--tokens", required=True, help=".npy int64 [n_windows, seq_len], BOS included")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument(
        "--n-grid",
        type=int,
        default=20,
        help="scalings tried per mapping, identity included (llm-compressor's meaning)",
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--batch-size", type=int, default=1, help="calibration windows per forward")
    p.add_argument("--dtype", default="auto", help="load dtype: auto (as saved), bfloat16, float32")
    p.add_argument(
        "--duo-scaling",
        choices=("true", "false", "both"),
        default="true",
        help="AWQModifier's duo_scaling: true (its default, E|x|^a / mean|W|^(1-a)), false (activations only), both",
    )
    p.add_argument("--timings", help="write stage timings (seconds) to this JSON file")
    return p.parse_args()


def allow_cpu_only() -> None:
    """Make AWQ's pinning of cached activations a no-op when there is no accelerator.

    Pinned memory only speeds host-to-device copies; on a CPU-only machine torch refuses it with
    "Cannot access accelerator device", which would end the run in the first AWQ smoothing step.
    """
    if torch.accelerator.is_available():
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None


def calibration_dataset(path: str):
    """The windows as a pre-tokenized dataset: llm-compressor then skips its own tokenization."""
    from datasets import Dataset

    ids = np.load(path, allow_pickle=False).astype(np.int64)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist()}), ids.shape


def recipe(bits: int, group_size: int, n_grid: int, duo_scaling: bool | str = True) -> list:
    """AWQ's scale search and folding, then min-max group quantization of every decoder linear."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    weights = QuantizationArgs(
        num_bits=bits, type="int", strategy="group", group_size=group_size, symmetric=False, dynamic=False
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    return [
        AWQModifier(n_grid=n_grid, duo_scaling=duo_scaling),
        QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"]),
    ]


def main() -> None:
    args = parse_args()
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    allow_cpu_only()
    torch.manual_seed(args.seed)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    dataset, (n_windows, seq_len) = calibration_dataset(args.tokens)
    timings["load"] = time.perf_counter() - start

    start = time.perf_counter()
    oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=dataset,
        recipe=recipe(
            args.bits, args.group_size, args.n_grid, {"true": True, "false": False}.get(args.duo_scaling, "both")
        ),
        num_calibration_samples=n_windows,
        max_seq_length=seq_len,
        batch_size=args.batch_size,
        shuffle_calibration_samples=False,
    )
    timings["oneshot"] = time.perf_counter() - start

    start = time.perf_counter()
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    timings["save"] = time.perf_counter() - start
    if args.timings:
        Path(args.timings).write_text(json.dumps(timings, indent=1) + "\n")


if __name__ == "__main__":
    main()
