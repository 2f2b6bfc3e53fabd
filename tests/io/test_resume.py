"""A streamed run stopped after block k continues from there and gives the same bytes."""

import json
import logging

import pytest
from conftest import Killed, output_hashes, stop_at_block

import awqkit.pipeline
from awqkit.cli import main
from awqkit.io.resume import STATE, partial_folder

FAST = ["--n-calib", "4", "--seq-len", "64", "--n-grid", "4", "--max-search-tokens", "128", "--group-size", "32"]


def _run(model_dir, out, calib, *extra):
    return main(["--quiet", "quantize", str(model_dir), "--out", str(out), "--calib-data", str(calib), *FAST, *extra])


@pytest.fixture(scope="module")
def four_layer_dir(tmp_path_factory, tokenizer):
    from conftest import save_tiny

    return save_tiny(tmp_path_factory.mktemp("four") / "model", tokenizer, num_hidden_layers=4)


@pytest.mark.parametrize(
    "extra", [[], ["--scales", "shared", "--format", "awq", "--rounding", "greedy"]], ids=["fake", "awq"]
)
def test_killed_run_resumes_to_byte_identical_output(extra, four_layer_dir, calib_text, tmp_path, monkeypatch):
    shards = ["--max-shard-size", "40KB"]  # several shards, so one closes between kill and resume
    assert _run(four_layer_dir, tmp_path / "uninterrupted", calib_text, *shards, *extra) == 0

    out = tmp_path / "resumed"
    stop_at_block(monkeypatch, 2)
    with pytest.raises(Killed):
        _run(four_layer_dir, out, calib_text, *shards, *extra)
    assert not out.exists()
    state = json.loads((partial_folder(out) / STATE).read_text())
    assert state["next_block"] == 2 and len(state["layers"]) == 14

    monkeypatch.undo()
    resumed_blocks = []
    real = awqkit.pipeline.quantize_block
    monkeypatch.setattr(
        awqkit.pipeline, "quantize_block", lambda v, *a, **k: resumed_blocks.append(v.index) or real(v, *a, **k)
    )
    assert _run(four_layer_dir, out, calib_text, *shards, *extra) == 0
    assert resumed_blocks == [2, 3]  # blocks 0 and 1 were not quantized again
    assert output_hashes(out) == output_hashes(tmp_path / "uninterrupted")
    assert not partial_folder(out).exists()


def test_a_different_command_never_resumes_from_a_stale_folder(
    four_layer_dir, calib_text, tmp_path, monkeypatch, caplog
):
    out = tmp_path / "out"
    stop_at_block(monkeypatch, 2)
    with pytest.raises(Killed):
        _run(four_layer_dir, out, calib_text)
    monkeypatch.undo()
    with caplog.at_level(logging.INFO, logger="awqkit"):
        assert (
            main(
                [
                    "quantize",
                    str(four_layer_dir),
                    "--out",
                    str(out),
                    "--calib-data",
                    str(calib_text),
                    *FAST,
                    "--seed",
                    "7",
                ]
            )
            == 0
        )
    assert "different or unfinished run" in caplog.text and "resuming" not in caplog.text
    assert _run(four_layer_dir, tmp_path / "fresh", calib_text, "--seed", "7") == 0
    assert output_hashes(out) == output_hashes(tmp_path / "fresh")


def test_a_foreign_folder_in_the_partial_place_is_never_deleted(four_layer_dir, calib_text, tmp_path, capsys):
    out = tmp_path / "out"
    foreign = partial_folder(out)
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert _run(four_layer_dir, out, calib_text) == 2
    assert "not an awqkit run's folder" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "mine"


def test_ctrl_c_is_one_line_and_the_same_command_continues(four_layer_dir, calib_text, tmp_path, monkeypatch, capsys):
    assert _run(four_layer_dir, tmp_path / "uninterrupted", calib_text) == 0
    stop_at_block(monkeypatch, 2, KeyboardInterrupt)
    capsys.readouterr()
    assert _run(four_layer_dir, tmp_path / "out", calib_text) == 130
    assert "run the same command again" in capsys.readouterr().err
    monkeypatch.undo()
    assert _run(four_layer_dir, tmp_path / "out", calib_text) == 0
    assert output_hashes(tmp_path / "out") == output_hashes(tmp_path / "uninterrupted")
