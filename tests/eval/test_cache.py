import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from awqkit.eval.cache import CACHE_FORMAT, CachedNLL, CacheKey, load_cache, save_cache
from awqkit.runtime import library_versions

N = 4
KEY = CacheKey("a" * 64, "auto", "b" * 64)


def _valid(**fields) -> dict:
    nll = np.array([2.5, 3.0, 0.0, 1.25])
    return {
        "format": np.array(CACHE_FORMAT),
        "key": np.array(KEY.text()),
        "versions": np.array(json.dumps(library_versions())),
        "dtype": np.array("float32"),
        "nll": nll,
        "scored": np.array([True, True, False, True]),
        **fields,
    }


def test_a_saved_cache_loads_back(tmp_path):
    path = tmp_path / "c.npz"
    cache = CachedNLL(np.array([2.5, 3.0, 0.0, 1.25]), np.array([True, True, False, True]), "bfloat16")
    save_cache(path, KEY, cache)
    loaded = load_cache(path, KEY, N)
    assert np.array_equal(loaded.nll, cache.nll) and np.array_equal(loaded.scored, cache.scored)
    assert loaded.dtype == "bfloat16" and not loaded.complete
    assert [p.name for p in tmp_path.iterdir()] == ["c.npz"]  # no temporary file left


def test_saves_are_synced_before_the_rename(tmp_path, monkeypatch):
    events = []
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync"))
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b)))
    save_cache(tmp_path / "c.npz", KEY, CachedNLL.empty(N))
    # The file's data first, then the rename, then the folder entry the rename wrote.
    assert events == ["fsync", "replace", "fsync"]


def _junk(path: Path) -> None:
    path.write_bytes(b"not an npz archive at all\n" * 10)


def _truncated(path: Path) -> None:
    np.savez(path, **_valid())
    path.write_bytes(path.read_bytes()[:300])


def _npy(path: Path) -> None:
    with open(path, "wb") as handle:
        np.save(handle, np.ones(N))


def _fields(**fields):
    return lambda path: np.savez(path, **_valid(**fields))


def _without(name: str):
    return lambda path: np.savez(path, **{k: v for k, v in _valid().items() if k != name})


INVALID = {
    "zero-byte": lambda path: path.write_bytes(b""),
    "junk": _junk,
    "truncated": _truncated,
    "npy, not npz": _npy,
    "negative nll": _fields(nll=np.array([2.5, -3.0, 0.0, 1.25])),
    "nan nll": _fields(nll=np.array([2.5, np.nan, 0.0, 1.25])),
    "inf nll": _fields(nll=np.array([2.5, np.inf, 0.0, 1.25])),
    "wrong shape": _fields(nll=np.ones(N + 1), scored=np.ones(N + 1, dtype=bool)),
    "float32 nll": _fields(nll=np.ones(N, dtype=np.float32)),
    "scored not bool": _fields(scored=np.ones(N)),
    "old format": _fields(format=np.array(CACHE_FORMAT - 1)),
    "other torch": _fields(versions=np.array(json.dumps({**library_versions(), "torch": "0.0"}))),
    "no dtype": _fields(dtype=np.array("not-a-dtype")),
    "no scored mask": _without("scored"),
    "no key": _without("key"),
    "other weights": _fields(key=np.array(CacheKey("c" * 64, "auto", "b" * 64).text())),
    "other dtype asked": _fields(key=np.array(CacheKey("a" * 64, "float32", "b" * 64).text())),
    "other windows": _fields(key=np.array(CacheKey("a" * 64, "auto", "c" * 64).text())),
    "pickled object": _fields(nll=np.array([{"a": 1}] * N, dtype=object)),
}


@pytest.mark.parametrize("case", INVALID)
def test_an_invalid_cache_file_is_no_cache_with_one_warning(case, tmp_path, caplog):
    path = tmp_path / "c.npz"
    INVALID[case](path)
    with caplog.at_level(logging.WARNING, logger="awqkit"):
        cache = load_cache(path, KEY, N)
    assert not cache.scored.any() and np.array_equal(cache.nll, np.zeros(N)) and cache.dtype is None
    assert len(caplog.records) == 1 and str(path) in caplog.records[0].getMessage()


def test_the_valid_reference_file_of_those_cases_loads(tmp_path):
    # The invalid cases above differ from this file by one field each: the checks are specific.
    np.savez(tmp_path / "c.npz", **_valid())
    cache = load_cache(tmp_path / "c.npz", KEY, N)
    assert cache.scored.tolist() == [True, True, False, True] and cache.dtype == "float32"
