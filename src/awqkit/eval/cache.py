"""The per-window NLL cache of ``awqkit eval``: one .npz per model, dtype, dataset and windows.

Keyed by the model folder's weights digest, the dtype and the windows' digest, written after every
batch so a crashed eval resumes. A file is trusted only when it passes every check on load (format
version, library versions, shapes, dtypes, finite non-negative NLLs); any other file is treated as
no cache, with a warning, and overwritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from awqkit.eval.windows import Windows
from awqkit.runtime import library_versions

log = logging.getLogger("awqkit")


# Version of the cache file's layout; a file of any other version is scored again.
CACHE_FORMAT = 2


def weights_digest(model: str) -> str | None:
    """sha256 over a local model folder's config.json and *.safetensors; None when not a folder."""
    folder = Path(model).expanduser()
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    h = hashlib.sha256()
    for path in [folder / "config.json", *files]:
        if path.is_file():
            with open(path, "rb") as handle:
                h.update(f"{path.name}:{hashlib.file_digest(handle, 'sha256').hexdigest()}\n".encode())
    return h.hexdigest()


def cache_path(root: Path, digest: str, dtype: str, dataset: str, windows: Windows) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(dataset).name)[:40]
    return root / f"{digest[:16]}-{dtype}-{slug}-{windows.digest()[:16]}.npz"


@dataclass
class CachedNLL:
    """Per-window NLLs of one model on one dataset, filled in as windows are scored.

    ``scored`` marks the windows done; their NLLs are finite and non-negative, the others 0.
    ``dtype`` is the dtype the scored windows ran in, None before the first.
    """

    nll: np.ndarray
    scored: np.ndarray
    dtype: str | None

    @classmethod
    def empty(cls, n: int) -> CachedNLL:
        return cls(np.zeros(n), np.zeros(n, dtype=bool), None)

    @property
    def complete(self) -> bool:
        return self.dtype is not None and bool(self.scored.all())


def read_cache(path: Path, n: int) -> CachedNLL:
    """A cache file's contents for ``n`` windows; ValueError saying why when they cannot be trusted."""
    try:
        loaded = np.load(path)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        with loaded:
            fields = {key: loaded[key] for key in loaded.files}
    # What numpy and zipfile raise on zero-byte, junk and truncated files.
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(f"unreadable: {error}") from None
    missing = {"format", "versions", "dtype", "nll", "scored"} - fields.keys()
    if missing:
        raise ValueError(f"lacks {', '.join(sorted(missing))}")
    if fields["format"].shape != () or fields["format"].item() != CACHE_FORMAT:
        raise ValueError(f"format {fields['format']!r}, not {CACHE_FORMAT}")
    if fields["versions"].dtype.kind != "U" or json.loads(fields["versions"].item()) != library_versions():
        raise ValueError(f"scored by other library versions ({fields['versions']})")
    nll, scored, dtype = fields["nll"], fields["scored"], fields["dtype"]
    if nll.shape != (n,) or nll.dtype != np.float64 or scored.shape != (n,) or scored.dtype != bool:
        raise ValueError(f"nll {nll.dtype} {nll.shape} and scored {scored.dtype} {scored.shape}, not for {n} windows")
    if not (np.isfinite(nll).all() and (nll >= 0).all()):
        raise ValueError("NLLs that are negative, NaN or infinite")
    if dtype.dtype.kind != "U" or dtype.shape != () or not isinstance(getattr(torch, dtype.item(), None), torch.dtype):
        raise ValueError(f"no torch dtype: {dtype!r}")
    return CachedNLL(nll, scored, dtype.item())


def load_cache(path: Path | None, n: int) -> CachedNLL:
    """What the cache file holds for ``n`` windows; an empty cache when there is no valid file."""
    if path is None or not path.exists():
        return CachedNLL.empty(n)
    try:
        return read_cache(path, n)
    except ValueError as error:
        log.warning("eval cache %s ignored and rewritten: %s", path, error)
        return CachedNLL.empty(n)


def save_cache(path: Path, cache: CachedNLL) -> None:
    # Write, fsync, rename: a crash or power loss mid-write leaves the previous cache, never a
    # truncated one. The folder is synced too, so the rename itself is on disk.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            np.savez(
                handle,
                format=np.array(CACHE_FORMAT),
                versions=np.array(json.dumps(library_versions())),
                dtype=np.array(cache.dtype),
                nll=cache.nll,
                scored=cache.scored,
            )
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
