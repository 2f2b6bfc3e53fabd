"""Which text a corpus name or path stands for.

The default calibration corpus, ``pydoc-topics``, is the Python reference text that every CPython
installation carries (``pydoc_data.topics``, what ``help("if")`` prints: ~465k characters of
English prose with code, ~113k SmolLM2 tokens, so 220 windows of 512): it needs no network, no
package and no Hub, so the default command runs the same offline as online. It is fixed per
Python version (recorded in awqkit.json with the other library versions).
Hub datasets (wikitext2, c4, agnews) load through ``datasets`` where the Hub is reachable.
Three English corpora ship in Debian packages and work offline: ``python-doc`` (python3.11-doc,
which contains the pydoc topics), ``fortunes`` (fortunes) and ``foldoc`` (dict-foldoc). Any .txt,
.gz, .jsonl or .parquet path works too (records' ``text`` field). Calibrate on one corpus and
evaluate on the others.
"""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path

HUB_CORPORA = {
    # name: (dataset, config, {split name: hub split}, text field)
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", {"train": "train", "test": "test"}, "text"),
    "c4": (
        "allenai/c4",
        None,
        {"train": "en/c4-train.00000-of-01024.json.gz", "test": "en/c4-validation.00000-of-00008.json.gz"},
        "text",
    ),
    "agnews": ("ag_news", None, {"train": "train", "test": "test"}, "text"),
}


DEBIAN_CORPORA = {
    "python-doc": ("python3.11-doc", Path("/usr/share/info/python3.11.info.gz")),
    "fortunes": ("fortunes", Path("/usr/share/games/fortunes")),
    "foldoc": ("dict-foldoc", Path("/usr/share/dictd/foldoc.dict.dz")),
}


PYDOC_TOPICS = "pydoc-topics"


CORPUS_NAMES = (PYDOC_TOPICS, *HUB_CORPORA, *DEBIAN_CORPORA)


def _pydoc_topics() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def _read_text(path: Path) -> str:
    opener = gzip.open if path.suffix in (".gz", ".dz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as handle:
        return handle.read()


def _fortunes(folder: Path) -> str:
    # Quotations are separated by lines holding only "%"; the .dat files are indexes.
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.is_symlink() and not p.suffix)
    quotes = [q.strip() for p in files for q in _read_text(p).split("\n%\n")]
    return "\n\n".join(q for q in quotes if q)


def _records(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(_read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                raise ValueError(f"cannot read {path}: line {number} is not JSON ({error})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f'cannot read {path}: line {number} has no "text" string')
            texts.append(record["text"])
        return texts
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        column = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"cannot read {path}: {str(error).splitlines()[0]}") from None
    return [t for t in column if t]


def _file_text(path: Path) -> str:
    """A corpus file's text; what it cannot be read for is one line naming it."""
    try:
        return "\n\n".join(_records(path)) if path.suffix in (".jsonl", ".parquet") else _read_text(path)
    except (OSError, EOFError, UnicodeError, zlib.error) as error:  # gzip's bad or truncated data among them
        raise ValueError(f"cannot read {path}: {getattr(error, 'strerror', None) or error}") from None


def _hub_corpus(name: str, split: str) -> str:
    try:
        from datasets import load_dataset
    except ImportError:
        raise ImportError(f"corpus {name!r} comes from the Hub through `datasets`: pip install 'awqkit[hub]'") from None

    dataset, config, splits, field = HUB_CORPORA[name]
    try:
        if name == "c4":
            data = load_dataset(dataset, data_files={split: splits[split]}, split=split)
        else:
            data = load_dataset(dataset, config, split=splits[split])
    except Exception as error:  # offline, gated, renamed: datasets raises many kinds
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        offline = ", ".join((PYDOC_TOPICS, *DEBIAN_CORPORA))
        raise FileNotFoundError(
            f"cannot load corpus {name!r} from the Hugging Face Hub ({first}); offline corpora: {offline}"
        ) from None
    return "\n\n".join(t for t in data[field] if t.strip())


def load_corpus(spec: str, split: str = "test") -> str:
    """The text of a named corpus or a file; ``split`` ("train" or "test") applies to hub corpora."""
    if spec == PYDOC_TOPICS:
        text = _pydoc_topics()
    elif spec in DEBIAN_CORPORA:
        package, path = DEBIAN_CORPORA[spec]
        if not path.exists():
            raise FileNotFoundError(f"corpus {spec!r} needs the Debian package {package} (apt-get install {package})")
        text = _fortunes(path) if path.is_dir() else _read_text(path).replace("\x1f", "")
    elif spec in HUB_CORPORA:
        text = _hub_corpus(spec, split)
    else:
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"unknown corpus {spec!r}: not a file, nor one of {', '.join(CORPUS_NAMES)}")
        text = _file_text(path)
    if not text.strip():
        raise ValueError(f"corpus {spec!r} is empty")
    return text
