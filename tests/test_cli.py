"""Every bad input to eval, diff and info ends as one stderr line and exit 2, writing nothing."""

import argparse
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file

import awqkit.eval.evaluate
from awqkit.cli import _config_from_args, build_parser, main
from awqkit.config import CHOICES, QuantizeConfig


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tokenizer) -> Path:
    """A good tiny model folder and hand-made broken ones beside it."""
    root = tmp_path_factory.mktemp("bad-inputs")
    good = root / "good"
    tiny_model("llama", hidden_act="silu", max_position_embeddings=64).save_pretrained(good)
    tokenizer.save_pretrained(good)
    tensors = load_file(good / "model.safetensors")

    def variant(name: str, edit=None) -> Path:
        folder = root / name
        folder.mkdir()
        for path in good.iterdir():
            (folder / path.name).write_bytes(path.read_bytes())
        if edit is not None:
            changed = dict(tensors)
            edit(changed)
            save_file(changed, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder

    nan = tensors["model.layers.0.self_attn.q_proj.weight"].clone()
    nan[0, 0] = torch.nan
    variant("nan-weight", lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": nan}))
    variant("missing-tensor", lambda t: t.pop("model.layers.0.mlp.down_proj.weight"))
    variant("wrong-shape", lambda t: t.update({"model.norm.weight": torch.ones(3)}))
    (variant("no-weight-map") / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    (variant("junk-index") / "model.safetensors.index.json").write_text('{"weight_map": ')
    (variant("bad-header") / "model.safetensors").write_bytes((16).to_bytes(8, "little") + b"{not json at all")
    (variant("huge-header") / "model.safetensors").write_bytes((2**40).to_bytes(8, "little") + b"{}")
    truncated = variant("truncated") / "model.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:5000])
    (variant("junk-config") / "config.json").write_text("{bad")
    (variant("list-config") / "config.json").write_text("[]")
    (variant("junk-record") / "awqkit.json").write_text(json.dumps({"config": {}}))
    (root / "a-file.txt").write_text("not a model\n")
    lines = (f"Line {i}: the quick brown fox jumps over the dog." for i in range(40))
    (root / "corpus.txt").write_text("\n\n".join(lines))
    return root


EVAL = ["--datasets", "{root}/corpus.txt", "--seq-len", "32", "--max-windows", "2", "--cache-dir", "{out}/cache"]

CASES = {
    # eval
    "eval nan weight": (["eval", "{root}/nan-weight", *EVAL], "non-finite NLL"),
    "eval missing tensor": (["eval", "{root}/missing-tensor", *EVAL], "model.layers.0.mlp.down_proj.weight"),
    "eval wrong shape": (["eval", "{root}/wrong-shape", *EVAL], "model.norm.weight [3]"),
    "eval seq-len too long": (["eval", "{root}/good", *EVAL, "--seq-len", "65"], "max_position_embeddings 64"),
    "eval model is a file": (["eval", "{root}/a-file.txt", *EVAL], "is a file, not a model folder"),
    "eval model under a file": (["eval", "{root}/a-file.txt/model", *EVAL], "model folder not found"),
    "eval missing model": (["eval", "{root}/nowhere", *EVAL], "model folder not found"),
    "eval junk config": (["eval", "{root}/junk-config", *EVAL], "junk-config"),
    "eval corpus is a folder": (["eval", "{root}/good", *EVAL, "--datasets", "{root}"], "unknown corpus"),
    "eval json into a missing folder": (["eval", "{root}/good", *EVAL, "--json", "{out}/no/r.json"], "no folder"),
    "eval json is a folder": (["eval", "{root}/good", *EVAL, "--json", "{root}"], "is a folder"),
    "eval plot under a file": (["eval", "{root}/good", *EVAL, "--plot", "{root}/a-file.txt/p.png"], "no folder"),
    "eval cache dir is a file": (
        ["eval", "{root}/good", *EVAL, "--cache-dir", "{root}/a-file.txt"],
        "cache folder is a file",
    ),
    # diff
    "diff no weight_map": (["diff", "{root}/no-weight-map", "{root}/good"], "no weight_map"),
    "diff junk index": (["diff", "{root}/junk-index", "{root}/good"], "cannot read"),
    "diff bad header": (["diff", "{root}/good", "{root}/bad-header"], "bad-header/model.safetensors"),
    "diff huge header": (["diff", "{root}/huge-header", "{root}/good"], "huge-header/model.safetensors"),
    "diff truncated": (["diff", "{root}/truncated", "{root}/good"], "truncated/model.safetensors"),
    "diff a text file": (["diff", "{root}/a-file.txt", "{root}/good"], "a-file.txt"),
    "diff under a file": (["diff", "{root}/a-file.txt/x", "{root}/good"], "checkpoint not found"),
    "diff json into a missing folder": (
        ["diff", "{root}/good", "{root}/good", "--json", "{out}/no/d.json"],
        "no folder",
    ),
    # info
    "info bad header": (["info", "{root}/bad-header"], "bad-header/model.safetensors"),
    "info huge header": (["info", "{root}/huge-header"], "huge-header/model.safetensors"),
    "info truncated": (["info", "{root}/truncated"], "truncated/model.safetensors"),
    "info junk config": (["info", "{root}/junk-config"], "junk-config/config.json"),
    "info list config": (["info", "{root}/list-config"], "not a JSON object"),
    "info junk record": (["info", "{root}/junk-record"], "quantization metadata"),
    "info a file": (["info", "{root}/a-file.txt"], "not a model folder"),
    "info under a file": (["info", "{root}/a-file.txt/x"], "not a model folder"),
}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_exit_2(case, inputs, tmp_path, capsys):
    argv, message = CASES[case]
    before = _snapshot(inputs)
    rc = main(["--quiet", *(arg.format(root=inputs, out=tmp_path) for arg in argv)])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("awqkit: error: ") and message in err[0], captured.err
    assert captured.out == ""
    assert _snapshot(inputs) == before and list(tmp_path.rglob("*")) == []


def test_the_good_folder_passes_every_command(inputs, tmp_path, capsys):
    # The bad cases differ from this folder by one thing each.
    rc_eval = main(["--quiet", *(a.format(root=inputs, out=tmp_path) for a in ["eval", "{root}/good", *EVAL])])
    rc_diff = main(["--quiet", "diff", str(inputs / "good"), str(inputs / "good")])
    rc_info = main(["--quiet", "info", str(inputs / "good")])
    assert (rc_eval, rc_diff, rc_info) == (0, 0, 0) and capsys.readouterr().err == ""


def test_a_package_the_format_needs_is_named_in_one_line(inputs, tmp_path, monkeypatch, capsys):
    # What transformers raises for an AWQ folder without gptqmodel installed.
    message = "Loading an AWQ quantized model requires gptqmodel. Please install it"

    def load(*args):
        raise ImportError(message)

    monkeypatch.setattr(awqkit.eval.evaluate, "load_checked_model", load)
    rc = main(["--quiet", *(a.format(root=inputs, out=tmp_path) for a in ["eval", "{root}/good", *EVAL])])
    assert rc == 2 and capsys.readouterr().err == f"awqkit: error: {message}\n"


def _readme_options(heading: str) -> set[str]:
    """The options in the first table after the README line that starts with ``heading``."""
    lines = (Path(__file__).parents[1] / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    rows = []
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break
    return {m.group(1) for row in rows[2:] if (m := re.match(r"\| `(--[a-z-]+)`", row))}


def _parser_options(command: str) -> set[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[command]
    return {flag for action in parser._actions for flag in action.option_strings if flag.startswith("--")} - {"--help"}


@pytest.mark.parametrize("command, heading", [("quantize", "`awqkit quantize MODEL"), ("eval", "`awqkit eval MODEL")])
def test_the_readme_lists_every_option_and_no_other(command, heading):
    assert _readme_options(heading) == _parser_options(command)


def test_every_config_field_is_an_option_with_help_and_its_choices():
    parser_options = _parser_options("quantize")
    for field in dataclasses.fields(QuantizeConfig):
        assert f"--{field.name.replace('_', '-')}" in parser_options and field.metadata["help"]
    args = build_parser().parse_args(["quantize", "m", "--out", "o"])
    assert _config_from_args(QuantizeConfig, args) == QuantizeConfig()
    for name, choices in CHOICES.items():
        with pytest.raises(SystemExit):
            build_parser().parse_args(["quantize", "m", "--out", "o", f"--{name.replace('_', '-')}", "no-such"])
        assert build_parser().parse_args(["quantize", "m", "--out", "o", f"--{name.replace('_', '-')}", choices[-1]])
