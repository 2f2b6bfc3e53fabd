"""A model folder is untrusted input: awqkit never runs its code, whatever its config asks."""

import io
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import Killed, output_hashes

import awqkit.pipeline
from awqkit.cli import main

FAST = ["--n-calib", "4", "--seq-len", "64", "--n-grid", "4", "--max-search-tokens", "128", "--group-size", "32"]

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


@pytest.mark.parametrize("command", ["quantize", "eval"])
def test_custom_code_is_refused_in_one_line_and_never_run(
    command, custom_code_folder, tmp_path, calib_text, capsys, monkeypatch
):
    monkeypatch.setattr("sys.stdin", io.StringIO("y\ny\ny\n"))  # a prompt would be answered yes
    args = {
        "quantize": [
            "quantize",
            str(custom_code_folder),
            "--out",
            str(tmp_path / "out"),
            "--calib-data",
            str(calib_text),
        ],
        "eval": ["eval", str(custom_code_folder), "--datasets", str(calib_text), "--no-cache"],
    }[command]
    assert main(["--quiet", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "auto_map" in err[0] and "never runs" in err[0]
    assert not (custom_code_folder / "RAN").exists() and not (tmp_path / "out").exists()


def test_diff_and_info_read_a_custom_code_folder_without_running_it(
    custom_code_folder, tiny_llama_dir, capsys, monkeypatch
):
    monkeypatch.setattr("sys.stdin", io.StringIO("y\ny\ny\n"))
    assert main(["diff", str(custom_code_folder), str(tiny_llama_dir)]) == 0
    assert main(["info", str(custom_code_folder)]) == 0
    assert not (custom_code_folder / "RAN").exists()


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
    real = awqkit.pipeline.quantize_block

    def killed_at_block_2(visit, *a, **k):
        if visit.index == 2:
            raise Killed
        return real(visit, *a, **k)

    monkeypatch.setattr(awqkit.pipeline, "quantize_block", killed_at_block_2)
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
