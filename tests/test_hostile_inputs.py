"""A model folder, a corpus and the state a run leaves are untrusted input: awqkit never runs a
folder's code, never trusts stale state by name, and answers each bad input in one line (exit 2)
with nothing written, or mends what a stopped run left."""

import errno
import gzip
import io
import json
import logging
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Killed, output_hashes, stop_at_block
from safetensors.torch import load_file, save_file

from awqkit.cli import main
from awqkit.io.publish import MARKER

FAST = ["--n-calib", "4", "--seq-len", "64", "--n-grid", "4", "--max-search-tokens", "128", "--group-size", "32"]


def _quantize(model: Path, out: Path, calib: Path, *extra: str) -> int:
    return main(["--quiet", "quantize", str(model), "--out", str(out), "--calib-data", str(calib), *FAST, *extra])


EVIL = "from pathlib import Path\nPath(__file__).with_name('RAN').write_text('evil.py ran')\n"


@pytest.fixture
def custom_code_folder(tmp_path, tiny_llama_dir) -> Path:
    """The tiny Llama whose config asks for a model type of its own, implemented in evil.py."""
    folder = tmp_path / "custom"
    shutil.copytree(tiny_llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="evil_llama", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.Evil"}
    )
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(EVIL)
    return folder


@pytest.mark.parametrize("command", ["quantize", "eval", "diff", "info"])
def test_custom_code_is_refused_in_one_line_and_never_run(
    command, custom_code_folder, tiny_llama_dir, tmp_path, calib_text, capsys, monkeypatch
):
    monkeypatch.setattr("sys.stdin", io.StringIO("y\ny\ny\n"))  # a prompt would be answered yes
    model = str(custom_code_folder)
    args = {
        "quantize": ["quantize", model, "--out", str(tmp_path / "out"), "--calib-data", str(calib_text)],
        "eval": ["eval", model, "--datasets", str(calib_text), "--no-cache"],
        "diff": ["diff", str(tiny_llama_dir), model],
        "info": ["info", model],
    }[command]
    assert main(["--quiet", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "auto_map" in err[0] and "never runs" in err[0]
    assert not (custom_code_folder / "RAN").exists() and not (tmp_path / "out").exists()


def _flip_a_weight_bit(folder: Path, tensor: str) -> None:
    """Flip the lowest bit of ``tensor``'s first byte in place, and put the file's times back."""
    path = folder / "model.safetensors"
    times = path.stat()
    data = bytearray(path.read_bytes())
    header_size = int.from_bytes(data[:8], "little")
    start = 8 + header_size + json.loads(data[8 : 8 + header_size])[tensor]["data_offsets"][0]
    data[start] ^= 1
    path.write_bytes(bytes(data))
    os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))


def test_a_run_never_resumes_past_a_changed_weight(tokenizer, calib_text, tmp_path, monkeypatch, caplog):
    """Killed after block 1, a weight of block 0 changed with its file's size and times kept: the
    same command starts afresh and writes what a fresh run on the changed model writes."""
    from conftest import save_tiny

    model = save_tiny(tmp_path / "model", tokenizer, num_hidden_layers=3)
    args = ["--quiet", "quantize", str(model), "--calib-data", str(calib_text), *FAST]
    assert main([*args, "--out", str(tmp_path / "before")]) == 0
    stop_at_block(monkeypatch, 2)
    with pytest.raises(Killed):
        main([*args, "--out", str(tmp_path / "out")])
    monkeypatch.undo()
    _flip_a_weight_bit(model, "model.layers.0.self_attn.q_proj.weight")
    with caplog.at_level(logging.INFO, logger="awqkit"):
        assert main([*args, "--out", str(tmp_path / "out")]) == 0
    assert "resuming" not in caplog.text and "different or unfinished run" in caplog.text
    assert main([*args, "--out", str(tmp_path / "fresh")]) == 0
    assert output_hashes(tmp_path / "out") == output_hashes(tmp_path / "fresh") != output_hashes(tmp_path / "before")


