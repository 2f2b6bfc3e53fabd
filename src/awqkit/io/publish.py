"""Output paths checked before any work, and folders published atomically: an output exists
only when complete, and an old one is set aside until the new one is in place."""

from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("awqkit")

MODEL_FOLDER_MARKERS = ("config.json", "awqkit.json")
MARKER = ".awqkit-partial"  # says a folder is a run's own, from creation until it is published


def check_output_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """Refuse, before any work, an output path that cannot or must not be written.

    ``--overwrite`` replaces only an existing model folder (one with config.json or awqkit.json),
    never a file, the current directory or one of its parents (nor an input: ``check_not_input``).
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


def check_not_input(out: Path, source: Path) -> None:
    """Refuse an output that is, or holds, the input model's folder (``--overwrite`` would delete it)."""
    resolved, source = out.resolve(), source.expanduser().resolve()
    if out.exists() and (resolved == source or resolved in source.parents):
        raise FileExistsError(f"--overwrite would delete the input model {source}")


def make_public(folder: Path) -> None:
    """mkdtemp and safetensors make things private; a checkpoint is an ordinary folder."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _aside(out: Path, pid: int) -> Path:
    return out.with_name(f".{out.name}.old-{pid}")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def recover_interrupted_publish(out_dir: str | Path) -> None:
    """Mend what a publish of ``out_dir`` stopped midway left (see ``publish``): the previous output
    set aside is put back when no output took its place, and deleted when the new one is in place;
    the marker a published run had yet to remove is removed. Each repair is said in one warning."""
    out = Path(out_dir).expanduser()
    for aside in sorted(out.parent.glob(f".{glob.escape(out.name)}.old-*")):
        pid = aside.name.rsplit("-", 1)[1]
        if not aside.is_dir() or not pid.isdigit() or _running(int(pid)):
            continue
        if out.exists() or out.is_symlink():
            shutil.rmtree(aside)
            log.warning("removed %s, the output %s replaced in a run that stopped before removing it", aside, out)
        else:
            aside.rename(out)
            log.warning("put back %s from %s, where a run that stopped while replacing it had set it aside", out, aside)
    if out.is_dir() and not out.is_symlink() and (out / MARKER).is_file() and (out / "awqkit.json").is_file():
        (out / MARKER).unlink()
        log.warning("%s was published by a run that stopped before unmarking it: unmarked", out)


def publish(tmp: Path, out_dir: str | Path, overwrite: bool) -> Path:
    """Rename the finished ``tmp`` folder to ``out_dir``; an old output is set aside, not lost.

    The old folder is renamed aside (``.<out>.old-PID``), the new one renamed in, and the old one
    deleted last; if the new one cannot be renamed in, the old one is put back. A process killed
    between those steps leaves what ``recover_interrupted_publish`` mends.
    """
    out = check_output_dir(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    make_public(tmp)
    aside = _aside(out, os.getpid()) if out.exists() else None
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
    recover_interrupted_publish(out_dir)
    out = check_output_dir(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        return publish(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def writes_named(folder: Path) -> Iterator[None]:
    """An OSError that names no file (a full disk, as a write reports it) names ``folder``."""
    try:
        yield
    except OSError as error:
        if error.filename is None and error.errno is not None:
            raise OSError(error.errno, error.strerror or str(error), str(folder)) from None
        raise


def check_output_file(path: str | Path) -> None:
    """Refuse a report destination that cannot be written, before the work whose result it holds."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"output is a folder, not a file: {path}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"no folder to write {path} into: {path.parent}")
