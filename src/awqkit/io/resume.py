"""What a streamed run keeps in its temporary folder so that the same command, run again, continues.

After each block the folder holds the finished blocks' shards, ``awqkit-resume.json`` (the run's
fingerprint, the records so far, the writers' states) and the hidden states entering the next
block. The JSON is written last, atomically: it is the commit point, and everything it names is
already on disk. A run whose fingerprint (awqkit and library versions, config, device, input
files, calibration tokens) differs never continues from it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from awqkit.io.publish import MARKER
from awqkit.workers import Workers

log = logging.getLogger("awqkit")


STATE = "awqkit-resume.json"


def partial_folder(out: Path) -> Path:
    """Where the run for ``out`` builds its output: a hidden sibling, renamed to ``out`` when done."""
    return out.with_name(f".{out.name}.partial")


def fingerprint(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Progress:
    fingerprint: str
    next_block: int = 0
    layers: dict[str, dict] = field(default_factory=dict)
    blocks: list[dict] = field(default_factory=list)  # per block: seconds, peak memory
    writers: dict[str, dict] = field(default_factory=dict)
    stored_dtype: str | None = None


def _hidden_path(folder: Path, block: int, workers: Workers = Workers()) -> Path:
    """Each worker keeps the hidden states of its own batches."""
    share = f"-{workers.rank}-of-{workers.world}" if workers.world > 1 else ""
    return folder / f"hidden-{block:05d}{share}.safetensors"


def open_partial(folder: Path, run_fingerprint: str) -> Progress:
    """The saved progress of this very run, or a fresh start (a stale folder is cleared)."""
    state = folder / STATE
    if folder.exists():
        saved = _read(state)
        if saved is not None and saved.get("fingerprint") == run_fingerprint:
            progress = Progress(**saved)
            if progress.next_block > 0:
                log.info("resuming at block %d from %s", progress.next_block, folder)
            return progress
        if not (folder / MARKER).is_file() and any(folder.iterdir()):
            raise FileExistsError(f"{folder} exists and is not an awqkit run's folder; remove it")
        log.info("%s is from a different or unfinished run: starting afresh", folder)
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / MARKER).touch()
    progress = Progress(run_fingerprint)
    _write_json(state, progress.__dict__)
    return progress


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(value, handle, allow_nan=False)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.rename(path)


def save_progress(folder: Path, progress: Progress, hidden: list[torch.Tensor], workers: Workers = Workers()) -> None:
    """Commit: every worker's hidden states entering ``progress.next_block``, then (worker 0) the
    JSON that names them."""
    save_file({f"batch.{i}": h.detach().cpu().contiguous() for i, h in enumerate(hidden)},
              str(_hidden_path(folder, progress.next_block, workers)))  # fmt: skip
    workers.barrier()
    if not workers.writes:
        return
    _write_json(folder / STATE, progress.__dict__)
    current = {_hidden_path(folder, progress.next_block, Workers(rank, workers.world)) for rank in range(workers.world)}
    for path in folder.glob("hidden-*.safetensors"):
        if path not in current:
            path.unlink()


def load_hidden(folder: Path, block: int, workers: Workers = Workers()) -> list[torch.Tensor]:
    tensors = load_file(str(_hidden_path(folder, block, workers)))
    return [tensors[f"batch.{i}"] for i in range(len(tensors))]


def clear_progress(folder: Path) -> None:
    """Remove what only resuming needs, before the folder is finished into the output."""
    for path in [folder / STATE, *folder.glob("hidden-*.safetensors")]:
        path.unlink()


def unmark(folder: Path) -> None:
    """The run's folder is published as the output: it is no longer a run in progress."""
    (folder / MARKER).unlink()
