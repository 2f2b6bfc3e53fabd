"""A model folder is untrusted input: awqkit never runs its code, whatever its config asks."""

import io
import json
import shutil
from pathlib import Path

import pytest

from awqkit.cli import main

EVIL = "from pathlib import Path\nPath(__file__).with_name('RAN').write_text('evil.py ran')\n"


@pytest.fixture
def custom_code_folder(tmp_path, tiny_llama_dir) -> Path:
    """The tiny Llama whose config asks for a model type of its own, implemented in evil.py."""
    folder = tmp_path / "custom"
    shutil.copytree(tiny_llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="evil_llama", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.Evil"}
    )
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(EVIL)
    return folder


@pytest.mark.parametrize("command", ["quantize", "eval"])
def test_custom_code_is_refused_in_one_line_and_never_run(
    command, custom_code_folder, tmp_path, calib_text, capsys, monkeypatch
):
    monkeypatch.setattr("sys.stdin", io.StringIO("y\ny\ny\n"))  # a prompt would be answered yes
    args = {
        "quantize": [
            "quantize",
            str(custom_code_folder),
            "--out",
            str(tmp_path / "out"),
            "--calib-data",
            str(calib_text),
        ],
        "eval": ["eval", str(custom_code_folder), "--datasets", str(calib_text), "--no-cache"],
    }[command]
    assert main(["--quiet", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "auto_map" in err[0] and "never runs" in err[0]
    assert not (custom_code_folder / "RAN").exists() and not (tmp_path / "out").exists()


def test_diff_and_info_read_a_custom_code_folder_without_running_it(
    custom_code_folder, tiny_llama_dir, capsys, monkeypatch
):
    monkeypatch.setattr("sys.stdin", io.StringIO("y\ny\ny\n"))
    assert main(["diff", str(custom_code_folder), str(tiny_llama_dir)]) == 0
    assert main(["info", str(custom_code_folder)]) == 0
    assert not (custom_code_folder / "RAN").exists()
