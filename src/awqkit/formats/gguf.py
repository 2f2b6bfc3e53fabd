"""GGUF, what llama.cpp and the tools built on it run, written with the ``gguf`` package from
awqkit's own integers: no float round trip, no re-rounding by llama.cpp's quantizer.

Groups of 32 map one to one onto GGUF blocks of 32 weights:
- Q4_1 (4-bit asymmetric): fp16 ``d``, fp16 ``m``, 16 bytes of nibbles; w = d*q + m. awqkit's
  w = (q - z)*scale is that with d = scale, m = -z*scale.
- Q4_0 (4-bit symmetric): fp16 ``d``, 16 bytes of nibbles; w = d*(q - 8), awqkit's zero being 8.
- Q8_0 (8-bit symmetric): fp16 ``d``, 32 int8; w = d*q with q = awqkit's q - 128.
Nibbles: byte j of a block holds weight j in its low half and weight j + 16 in its high half.
The fp16 rounding of d and m is the only change to the stored weights.

Other tensors are written as llama.cpp's converter writes them: 1-D ones (norms) as F32, the rest
in the checkpoint's dtype (BF16, F16 or F32); Llama's q/k rows in GGML's rotary order; Gemma's
norms as (1 + weight), since GGML multiplies by the weight itself.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from awqkit.data.tokens import bos_to_prepend
from awqkit.formats.grids import GGUF_GROUP_SIZE, GGUF_TYPES, check_gguf
from awqkit.io.safetensors import INDEX, meta_tensor, read_tensors, tensor_files, tensor_headers
from awqkit.quant.grid import GroupQuantized

# transformers model_type -> GGUF architecture name
GGUF_ARCHITECTURES = {"llama": "llama", "gemma3_text": "gemma3", "gemma3": "gemma3"}
GGUF_FILE = "model.gguf"
# A BPE tokenizer's pre-tokenizer must be named for llama.cpp to split text as the model was
# trained; it is recognised by the ids it gives this text (llama.cpp does the same with its own).
PRETOKENIZER_PROBE = "Hello world!  It's 2026: 3.14159 apples\n\n\tcost $12,345 (¡olé!) 你好 — x==y   z"
BPE_PRETOKENIZERS = {"892e1ee7c56b6af5b991fd6bc544bacbc9af22c51f4aceb8b29c8848a44a6c90": "smollm"}  # SmolLM2


def check_gguf_model(config: Any) -> None:
    """Refuse a model whose architecture or rotary scaling this writer cannot describe to llama.cpp."""
    if config.model_type not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"format gguf supports {', '.join(sorted(set(GGUF_ARCHITECTURES)))} models, not {config.model_type}"
        )
    rope = _rope(config)
    if rope.get("rope_type", "default") not in ("default", "linear"):
        raise ValueError(
            f"format gguf: rotary scaling {rope['rope_type']!r} is not supported yet (default and linear are)"
        )


def gguf_blocks(quantized: GroupQuantized) -> torch.Tensor:
    """The GGUF blocks of one linear's integers: uint8 [out, n_groups * block bytes]."""
    type_name = GGUF_TYPES.get((quantized.bits, quantized.symmetric))
    if type_name is None or quantized.group_size != GGUF_GROUP_SIZE or quantized.q.shape[1] % GGUF_GROUP_SIZE:
        check_gguf(quantized.bits, quantized.group_size, quantized.symmetric)
        raise ValueError(f"format gguf needs input sizes divisible by 32, got {quantized.q.shape[1]}")
    out, n_groups = quantized.scale.shape
    q = quantized.q.to(torch.int32).view(out, n_groups, GGUF_GROUP_SIZE)
    d = _fp16_bytes(quantized.scale)
    if type_name == "Q8_0":
        parts = [d, (q - 128).to(torch.int8).view(torch.uint8)]
    else:
        nibbles = (q[..., :16] | (q[..., 16:] << 4)).to(torch.uint8)
        parts = [d, nibbles] if type_name == "Q4_0" else [d, _fp16_bytes(-quantized.zero * quantized.scale), nibbles]
    return torch.cat(parts, dim=2).reshape(out, -1)


def _fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    """[out, n_groups] -> their fp16 little-endian bytes [out, n_groups, 2]."""
    return values.to(torch.float16).contiguous().view(torch.uint8).view(*values.shape, 2)


def _rope(config: Any) -> dict:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if "full_attention" in rope:  # Gemma-3 keeps one entry per attention type
        rope = rope["full_attention"]
    return dict(rope)


def _rope_theta(config: Any) -> float:
    return float(_rope(config).get("rope_theta") or getattr(config, "rope_theta", 10000.0))


