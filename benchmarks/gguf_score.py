"""Per-window NLL of a GGUF file under llama.cpp (llama-cpp-python), for gguf_llamacpp.py.

Runs in benchmarks/.venv-llamacpp. Reads token windows [n, seq_len] from a .npy, feeds each window's
ids to llama.cpp as they are (no re-tokenizing), and writes the mean NLL of tokens 1..n-1 of every
window, plus the ids llama.cpp's own tokenizer gives a probe text, as JSON.

    python benchmarks/gguf_score.py model.gguf --windows w.npy --probe "text" --out nll.json
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from llama_cpp import Llama


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--windows", required=True)
    p.add_argument("--probe", default="")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    windows = np.load(args.windows)
    llm = Llama(
        model_path=args.model, n_ctx=windows.shape[1], n_batch=windows.shape[1], logits_all=True,
        n_threads=os.cpu_count(), verbose=False,
    )  # fmt: skip
    nll = []
    for ids in windows.tolist():
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
        top = logits.max(axis=1, keepdims=True)
        log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        nll.append(float(np.mean(log_z - logits[np.arange(len(ids) - 1), ids[1:]])))
    probe = llm.tokenize(args.probe.encode(), add_bos=False, special=False) if args.probe else []
    with open(args.out, "w") as handle:
        json.dump({"window_nll": nll, "probe_ids": probe}, handle)


if __name__ == "__main__":
    main()
