"""Where a run computes and what it costs: the compute device, stage timings, peak memory."""

from __future__ import annotations

import functools
import platform
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import transformers

from awqkit import __version__

DEVICES = "auto, cpu, cuda, cuda:N, xpu, xpu:N, mps"


def resolve_device(spec: str) -> torch.device:
    """``auto`` is the first accelerator torch sees (cuda, xpu, mps), else the CPU."""
    if spec == "auto":
        for kind in ("cuda", "xpu", "mps"):
            if _available(kind):
                return torch.device(kind)
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"unknown device {spec!r}; choose one of {DEVICES}") from None
    if device.type not in ("cpu", "cuda", "xpu", "mps"):
        raise ValueError(f"unknown device {spec!r}; choose one of {DEVICES}")
    if device.type != "cpu":
        if not _available(device.type):
            raise ValueError(f"device {spec} is not available: torch {torch.__version__} sees no {device.type} device")
        count = _module(device.type).device_count() if device.type != "mps" else 1
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {spec} does not exist: torch sees {count} {device.type} device(s)")
    return device


def _module(kind: str) -> Any:
    return getattr(torch, kind, None)


def _available(kind: str) -> bool:
    if kind == "mps":
        return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    module = _module(kind)
    return module is not None and module.is_available()


def peak_rss_gib() -> float:
    """This program's peak resident memory so far.

    Linux's VmHWM is the high-water mark of the memory of this program since it started;
    ru_maxrss is not: a process started by fork or vfork + exec inherits its parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux, bytes on macOS


def peak_device_gib(device: torch.device) -> float | None:
    """Peak memory torch allocated on an accelerator so far; None on the CPU."""
    if device.type in ("cuda", "xpu"):
        return _module(device.type).max_memory_allocated(device) / 2**30
    return None


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels so that stage timings mean what they say."""
    if device.type in ("cuda", "xpu"):
        _module(device.type).synchronize(device)


def release_freed_memory(device: torch.device | None = None) -> None:
    """Hand memory freed by a block's temporaries back to the OS (glibc) and the device cache.

    Two threads allocating from their own malloc arenas leave freed chunks scattered, so peak RSS
    grew by 0.0-0.3 GiB run to run on SmolLM2 without the trim; with it, it is flat (measured).
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
    if device is not None and device.type in ("cuda", "xpu"):
        _module(device.type).empty_cache()


@functools.cache
def _glibc() -> Any:
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


# Seconds spent in stages timed inside the innermost open stage, one entry per open stage.
_nested_seconds: list[float] = []


@contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Add the seconds spent inside to ``timings[stage]``, less those of stages timed within it:
    stages never overlap (the search's own time excludes its rounding and clipping), so they sum
    to the time spent."""
    _nested_seconds.append(0.0)
    start = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        inner = _nested_seconds.pop()
        timings[stage] = timings.get(stage, 0.0) + elapsed - inner
        if _nested_seconds:
            _nested_seconds[-1] += elapsed


def library_versions() -> dict[str, str]:
    """The versions that decide what a run computes: a cache or a partial run from others is stale."""
    return {
        "awqkit": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),  # the default corpus, pydoc-topics, is the stdlib's
    }


def cpu_name() -> str:
    """The CPU's model name, to print next to every timing."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
