"""How tensors become safetensors shards as they arrive: appended, memory-bounded, resumable.

A block's tensors are appended to the open shard's data file as soon as the block is done; a
shard closes before a block that would take it past the maximum size, and is then written as
header + data (a sequential copy, never the whole shard in memory). ``state()`` is everything
needed to continue after a kill: the closed shards and the open shard's entries, whose last end
offset is where its data file is cut back to. ``finish()`` names the shards like
``save_pretrained`` (``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` + index).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from awqkit.io.safetensors import CODES


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of ``tensor`` (bf16 included, which numpy cannot hold)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def write_safetensors_file(path: Path, entries: list[list[Any]], data: Path | None) -> None:
    """A safetensors file from its entries [name, dtype, shape, start, end] and a file of their bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    for name, dtype, shape, start, end in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # as safetensors' own writer: data starts 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as out:
        out.write(len(encoded).to_bytes(8, "little"))
        out.write(encoded)
        if data is not None:
            with open(data, "rb") as source:
                shutil.copyfileobj(source, out, 64 << 20)
        out.flush()
        os.fsync(out.fileno())
    tmp.rename(path)


class ShardWriter:
    """Appends named tensors to ``{stem}`` shards in ``folder``; see the module docstring."""

    def __init__(self, folder: Path, stem: str, max_shard_bytes: float = math.inf, state: dict | None = None):
        self.folder, self.stem, self.max_shard_bytes = folder, stem, max_shard_bytes
        state = state or {"closed": 0, "entries": [], "weight_map": {}, "total_size": 0}
        self.closed: int = state["closed"]
        self.entries: list[list[Any]] = state["entries"]
        self.weight_map: dict[str, int] = state["weight_map"]
        self.total_size: int = state["total_size"]
        self._drop_files_past_state()
        self._data = open(self._data_path(self.closed), "ab")
        self._data.truncate(self._open_size())

    def _shard_path(self, index: int) -> Path:
        return self.folder / f"{self.stem}.shard-{index:05d}.safetensors"

    def _data_path(self, index: int) -> Path:
        return self.folder / f"{self.stem}.shard-{index:05d}.data"

    def _open_size(self) -> int:
        return self.entries[-1][4] if self.entries else 0

    def _drop_files_past_state(self) -> None:
        """Files a killed run wrote after its last saved state: shards it closed, data it began."""
        for path in self.folder.glob(f"{self.stem}.shard-*"):
            index = int(path.name.split("shard-")[1][:5])
            closed_shard = path.suffix == ".safetensors" and index < self.closed
            if not closed_shard and not (path.suffix == ".data" and index == self.closed):
                path.unlink()

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Append ``tensors`` (one unit: never split over two shards), in the given order."""
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.entries and self._open_size() + size > self.max_shard_bytes:
            self._close()
        for name, tensor in tensors.items():
            if name in self.weight_map:
                raise ValueError(f"tensor {name} written twice")
            if tensor.dtype not in CODES:
                raise ValueError(f"tensor {name}: safetensors cannot hold dtype {tensor.dtype}")
            start = self._open_size()
            self._data.write(tensor_bytes(tensor))
            end = start + tensor.numel() * tensor.element_size()
            self.entries.append([name, CODES[tensor.dtype], list(tensor.shape), start, end])
            self.weight_map[name] = self.closed
            self.total_size += end - start

    def _close(self) -> None:
        self._data.close()
        write_safetensors_file(self._shard_path(self.closed), self.entries, self._data_path(self.closed))
        # The data file stays until the next saved state no longer needs it (see ``state``).
        self.closed, self.entries = self.closed + 1, []
        self._data = open(self._data_path(self.closed), "ab")

    def state(self) -> dict:
        """Flush to disk and return what ``ShardWriter(..., state=)`` continues from."""
        self._data.flush()
        os.fsync(self._data.fileno())
        return {"closed": self.closed, "entries": [list(e) for e in self.entries],
                "weight_map": dict(self.weight_map), "total_size": self.total_size}  # fmt: skip

    def saved(self) -> None:
        """The caller has saved ``state()``: data files of closed shards are no longer needed."""
        for index in range(self.closed):
            self._data_path(index).unlink(missing_ok=True)

    def finish(self) -> list[str]:
        """Close the last shard, name the shards like save_pretrained, write the index; file names."""
        if self.entries or self.closed == 0:
            self._close()
        else:
            self._data.close()
        self._data_path(self.closed).unlink(missing_ok=True)
        self.saved()
        n = self.closed
        names = (
            [f"{self.stem}.safetensors"]
            if n == 1
            else [f"{self.stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        for index, name in enumerate(names):
            self._shard_path(index).rename(self.folder / name)
        if n > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {k: names[v] for k, v in sorted(self.weight_map.items())},
            }
            (self.folder / f"{self.stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names
