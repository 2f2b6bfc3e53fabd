"""--overwrite replaces only a model folder, and an old output is never lost on the way."""

import hashlib
from pathlib import Path

import pytest

from awqkit.cli import main
from awqkit.io.publish import check_output_dir, publish

FAST = ["--n-calib", "4", "--seq-len", "64", "--n-grid", "2", "--max-search-tokens", "64", "--group-size", "32"]


def _run(model_dir, out, calib, *extra):
    return main(["--quiet", "quantize", str(model_dir), "--out", str(out), "--calib-data", str(calib), *FAST, *extra])


def _tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A current folder holding unrelated files, which no --overwrite may touch."""
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "notes.txt").write_text("keep me")
    (work / "sub" / "data.txt").write_text("keep me too")
    monkeypatch.chdir(work / "sub")
    return work


@pytest.mark.parametrize(
    "target, message",
    [(".", "current folder"), ("..", "current folder"), ("../notes.txt", "not a folder"), ("..", "parents")],
)
def test_overwrite_refuses_the_current_folder_its_parents_and_files(
    target, message, workdir, tiny_llama_dir, calib_text, capsys
):
    before = _tree(workdir)
    assert _run(tiny_llama_dir, target, calib_text, "--overwrite") == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert _tree(workdir) == before


def test_overwrite_refuses_a_folder_that_is_not_a_model_and_the_input_model(
    workdir, tiny_llama_dir, calib_text, capsys
):
    (workdir / "photos").mkdir()
    (workdir / "photos" / "cat.jpg").write_bytes(b"meow")
    before = _tree(workdir)
    assert _run(tiny_llama_dir, workdir / "photos", calib_text, "--overwrite") == 2
    assert "not a model folder" in capsys.readouterr().err
    assert _run(tiny_llama_dir, tiny_llama_dir, calib_text, "--overwrite") == 2
    assert "input model" in capsys.readouterr().err
    assert _tree(workdir) == before


def test_overwrite_replaces_an_earlier_output(tiny_llama_dir, calib_text, tmp_path):
    out = tmp_path / "q"
    assert _run(tiny_llama_dir, out, calib_text) == 0
    assert _run(tiny_llama_dir, out, calib_text, "--seed", "3", "--overwrite") == 0
    assert '"seed": 3' in (out / "awqkit.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # nothing set aside is left


def test_a_failing_swap_leaves_the_old_output_byte_identical(tiny_llama_dir, calib_text, tmp_path, monkeypatch):
    out = tmp_path / "q"
    assert _run(tiny_llama_dir, out, calib_text) == 0
    before = _tree(out)
    real_rename = Path.rename

    def rename(self, target):
        if Path(target) == out and ".partial" in self.name:  # the new folder cannot be moved in
            raise OSError("simulated failure")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    assert _run(tiny_llama_dir, out, calib_text, "--seed", "3", "--overwrite") == 2
    assert _tree(out) == before


def test_output_path_problems_are_found_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        check_output_dir(tmp_path / "file" / "out", overwrite=False)
    with pytest.raises(FileExistsError, match="exists"):
        check_output_dir(tmp_path / "file", overwrite=False)
    assert check_output_dir(tmp_path / "new" / "deeper", overwrite=False) == tmp_path / "new" / "deeper"


def test_publish_renames_into_place_and_makes_files_readable(tmp_path):
    tmp = tmp_path / ".tmp"
    tmp.mkdir(mode=0o700)
    (tmp / "config.json").write_text("{}")
    out = publish(tmp, tmp_path / "out", overwrite=False)
    assert (out / "config.json").stat().st_mode & 0o777 == 0o644 and out.stat().st_mode & 0o777 == 0o755