def test_another_models_cache_file_under_this_ones_name_is_scored_again(
    tiny_llama_dir, tokenizer, calib_text, tmp_path
):
    from conftest import save_tiny

    other = save_tiny(tmp_path / "other", tokenizer, seed=1)
    cache = tmp_path / "cache"

    def ppl(model: Path, *extra: str) -> float:
        report = tmp_path / "report.json"
        args = ["--quiet", "eval", str(model), "--datasets", str(calib_text), "--json", str(report)]
        assert main([*args, "--max-windows", "4", "--seq-len", "32", *extra]) == 0
        return json.loads(report.read_text())["datasets"][str(calib_text)]["results"][0]["ppl"]

    own, theirs = ppl(tiny_llama_dir, "--no-cache"), ppl(other, "--no-cache")
    assert own != theirs
    ppl(tiny_llama_dir, "--cache-dir", str(cache))
    [own_file] = cache.iterdir()
    ppl(other, "--cache-dir", str(cache))
    [their_file] = set(cache.iterdir()) - {own_file}
    shutil.copy(their_file, own_file)
    assert ppl(tiny_llama_dir, "--cache-dir", str(cache)) == own
    # A forged file (all NLLs zero, no key) is no cache either.
    np.savez(own_file, nll=np.zeros(4), scored=np.ones(4, dtype=bool))
    assert ppl(tiny_llama_dir, "--cache-dir", str(cache)) == own


WEIGHT = "model.layers.0.mlp.up_proj.weight"


def _cast(dtype: torch.dtype):
    return lambda tensors: tensors.update({WEIGHT: tensors[WEIGHT].to(dtype)})


# How the checkpoint is broken: (config edit, tensors edit, what the one line says).
DISAGREEING = {
    "a tensor's shape": (None, lambda t: t.update({WEIGHT: t[WEIGHT][:, :32].clone()}), "has shape [96, 32], but config.json makes it [96, 64]"),
    "the config's sizes": (lambda c: c.update(hidden_size=128), None, "but config.json makes it [49152, 128]"),
    "a float8 weight": (None, _cast(torch.float8_e4m3fn), "is stored as float8_e4m3fn (an already quantized checkpoint)"),
    "an int64 weight": (None, _cast(torch.int64), "is stored as int64 (not a float)"),
    "20000 layers": (lambda c: c.update(num_hidden_layers=20000), None, "num_hidden_layers is 20000, but the checkpoint holds at most 2 layers"),
}  # fmt: skip


