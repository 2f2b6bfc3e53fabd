import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file
from test_cache import INVALID

import awqkit.eval.evaluate
from awqkit.cli import main
from awqkit.eval.cache import CacheKey, load_cache, save_cache
from awqkit.eval.evaluate import check_seq_len
from awqkit.model.load import load_checked_model

N = 4
ARGS = ["--seq-len", "32", "--max-windows", str(N), "--batch-size", "2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(60)))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    """A random two-layer float32 Llama with the generated tokenizer; positions up to 64."""
    folder = tmp_path_factory.mktemp("tiny-compare")
    tiny_model("llama", hidden_act="silu", max_position_embeddings=64).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _eval(tmp_path: Path, model: Path, corpus: Path, *extra: str) -> tuple[int, dict | None]:
    out = tmp_path / "report.json"
    out.unlink(missing_ok=True)
    args = ["--quiet", "eval", str(model), "--datasets", str(corpus), *ARGS, "--json", str(out), *extra]
    rc = main(args)
    return rc, json.loads(out.read_text()) if out.exists() else None


def stored_key(path: Path) -> CacheKey:
    """The key a cache file says it holds."""
    with np.load(path) as fields:
        return CacheKey(**json.loads(fields["key"].item()))


def _scored(report: dict) -> dict:
    """What a report says about the models, without the run's settings (the cache folder differs)."""
    return {key: report[key] for key in ("models", "datasets")}


@pytest.mark.parametrize("case", ["zero-byte", "junk", "truncated", "negative nll"])
def test_a_bad_cache_file_gives_the_report_of_no_cache(case, tmp_path, model_dir, corpus, monkeypatch):
    rc, uncached = _eval(tmp_path, model_dir, corpus, "--no-cache")
    assert rc == 0
    rc, _ = _eval(tmp_path, model_dir, corpus, "--cache-dir", str(tmp_path / "cache"))
    [path] = (tmp_path / "cache").glob("*.npz")
    INVALID[case](path)
    rc, report = _eval(tmp_path, model_dir, corpus, "--cache-dir", str(tmp_path / "cache"))
    assert rc == 0 and _scored(report) == _scored(uncached)
    # The file was rewritten whole: a later run needs no model.
    assert load_cache(path, stored_key(path), N).complete
    monkeypatch.setattr(awqkit.eval.evaluate, "load_checked_model", lambda *a: pytest.fail("model loaded"))
    rc, cached = _eval(tmp_path, model_dir, corpus, "--cache-dir", str(tmp_path / "cache"))
    assert rc == 0 and _scored(cached) == _scored(uncached)


def test_only_unscored_windows_are_scored_again(tmp_path, model_dir, corpus, monkeypatch):
    cache_args = ["--cache-dir", str(tmp_path / "cache")]
    _, full = _eval(tmp_path, model_dir, corpus, *cache_args)
    [path] = (tmp_path / "cache").glob("*.npz")
    key = stored_key(path)
    cache = load_cache(path, key, N)
    cache.scored[[1, 2]] = False  # as if the run died with those windows still to do
    cache.nll[[1, 2]] = 0.0
    save_cache(path, key, cache)
    scored_rows = []
    real = awqkit.eval.evaluate.window_nll

    def counting(model, ids, *args, **kwargs):
        scored_rows.append(len(ids))
        return real(model, ids, *args, **kwargs)

    monkeypatch.setattr(awqkit.eval.evaluate, "window_nll", counting)
    _, resumed = _eval(tmp_path, model_dir, corpus, *cache_args)
    assert scored_rows == [2]
    nll = [report["datasets"][str(corpus)]["results"][0]["window_nll"] for report in (full, resumed)]
    # Windows 0 and 3 come from the cache as they were; 1 and 2 ran again, in a smaller batch.
    assert [nll[1][i] for i in (0, 3)] == [nll[0][i] for i in (0, 3)]
    assert nll[1] == pytest.approx(nll[0], rel=1e-6) and min(nll[1]) > 0


def test_a_non_finite_nll_stops_the_run_naming_model_and_dataset(tmp_path, model_dir, corpus, monkeypatch, capsys):
    monkeypatch.setattr(
        awqkit.eval.evaluate, "window_nll", lambda model, ids, *a, **k: torch.full((len(ids),), torch.nan)
    )
    rc, report = _eval(tmp_path, model_dir, corpus, "--cache-dir", str(tmp_path / "cache"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and report is None and len(err) == 1
    assert "non-finite NLL" in err[0] and str(model_dir) in err[0] and str(corpus) in err[0]
    assert not list((tmp_path / "cache").glob("*"))  # no NaN was cached


def _copy_with(tmp_path: Path, source: Path, edit) -> Path:
    folder = tmp_path / "edited"
    folder.mkdir()
    for path in source.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_a_checkpoint_missing_a_tensor_is_refused(tmp_path, model_dir):
    folder = _copy_with(tmp_path, model_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"lacks tensors the model needs: model\.layers\.1\.mlp\.up_proj\.weight$"):
        load_checked_model(str(folder), "auto")


def test_a_tensor_of_the_wrong_shape_is_refused(tmp_path, model_dir):
    folder = _copy_with(tmp_path, model_dir, lambda t: t.update({"model.norm.weight": torch.ones(3)}))
    with pytest.raises(ValueError, match=r"wrong shape: model\.norm\.weight \[3\] \(model \[64\]\)"):
        load_checked_model(str(folder), "auto")


def test_extra_tensors_are_ignored_with_a_warning(tmp_path, model_dir, caplog):
    folder = _copy_with(tmp_path, model_dir, lambda t: t.update({"extra.weight": torch.ones(3)}))
    with caplog.at_level(logging.WARNING, logger="awqkit"):
        model = load_checked_model(str(folder), "float32")
    assert "extra.weight" in caplog.text and not model.training
    reference = load_file(model_dir / "model.safetensors")
    assert torch.equal(model.model.norm.weight, reference["model.norm.weight"])


def test_seq_len_is_checked_against_the_position_embeddings(model_dir):
    check_seq_len(str(model_dir), 64)
    with pytest.raises(ValueError, match="seq-len 65 is beyond .* max_position_embeddings 64"):
        check_seq_len(str(model_dir), 65)
