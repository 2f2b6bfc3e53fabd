import json

import pytest
import torch
from conftest import loaded_pair
from safetensors.torch import load_file

from awqkit.cli import main
from awqkit.formats.awq_gemm import AWQ_ORDER, awq_gemm_tensors, pack_awq, unpack_awq
from awqkit.formats.pack_quantized import pack_quantized_tensors
from awqkit.quant.grid import GroupQuantized, dequantize_groupwise, quantize_groupwise
from awqkit.tools.info import checkpoint_info

G = 32
FAST = ["--n-calib", "4", "--seq-len", "64", "--n-grid", "4", "--max-search-tokens", "128", "--group-size", str(G)]


def awq_unpack_by_definition(packed: torch.Tensor) -> torch.Tensor:
    """AutoAWQ GEMM, read from its definition one value at a time: int32 column j holds output
    columns 8j + order[i] in bits 4i..4i+3, order = [0, 2, 4, 6, 1, 3, 5, 7]."""
    rows, n = packed.shape
    out = torch.empty(rows, 8 * n, dtype=torch.int64)
    for r in range(rows):
        for j in range(n):
            word = int(packed[r, j]) & 0xFFFFFFFF
            for i in range(8):
                out[r, 8 * j + AWQ_ORDER[i]] = (word >> (4 * i)) & 0xF
    return out


def ct_unpack_by_definition(packed: torch.Tensor, bits: int, dim: int, length: int) -> torch.Tensor:
    """compressed-tensors pack-quantized: floor(32/bits) unsigned values per int32 along ``dim``
    (3 bits: 10, two bits unused), value k in bits k*bits.., each the signed integer plus
    2^(bits-1), the last word padded with zeros; returns the first ``length`` unsigned values."""
    per_word = 32 // bits
    words = packed if dim == 1 else packed.T
    out = torch.empty(words.shape[0], words.shape[1] * per_word, dtype=torch.int64)
    for r in range(words.shape[0]):
        for j in range(words.shape[1]):
            word = int(words[r, j]) & 0xFFFFFFFF
            for k in range(per_word):
                out[r, per_word * j + k] = (word >> (bits * k)) & (2**bits - 1)
    out = out[:, :length]
    return out if dim == 1 else out.T


def _random_quantized(out: int = 16, inp: int = 64, seed: int = 0) -> GroupQuantized:
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))
    q = quantize_groupwise(w, 4, 16)
    return GroupQuantized(q.q.to(torch.uint8), q.scale, q.zero, 4, 16)


def test_awq_pack_round_trip_is_exact_including_the_sign_nibble():
    values = torch.randint(0, 16, (5, 64), generator=torch.Generator().manual_seed(0))
    values[0] = 15  # every nibble set: the int32 is -1
    values[1] = 0
    values[2, :8] = torch.tensor([0, 0, 0, 0, 0, 0, 0, 8])  # only the top bit of the word: INT32_MIN
    packed = pack_awq(values)
    assert packed.dtype == torch.int32 and packed.shape == (5, 8)
    assert (packed[0] == -1).all() and (packed[1] == 0).all()
    assert packed[2, 0] == -(2**31)
    assert torch.equal(unpack_awq(packed), values)
    assert torch.equal(awq_unpack_by_definition(packed), values)


def test_awq_tensors_hold_the_integers_zeros_and_fp16_scales():
    q = _random_quantized()
    t = awq_gemm_tensors(q)
    assert t["qweight"].shape == (64, 2) and t["qzeros"].shape == (4, 2) and t["scales"].shape == (4, 16)
    assert t["scales"].dtype == torch.float16
    assert torch.equal(awq_unpack_by_definition(t["qweight"]), q.q.T.long())
    assert torch.equal(awq_unpack_by_definition(t["qzeros"]), q.zero.T.long())
    weight = (
        awq_unpack_by_definition(t["qweight"]) - awq_unpack_by_definition(t["qzeros"]).repeat_interleave(16, 0)
    ) * t["scales"].float().repeat_interleave(16, 0)
    # Identical to awqkit's own weights up to the fp16 rounding of the scales.
    rounded = GroupQuantized(q.q, q.scale.half().float(), q.zero, 4, 16)
    assert torch.equal(weight.T, dequantize_groupwise(rounded))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_compressed_tensors_packing_matches_its_definition(bits):
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    q = quantize_groupwise(w, bits, 16)
    t = pack_quantized_tensors(GroupQuantized(q.q.to(torch.uint8), q.scale, q.zero, bits, 16), torch.bfloat16)
    assert t["weight_shape"].tolist() == [16, 64]
    assert torch.equal(ct_unpack_by_definition(t["weight_packed"], bits, dim=1, length=64), q.q.long())
    assert torch.equal(ct_unpack_by_definition(t["weight_zero_point"], bits, dim=0, length=16), q.zero.long())
    assert torch.equal(t["weight_scale"], q.scale.to(torch.bfloat16))


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_llama_dir, calib_text):
    """The same shared-scale run written in all three formats (runs are deterministic)."""
    root = tmp_path_factory.mktemp("formats")
    for fmt in ("fake", "awq", "compressed-tensors"):
        args = ["--quiet", "quantize", str(tiny_llama_dir), "--out", str(root / fmt), "--calib-data", str(calib_text)]
        assert main([*args, *FAST, "--scales", "shared", "--format", fmt]) == 0
    return root