def _edited(folder: Path, config_edit=None, tensors_edit=None) -> Path:
    if config_edit is not None:
        config = json.loads((folder / "config.json").read_text())
        config_edit(config)
        (folder / "config.json").write_text(json.dumps(config))
    if tensors_edit is not None:
        tensors = load_file(folder / "model.safetensors")
        tensors_edit(tensors)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _never_built(monkeypatch) -> None:
    import transformers

    def refused(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", refused)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refused)


@pytest.mark.parametrize("case", DISAGREEING)
def test_a_checkpoint_that_disagrees_with_its_config_is_one_line_and_nothing_written(
    case, tiny_llama_dir, calib_text, tmp_path, capsys, monkeypatch
):
    config_edit, tensors_edit, said = DISAGREEING[case]
    model = _edited(shutil.copytree(tiny_llama_dir, tmp_path / "model"), config_edit, tensors_edit)
    if case == "20000 layers":
        _never_built(monkeypatch)  # refused from the config and the headers alone
    assert _quantize(model, tmp_path / "out", calib_text) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and said in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no output, no partial folder


def test_eval_refuses_a_config_asking_for_layers_the_checkpoint_lacks_before_building(
    tiny_llama_dir, calib_text, tmp_path, capsys, monkeypatch
):
    model = _edited(shutil.copytree(tiny_llama_dir, tmp_path / "model"), DISAGREEING["20000 layers"][0])
    _never_built(monkeypatch)
    assert main(["--quiet", "eval", str(model), "--datasets", str(calib_text), "--no-cache"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "num_hidden_layers is 20000" in err[0]


def test_stored_layers_beyond_the_config_are_named_in_one_warning(tiny_llama_dir, calib_text, tmp_path, caplog):
    model = _edited(shutil.copytree(tiny_llama_dir, tmp_path / "model"), lambda c: c.update(num_hidden_layers=1))
    with caplog.at_level(logging.WARNING, logger="awqkit"):
        assert _quantize(model, tmp_path / "out", calib_text) == 0
    assert [r.getMessage() for r in caplog.records if "model.layers.1 beyond config.json's 1 layers" in r.getMessage()]
    assert len(caplog.records) == 1
    assert not any(name.startswith("model.layers.1.") for name in load_file(tmp_path / "out" / "model.safetensors"))


def _truncated_gzip(path: Path) -> None:
    path.write_bytes(gzip.compress(b"some text " * 100)[:20])


BAD_CORPORA = {
    "garbage.gz": lambda path: path.write_bytes(b"\x1f\x8b garbage"),
    "truncated.gz": _truncated_gzip,
    "not-json.jsonl": lambda path: path.write_text('{"text": "fine"}\nnot json\n'),
    "no-text.jsonl": lambda path: path.write_text('{"body": "no text field"}\n'),
    "invalid.txt": lambda path: path.mkdir(),  # a folder with a file's name
}


@pytest.mark.parametrize("name", BAD_CORPORA)
@pytest.mark.parametrize("command", ["quantize", "eval"])
def test_an_unreadable_corpus_is_one_line_naming_it(command, name, tiny_llama_dir, tmp_path, capsys):
    corpus = tmp_path / name
    BAD_CORPORA[name](corpus)
    args = {
        "quantize": ["quantize", str(tiny_llama_dir), "--out", str(tmp_path / "out"), "--calib-data", str(corpus)],
        "eval": ["eval", str(tiny_llama_dir), "--datasets", str(corpus), "--no-cache"],
    }[command]
    assert main(["--quiet", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(corpus) in err[0], err
    assert not (tmp_path / "out").exists()


GARBAGE_GGUF = {
    "bad version": b"GGUF\x03" + b"\xff" * 100,
    "cut after the version": b"GGUF\x03\x00\x00\x00",
    "a trillion tensors": b"GGUF" + struct.pack("<IQQ", 3, 10**12, 5),
    "a key a terabyte long": b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 10**12),
}


@pytest.mark.parametrize("case", GARBAGE_GGUF)
def test_info_on_a_garbage_gguf_file_is_one_line(case, tmp_path, capsys):
    (tmp_path / "model.gguf").write_bytes(GARBAGE_GGUF[case])
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.gguf" in err[0], err


def test_a_full_disk_is_one_line_naming_where_and_the_same_command_then_finishes(
    tiny_llama_dir, calib_text, tmp_path, capsys, monkeypatch
):
    import awqkit.io.shards

    def no_space(tensor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(awqkit.io.shards, "tensor_bytes", no_space)
    assert _quantize(tiny_llama_dir, tmp_path / "out", calib_text) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and ".out.partial" in err[0], err
    monkeypatch.undo()
    assert _quantize(tiny_llama_dir, tmp_path / "out", calib_text) == 0
    assert _quantize(tiny_llama_dir, tmp_path / "fresh", calib_text) == 0
    assert output_hashes(tmp_path / "out") == output_hashes(tmp_path / "fresh")


@pytest.fixture
def published(tiny_llama_dir, calib_text, tmp_path) -> Path:
    """A finished output and the command that wrote it."""
    out = tmp_path / "out"
    assert _quantize(tiny_llama_dir, out, calib_text) == 0
    return out


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_an_output_a_killed_overwrite_set_aside_is_put_back(published, tiny_llama_dir, calib_text, tmp_path, caplog):
    """Killed between setting the old output aside and renaming the new one in."""
    before = output_hashes(published)
    aside = published.with_name(f".out.old-{_dead_pid()}")
    published.rename(aside)
    with caplog.at_level(logging.WARNING, logger="awqkit"):
        assert _quantize(tiny_llama_dir, published, calib_text) == 2  # the old output is back; no --overwrite
    assert "put back" in caplog.text and not aside.exists() and output_hashes(published) == before


def test_an_old_output_left_aside_after_the_new_one_is_in_place_is_removed(
    published, tiny_llama_dir, calib_text, caplog
):
    aside = published.with_name(f".out.old-{_dead_pid()}")
    shutil.copytree(published, aside)
    with caplog.at_level(logging.WARNING, logger="awqkit"):
        assert _quantize(tiny_llama_dir, published, calib_text, "--overwrite") == 0
    assert "removed" in caplog.text and not aside.exists()


def test_a_published_output_still_marked_as_partial_is_unmarked(published, tiny_llama_dir, calib_text, caplog):
    (published / MARKER).touch()
    with caplog.at_level(logging.WARNING, logger="awqkit"):
        assert _quantize(tiny_llama_dir, published, calib_text) == 2  # it exists, and no --overwrite
    assert "unmarked" in caplog.text and not (published / MARKER).exists()


def test_a_known_model_type_asking_for_custom_code_is_written_without_it(tiny_llama_dir, calib_text, tmp_path):
    model = _edited(
        shutil.copytree(tiny_llama_dir, tmp_path / "model"),
        lambda c: c.update(auto_map={"AutoModelForCausalLM": "evil.Evil"}),
    )
    (model / "evil.py").write_text(EVIL)
    out = tmp_path / "out"
    assert _quantize(model, out, calib_text) == 0
    assert not (model / "RAN").exists() and not (out / "evil.py").exists()
    assert not any("auto_map" in json.loads(p.read_text()) for p in out.glob("*.json"))


def test_info_on_a_folder_without_readable_weights_is_one_line(tiny_llama_dir, tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", folder)
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    assert main(["info", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read" in err[0] and "model.safetensors" in err[0], err
