"""Round-to-nearest baseline (AWQ with alpha = 0, i.e. no scaling) for the benchmark.

Every nn.Linear inside the decoder blocks gets awqkit's group-wise asymmetric min-max quantizer
with s = 1, the same quantizer and grid the AWQ methods use, so the gap to them is the scaling
alone. Written as a fake-quantized folder in the model's dtype, like ``awqkit quantize``.

    python benchmarks/rtn.py MODEL --out DIR --bits 4 --group-size 64
"""

from __future__ import annotations

import argparse

import torch

from awqkit.architectures import block_linears, find_decoder
from awqkit.checkpoint import load_model, write_atomically
from awqkit.quant import dequantize_groupwise, quantize_groupwise


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="local Hugging Face model folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    return p.parse_args()


@torch.no_grad()
def round_to_nearest(model: torch.nn.Module, bits: int, group_size: int) -> int:
    """Quantize the decoder blocks' linears in place; returns how many were quantized."""
    linears = [linear for block in find_decoder(model).blocks for linear in block_linears(block).values()]
    for linear in linears:
        # float32 like awqkit's search, so both round the same values; stored back in the model dtype
        w = linear.weight.data.float()
        linear.weight.data.copy_(dequantize_groupwise(quantize_groupwise(w, bits, group_size)))
    return len(linears)


def main() -> None:
    args = parse_args()
    model, tokenizer = load_model(args.model)
    count = round_to_nearest(model, args.bits, args.group_size)

    def write(folder) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    write_atomically(args.out, overwrite=True, write=write)
    print(f"wrote {args.out}: {count} linears rounded to nearest")


if __name__ == "__main__":
    main()