def _rotary_order(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Llama's q/k rows from transformers' half-split rotary layout to GGML's interleaved one."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def _metadata(writer: Any, config: Any, type_name: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    rope = _rope(config)
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)
    writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{type_name}"))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _vocab(tokenizer: Any, folder: Path) -> tuple[Any, str]:
    """gguf's vocabulary class for the tokenizer saved in ``folder``, and llama.cpp's pre-tokenizer name."""
    from gguf.vocab import BpeVocab, LlamaHfVocab

    try:
        vocab = BpeVocab(folder)
    except FileNotFoundError:
        try:
            return LlamaHfVocab(folder), "default"
        except FileNotFoundError:
            raise ValueError(
                "format gguf: the tokenizer is neither GPT-2-style BPE nor Llama/Gemma-style BPE"
            ) from None
    ids = tokenizer(PRETOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    digest = hashlib.sha256(json.dumps(ids).encode()).hexdigest()
    if digest not in BPE_PRETOKENIZERS:
        raise ValueError(
            "format gguf: this BPE tokenizer's pre-tokenizer is not one awqkit can name for llama.cpp "
            f"(probe digest {digest[:16]}); known: {', '.join(sorted(set(BPE_PRETOKENIZERS.values())))}"
        )
    return vocab, BPE_PRETOKENIZERS[digest]


def check_gguf_tokenizer(tokenizer: Any) -> None:
    """Refuse, before any work, a tokenizer the GGUF file could not describe to llama.cpp."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        _vocab(tokenizer, Path(folder))


def _vocabulary(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """Tokens, scores, types, merges and special ids, read by gguf's own vocabulary classes."""
    import gguf
    from gguf.vocab import SpecialVocab

    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        vocab, pre = _vocab(tokenizer, Path(folder))
        tokens, scores, types = [], [], []
        for text, score, token_type in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(token_type)
        special = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
        for index, token in tokenizer.added_tokens_decoder.items():
            if index < len(types):  # llama.cpp's split: special added tokens are control, others user-defined
                types[index] = gguf.TokenType.CONTROL if token.content in special else gguf.TokenType.USER_DEFINED
        if vocab.tokenizer_model == "llama":
            # llama.cpp's SentencePiece-BPE tokenizer merges by piece score, which gguf's class
            # leaves at -1000. SentencePiece scores its pieces -rank, in id order: restore that.
            normal = [i for i, kind in enumerate(types) if kind == gguf.TokenType.NORMAL]
            for rank, index in enumerate(normal):
                scores[index] = -float(rank)
        for index in range(len(tokens), vocab_size):  # rows of the embedding no token names
            tokens.append(f"[PAD{index}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model(vocab.tokenizer_model)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        special_vocab = SpecialVocab(folder, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=len(tokens))
        # Said outright, as transformers tokenizes: llama.cpp's default differs between vocab types.
        special_vocab.add_special_token["bos"] = bos_to_prepend(tokenizer) is not None
        special_vocab.add_special_token.setdefault("eos", False)
        special_vocab.add_to_gguf(writer, quiet=True)


def _gguf_tensor(
    name: str, tensor: torch.Tensor, config: Any, architecture: str, type_name: str
) -> tuple[torch.Tensor, Any]:
    """The tensor as GGUF stores it and its GGML type (None: from the dtype). Shape-only on the
    meta device, so the header is planned from the safetensors header without reading a tensor."""
    import gguf

    if architecture == "llama" and name.endswith(("q_proj.gguf", "k_proj.gguf", "q_proj.weight", "k_proj.weight")):
        heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
        tensor = _rotary_order(tensor, heads)
    if name.endswith(".gguf"):
        return tensor, gguf.GGMLQuantizationType[type_name]
    if architecture == "gemma3" and name.endswith("norm.weight"):
        tensor = tensor.float() + 1.0
    if tensor.dim() == 1 or tensor.dtype == torch.float32:
        return tensor.float(), None
    if tensor.dtype == torch.float16:
        return tensor, None
    return tensor.contiguous().view(torch.uint8), gguf.GGMLQuantizationType.BF16


def write_gguf(folder: Path, config: Any, tokenizer: Any, type_name: str) -> Path:
    """Turn the safetensors checkpoint in ``folder`` (quantized linears as ``<name>.gguf`` blocks)
    into ``folder/model.gguf``, one tensor in memory at a time, and remove the safetensors."""
    import gguf

    check_gguf_model(config)
    architecture = GGUF_ARCHITECTURES[config.model_type]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[architecture.upper()], config.num_hidden_layers)
    files = tensor_files(folder)
    path = folder / GGUF_FILE
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_name(Path(getattr(config, "_name_or_path", "") or architecture).name)
    _metadata(writer, config, type_name)
    _vocabulary(writer, tokenizer, config.vocab_size)

    plan = sorted(files)
    headers = tensor_headers(sorted(set(files.values())))  # headers only: no tensor data touched
    for name in plan:
        target = names.get_name(name.removesuffix(".gguf").removesuffix(".weight").removesuffix(".bias"))
        if target is None:
            raise ValueError(f"format gguf: no GGUF name for tensor {name}")
        suffix = ".bias" if name.endswith(".bias") else ".weight"
        shaped, raw = _gguf_tensor(name, meta_tensor(headers[name]), config, architecture, type_name)
        dtype = torch.empty(0, dtype=shaped.dtype).numpy().dtype
        writer.add_tensor_info(
            target + suffix, shaped.shape, dtype, shaped.numel() * shaped.element_size(), raw_dtype=raw
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name in plan:  # one open per tensor: its mapped pages leave with it
        tensor = read_tensors(files, [name])[name]
        writer.write_tensor_data(_gguf_tensor(name, tensor, config, architecture, type_name)[0].numpy())
    writer.close()
    for name in set(files.values()):
        name.unlink()
    (folder / INDEX).unlink(missing_ok=True)
    return path
