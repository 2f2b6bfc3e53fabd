import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from awqkit.io.shards import ShardWriter


def _units(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    head = {
        "embed.weight": torch.randn(40, 8, generator=g).to(torch.bfloat16),
        "norm.weight": torch.rand(8, generator=g),
    }
    return [head] + [
        {f"layers.{i}.w": torch.randn(16, 8, generator=g).to(torch.float16),
         f"layers.{i}.q": torch.randint(-2**31, 2**31 - 1, (4, 2), generator=g, dtype=torch.int32),
         f"layers.{i}.u": torch.randint(0, 255, (3,), generator=g, dtype=torch.uint8),
         f"layers.{i}.scalar": torch.tensor(1.5)}
        for i in range(5)
    ]  # fmt: skip


def _read_folder(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("model*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def _write(folder, units, max_bytes):
    writer = ShardWriter(folder, "model", max_bytes)
    for unit in units:
        writer.add(unit)
    return writer.finish()


def test_one_shard_is_model_safetensors_and_reads_back_exactly(tmp_path):
    units = _units()
    assert _write(tmp_path, units, float("inf")) == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    expected = {k: v for unit in units for k, v in unit.items()}
    read = load_file(tmp_path / "model.safetensors")
    assert read.keys() == expected.keys()
    assert all(read[k].dtype == v.dtype and torch.equal(read[k], v) for k, v in expected.items())
    with safe_open(tmp_path / "model.safetensors", framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_shards_hold_whole_units_and_the_index_is_save_pretrained_s(tmp_path):
    units = _units()
    unit_bytes = [sum(t.numel() * t.element_size() for t in u.values()) for u in units]
    names = _write(tmp_path, units, max_bytes=2 * unit_bytes[1] + 1)
    assert names[0] == f"model-00001-of-{len(names):05d}.safetensors" and len(names) == 4  # head, 2+2+1 blocks
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    expected = {k: v for unit in units for k, v in unit.items()}
    assert set(index["weight_map"]) == set(expected)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in expected.values())
    for unit in units:  # never split over two shards
        assert len({index["weight_map"][k] for k in unit}) == 1
    read = _read_folder(tmp_path)
    assert all(torch.equal(read[k], v) for k, v in expected.items())
    assert not list(tmp_path.glob("*.data")) and not list(tmp_path.glob("*shard-*"))


def test_a_unit_larger_than_the_maximum_gets_a_shard_of_its_own(tmp_path):
    units = _units()
    names = _write(tmp_path, units[:2], max_bytes=10)
    assert len(names) == 2


def test_resuming_from_a_saved_state_gives_identical_bytes(tmp_path):
    units = _units()
    unit_bytes = sum(t.numel() * t.element_size() for t in units[1].values())
    uninterrupted = tmp_path / "a"
    uninterrupted.mkdir()
    _write(uninterrupted, units, max_bytes=2 * unit_bytes + 1)

    resumed = tmp_path / "b"
    resumed.mkdir()
    writer = ShardWriter(resumed, "model", 2 * unit_bytes + 1)
    for unit in units[:4]:
        writer.add(unit)
    state = json.loads(json.dumps(writer.state()))  # what the run saved, through JSON
    writer.saved()
    writer.add(units[4])  # written after the saved state, then the run is killed
    writer.add({"stray": torch.ones(1000)})
    writer._data.close()
    writer = ShardWriter(resumed, "model", 2 * unit_bytes + 1, state)
    for unit in units[4:]:
        writer.add(unit)
    writer.finish()
    assert sorted(p.name for p in resumed.iterdir()) == sorted(p.name for p in uninterrupted.iterdir())
    for path in uninterrupted.iterdir():
        assert (resumed / path.name).read_bytes() == path.read_bytes(), path.name


def test_a_name_written_twice_is_refused(tmp_path):
    writer = ShardWriter(tmp_path, "model")
    writer.add({"a": torch.ones(2)})
    with pytest.raises(ValueError, match="twice"):
        writer.add({"a": torch.ones(2)})
