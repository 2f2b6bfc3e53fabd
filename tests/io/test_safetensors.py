"""The one safetensors reader: a model folder's files stay inside it, whatever its index says."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from awqkit.cli import main
from awqkit.io.safetensors import CheckpointFiles, checkpoint_files, inside, tensor_headers


def _folder(root: Path, index: dict[str, str]) -> Path:
    folder = root / "model"
    folder.mkdir()
    save_file({"a": torch.zeros(2)}, str(folder / "shard.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    return folder


@pytest.fixture
def outside(tmp_path) -> Path:
    save_file({"b": torch.ones(2)}, str(tmp_path / "evil.safetensors"))
    return tmp_path / "evil.safetensors"


@pytest.mark.parametrize("entry", ["../evil.safetensors", "ABSOLUTE", "sub/../../evil.safetensors"])
def test_an_index_entry_outside_the_folder_is_refused_in_one_line(tmp_path, outside, entry):
    entry = str(outside) if entry == "ABSOLUTE" else entry
    folder = _folder(tmp_path, {"a": "shard.safetensors", "b": entry})
    for read in (CheckpointFiles, checkpoint_files):
        with pytest.raises(ValueError, match="outside the model folder") as error:
            read(folder)
        assert entry in str(error.value) and "\n" not in str(error.value)


def test_a_symlink_out_of_the_folder_is_refused(tmp_path, outside):
    folder = _folder(tmp_path, {"a": "shard.safetensors", "b": "link.safetensors"})
    (folder / "link.safetensors").symlink_to(outside)
    with pytest.raises(ValueError, match="links outside the model folder"):
        CheckpointFiles(folder)
    (folder / "model.safetensors.index.json").unlink()
    (folder / "shard.safetensors").unlink()
    (folder / "link.safetensors").rename(folder / "model.safetensors")
    with pytest.raises(ValueError, match="links outside the model folder"):
        checkpoint_files(folder)


def test_a_hub_snapshot_links_into_its_blob_store(tmp_path):
    """The Hub cache's layout: snapshots/REV/file -> ../../blobs/HASH, which is allowed."""
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    save_file({"a": torch.arange(3.0)}, str(repo / "blobs" / "0123abcd"))
    snapshot = repo / "snapshots" / "rev"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(Path("../../blobs/0123abcd"))
    files = CheckpointFiles(snapshot)
    assert torch.equal(files.read(["a"])["a"], torch.arange(3.0))
    assert tensor_headers(checkpoint_files(snapshot))["a"].shape == [3]


def test_inside_keeps_plain_names_and_subfolders(tmp_path):
    assert inside(tmp_path, "x.safetensors") == tmp_path.resolve() / "x.safetensors"
    assert inside(tmp_path, "sub/../x.safetensors") == tmp_path.resolve() / "sub/../x.safetensors"


def test_diff_and_info_refuse_an_index_pointing_outside(tmp_path, outside, capsys):
    folder = _folder(tmp_path, {"a": "shard.safetensors", "b": "../evil.safetensors"})
    (folder / "config.json").write_text("{}")
    for command in (["diff", str(folder), str(folder)], ["info", str(folder)]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "outside the model folder" in err[0]


def test_quantize_refuses_an_index_pointing_outside_and_writes_nothing(
    tmp_path, outside, tiny_llama_dir, calib_text, capsys
):
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, folder)
    names = list(load_file(folder / "model.safetensors"))
    weight_map = {**dict.fromkeys(names, "model.safetensors"), names[-1]: "../evil.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    out = tmp_path / "out"
    assert main(["--quiet", "quantize", str(folder), "--out", str(out), "--calib-data", str(calib_text),
                 "--n-calib", "2", "--seq-len", "16"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "outside the model folder" in err[0]
    assert not out.exists() and not list(tmp_path.glob(".out*"))
