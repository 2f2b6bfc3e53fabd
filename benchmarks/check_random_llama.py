"""Check make_random_llama.py on tiny models (a few seconds): run it before trusting a big one.

    python -m benchmarks.check_random_llama

For untied and tied embeddings: the folder loads with ``from_pretrained`` with no missing,
unexpected or mismatched keys and gives finite logits; a sharded write holds the same tensors as
a single-file write; two runs write identical bytes; the index and configs equal those that
``save_pretrained`` writes for a model built by ``from_config`` with the same config.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from awqkit.model.shipped import shipped_model
from benchmarks.make_random_llama import llama_config, parse_args, write_random_llama

TINY = ["--layers", "3", "--hidden", "256", "--intermediate", "704", "--heads", "4", "--kv-heads", "2", "--seed", "7"]


def write(folder: Path, *extra: str) -> Path:
    args = parse_args([str(folder), *TINY, "--tokenizer", str(shipped_model("smollm2")), *extra])
    write_random_llama(llama_config(args), folder, args.seed, args.max_shard_size, args.tokenizer)
    return folder


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {name: t for path in sorted(folder.glob("model*.safetensors")) for name, t in load_file(path).items()}


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def check(work: Path, tie: list[str]) -> None:
    single = write(work / "single", *tie)
    sharded = write(work / "sharded", "--max-shard-size", "1MB", *tie)
    again = write(work / "again", "--max-shard-size", "1MB", *tie)

    model, info = AutoModelForCausalLM.from_pretrained(single, output_loading_info=True)
    assert not any(info.values()), info
    ids = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    assert out.logits.isfinite().all()
    rms = [round(h.float().pow(2).mean().sqrt().item(), 3) for h in out.hidden_states]

    a, b = tensors(single), tensors(sharded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "sharded and single-file tensors differ"
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    assert digests(sharded) == digests(again), "two runs wrote different bytes"

    reference = work / "reference"
    AutoModelForCausalLM.from_config(model.config).save_pretrained(reference, max_shard_size="1MB")
    for name in ("model.safetensors.index.json", "config.json", "generation_config.json"):
        assert json.loads((reference / name).read_text()) == json.loads((sharded / name).read_text()), name
    print(
        f"ok {tie or ['untied']}: {len(a)} tensors, logit std {out.logits.float().std():.3f}, hidden-state RMS by layer (last: final norm) {rms}"
    )


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for tie in ([], ["--tie-word-embeddings"]):
            check(Path(tmp) / str(len(tie)), tie)


if __name__ == "__main__":
    main()
