import json
from pathlib import Path

import pytest
import torch
from conftest import output_hashes
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from awqkit.cli import main
from awqkit.pipeline import MEASUREMENTS
from awqkit.quant.grid import dequantize_groupwise, quantize_groupwise

FAST = ["--n-calib", "4", "--seq-len", "64", "--n-grid", "4", "--max-search-tokens", "128", "--group-size", "32"]


def _run(model_dir, out, calib, *extra):
    return main(["--quiet", "quantize", str(model_dir), "--out", str(out), "--calib-data", str(calib), *FAST, *extra])


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
    assert output_hashes(tmp_path / "again") == output_hashes(nearest_dir)
    assert _run(tiny_llama_dir, tmp_path / "other", calib_text, "--seed", "7") == 0
    assert output_hashes(tmp_path / "other")["model.safetensors"] != output_hashes(nearest_dir)["model.safetensors"]


def test_greedy_records_flips_and_differs(tiny_llama_dir, calib_text, tmp_path):
    assert _run(tiny_llama_dir, tmp_path / "greedy", calib_text, "--rounding", "greedy") == 0
    record = json.loads((tmp_path / "greedy" / "awqkit.json").read_text())
    flips = [layer["flips"] for layer in record["layers"].values()]
    assert all(f >= 0 for f in flips) and sum(flips) > 0


def test_gptq_after_the_search_rounds_nearests_choices_again_with_less_error(tiny_llama_dir, calib_text, tmp_path):
    runs = {}
    for name, extra in (("nearest", []), ("after", ["--rounding", "gptq", "--rounding-after-search"]),
                        ("inside", ["--rounding", "gptq"])):  # fmt: skip
        assert _run(tiny_llama_dir, tmp_path / name, calib_text, "--bits", "3", *extra) == 0
        runs[name] = json.loads((tmp_path / name / "awqkit.json").read_text())["layers"]
    for name, nearest in runs["nearest"].items():
        after, inside = runs["after"][name], runs["inside"][name]
        assert after["alpha"] == nearest["alpha"] and after["fallback"] is None, name  # chosen with nearest
        assert after["flips"] > 0 and inside["flips"] > 0, name
        # GPTQ lowers the output error at nearest's alpha; searching with it can only lower it more
        assert after["error"] < nearest["error"] and inside["error"] <= after["error"] * (1 + 1e-6), name
    saved, original = (
        load_file(tmp_path / "after" / "model.safetensors"),
        load_file(tiny_llama_dir / "model.safetensors"),
    )
    scales = load_file(tmp_path / "after" / "awq_scales.safetensors")
    w, s = original["model.layers.0.mlp.down_proj.weight"].float(), scales["model.layers.0.mlp.down_proj"]
    nearest = dequantize_groupwise(quantize_groupwise(w * s, 3, 32)) / s
    stored = saved["model.layers.0.mlp.down_proj.weight"].float()
    assert not torch.equal(stored, nearest.to(stored.dtype).float())
    # on nearest's grid: every stored weight is a grid point of W * s (another integer, same scale and zero)
    grid = quantize_groupwise(w * s, 3, 32)
    u = (stored * s).view(w.shape[0], -1, 32) / grid.scale[..., None] + grid.zero[..., None]
    assert (u - u.round()).abs().max() < 0.02 and u.round().min() >= 0 and u.round().max() <= 7


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


def test_calibration_tokens_from_a_file_give_the_same_run_as_the_drawn_windows(
    tiny_llama_dir, calib_text, tmp_path, tokenizer
):
    import numpy as np

    from awqkit.config import QuantizeConfig
    from awqkit.data.tokens import calibration_data

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


# The streamed run (the CLI's) against the in-memory one (the Python API's): the same block walk.
STREAM_CASES = {
    "per-linear-fake": [],
    "shared-awq": ["--scales", "shared", "--format", "awq"],
    "shared-module-greedy-ct": ["--scales", "shared", "--objective", "module", "--rounding", "greedy", "--format", "compressed-tensors"],
    "shared-gptq-gram-ct": ["--scales", "shared", "--rounding", "gptq", "--search-error", "gram", "--format", "compressed-tensors"],
}  # fmt: skip


def _in_memory_run(model_dir, calib, extra, out):
    from awqkit.cli import _config_from_args, build_parser
    from awqkit.config import QuantizeConfig
    from awqkit.data.tokens import calibration_data
    from awqkit.formats.folder import save_quantized
    from awqkit.model.load import load_model
    from awqkit.pipeline import quantize_model, run_record

    args = build_parser().parse_args(
        ["quantize", str(model_dir), "--out", str(out), "--calib-data", str(calib), *FAST, *extra]
    )
    config = _config_from_args(QuantizeConfig, args)
    model, tokenizer = load_model(str(model_dir))
    result = quantize_model(model, calibration_data(tokenizer, config), config, progress=False)
    record = run_record(str(model_dir), str(model.dtype).removeprefix("torch."), config, result.layers)
    save_quantized(model, tokenizer, out, record, result.scales, format=config.format, quantized=result.quantized)


