"""A quantized model folder: its tensors through a format's writer, then config, tokenizer,
quantization_config, ``awqkit.json`` and the scales."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from awqkit.config import DEFAULT_MAX_SHARD_SIZE, parse_size
from awqkit.formats.gguf import GGUF_TYPES, write_gguf
from awqkit.formats.tensors import stored_block_tensors, write_quantization_config
from awqkit.io.publish import write_atomically
from awqkit.io.shards import ShardWriter
from awqkit.model.layout import find_decoder, float_linears, linear_classes


def save_quantized(
    model: Any,
    tokenizer: Any,
    out_dir: str | Path,
    record: dict,
    scales: dict[str, torch.Tensor],
    overwrite: bool = False,
    *,
    format: str = "fake",
    quantized: dict[str, Any] | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write an in-memory quantized model with the same writer as the streamed run."""

    layout = find_decoder(model)
    quantized = quantized or {}
    state = unique_state(model)
    blocks = layout.blocks_name + "."

    def write(folder: Path) -> None:
        writer = ShardWriter(folder, "model", parse_size(max_shard_size))
        writer.add({name: state[name] for name in sorted(state) if not name.startswith(blocks)})
        for index in range(len(layout.blocks)):
            prefix = f"{blocks}{index}."
            block_state = {n.removeprefix(prefix): t for n, t in state.items() if n.startswith(prefix)}
            block_q = {n.removeprefix(prefix): q for n, q in quantized.items() if n.startswith(prefix)}
            writer.add(stored_block_tensors(layout.blocks[index], prefix, block_state, block_q, format))
        writer.finish()
        generation = model.generation_config if model.can_generate() else None
        write_model_files(
            folder,
            model.config,
            generation,
            tokenizer,
            record,
            scales,
            format,
            float_linears(model),
            targets=linear_classes(model),
        )

    return write_atomically(out_dir, overwrite, write)


def unique_state(model: Any) -> dict[str, torch.Tensor]:
    """The model's tensors with tied duplicates (lm_head = embeddings) dropped, as save_pretrained does."""
    seen: set[int] = set()
    state = {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor.contiguous()
    return state


def write_model_files(
    folder: Path,
    config: Any,
    generation_config: Any,
    tokenizer: Any,
    record: dict,
    scales: dict[str, torch.Tensor] | None,
    format: str,
    ignore: list[str],
    source: Path | None = None,
    targets: tuple[str, ...] = ("Linear",),
) -> None:
    """Everything but the weights: config (with quantization_config), tokenizer, the processor files
    of ``source`` (a vision-language model's image processor), record, scales."""

    settings = record["config"]
    if format == "gguf":  # one file holds config and tokenizer: no Hugging Face folder around it
        write_gguf(folder, config, tokenizer, GGUF_TYPES[(settings["bits"], settings.get("symmetric", False))])
    else:
        config.save_pretrained(folder)
        if generation_config is not None:
            generation_config.save_pretrained(folder)
        if format != "fake":
            write_quantization_config(
                folder,
                format,
                settings["bits"],
                settings["group_size"],
                ignore,
                settings.get("symmetric", False),
                targets,
            )
        tokenizer.save_pretrained(folder)
        copy_processor_files(source, folder)
        drop_remote_code(folder)
    (folder / "awqkit.json").write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
    if scales is not None:
        save_file(scales, str(folder / "awq_scales.safetensors"), metadata={"format": "pt"})


# What AutoProcessor reads beside the tokenizer: image and video preprocessing, the chat template.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                   "chat_template.json", "chat_template.jinja")  # fmt: skip


def copy_processor_files(source: Path | None, folder: Path) -> None:
    """The processor files of ``source`` that the tokenizer did not write: the output loads with the
    input's processor (a vision-language model's images still need it)."""
    for name in PROCESSOR_FILES if source is not None else ():
        if (source / name).is_file() and not (folder / name).exists():
            shutil.copyfile(source / name, folder / name)


def drop_remote_code(folder: Path) -> None:
    """No ``auto_map`` in the written configs: the output loads with transformers' own classes, as
    awqkit loaded the input, and never asks a user of it to run code (none is copied either)."""
    for name in ("config.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            content = json.loads(path.read_text())
            if isinstance(content, dict) and content.pop("auto_map", None) is not None:
                path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
