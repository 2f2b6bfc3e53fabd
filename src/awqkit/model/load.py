"""Finding and loading a model: a local folder, a shipped test model or a Hub snapshot; its
tokenizer; the whole model in memory, refused when its checkpoint does not match it."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from awqkit.io.safetensors import INDEX, SINGLE, tensor_files
from awqkit.model.shipped import resolve_shipped

log = logging.getLogger("awqkit")


HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]


def resolve_model_folder(name_or_path: str) -> Path:
    """A local folder for ``name_or_path``: itself, a shipped test model, or a Hub snapshot."""

    path = Path(resolve_shipped(name_or_path)).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{name_or_path} is a file, not a model folder")
    if name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder not found: {name_or_path}")
    return _hub_snapshot(name_or_path)


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as error:  # the hub raises many kinds (offline, gated, missing): one line each
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise FileNotFoundError(f"cannot fetch {repo_id!r} from the Hugging Face Hub: {first}") from None


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


def check_no_custom_code(name_or_path: str | Path) -> None:
    """Refuse a local model folder whose config needs code of its own (``auto_map`` for a model type
    transformers does not know): awqkit never runs a model folder's code, and never asks."""
    config = Path(name_or_path).expanduser() / "config.json"
    try:
        content = json.loads(config.read_text()) if config.is_file() else {}
    except (ValueError, UnicodeDecodeError):
        return  # transformers reports a malformed config in its own words
    model_type = content.get("model_type") if isinstance(content, dict) else None
    if isinstance(content, dict) and content.get("auto_map") and model_type not in CONFIG_MAPPING:
        raise ValueError(
            f"{config}: auto_map names custom code for model type {model_type!r}, which transformers does not "
            "know; awqkit never runs a model folder's code"
        )


def check_layer_count(folder: Path, config: Any, names: list[str]) -> None:
    """Refuse, before building anything, a config asking for more layers than any list of layers in
    the checkpoint holds (``model.layers.N.``, ``transformer.h.N.``): 20000 layers would take minutes
    to build, only to find their weights missing."""
    layers = getattr(config.get_text_config(), "num_hidden_layers", None)
    indices: dict[str, set[str]] = {}
    for name in names:
        found = re.match(r"(.*?)\.(\d+)\.", name)
        if found:
            indices.setdefault(found[1], set()).add(found[2])
    stored = max(map(len, indices.values()), default=0)
    if isinstance(layers, int) and layers > stored:
        raise ValueError(
            f"{folder / 'config.json'}: num_hidden_layers is {layers}, but the checkpoint holds at most {stored} layers"
        )


def model_class(config: Any) -> Any:
    """``AutoModelForImageTextToText`` where ``config.architectures`` names a vision-language class
    (the model stays one: its language model's blocks are quantized, its vision tower kept), else
    ``AutoModelForCausalLM``."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    named = (getattr(config, "architectures", None) or [None])[0]
    if named in set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values()):
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


def load_tokenizer(name_or_path: str) -> Any:
    from transformers import AutoTokenizer

    _check_model_ref(name_or_path)
    check_no_custom_code(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
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
    from transformers import AutoConfig

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    check_no_custom_code(name_or_path)
    folder = Path(name_or_path).expanduser()
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=False)
    except OSError as error:
        raise one_line_load_error(name_or_path, error) from None
    if (folder / "config.json").is_file() and ((folder / INDEX).is_file() or (folder / SINGLE).is_file()):
        check_layer_count(folder, config, list(tensor_files(folder)))
    try:
        model, loading = model_class(config).from_pretrained(
            name_or_path,
            dtype=DTYPES[dtype],
            output_loading_info=True,
            ignore_mismatched_sizes=True,
            trust_remote_code=False,
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
