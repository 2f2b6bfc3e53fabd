"""Streaming a checkpoint: sharded inputs, refused inputs, names that must match the model's."""

import json

import pytest
import torch
from conftest import read_tensors
from transformers import AutoModelForCausalLM

from awqkit.cli import main
from awqkit.io.safetensors import CheckpointFiles
from awqkit.model.streamed import StreamedModel

FAST = ["--n-calib", "4", "--seq-len", "64", "--n-grid", "2", "--max-search-tokens", "64", "--group-size", "32"]


def _run(model_dir, out, calib, *extra):
    return main(["--quiet", "quantize", str(model_dir), "--out", str(out), "--calib-data", str(calib), *FAST, *extra])


def test_a_sharded_input_gives_the_same_output(tiny_llama_dir, tokenizer, calib_text, tmp_path):
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype="auto").save_pretrained(sharded, max_shard_size="50KB")
    tokenizer.save_pretrained(sharded)
    assert len(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    assert _run(tiny_llama_dir, tmp_path / "a", calib_text) == 0
    assert _run(sharded, tmp_path / "b", calib_text) == 0
    a, b = read_tensors(tmp_path / "a"), read_tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    layers = [json.loads((tmp_path / d / "awqkit.json").read_text())["layers"] for d in "ab"]
    assert layers[0] == layers[1]


def test_block_state_reads_exactly_the_stored_tensors(tiny_llama_dir):
    source = StreamedModel(tiny_llama_dir)
    stored = read_tensors(tiny_llama_dir)
    assert all(p.device.type == "meta" for p in source.model.parameters())
    state = source.block_state(1)
    assert set(state) == {n.removeprefix("model.layers.1.") for n in stored if n.startswith("model.layers.1.")}
    assert all(torch.equal(t, stored["model.layers.1." + n]) for n, t in state.items())
    assert source.non_block_names() == sorted(n for n in stored if not n.startswith("model.layers."))
    source.materialize_decoder()
    assert torch.equal(source.layout.decoder.embed_tokens.weight, stored["model.embed_tokens.weight"])
    source.release_decoder()
    assert source.layout.decoder.embed_tokens.weight.device.type == "meta"


def test_bin_weights_are_refused_with_how_to_convert(tiny_llama_dir, calib_text, tmp_path, capsys):
    folder = tmp_path / "bin-model"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model.config.save_pretrained(folder)  # transformers 5 saves safetensors only: the .bin by hand
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny_llama_dir / name).read_bytes())
    assert _run(folder, tmp_path / "out", calib_text) == 2
    err = capsys.readouterr().err.strip()
    assert ".bin" in err and "save_pretrained" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_missing_a_tensor_is_refused_naming_it(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_bytes((tiny_llama_dir / "config.json").read_bytes())
    state = load_file(tiny_llama_dir / "model.safetensors")
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks model.layers.1.mlp.down_proj.weight"):
        StreamedModel(folder)


def test_an_index_without_weight_map_or_a_missing_shard_is_one_line(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match="no weight_map"):
        CheckpointFiles(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model-1.safetensors"}}')
    with pytest.raises(FileNotFoundError, match="missing"):
        CheckpointFiles(tmp_path)


def test_an_unreachable_hub_is_one_line(calib_text, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert _run("no-such-org/no-such-model", tmp_path / "out", calib_text) == 2
    err = capsys.readouterr().err.strip()
    assert "no-such-org/no-such-model" in err and len(err.splitlines()) == 1
