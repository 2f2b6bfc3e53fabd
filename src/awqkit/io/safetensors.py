"""The one reader of safetensors checkpoints: which files, which tensor is where, its dtype and shape."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger("awqkit")


INDEX = "model.safetensors.index.json"


SINGLE = "model.safetensors"


CONVERT_HINT = (
    'convert it once with: python -c "from transformers import AutoModelForCausalLM as M; '
    "M.from_pretrained('{src}').save_pretrained('{src}-safetensors')\""
)


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
            raise ValueError(
                f"{folder} holds PyTorch .bin weights; awqkit reads safetensors: {CONVERT_HINT.format(src=folder)}"
            )
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
