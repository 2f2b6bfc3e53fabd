"""The per-window NLL cache of ``awqkit eval``: one .npz per model, dtype, dataset and windows.

Keyed by the sha256 of the model folder's weights and config, the dtype and the windows' digest,
written after every batch so a crashed eval resumes. The key is stored in the file as well as in
its name: a file is trusted only when it passes every check on load (its key, format version,
library versions, shapes, dtypes, finite non-negative NLLs), so another model's file copied under
this one's name is scored again. Any other file is treated as no cache, with a warning, and
overwritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from awqkit.io.safetensors import checkpoint_files, file_digests
from awqkit.runtime import library_versions

log = logging.getLogger("awqkit")


# Version of the cache file's layout; a file of any other version is scored again.
CACHE_FORMAT = 3


def weights_digest(model: str) -> str | None:
    """sha256 over a local model folder's config.json and safetensors files (those inside it only);
    None when it is not a folder with safetensors weights."""
    folder = Path(model).expanduser()
    try:
        files = checkpoint_files(folder) if folder.is_dir() else []
    except FileNotFoundError:
        return None
    if not files:
        return None
    config = [folder / "config.json"] if (folder / "config.json").is_file() else []
    listing = "".join(f"{name}:{digest}\n" for name, digest in file_digests(config + files))
    return hashlib.sha256(listing.encode()).hexdigest()


@dataclass(frozen=True)
class CacheKey:
    """What a cache file holds NLLs of: these weights, in this dtype, on these windows."""

    weights: str  # weights_digest of the model
    dtype: str  # the dtype asked for ("auto" included)
    windows: str  # Windows.digest()

    def file(self, root: Path, dataset: str) -> Path:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(dataset).name)[:40]
        return root / f"{self.weights[:16]}-{self.dtype}-{slug}-{self.windows[:16]}.npz"

    def text(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


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


def read_cache(path: Path, key: CacheKey, n: int) -> CachedNLL:
    """A cache file's contents for ``n`` windows of ``key``; ValueError saying why when they cannot
    be trusted."""
    try:
        loaded = np.load(path)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        with loaded:
            fields = {key: loaded[key] for key in loaded.files}
    # What numpy and zipfile raise on zero-byte, junk and truncated files.
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(f"unreadable: {error}") from None
    missing = {"format", "key", "versions", "dtype", "nll", "scored"} - fields.keys()
    if fields.get("format") is not None and (fields["format"].shape != () or fields["format"].item() != CACHE_FORMAT):
        raise ValueError(f"format {fields['format']!r}, not {CACHE_FORMAT}")
    if missing:
        raise ValueError(f"lacks {', '.join(sorted(missing))}")
    if fields["key"].dtype.kind != "U" or fields["key"].shape != () or fields["key"].item() != key.text():
        raise ValueError(f"holds the NLLs of {fields['key']}, not of {key.text()}")
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


def load_cache(path: Path, key: CacheKey, n: int) -> CachedNLL:
    """What the cache file holds for ``n`` windows of ``key``; an empty cache when there is no valid file."""
    if not path.exists():
        return CachedNLL.empty(n)
    try:
        return read_cache(path, key, n)
    except ValueError as error:
        log.warning("eval cache %s ignored and rewritten: %s", path, error)
        return CachedNLL.empty(n)


def save_cache(path: Path, key: CacheKey, cache: CachedNLL) -> None:
    # Write, fsync, rename: a crash or power loss mid-write leaves the previous cache, never a
    # truncated one. The folder is synced too, so the rename itself is on disk.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            np.savez(
                handle,
                format=np.array(CACHE_FORMAT),
                key=np.array(key.text()),
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
