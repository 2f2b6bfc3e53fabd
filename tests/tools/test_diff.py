import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import save_file

from awqkit.cli import main
from awqkit.tools.diff import compare_tensors, diff_checkpoints


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    names = ["model.embed_tokens.weight", "model.layers.2.mlp.up_proj.weight", "model.layers.10.mlp.up_proj.weight"]
    tensors = {name: torch.randn(8, 16, generator=g).to(torch.bfloat16) for name in names}
    tensors["model.norm.weight"] = torch.ones(16)
    return tensors


def _save(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def _diff(tmp_path: Path, a: Path, b: Path) -> tuple[int, dict | None]:
    out = tmp_path / "diff.json"
    rc = main(["--quiet", "diff", str(a), str(b), "--json", str(out)])
    return rc, json.loads(out.read_text()) if out.exists() else None


def _by_name(report: dict) -> dict[str, dict]:
    return {t["name"]: t for t in report["tensors"]}


def test_identical_checkpoints_exit_0(tmp_path, capsys):
    a, b = _save(tmp_path / "a", _tensors()), _save(tmp_path / "b", _tensors())
    rc, report = _diff(tmp_path, a, b)
    assert rc == 0 and report["identical"] and report["first_difference"] is None
    assert "identical: all 4 tensors equal" in capsys.readouterr().out


def test_one_flipped_element_is_found(tmp_path, capsys):
    tensors = _tensors()
    a = _save(tmp_path / "a", tensors)
    name = "model.layers.10.mlp.up_proj.weight"
    before = tensors[name][3, 5].item()
    tensors[name][3, 5] += 1.0
    rc, report = _diff(tmp_path, a, _save(tmp_path / "b", tensors))
    assert rc == 1 and report["first_difference"] == name
    assert report["counts"] == {"equal": 3, "differ": 1}
    flipped = _by_name(report)[name]
    assert flipped["differing_share"] == 1 / 128
    assert flipped["max_abs"] == abs(tensors[name][3, 5].item() - before) and 0 < flipped["rel_frobenius"] < 1
    layers = {layer["layer"]: layer for layer in report["layers"]}
    assert layers["model.layers.10"]["differing"] == 1 and layers["model.layers.2"]["differing"] == 0
    assert name in capsys.readouterr().out


def test_first_difference_follows_layer_numbers_not_spelling(tmp_path):
    tensors = _tensors()
    a = _save(tmp_path / "a", tensors)
    for name in ("model.layers.10.mlp.up_proj.weight", "model.layers.2.mlp.up_proj.weight"):
        tensors[name][0, 0] += 1.0
    rc, report = _diff(tmp_path, a, _save(tmp_path / "b", tensors))
    assert rc == 1 and report["first_difference"] == "model.layers.2.mlp.up_proj.weight"


def test_first_difference_is_in_model_order_when_there_is_a_config(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "a")
    # Alphabetically mlp.down_proj precedes self_attn.q_proj; in the model, attention runs first.
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
        model.model.layers[0].self_attn.q_proj.weight[0, 0] += 1.0
    model.save_pretrained(tmp_path / "b")
    diff = diff_checkpoints(tmp_path / "a", tmp_path / "b")
    assert diff.first_difference.name == "model.layers.0.self_attn.q_proj.weight"


def test_shape_dtype_and_missing_tensors_are_reported_as_such(tmp_path, capsys):
    tensors = _tensors()
    a = _save(tmp_path / "a", tensors)
    tensors["model.layers.2.mlp.up_proj.weight"] = torch.zeros(8, 17, dtype=torch.bfloat16)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].double()
    tensors["lm_head.weight"] = torch.zeros(2, 2)
    del tensors["model.embed_tokens.weight"]
    rc, report = _diff(tmp_path, a, _save(tmp_path / "b", tensors))
    by_name = _by_name(report)
    assert rc == 1
    shape = by_name["model.layers.2.mlp.up_proj.weight"]
    assert shape["status"] == "shape mismatch" and shape["shape_a"] == [8, 16] and shape["shape_b"] == [8, 17]
    assert shape["max_abs"] is None
    # Same values in another dtype: reported, with the (zero) numeric difference still measured.
    dtype = by_name["model.norm.weight"]
    assert dtype["status"] == "dtype mismatch" and dtype["max_abs"] == 0 and dtype["dtype_b"] == "float64"
    assert by_name["model.embed_tokens.weight"]["status"] == "only in A"
    assert by_name["lm_head.weight"]["status"] == "only in B" and by_name["lm_head.weight"]["shape_b"] == [2, 2]
    out = capsys.readouterr().out
    assert "shape mismatch" in out and "only in A" in out and "only in B" in out


def test_sharded_checkpoint_equals_its_single_file(tmp_path):
    tensors = _tensors()
    a = _save(tmp_path / "a", tensors)
    b = tmp_path / "b"
    b.mkdir()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    for shard, members in shards.items():
        save_file({n: tensors[n] for n in members}, str(b / shard))
    weight_map = {n: shard for shard, members in shards.items() for n in members}
    (b / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    save_file({"ignored": torch.zeros(1)}, str(b / "awq_scales.safetensors"))  # not in the index
    assert _diff(tmp_path, a, b)[0] == 0


def test_bit_patterns_decide_equality():
    a = torch.tensor([0.0, float("nan"), 1.0])
    same = compare_tensors("t", a, a.clone())
    assert same.status == "equal" and same.max_abs == 0
    signed_zero = compare_tensors("t", a, torch.tensor([-0.0, float("nan"), 1.0]))
    assert signed_zero.status == "differ" and signed_zero.differing_share == pytest.approx(1 / 3)


@pytest.mark.parametrize("case", ["missing", "garbage"])
def test_unreadable_checkpoints_exit_2(case, tmp_path, capsys):
    a = _save(tmp_path / "a", _tensors())
    b = tmp_path / "b.safetensors"
    if case == "garbage":
        b.write_bytes(b"not a safetensors file")
    assert _diff(tmp_path, a, b)[0] == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("not found" if case == "missing" else "cannot read") in err[0]