@pytest.mark.parametrize("case", STREAM_CASES)
@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_streamed_run_equals_the_in_memory_run(case, model_type, tokenizer, calib_text, tmp_path):
    from conftest import read_tensors, save_tiny

    model_dir = save_tiny(tmp_path / "model", tokenizer, model_type)
    assert _run(model_dir, tmp_path / "streamed", calib_text, *STREAM_CASES[case]) == 0
    _in_memory_run(model_dir, calib_text, STREAM_CASES[case], tmp_path / "in-memory")
    streamed, in_memory = read_tensors(tmp_path / "streamed"), read_tensors(tmp_path / "in-memory")
    assert streamed.keys() == in_memory.keys()
    assert all(streamed[k].dtype == in_memory[k].dtype and torch.equal(streamed[k], in_memory[k]) for k in streamed)
    scales = [load_file(tmp_path / d / "awq_scales.safetensors") for d in ("streamed", "in-memory")]
    assert scales[0].keys() == scales[1].keys() and all(torch.equal(scales[0][k], scales[1][k]) for k in scales[0])
    records = [json.loads((tmp_path / d / "awqkit.json").read_text()) for d in ("streamed", "in-memory")]
    assert records[0]["layers"] == records[1]["layers"] and records[0]["dtype"] == records[1]["dtype"] == "bfloat16"


def test_sharded_output_has_an_index_and_loads_like_the_single_file(nearest_dir, tiny_llama_dir, calib_text, tmp_path):
    from conftest import read_tensors

    out = tmp_path / "sharded"
    assert _run(tiny_llama_dir, out, calib_text, "--max-shard-size", "100KB") == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == set(shards)
    single, sharded = read_tensors(nearest_dir), read_tensors(out)
    assert single.keys() == sharded.keys() == set(index["weight_map"])
    assert all(torch.equal(single[k], sharded[k]) for k in single)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in single.items())


def test_run_measurements_name_every_block(nearest_dir):
    measured = json.loads((nearest_dir / MEASUREMENTS).read_text())
    assert [b["block"] for b in measured["blocks"]] == [0, 1]
    assert all(b["seconds"] > 0 and b["peak_rss_gib"] > 0 for b in measured["blocks"])
    assert measured["device"] == "cpu" and {"calibration", "search", "save"} <= set(measured["stages_s"])


@pytest.mark.parametrize(
    "device, message",
    [("nonsense", "unknown device"), ("tpu", "unknown device"), ("cuda:7", "cuda"), ("mps", "mps")],
)
def test_unavailable_or_unknown_devices_are_one_line(device, message, tiny_llama_dir, calib_text, tmp_path, capsys):
    from awqkit.runtime import _available

    if device != "nonsense" and device != "tpu" and _available(device.split(":")[0]):
        pytest.skip(f"{device} exists here")
    assert _run(tiny_llama_dir, tmp_path / "out", calib_text, "--device", device) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_explicit_cpu_device_gives_the_default_run(nearest_dir, tiny_llama_dir, calib_text, tmp_path):
    assert _run(tiny_llama_dir, tmp_path / "cpu", calib_text, "--device", "cpu") == 0
    assert output_hashes(tmp_path / "cpu") == output_hashes(nearest_dir)


