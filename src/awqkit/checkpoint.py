"""Loading models and writing quantized folders, atomically: a folder exists only when complete."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from safetensors.torch import save_file

from awqkit.config import DEFAULT_MAX_SHARD_SIZE, parse_size

log = logging.getLogger("awqkit")

DTYPES = {"auto": "auto", "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _check_model_ref(name_or_path: str) -> None:
    path = Path(name_or_path).expanduser()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{name_or_path} is a file, not a model folder")
    if name_or_path.startswith((".", "/", "~")) and not path.is_dir():
        raise FileNotFoundError(f"model folder not found: {name_or_path}")


def one_line_load_error(name_or_path: str, error: OSError) -> FileNotFoundError:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return FileNotFoundError(f"cannot load model {name_or_path!r}: {first_line}")


def load_tokenizer(name_or_path: str) -> Any:
    from transformers import AutoTokenizer

    _check_model_ref(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except OSError as error:
        raise one_line_load_error(name_or_path, error) from None


def load_model(name_or_path: str, dtype: str = "auto", tokenizer: Any = None) -> tuple[Any, Any]:
    """A causal LM and its tokenizer, in the dtype the checkpoint was saved in unless ``dtype`` says."""

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    tokenizer = tokenizer or load_tokenizer(name_or_path)
    return load_checked_model(name_or_path, dtype), tokenizer


MAX_NAMED_TENSORS = 5


def _named(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - MAX_NAMED_TENSORS} more" if len(keys) > MAX_NAMED_TENSORS else ""
    return ", ".join(keys[:MAX_NAMED_TENSORS]) + more


def load_checked_model(name_or_path: str, dtype: str = "auto") -> Any:
    """The model in ``dtype``, refused when its checkpoint lacks a tensor or has one in the wrong shape.

    transformers fills such tensors with random values and only warns: quantized or scored, that
    would be a model nobody saved.
    """
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    try:
        model, loading = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=DTYPES[dtype], output_loading_info=True, ignore_mismatched_sizes=True
        )
    except OSError as error:
        raise one_line_load_error(name_or_path, error) from None
    if loading["missing_keys"]:
        raise ValueError(f"{name_or_path} lacks tensors the model needs: {_named(loading['missing_keys'])}")
    if loading["mismatched_keys"]:
        names = (f"{key} {list(saved)} (model {list(expected)})" for key, saved, expected in loading["mismatched_keys"])
        raise ValueError(f"{name_or_path} has tensors of the wrong shape: {_named(names)}")
    if loading["unexpected_keys"]:
        log.warning("%s: tensors the model does not use, ignored: %s", name_or_path, _named(loading["unexpected_keys"]))
    return model.eval()


MODEL_FOLDER_MARKERS = ("config.json", "awqkit.json")


def check_output_dir(out_dir: str | Path, overwrite: bool, inputs: tuple[str | Path, ...] = ()) -> Path:
    """Refuse, before any work, an output path that cannot or must not be written.

    ``--overwrite`` replaces only an existing model folder (one with config.json or awqkit.json),
    never a file, the current directory or one of its parents, nor an input model's folder.
    """
    out = Path(out_dir).expanduser()
    resolved = out.resolve()
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise FileExistsError(f"output folder exists: {out_dir} (pass --overwrite to replace it)")
        if not out.is_dir() or out.is_symlink():
            raise FileExistsError(f"{out_dir} exists and is not a folder; --overwrite replaces only a model folder")
        cwd = Path.cwd().resolve()
        if resolved == cwd or resolved in cwd.parents:
            raise FileExistsError(f"--overwrite would delete {out_dir}, the current folder or one of its parents")
        for source in inputs:
            source = Path(source).expanduser().resolve()
            if resolved == source or resolved in source.parents:
                raise FileExistsError(f"--overwrite would delete the input model {source}")
        if not any((out / marker).is_file() for marker in MODEL_FOLDER_MARKERS):
            raise FileExistsError(
                f"{out_dir} is not a model folder (no config.json or awqkit.json); --overwrite replaces only model folders"
            )
    parent = next(p for p in (resolved.parent, *resolved.parent.parents) if p.exists())
    if not parent.is_dir():
        raise NotADirectoryError(f"cannot create {out_dir}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {out_dir}: no write permission in {parent}")
    return out


def make_public(folder: Path) -> None:
    """mkdtemp and safetensors make things private; a checkpoint is an ordinary folder."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def publish(tmp: Path, out_dir: str | Path, overwrite: bool) -> Path:
    """Rename the finished ``tmp`` folder to ``out_dir``; an old output is set aside, not lost.

    The old folder is renamed aside, the new one renamed in, and the old one deleted last; if
    the new one cannot be renamed in, the old one is put back.
    """
    out = check_output_dir(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    make_public(tmp)
    aside = out.with_name(f".{out.name}.old-{os.getpid()}") if out.exists() else None
    if aside is not None:
        out.rename(aside)
    try:
        tmp.rename(out)
    except BaseException:
        if aside is not None:
            aside.rename(out)
        raise
    if aside is not None:
        shutil.rmtree(aside)
    return out


def write_atomically(out_dir: str | Path, overwrite: bool, write: Callable[[Path], None]) -> Path:
    """Run ``write`` on a temporary sibling folder, then publish it as ``out_dir``."""
    out = check_output_dir(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        return publish(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    from awqkit.architectures import find_decoder
    from awqkit.formats import block_tensors
    from awqkit.writer import ShardWriter

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
            writer.add(block_tensors(prefix, block_state, block_q, format))
        writer.finish()
        generation = model.generation_config if model.can_generate() else None
        write_model_files(folder, model.config, generation, tokenizer, record, scales, format, float_linears(model))

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


def float_linears(model: Any) -> list[str]:
    """The linears outside the decoder blocks (lm_head), the MoE routers and the linears blocks keep
    float (Qwen2-MoE's shared-expert gate): left float, so listed as ignored (vLLM builds the
    routers as linears)."""
    from torch import nn

    from awqkit.architectures import FLOAT_LINEARS, find_decoder
    from awqkit.experts import router_names

    blocks = find_decoder(model).blocks_name + "."
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    kept = [n for n in linears if not n.startswith(blocks) or n.rsplit(".", 1)[-1] in FLOAT_LINEARS]
    return sorted([*kept, *router_names(model)])


def write_model_files(
    folder: Path,
    config: Any,
    generation_config: Any,
    tokenizer: Any,
    record: dict,
    scales: dict[str, torch.Tensor] | None,
    format: str,
    ignore: list[str],
) -> None:
    """Everything but the weights: config (with quantization_config), tokenizer, record, scales."""
    from awqkit.formats import write_quantization_config
    from awqkit.formats.gguf import GGUF_TYPES, write_gguf

    settings = record["config"]
    if format == "gguf":  # one file holds config and tokenizer: no Hugging Face folder around it
        write_gguf(folder, config, tokenizer, GGUF_TYPES[(settings["bits"], settings.get("symmetric", False))])
    else:
        config.save_pretrained(folder)
        if generation_config is not None:
            generation_config.save_pretrained(folder)
        if format != "fake":
            write_quantization_config(
                folder, format, settings["bits"], settings["group_size"], ignore, settings.get("symmetric", False)
            )
        tokenizer.save_pretrained(folder)
    (folder / "awqkit.json").write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
    if scales is not None:
        save_file(scales, str(folder / "awq_scales.safetensors"), metadata={"format": "pt"})
