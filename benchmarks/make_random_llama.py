"""Write a randomly initialised Llama checkpoint folder, shard by shard, never holding it whole.

    python -m benchmarks.make_random_llama OUT --layers 40 --hidden 5120 --intermediate 13824 \
        --heads 40 --kv-heads 40 --tokenizer "$(python -m awqkit.model.shipped smollm2)"

The folder looks like ``save_pretrained``'s: config.json, generation_config.json, and either one
``model.safetensors`` or ``model-0000i-of-0000N.safetensors`` shards with
``model.safetensors.index.json``. Tensor names, shapes, tied-weight removal and the split into
shards come from transformers and huggingface_hub themselves, run on a meta-device model, so
nothing is allocated until a tensor is generated. At most one shard (plus one small float32 chunk)
is in memory at a time. Each tensor has its own generator, seeded from --seed and its index, so
two runs write identical bytes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
)
from transformers.modeling_utils import remove_tied_weights_from_state_dict

INIT_STD = 0.02  # LlamaConfig's initializer_range: what from_config's random init draws
CHUNK = 1 << 24  # elements generated per float32 chunk (64 MiB), so big tensors need no full-size temp
# Files a tokenizer may consist of; whichever the source folder has are copied.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
)  # fmt: skip
SEED_STRIDE = 1 << 20  # tensor index < 2**20, so (seed, index) pairs never share a generator seed


def llama_config(args: argparse.Namespace) -> LlamaConfig:
    special: dict[str, int] = {}
    if args.tokenizer is not None:
        n_tokens = len(AutoTokenizer.from_pretrained(args.tokenizer))
        if n_tokens > args.vocab:
            raise SystemExit(f"the tokenizer in {args.tokenizer} has {n_tokens} tokens, more than --vocab {args.vocab}")
        # the model's special token ids follow the tokenizer it is shipped with
        source = AutoConfig.from_pretrained(args.tokenizer)
        special = {
            k: getattr(source, k)
            for k in ("bos_token_id", "eos_token_id", "pad_token_id")
            if getattr(source, k, None) is not None
        }
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        tie_word_embeddings=args.tie_word_embeddings, dtype=args.dtype, **special,
    )  # fmt: skip
    config.architectures = ["LlamaForCausalLM"]  # what save_pretrained records
    return config


def random_tensor(shape: torch.Size, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Norm weights (1-D) are ones; matrices are N(0, INIT_STD), drawn in float32 chunks and cast."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    out = torch.empty(shape, dtype=dtype)
    flat = out.view(-1)
    for start in range(0, flat.numel(), CHUNK):
        chunk = flat[start : start + CHUNK]
        chunk.copy_(torch.empty(chunk.shape, dtype=torch.float32).normal_(0.0, INIT_STD, generator=generator))
    return out


def write_random_llama(config: LlamaConfig, out: Path, seed: int, max_shard_size: str, tokenizer: Path | None) -> dict:
    """Write the checkpoint to a temporary sibling folder, then rename it to ``out``."""
    dtype = config.dtype  # LlamaConfig turns the dtype name into a torch.dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # exactly the tensors, order and shards that save_pretrained writes for a from_config model
    # (one loaded by from_pretrained has its state dict sorted by name first)
    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    split = split_torch_state_dict_into_shards(
        state, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    index_of = {name: i for i, name in enumerate(state)}

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config.save_pretrained(tmp)
    GenerationConfig.from_model_config(config).save_pretrained(tmp)
    if tokenizer is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer / name).exists():
                shutil.copy2(tokenizer / name, tmp / name)

    start = time.perf_counter()
    for i, (filename, names) in enumerate(split.filename_to_tensors.items()):
        shard = {name: random_tensor(state[name].shape, dtype, seed * SEED_STRIDE + index_of[name]) for name in names}
        save_file(shard, str(tmp / filename), metadata={"format": "pt"})
        del shard
        print(
            f"  {filename} ({i + 1}/{len(split.filename_to_tensors)}) {time.perf_counter() - start:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    if split.is_sharded:
        n_params = sum(t.numel() for t in model.parameters())  # parameters() lists a tied tensor once
        index = {"metadata": {"total_parameters": n_params, **split.metadata}, "weight_map": split.tensor_to_filename}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return {
        "params": sum(state[n].numel() for n in state),
        "bytes": split.metadata["total_size"],
        "shards": len(split.filename_to_tensors),
        "seconds": time.perf_counter() - start,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument(
        "--max-shard-size",
        default="2GB",
        help="as in save_pretrained (whose default is 50GB); at most one shard is held in memory",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", type=Path, help="model folder whose tokenizer files (and special token ids) to copy")
    p.add_argument("--tie-word-embeddings", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.out.exists() and not args.overwrite:
        raise SystemExit(f"{args.out} exists (pass --overwrite to replace it)")
    summary = write_random_llama(llama_config(args), args.out, args.seed, args.max_shard_size, args.tokenizer)
    print(
        f"{args.out}: {summary['params'] / 1e9:.3f} B parameters, {summary['bytes'] / 2**30:.2f} GiB "
        f"in {summary['shards']} file(s), {summary['seconds']:.0f} s"
    )


if __name__ == "__main__":
    main()