def test_nan_weight_stops_the_run_in_one_line_naming_the_layer(tokenizer, calib_text, tmp_path, capsys):
    from conftest import save_tiny

    model_dir = save_tiny(tmp_path / "model", tokenizer)
    state = load_file(model_dir / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    from safetensors.torch import save_file

    save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()
    assert _run(model_dir, tmp_path / "out", calib_text) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "block 1" in err and "up_proj" in err and "NaN" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_seq_len_beyond_the_models_positions_is_refused(tokenizer, calib_text, tmp_path, capsys):
    from conftest import save_tiny

    model_dir = save_tiny(tmp_path / "model", tokenizer, max_position_embeddings=32)
    assert _run(model_dir, tmp_path / "out", calib_text) == 2
    assert "max_position_embeddings (32)" in capsys.readouterr().err


def test_bfloat16_compute_on_a_float32_model_stores_everything_else_exactly(tokenizer, calib_text, tmp_path):
    from conftest import save_tiny

    model_dir = save_tiny(tmp_path / "model", tokenizer, dtype=torch.float32)
    original = load_file(model_dir / "model.safetensors")
    g = torch.Generator().manual_seed(3)
    for name in original:  # random norms: a bf16 round trip would change them
        if "norm" in name:
            original[name] = torch.rand(original[name].shape, generator=g) + 0.5
    from safetensors.torch import save_file

    save_file(original, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    assert _run(model_dir, out, calib_text, "--compute-dtype", "bfloat16") == 0
    saved, scales = load_file(out / "model.safetensors"), load_file(out / "awq_scales.safetensors")
    assert all(t.dtype == torch.float32 for t in saved.values())
    for name, tensor in original.items():
        linear = name.removesuffix(".weight")
        if linear in scales:  # Q(W*s)/s of the float32 W, not of a bf16-rounded one
            s = scales[linear]
            expected = dequantize_groupwise(quantize_groupwise(tensor * s, 4, 32)) / s
            assert torch.equal(saved[name], expected), name
        else:
            assert torch.equal(saved[name], tensor), name


def _bad_inputs(root: Path) -> dict[str, tuple[list[str], str]]:
    import numpy as np

    np.savez(root / "windows.npz", ids=np.zeros((2, 8), dtype=np.int64))
    np.save(root / "float.npy", np.full((2, 8), 3.7))
    np.save(root / "flat.npy", np.zeros(8, dtype=np.int64))
    (root / "junk.npy").write_bytes(b"not numpy")
    (root / "a-file").write_text("x")
    return {
        "npz calib tokens": (["--calib-tokens", str(root / "windows.npz")], "npz"),
        "float calib tokens": (["--calib-tokens", str(root / "float.npy")], "must be integers"),
        "1-D calib tokens": (["--calib-tokens", str(root / "flat.npy")], "[n_windows, seq_len]"),
        "junk calib tokens": (["--calib-tokens", str(root / "junk.npy")], "not a numpy"),
        "missing calib tokens": (["--calib-tokens", str(root / "nope.npy")], "not found"),
        "bad shard size": (["--max-shard-size", "lots"], "cannot read size"),
        "bad dtype": (["--dtype", "int8"], "unknown dtype"),
        "out below a file": (["--out", str(root / "a-file" / "out")], "not a folder"),
        "symmetric awq": (
            ["--scales", "shared", "--format", "awq", "--symmetric"],
            "format awq (AutoAWQ GEMM) is asymmetric",
        ),
        "unknown scaling": (["--scaling", "loud"], "invalid choice"),
    }


@pytest.mark.parametrize("case", [
    "npz calib tokens", "float calib tokens", "1-D calib tokens", "junk calib tokens", "missing calib tokens",
    "bad shard size", "bad dtype", "out below a file", "symmetric awq", "unknown scaling",
])  # fmt: skip
def test_bad_quantize_inputs_are_one_line_exit_2_and_write_nothing(case, tiny_llama_dir, calib_text, tmp_path, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    extra, message = _bad_inputs(inputs)[case]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    out = ["--out", str(tmp_path / "out")] if "--out" not in extra else []
    argv = ["--quiet", "quantize", str(tiny_llama_dir), *out, "--calib-data", str(calib_text), *FAST, *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_fused_expert_weights_are_refused_not_half_quantized():
    from transformers import AutoConfig, AutoModelForCausalLM

    from awqkit.errors import UnsupportedModelError
    from awqkit.model.layout import find_decoder

    config = AutoConfig.for_model(
        "mixtral", hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=1, num_local_experts=4, num_experts_per_tok=2, vocab_size=128,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    if not any(p.dim() == 3 for p in model.parameters()):
        pytest.skip("this transformers keeps Mixtral's experts as nn.Linear")
    with pytest.raises(UnsupportedModelError, match="outside nn.Linear.*mixture-of-experts"):
        find_decoder(model)


def test_float16_model_with_large_activations_exports_finite_awq_scales(tokenizer, calib_text, tmp_path):
    from conftest import save_tiny
    from safetensors.torch import save_file

    model_dir = save_tiny(tmp_path / "model", tokenizer, dtype=torch.float16)
    state = load_file(model_dir / "model.safetensors")
    embed = state["model.embed_tokens.weight"].float() * 300
    embed[:, :8] = 0  # dead channels: s = 1e-5 there, so an unnormalised 1/s folds as 1e5 (> fp16's max)
    state["model.embed_tokens.weight"] = embed.half()
    save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    assert _run(model_dir, out, calib_text, "--scales", "shared", "--format", "awq", "--n-grid", "10") == 0
    saved = load_file(out / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values() if t.is_floating_point())
    layers = json.loads((out / "awqkit.json").read_text())["layers"]
    assert layers["model.layers.0.self_attn.q_proj"]["alpha"] > 0  # the dead channels' scales were folded


# The accuracy knobs: every one composes with both roundings, both scale modes and every format.
MODES = {
    "per-linear fake": [],
    "shared module fake": ["--scales", "shared", "--objective", "module"],
    "shared awq": ["--scales", "shared", "--format", "awq"],
    "shared compressed-tensors": ["--scales", "shared", "--format", "compressed-tensors"],
}


@pytest.mark.parametrize("rounding", ["nearest", "greedy", "gptq"])
@pytest.mark.parametrize("mode", MODES)
def test_scaling_clip_and_symmetric_compose_with_rounding_scale_mode_and_format(
    mode, rounding, tiny_llama_dir, calib_text, tmp_path
):
    symmetric = [] if "awq" in mode else ["--symmetric"]
    out = tmp_path / "out"
    knobs = ["--scaling", "both", "--clip", *symmetric]
    assert _run(tiny_llama_dir, out, calib_text, *MODES[mode], "--rounding", rounding, *knobs) == 0
    record = json.loads((out / "awqkit.json").read_text())
    assert (
        record["config"]["scaling"] == "both"
        and record["config"]["clip"]
        and record["config"]["symmetric"] == bool(symmetric)
    )
    layers = record["layers"]
    assert len(layers) == 14 and {layer["scaling"] for layer in layers.values()} <= {"activation", "duo"}
    for name, layer in layers.items():
        assert 0.55 <= layer["clip"] <= 1 and 0 <= layer["clipped"] <= 1, name
        if name.endswith(("q_proj", "k_proj")):
            assert layer["clip"] == 1 and layer["clipped"] == 0, name  # never clipped
    # GPTQ already compensates what nearest's ranges were clipped for: there clipping may never pay
    assert rounding == "gptq" or any(layer["clipped"] > 0 for layer in layers.values())
    if "awq" in mode:  # transformers loads AWQ only with gptqmodel; its read-back is test_formats'
        assert all(
            torch.isfinite(t).all() for t in load_file(out / "model.safetensors").values() if t.is_floating_point()
        )
        return
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        logits = model(torch.randint(0, 600, (1, 16), generator=torch.Generator().manual_seed(0))).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("mode", ["per-linear fake", "shared module fake"])
def test_clipping_never_raises_a_layers_error_and_keeps_its_scales(mode, tiny_llama_dir, calib_text, tmp_path):
    records = {}
    for clip in ([], ["--clip"]):
        out = tmp_path / ("clip" if clip else "plain")
        assert (
            _run(tiny_llama_dir, out, calib_text, *MODES[mode], "--rounding", "greedy", "--group-size", "16", *clip)
            == 0
        )
        records[bool(clip)] = json.loads((out / "awqkit.json").read_text())["layers"]
    for name, plain in records[False].items():
        clipped = records[True][name]
        assert clipped["alpha"] == plain["alpha"] and clipped["scaling"] == plain["scaling"], name
        assert clipped["error"] <= plain["error"], name
        assert (clipped["error"] < plain["error"]) == (clipped["clipped"] > 0), name
        assert plain["clip"] is None and plain["clipped"] is None


def test_symmetric_compressed_tensors_loads_in_transformers_with_the_fake_weights(tiny_llama_dir, calib_text, tmp_path):
    shared = ["--scales", "shared", "--symmetric", "--clip", "--scaling", "duo"]
    for fmt in ("fake", "compressed-tensors"):
        assert _run(tiny_llama_dir, tmp_path / fmt, calib_text, *shared, "--format", fmt) == 0
    config = json.loads((tmp_path / "compressed-tensors" / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["weights"]["symmetric"] is True
    packed_tensors = load_file(tmp_path / "compressed-tensors" / "model.safetensors")
    assert not any(name.endswith("weight_zero_point") for name in packed_tensors)
    from conftest import loaded_pair

    fake, packed = loaded_pair(tmp_path / "fake", tmp_path / "compressed-tensors")
    fake_state, packed_state = fake.state_dict(), packed.state_dict()
    for name, tensor in fake_state.items():
        if name.startswith("model.layers.") and name.endswith("proj.weight"):
            assert torch.allclose(packed_state[name].float(), tensor.float(), rtol=2**-7, atol=0), name
            # on the symmetric grid: w / scale is an integer in [-8, 7] (scale from the packed file)
            scale = packed_tensors[name.replace(".weight", ".weight_scale")].float().repeat_interleave(32, dim=1)
            steps = tensor.float() / scale
            # bf16 weight and bf16 scale, each within 2^-8 relative: at most 8 steps x 2 x 2^-8 = 0.0625 apart
            assert (
                (steps - steps.round()).abs().max() < 0.0625 and steps.round().min() >= -8 and steps.round().max() <= 7
            )
        else:
            assert torch.equal(packed_state[name], tensor), name
