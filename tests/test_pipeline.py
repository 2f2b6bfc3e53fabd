import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from awqkit.cli import main
from awqkit.pipeline import MEASUREMENTS
from awqkit.quant import dequantize_groupwise, quantize_groupwise

FAST = ["--n-calib", "4", "--seq-len", "64", "--n-grid", "4", "--max-search-tokens", "128", "--group-size", "32"]


def _run(model_dir, out, calib, *extra):
    return main(["--quiet", "quantize", str(model_dir), "--out", str(out), "--calib-data", str(calib), *FAST, *extra])


def _hashes(folder: Path) -> dict[str, str]:
    """Every file's hash but the run's measurements (timings and memory differ run to run)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.name != MEASUREMENTS}


@pytest.fixture(scope="module")
def nearest_dir(tmp_path_factory, tiny_llama_dir, calib_text):
    out = tmp_path_factory.mktemp("q") / "nearest"
    assert _run(tiny_llama_dir, out, calib_text) == 0
    return out


def test_output_folder_is_complete_and_loads_with_plain_transformers(nearest_dir, tiny_llama_dir):
    names = {p.name for p in nearest_dir.iterdir()}
    assert {"config.json", "model.safetensors", "awqkit.json", "awq_scales.safetensors", "tokenizer.json"} <= names
    assert "generation_config.json" in names
    assert not list(nearest_dir.parent.glob(".*tmp*"))
    assert nearest_dir.stat().st_mode & 0o777 == 0o755
    assert (nearest_dir / "model.safetensors").stat().st_mode & 0o777 == 0o644
    model = AutoModelForCausalLM.from_pretrained(nearest_dir, dtype="auto")
    original = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype="auto")
    assert model.dtype == torch.bfloat16
    record = json.loads((nearest_dir / "awqkit.json").read_text())
    assert record["dtype"] == "bfloat16" and record["config"]["rounding"] == "nearest"
    assert len(record["layers"]) == 14 and "versions" in record
    # Untouched: embeddings, norms, lm_head. Changed: every block linear.
    q_sd, o_sd = model.state_dict(), original.state_dict()
    for name in o_sd:
        changed = not torch.equal(q_sd[name], o_sd[name])
        is_block_linear = name.startswith("model.layers.") and name.endswith("proj.weight")
        assert changed == is_block_linear, name


def test_saved_weight_is_q_of_ws_over_s(nearest_dir, tiny_llama_dir):
    scales = load_file(nearest_dir / "awq_scales.safetensors")
    saved = load_file(nearest_dir / "model.safetensors")
    original = load_file(tiny_llama_dir / "model.safetensors")
    assert len(scales) == 14
    for name, s in scales.items():
        w = original[f"{name}.weight"].float()
        expected = (dequantize_groupwise(quantize_groupwise(w * s, 4, 32)) / s).to(torch.bfloat16)
        assert torch.equal(saved[f"{name}.weight"], expected), name


def test_same_seed_gives_identical_files(nearest_dir, tiny_llama_dir, calib_text, tmp_path):
    assert _run(tiny_llama_dir, tmp_path / "again", calib_text) == 0
    assert _hashes(tmp_path / "again") == _hashes(nearest_dir)
    assert _run(tiny_llama_dir, tmp_path / "other", calib_text, "--seed", "7") == 0
    assert _hashes(tmp_path / "other")["model.safetensors"] != _hashes(nearest_dir)["model.safetensors"]


def test_greedy_records_flips_and_differs(tiny_llama_dir, calib_text, tmp_path):
    assert _run(tiny_llama_dir, tmp_path / "greedy", calib_text, "--rounding", "greedy") == 0
    record = json.loads((tmp_path / "greedy" / "awqkit.json").read_text())
    flips = [layer["flips"] for layer in record["layers"].values()]
    assert all(f >= 0 for f in flips) and sum(flips) > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bits", "9"], "bits must be in 2..8"),
        (["--bits", "1"], "bits must be in 2..8"),
        (["--group-size", "0"], "group size must be >= 1"),
        (["--n-grid", "-1"], "n-grid must be >= 0"),
        (["--n-calib", "100000"], "calibration text too short"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(args, message, tiny_llama_dir, calib_text, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(tiny_llama_dir, out, calib_text, *args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_missing_model_empty_corpus_and_existing_output(tiny_llama_dir, calib_text, tmp_path, capsys):
    assert _run(tmp_path / "no-such-model", tmp_path / "a", calib_text) == 2
    assert "model folder not found" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert _run(tiny_llama_dir, tmp_path / "b", empty) == 2
    assert "is empty" in capsys.readouterr().err
    (tmp_path / "exists").mkdir()
    assert _run(tiny_llama_dir, tmp_path / "exists", calib_text) == 2
    assert "output folder exists" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "exists"]
    assert list((tmp_path / "exists").iterdir()) == []


def test_quiet_works_before_or_after_the_command():
    from awqkit.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["quantize", "m", "--out", "o", "--quiet"]).quiet
    assert parser.parse_args(["--quiet", "quantize", "m", "--out", "o"]).quiet
    assert not parser.parse_args(["quantize", "m", "--out", "o"]).quiet


def test_calibration_tokens_from_a_file_give_the_same_run_as_the_drawn_windows(tiny_llama_dir, calib_text, tmp_path, tokenizer):
    import numpy as np

    from awqkit.calibration import calibration_data
    from awqkit.config import QuantizeConfig

    config = QuantizeConfig(n_calib=4, seq_len=64, calib_data=str(calib_text))
    windows = calibration_data(tokenizer, config)
    np.save(tmp_path / "windows.npy", windows.numpy())
    assert _run(tiny_llama_dir, tmp_path / "drawn", calib_text) == 0
    assert _run(tiny_llama_dir, tmp_path / "file", calib_text, "--calib-tokens", str(tmp_path / "windows.npy")) == 0
    drawn, from_file = (load_file(tmp_path / d / "model.safetensors") for d in ("drawn", "file"))
    assert all(torch.equal(drawn[k], from_file[k]) for k in drawn)
    np.save(tmp_path / "bad.npy", np.full((2, 8), 10**9))
    assert _run(tiny_llama_dir, tmp_path / "bad", calib_text, "--calib-tokens", str(tmp_path / "bad.npy")) == 2
    assert not (tmp_path / "bad").exists()


def test_bfloat16_compute_keeps_float32_quantization_math_and_nearly_the_same_choices(
    nearest_dir, tiny_llama_dir, calib_text, tmp_path
):
    out = tmp_path / "bf16"
    assert _run(tiny_llama_dir, out, calib_text, "--compute-dtype", "bfloat16") == 0
    scales = load_file(out / "awq_scales.safetensors")
    saved = load_file(out / "model.safetensors")
    original = load_file(tiny_llama_dir / "model.safetensors")
    for name, s in scales.items():  # only the products ran in bf16: the stored weight is exact
        w = original[f"{name}.weight"].float()
        expected = (dequantize_groupwise(quantize_groupwise(w * s, 4, 32)) / s).to(torch.bfloat16)
        assert torch.equal(saved[f"{name}.weight"], expected), name
    fp32 = json.loads((nearest_dir / "awqkit.json").read_text())["layers"]
    bf16 = json.loads((out / "awqkit.json").read_text())["layers"]
    same_alpha = sum(fp32[n]["alpha"] == bf16[n]["alpha"] for n in fp32)
    assert same_alpha >= 0.7 * len(fp32), (same_alpha, len(fp32))
    for n in fp32:  # the measured error of the chosen weight, in bf16 products, within a few percent
        assert bf16[n]["error"] == pytest.approx(fp32[n]["error"], rel=0.1), n
