"""Where a model's tensors come from: safetensors shards read a block at a time onto a skeleton.

The model is built from its config on the meta device (no weights, real rotary buffers), and a
block's tensors are read from the shard(s) holding them only when the walk reaches it, so memory
holds one block whatever the model's size. Each read opens and closes its shard: safetensors maps
the file, and a mapping kept open would count every page read so far as resident memory.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from awqkit.architectures import DecoderLayout, find_decoder
from awqkit.experts import linearize_experts

log = logging.getLogger("awqkit")

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
CONVERT_HINT = (
    "convert it once with: python -c \"from transformers import AutoModelForCausalLM as M; "
    "M.from_pretrained('{src}').save_pretrained('{src}-safetensors')\""
)
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]


def resolve_model_folder(name_or_path: str) -> Path:
    """A local folder for ``name_or_path``: itself, a shipped test model, or a Hub snapshot."""
    from awqkit.shipped import resolve_shipped

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


class CheckpointFiles:
    """The tensors of a safetensors checkpoint folder (one file or an index of shards), by name."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{index}: not a safetensors index (no weight_map)") from None
            self.files = {name: folder / file for name, file in weight_map.items()}
        elif (folder / SINGLE).is_file():
            self.files = {name: folder / SINGLE for name in _keys(folder / SINGLE)}
        elif list(folder.glob("*.bin")) or list(folder.glob("*.pt")):
            raise ValueError(f"{folder} holds PyTorch .bin weights; awqkit reads safetensors: {CONVERT_HINT.format(src=folder)}")
        else:
            raise FileNotFoundError(f"no safetensors weights in {folder} ({SINGLE} or {INDEX})")
        missing = sorted({str(path) for path in self.files.values() if not path.is_file()})
        if missing:
            raise FileNotFoundError(f"{index}: shard(s) missing: {', '.join(missing)}")
        self.keys = {name: name for name in self.files}  # name -> the key it is stored under

    def rename(self, rename: Callable[[str], str]) -> None:
        """Name each tensor as the model does (``rename`` of its stored key); reads use the stored key."""
        self.files = {rename(key): path for key, path in self.files.items()}
        self.keys = {rename(key): key for key in self.keys.values()}

    def names(self) -> list[str]:
        return list(self.files)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, each shard opened once and closed again."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        tensors = {}
        for path, file_names in by_file.items():
            with safe_open(str(path), framework="pt") as handle:
                for name in file_names:
                    tensors[name] = handle.get_tensor(self.keys[name])
        return {name: tensors[name] for name in names}

    def identity(self) -> list[tuple[str, int, int]]:
        """Each file's name, size and modification time: a different checkpoint never matches."""
        files = sorted({*self.files.values(), self.folder / "config.json"})
        return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.is_file()]


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except Exception as error:  # safetensors raises its own error type for a bad header
        raise ValueError(f"{path}: not a readable safetensors file ({str(error).splitlines()[0]})") from None


def checkpoint_renaming(model: nn.Module) -> Callable[[str], str]:
    """Stored key -> the model's name for it, by transformers' renamings for the model type
    (Mixtral's ``block_sparse_moe`` is its ``mlp``). Fusing conversions are not applied: awqkit
    holds experts as linears (awqkit.experts), named per expert as checkpoints store them."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    renamings = [t for t in get_model_conversion_mapping(model, add_legacy=False) if isinstance(t, WeightRenaming)]

    def rename(key: str) -> str:
        for renaming in renamings:
            key, _ = renaming.rename_source_key(key)
        return key

    return rename


class StreamedModel:
    """A causal LM's skeleton on the meta device, its tensors read from the checkpoint on demand."""

    def __init__(self, folder: Path, dtype: torch.dtype | None = None):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.folder = folder
        self.files = CheckpointFiles(folder)
        self.dtype = dtype  # None: each tensor as stored
        self.config = AutoConfig.from_pretrained(folder)
        with init_empty_weights(include_buffers=False):  # rotary tables are computed, not stored
            self.model: nn.Module = AutoModelForCausalLM.from_config(self.config)
        self.model.eval()
        linearize_experts(self.model)
        self.files.rename(checkpoint_renaming(self.model))
        self.layout: DecoderLayout = find_decoder(self.model)
        self._check_names()

    def _check_names(self) -> None:
        tied = set(getattr(self.model, "_tied_weights_keys", None) or {}) if self.config.tie_word_embeddings else set()
        expected = set(self.model.state_dict()) - tied
        missing = sorted(expected - set(self.files.files))
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise ValueError(
                f"{self.folder}: the checkpoint lacks {shown}; awqkit streams checkpoints whose tensor names are "
                "the model's own (re-save it with transformers' save_pretrained)"
            )

    def block_prefix(self, index: int) -> str:
        return f"{self.layout.blocks_name}.{index}."

    def block_state(self, index: int) -> dict[str, torch.Tensor]:
        """Block ``index``'s tensors, named relative to the block, as loaded (CPU)."""
        prefix = self.block_prefix(index)
        names = list(self.layout.blocks[index].state_dict())
        tensors = self.files.read([prefix + name for name in names])
        return {name: self._as_loaded(tensors[prefix + name]) for name in names}

    def stored_name(self, name: str) -> str:
        """What the checkpoint calls the model's tensor ``name`` (Mixtral's ``block_sparse_moe`` for
        the model's ``mlp``); a tensor a packed format adds (``weight_packed``) is named after its
        linear's stored weight. Outputs keep the input's names, which every loader of it reads."""
        if name in self.files.keys:
            return self.files.keys[name]
        module, _, suffix = name.rpartition(".")
        weight = self.files.keys.get(f"{module}.weight")
        return f"{weight.removesuffix('.weight')}.{suffix}" if weight is not None else name

    def stored_names(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self.stored_name(name): tensor for name, tensor in tensors.items()}

    def non_block_names(self) -> list[str]:
        """Checkpoint tensors outside the decoder blocks (embeddings, final norm, lm_head), sorted."""
        blocks = self.layout.blocks_name + "."
        return sorted(name for name in self.files.names() if not name.startswith(blocks))

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        return {name: self._as_loaded(t) for name, t in self.files.read(names).items()}

    def _as_loaded(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.dtype) if self.dtype is not None and tensor.is_floating_point() else tensor

    def _decoder_own_names(self) -> list[str]:
        blocks = self.layout.blocks_name.removeprefix(self._decoder_prefix()) + "."
        return [n for n in self.layout.decoder.state_dict() if not n.startswith(blocks)]

    def _decoder_prefix(self) -> str:
        return f"{self.layout.decoder_name}." if self.layout.decoder_name else ""

    def materialize_decoder(self) -> None:
        """Load the decoder's own tensors (embeddings, norm), not the blocks', for the capture pass."""
        prefix, names = self._decoder_prefix(), self._decoder_own_names()
        tensors = self.read([prefix + n for n in names])
        self.layout.decoder.load_state_dict({n: tensors[prefix + n] for n in names}, strict=False, assign=True)

    def release_decoder(self) -> None:
        """Back to the meta device: the embeddings are not needed after the capture pass."""
        from accelerate.utils import set_module_tensor_to_device

        for name in self._decoder_own_names():
            set_module_tensor_to_device(self.layout.decoder, name, "meta")
