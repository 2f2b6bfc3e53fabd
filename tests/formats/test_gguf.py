"""GGUF blocks against the format's definition; the file through gguf's reader and transformers."""

import numpy as np
import pytest
import torch

from awqkit.cli import main
from awqkit.formats.gguf import check_gguf, gguf_blocks
from awqkit.quant.grid import dequantize_groupwise, quantize_groupwise

FAST = ["--n-calib", "4", "--seq-len", "64", "--n-grid", "2", "--max-search-tokens", "64"]


def dequantize_by_definition(blocks: np.ndarray, type_name: str) -> np.ndarray:
    """ggml's definitions, block by block: Q4_1 w = d*q + m, Q4_0 w = d*(q - 8), Q8_0 w = d*q;
    byte j of the nibbles holds weight j (low half) and weight j + 16 (high half)."""
    size = {"Q4_1": 20, "Q4_0": 18, "Q8_0": 34}[type_name]
    rows = []
    for row in blocks:
        values = []
        for block in row.reshape(-1, size):
            d = float(block[:2].view(np.float16)[0])
            if type_name == "Q8_0":
                values += [d * float(q) for q in block[2:].view(np.int8)]
                continue
            nibbles = block[4:] if type_name == "Q4_1" else block[2:]
            q = [int(b) & 15 for b in nibbles] + [int(b) >> 4 for b in nibbles]
            m = float(block[2:4].view(np.float16)[0]) if type_name == "Q4_1" else -8 * d
            values += [d * v + m for v in q]
        rows.append(values)
    return np.array(rows, dtype=np.float32)


@pytest.mark.parametrize("bits, symmetric, type_name", [(4, False, "Q4_1"), (4, True, "Q4_0"), (8, True, "Q8_0")])
def test_blocks_dequantize_to_the_grid_values_within_fp16_rounding(bits, symmetric, type_name):
    import gguf.quants

    w = torch.randn(6, 96, generator=torch.Generator().manual_seed(bits)) * 0.05
    w[0] += 0.2  # a single-sign row: a zero point far from the middle
    q = quantize_groupwise(w, bits, 32, symmetric=symmetric)
    q = type(q)(q.q.to(torch.uint8), q.scale, q.zero, bits, 32, symmetric)
    blocks = gguf_blocks(q).numpy()
    assert blocks.dtype == np.uint8 and blocks.shape == (6, 3 * {"Q4_1": 20, "Q4_0": 18, "Q8_0": 34}[type_name])
    ours = dequantize_by_definition(blocks, type_name)
    exact = dequantize_groupwise(q).numpy()
    # d and m are fp16 (relative 2^-11 each); |q - z| <= 2^bits
    scale = np.repeat(q.scale.numpy(), 32, axis=1)
    assert np.abs(ours - exact).max() <= (2**bits + 1) * 2**-10 * scale.max()
    library = gguf.quants.dequantize(blocks, getattr(gguf.GGMLQuantizationType, type_name))
    assert np.array_equal(library.reshape(ours.shape), ours)  # gguf's own reader agrees bit for bit


@pytest.mark.parametrize("bits, group_size, symmetric", [(4, 64, False), (3, 32, False), (8, 32, False), (2, 32, True)])
def test_grids_gguf_cannot_hold_are_refused_naming_what_works(bits, group_size, symmetric):
    with pytest.raises(ValueError, match="--group-size 32 with --bits 4 .Q4_1.") as error:
        check_gguf(bits, group_size, symmetric)
    assert "\n" not in str(error.value)


