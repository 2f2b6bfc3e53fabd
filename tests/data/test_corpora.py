import pytest

from awqkit.data.corpora import load_corpus


def test_an_unreachable_hub_corpus_is_one_line_naming_the_offline_ones(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="cannot load corpus .wikitext2.*pydoc-topics, python-doc") as error:
        load_corpus("wikitext2", split="train")
    assert "\n" not in str(error.value)


def test_a_text_file_and_an_empty_one(tmp_path):
    (tmp_path / "a.txt").write_text("hello\n\nworld")
    assert load_corpus(str(tmp_path / "a.txt")) == "hello\n\nworld"
    (tmp_path / "empty.txt").write_text(" \n")
    with pytest.raises(ValueError, match="empty"):
        load_corpus(str(tmp_path / "empty.txt"))


def test_the_default_calibration_corpus_is_offline_python_reference_text(monkeypatch):
    from awqkit.config import QuantizeConfig

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    text = load_corpus(QuantizeConfig().calib_data, split="train")
    assert QuantizeConfig().calib_data == "pydoc-topics"
    assert len(text) > 300_000 and 'The "if" statement' in text  # help("if")'s text, from the stdlib
    assert load_corpus("pydoc-topics") == text  # no splits: the same text wherever it is read
