"""Check that an awqkit AutoAWQ-GEMM export runs in a real client: transformers + gptqmodel.

Loads the AWQ folder through ``AutoModelForCausalLM.from_pretrained`` (transformers hands AWQ
linears to gptqmodel's kernels) and the fake-quant folder of the same run through plain
transformers, both in bf16, then compares perplexity on held-out windows. Both folders hold the
same quantized weights, so any gap beyond bf16 noise means the packed export (or the client's
unpacking) is wrong. Exits 1 when the perplexities differ by more than ``--tolerance``.

Needs the opt-in venv made by scripts/check_awq_client.sh (gptqmodel is not an awqkit dependency).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from awqkit.data.corpora import load_corpus
from awqkit.eval.evaluate import window_nll
from awqkit.eval.stats import perplexity
from awqkit.eval.windows import eval_windows

DTYPE = torch.bfloat16


def quantized_linears(model: torch.nn.Module) -> Counter[str]:
    """Class names of the modules gptqmodel put in place of nn.Linear, with their counts."""
    return Counter(
        f"{type(m).__module__}.{type(m).__name__}"
        for m in model.modules()
        if type(m).__module__.startswith("gptqmodel.") and hasattr(m, "qweight")
    )


def timed_nll(name: str, model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    start = time.perf_counter()
    nll = window_nll(model, windows, batch_size=1)
    print(f"{name}: {len(windows)} windows scored in {time.perf_counter() - start:.1f} s")
    return nll


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("awq_dir", type=Path, help="awqkit export with --format awq")
    parser.add_argument("fake_dir", type=Path, help="the same run exported with --format fake")
    parser.add_argument("--corpus", default="fortunes")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=8)
    # bf16 kernel noise alone moved ppl by ~1.2% on 64-256 tokens but 0.05% on the default 8 x 512.
    parser.add_argument("--tolerance", type=float, default=0.01, help="largest relative ppl gap that passes")
    args = parser.parse_args()

    # Import gptqmodel up front (transformers would do it lazily inside from_pretrained) so the
    # load time below measures the checkpoint, not the package's ~10 s import.
    start = time.perf_counter()
    import gptqmodel

    print(f"gptqmodel {gptqmodel.__version__} imported in {time.perf_counter() - start:.1f} s")

    start = time.perf_counter()
    awq = AutoModelForCausalLM.from_pretrained(args.awq_dir, dtype=DTYPE).eval()
    print(f"AWQ checkpoint loaded in {time.perf_counter() - start:.1f} s")
    kernels = quantized_linears(awq)
    if not kernels:
        print("FAIL: no gptqmodel linear in the loaded model; the AWQ config was not honoured")
        return 1
    for cls, count in kernels.items():
        print(f"linears became {cls} (x{count})")

    fake = AutoModelForCausalLM.from_pretrained(args.fake_dir, dtype=DTYPE).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.awq_dir)
    windows = eval_windows(tokenizer, load_corpus(args.corpus), args.seq_len, max_windows=args.windows)

    # The first AWQ forward repacks every layer for the CPU kernel; time it apart from scoring.
    start = time.perf_counter()
    with torch.inference_mode():
        awq_logits = awq(windows[:1]).logits.float()
        fake_logits = fake(windows[:1]).logits.float()
    print(f"first forward (AWQ repack + one window on both models): {time.perf_counter() - start:.1f} s")
    # gptqmodel falls back to dequantize + matmul when its fused op is unusable; say which ran.
    modes = Counter(getattr(m, "linear_mode", None) for m in awq.modules() if hasattr(m, "qweight"))
    print(f"AWQ linear modes after first forward: {dict(modes)}")
    diff = (awq_logits - fake_logits).abs().max().item()
    print(f"max |logits AWQ - fake| on window 0: {diff:.4f} (max |logit| {fake_logits.abs().max().item():.2f})")

    ppl_awq = perplexity(timed_nll("AWQ (gptqmodel)", awq, windows))
    ppl_fake = perplexity(timed_nll("fake-quant (transformers)", fake, windows))
    rel = abs(ppl_awq - ppl_fake) / ppl_fake
    print(f"ppl {args.corpus} ({len(windows)} x {args.seq_len} tokens, {DTYPE}):")
    print(f"  AWQ via gptqmodel: {ppl_awq:.4f}")
    print(f"  fake-quant:        {ppl_fake:.4f}")
    print(f"  relative diff:     {rel:.4%} (tolerance {args.tolerance:.2%})")
    if rel > args.tolerance:
        print("FAIL: perplexities differ beyond tolerance")
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