def _awq_weights(folder) -> dict[str, torch.Tensor]:
    state = load_file(folder / "model.safetensors")
    weights = {}
    for name in [k.removesuffix(".qweight") for k in state if k.endswith(".qweight")]:
        q = awq_unpack_by_definition(state[f"{name}.qweight"])
        zeros = awq_unpack_by_definition(state[f"{name}.qzeros"]).repeat_interleave(G, 0)
        weights[name] = ((q - zeros) * state[f"{name}.scales"].float().repeat_interleave(G, 0)).T
    return weights


def test_awq_export_reads_back_as_the_fake_weights(exports):
    config = json.loads((exports / "awq" / "config.json").read_text())["quantization_config"]
    assert config == {
        "quant_method": "awq",
        "version": "gemm",
        "bits": 4,
        "group_size": G,
        "zero_point": True,
        "modules_to_not_convert": None,
    }
    fake = load_file(exports / "fake" / "model.safetensors")
    awq = load_file(exports / "awq" / "model.safetensors")
    weights = _awq_weights(exports / "awq")
    assert len(weights) == 14
    for name, w in weights.items():
        # fp16 scales vs the fake export's bf16 weights (unit roundoff 2^-8): both round one grid value.
        reference = fake[f"{name}.weight"].float()
        assert torch.allclose(w, reference, rtol=2**-7, atol=1e-6 * reference.abs().max()), name
    for name, tensor in fake.items():
        if name.removesuffix(".weight") not in weights:
            assert torch.equal(awq[name], tensor), name  # norms (folded), embeddings: as in the fake export


def test_compressed_tensors_export_loads_in_transformers_with_the_fake_weights(exports):
    fake, packed = loaded_pair(exports / "fake", exports / "compressed-tensors")
    ids = torch.randint(0, 600, (1, 32), generator=torch.Generator().manual_seed(0))
    fake_state, packed_state = fake.state_dict(), packed.state_dict()
    for name, tensor in fake_state.items():
        if name.startswith("model.layers.") and name.endswith("proj.weight"):
            # Both are the grid value (q - z) * scale rounded to bf16; the packed one from a bf16 scale.
            assert torch.allclose(packed_state[name].float(), tensor.float(), rtol=2**-7, atol=0), name
        else:
            assert torch.equal(packed_state[name], tensor), name
    with torch.no_grad():
        a, b = fake(ids).logits.float(), packed(ids).logits.float()
    assert (a - b).abs().max() < 0.05 * a.abs().max()


@pytest.mark.parametrize("bits", [2, 3])
def test_low_bit_compressed_tensors_loads_in_transformers_with_the_fake_weights(
    bits, tiny_llama_dir, calib_text, tmp_path
):
    """3 bits pack 10 per int32 (two bits unused), 2 bits 16: transformers reads both back."""
    for fmt in ("fake", "compressed-tensors"):
        args = [
            "--quiet",
            "quantize",
            str(tiny_llama_dir),
            "--out",
            str(tmp_path / fmt),
            "--calib-data",
            str(calib_text),
        ]
        assert (
            main([*args, *FAST, "--scales", "shared", "--bits", str(bits), "--rounding", "gptq", "--format", fmt]) == 0
        )
    config = json.loads((tmp_path / "compressed-tensors" / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["weights"]["num_bits"] == bits
    fake, packed = loaded_pair(tmp_path / "fake", tmp_path / "compressed-tensors")
    fake_state, packed_state = fake.state_dict(), packed.state_dict()
    for name, tensor in fake_state.items():
        if name.startswith("model.layers.") and name.endswith("proj.weight"):
            assert torch.allclose(packed_state[name].float(), tensor.float(), rtol=2**-7, atol=0), name
            assert len(torch.unique(tensor[0, :G])) <= 2**bits, name  # one group: at most 2^bits values


def test_info_reports_formats_and_bits_per_weight(exports, tiny_llama_dir):
    infos = {fmt: checkpoint_info(exports / fmt) for fmt in ("fake", "awq", "compressed-tensors")}
    assert {fmt: i.format for fmt, i in infos.items()} == {f: f for f in infos}
    assert all(i.bits == 4 and i.group_size == G and i.quantized_linears == 14 for i in infos.values())
    # 4-bit integers, a 4-bit zero and a 16-bit scale per group of G weights.
    assert infos["awq"].bits_per_weight == pytest.approx(4 + 20 / G)
    ct = infos["compressed-tensors"]  # plus each linear's weight_shape, two int64
    assert ct.bits_per_weight == pytest.approx(4 + 20 / G + 14 * 128 / ct.quantized_weights)
    assert infos["fake"].bits_per_weight == 16
    assert checkpoint_info(tiny_llama_dir).format == "float"


def test_packed_formats_refuse_a_ragged_group_naming_sizes_that_work(tmp_path, tiny_llama_dir, calib_text, capsys):
    # The tiny model's inputs are 64 and 96 wide: 48 divides neither evenly.
    args = [
        "--quiet",
        "quantize",
        str(tiny_llama_dir),
        "--out",
        str(tmp_path / "x"),
        "--calib-data",
        str(calib_text),
        *FAST,
    ]
    assert main([*args, "--scales", "shared", "--format", "awq", "--group-size", "48"]) == 2
    err = capsys.readouterr().err
    assert "64, 96" in err and "16, 32" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
    assert main([*args, "--format", "compressed-tensors"]) == 2
    assert "--scales shared" in capsys.readouterr().err
