"""The one reader of safetensors checkpoints: which files make one up, which tensor is where, its
dtype and shape from the header, and its data. Every problem is one line naming the file.

Each read opens and closes its file: safetensors maps the file, and a mapping kept open would count
every page read so far as resident memory.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Written beside a checkpoint's weights (awqkit's scales), never loaded with them.
SIDE_FILES = ("awq_scales.safetensors",)
CONVERT_HINT = (
    'convert it once with: python -c "from transformers import AutoModelForCausalLM as M; '
    "M.from_pretrained('{src}').save_pretrained('{src}-safetensors')\""
)

# The format's dtype codes and the torch dtypes they hold: the one dtype map.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in DTYPES.items()}


def dtype_name(code: str) -> str:
    """A dtype code as torch names the dtype (``BF16`` -> ``bfloat16``)."""
    return str(DTYPES[code]).removeprefix("torch.") if code in DTYPES else code


# The dtypes of weights awqkit reads as they are: float8 checkpoints are already quantized.
FLOAT_CODES = ("F64", "F32", "F16", "BF16")


def dtype_bits(code: str) -> int:
    return DTYPES[code].itemsize * 8


@dataclass(frozen=True)
class TensorHeader:
    file: Path
    dtype: str  # the format's code, e.g. BF16
    shape: list[int]


@contextmanager
def opened(path: Path) -> Iterator[Any]:
    """``safe_open`` with its errors (a bad header, a truncated file) as one line naming the file."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            yield handle
    except SafetensorError as error:
        raise ValueError(f"cannot read {path}: {str(error).splitlines()[0]}") from None


def read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a safetensors index: tensor name -> shard file name."""
    try:
        content = json.loads(index.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read {index}: {error}") from None
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(file, str) for file in weight_map.values()):
        raise ValueError(f"cannot read {index}: no weight_map from tensor names to shard files")
    return weight_map


def inside(folder: Path, entry: str, named_by: Path | None = None) -> Path:
    """``folder / entry``, refused in one line unless it stays inside the model folder: no absolute
    path, no ``..`` out of it, no symlink out of it. The one way out allowed is a Hub snapshot's:
    its files link into the blob store of the same repository (``snapshots/REV/x -> ../../blobs/``)."""
    folder = folder.resolve()
    where = f"{named_by}: " if named_by is not None else ""
    path = folder / entry
    if Path(entry).is_absolute() or not Path(os.path.normpath(path)).is_relative_to(folder):
        raise ValueError(
            f"{where}{entry!r} points outside the model folder {folder}; awqkit reads only files inside it"
        )
    allowed = [folder] + ([folder.parent.parent / "blobs"] if folder.parent.name == "snapshots" else [])
    if path.exists() and not any(path.resolve().is_relative_to(root) for root in allowed):
        raise ValueError(f"{where}{entry!r} links outside the model folder {folder}; awqkit reads only files inside it")
    return path


def tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the file holding it, for a model folder (its index, else model.safetensors),
    every file inside the folder."""
    index = folder / INDEX
    if index.is_file():
        files = {name: inside(folder, file, index) for name, file in read_index(index).items()}
    elif (folder / SINGLE).is_file():
        single = inside(folder, SINGLE)
        files = dict.fromkeys(tensor_names(single), single)
    elif list(folder.glob("*.bin")) or list(folder.glob("*.pt")):
        raise ValueError(
            f"{folder} holds PyTorch .bin weights; awqkit reads safetensors: {CONVERT_HINT.format(src=folder)}"
        )
    else:
        raise FileNotFoundError(f"no safetensors weights in {folder} ({SINGLE} or {INDEX})")
    missing = sorted({str(path) for path in files.values() if not path.is_file()})
    if missing:
        raise FileNotFoundError(f"{index}: shard(s) missing: {', '.join(missing)}")
    return files


def checkpoint_files(path: str | Path) -> list[Path]:
    """The files of the checkpoint at ``path``: the file itself, or a folder's indexed shards, its
    model.safetensors, else every *.safetensors in it but the side files."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if (path / INDEX).is_file():
        return [inside(path, file, path / INDEX) for file in sorted(set(read_index(path / INDEX).values()))]
    if (path / SINGLE).is_file():
        return [inside(path, SINGLE)]
    files = sorted(inside(path, p.name) for p in path.glob("*.safetensors") if p.name not in SIDE_FILES)
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {path}")
    return files


def tensor_names(path: Path) -> list[str]:
    with opened(path) as handle:
        return list(handle.keys())


def tensor_headers(files: list[Path]) -> dict[str, TensorHeader]:
    """Name -> file, dtype and shape of every tensor in ``files``, from the headers only."""
    headers: dict[str, TensorHeader] = {}
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"checkpoint shard missing: {file}")
        with opened(file) as handle:
            for name in handle.keys():
                if name in headers:
                    raise ValueError(f"tensor {name} is in both {headers[name].file} and {file}")
                piece = handle.get_slice(name)
                headers[name] = TensorHeader(file, piece.get_dtype(), list(piece.get_shape()))
    return headers


def meta_tensor(header: TensorHeader) -> torch.Tensor:
    """A tensor of the header's shape and dtype on the meta device: shapes planned, nothing read."""
    return torch.empty(header.shape, dtype=DTYPES[header.dtype], device="meta")


def read_tensors(
    files: dict[str, Path], names: list[str], keys: dict[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """The named tensors (stored under ``keys[name]`` when given), each file opened once."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    tensors = {}
    for path, file_names in by_file.items():
        with opened(path) as handle:
            for name in file_names:
                tensors[name] = handle.get_tensor(keys[name] if keys else name)
    return {name: tensors[name] for name in names}


class CheckpointFiles:
    """The tensors of a model folder by name, renamed as the model names them; reads use the stored key."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files = tensor_files(folder)
        self.keys = {name: name for name in self.files}  # name -> the key it is stored under

    def rename(self, rename: Callable[[str], str]) -> None:
        """Name each tensor as the model does (``rename`` of its stored key)."""
        self.files = {rename(key): path for key, path in self.files.items()}
        self.keys = {rename(key): key for key in self.keys.values()}

    def names(self) -> list[str]:
        return list(self.files)

    def headers(self) -> dict[str, TensorHeader]:
        """Each tensor's file, dtype and shape by the model's name, from the headers only."""
        stored = tensor_headers(sorted(set(self.files.values())))
        return {name: stored[key] for name, key in self.keys.items() if key in stored}

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        return read_tensors(self.files, names, self.keys)

    def identity(self, progress: bool = False) -> list[tuple[str, str]]:
        """Each file's name and the sha256 of its bytes, config.json's too: a checkpoint that
        differs in any byte never matches, whatever its files' names and times say."""
        files = sorted({*self.files.values(), self.folder / "config.json"})
        return file_digests([p for p in files if p.is_file()], progress)


def file_digests(paths: list[Path], progress: bool = False) -> list[tuple[str, str]]:
    """Each file's name and the sha256 of its bytes, read once in order (about 1 GB/s a core)."""
    bar = tqdm(total=sum(p.stat().st_size for p in paths), unit="B", unit_scale=True, desc="input digest",
               disable=not progress)  # fmt: skip
    digests = []
    buffer = bytearray(1 << 23)
    for path in paths:
        h = hashlib.sha256()
        try:
            with open(path, "rb", buffering=0) as handle:
                while n := handle.readinto(buffer):
                    h.update(memoryview(buffer)[:n])
                    bar.update(n)
        except OSError as error:
            raise ValueError(f"cannot read {path}: {error.strerror or error}") from None
        digests.append((path.name, h.hexdigest()))
    bar.close()
    return digests