def test_cli_refuses_before_any_work(tiny_llama_dir, calib_text, tmp_path, capsys):
    base = ["--quiet", "quantize", str(tiny_llama_dir), "--calib-data", str(calib_text), *FAST, "--scales", "shared"]
    assert main([*base, "--out", str(tmp_path / "a"), "--format", "gguf", "--group-size", "64"]) == 2
    assert "format gguf holds groups of 32 only" in capsys.readouterr().err
    # The tiny model's tokenizer is a BPE whose pre-tokenizer llama.cpp would not know: refused up front.
    assert main([*base, "--out", str(tmp_path / "b"), "--format", "gguf", "--group-size", "32"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pre-tokenizer is not one awqkit can name" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.real
@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_exported_gguf_loads_in_transformers_as_the_fake_quant_model(model, tmp_path):
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from awqkit.tools.info import checkpoint_info

    args = ["--quiet", "quantize", model, "--calib-data", "fortunes", *FAST, "--scales", "shared", "--group-size", "32"]
    for fmt in ("fake", "gguf"):
        assert main([*args, "--out", str(tmp_path / fmt), "--format", fmt]) == 0
    assert sorted(p.name for p in (tmp_path / "gguf").iterdir()) == [
        "awq_scales.safetensors", "awqkit-run.json", "awqkit.json", "model.gguf",
    ]  # fmt: skip
    reader = gguf.GGUFReader(tmp_path / "gguf" / "model.gguf")
    tensors = {t.name: t for t in reader.tensors}
    assert {t.tensor_type.name for t in tensors.values() if t.name.startswith("blk.") and t.data.ndim == 2} == {"Q4_1"}
    # One linear's blocks, dequantized from the definition, are the fake export's weight
    # (bf16 there, fp16 d and m here).
    fake = load_file(tmp_path / "fake" / "model.safetensors")
    down = fake["model.layers.0.mlp.down_proj.weight"].float().numpy()
    ours = dequantize_by_definition(np.asarray(tensors["blk.0.ffn_down.weight"].data), "Q4_1")
    assert np.abs(ours - down).max() <= 2**-7 * np.abs(down).max()
    info = checkpoint_info(tmp_path / "gguf")
    assert info.format == "gguf (Q4_1)" and info.bits_per_weight == 5.0 and info.group_size == 32

    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "fake", dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file="model.gguf", dtype=torch.float32)
    expected, got = reference.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():  # q/k back in transformers' order, Gemma's norms minus 1
        assert (got[name] - tensor).abs().max() <= 2**-7 * tensor.abs().max() + 1e-6, name
    ids = torch.randint(0, reference.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(0))
    ids[0, 0] = reference.config.bos_token_id
    with torch.no_grad():
        a, b = reference(ids).logits, loaded(ids).logits
    # Each weight differs by bf16 (fake) and fp16 d, m (GGUF) rounding, a few percent of a step.
    assert (a - b).abs().mean() < 0.03 * a.abs().mean()
    assert (a.argmax(dim=-1) == b.argmax(dim=-1)).float().mean() >= 0.9


@pytest.mark.real
@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_the_vocabulary_written_is_the_one_llama_cpps_converter_wrote(model, tmp_path):
    """Against the shipped GGUF files themselves (written by llama.cpp's converter)."""
    import gguf
    from transformers import AutoConfig, AutoTokenizer

    from awqkit.formats.gguf import _vocabulary
    from awqkit.model.shipped import gguf_path, shipped_model

    folder = shipped_model(model)
    writer = gguf.GGUFWriter(tmp_path / "vocab.gguf", "llama")
    _vocabulary(writer, AutoTokenizer.from_pretrained(folder), AutoConfig.from_pretrained(folder).vocab_size)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    ours, original = gguf.GGUFReader(tmp_path / "vocab.gguf"), gguf.GGUFReader(gguf_path(model))

    def values(reader, key):
        field = reader.fields[key]
        return [bytes(field.parts[i]) if key.endswith("tokens") else field.parts[i][0] for i in field.data]

    tokens, types = values(ours, "tokenizer.ggml.tokens"), values(ours, "tokenizer.ggml.token_type")
    expected_tokens, expected_types = (
        values(original, "tokenizer.ggml.tokens"),
        values(original, "tokenizer.ggml.token_type"),
    )
    differ = [i for i in range(len(tokens)) if (tokens[i], types[i]) != (expected_tokens[i], expected_types[i])]
    # Gemma's 30 whitespace pieces ("  " ...) come back from transformers' GGUF conversion as
    # ordinary "▁▁" pieces: the only difference.
    assert len(tokens) == len(expected_tokens) and len(differ) <= (30 if model == "gemma3" else 0)
    for key in (
        "model",
        "pre",
        "bos_token_id",
        "eos_token_id",
        "unknown_token_id",
        "padding_token_id",
        "add_bos_token",
    ):
        assert ours.fields[f"tokenizer.ggml.{key}"].contents() == original.fields[f"tokenizer.ggml.{key}"].contents(), (
            key
        )
    if model == "gemma3":  # SentencePiece merges by score: the normal pieces' order must be the original's
        scores, expected = values(ours, "tokenizer.ggml.scores"), values(original, "tokenizer.ggml.scores")
        normal = [i for i in range(len(types)) if types[i] == expected_types[i] == gguf.TokenType.NORMAL]
        assert all(scores[a] > scores[b] for a, b in zip(normal, normal[1:]))
        assert all(expected[a] > expected[b] for a, b in zip(normal, normal[1:]))
    else:
        assert len(values(ours, "tokenizer.ggml.merges")) == len(values(original, "tokenizer.ggml.merges"))
