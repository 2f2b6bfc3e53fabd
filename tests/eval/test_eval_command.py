import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import generated_text, tiny_model, trained_tokenizer
from transformers import AutoModelForCausalLM

from awqkit.cli import main
from awqkit.data.corpora import load_corpus

SMALL = ["--seq-len", "128", "--max-windows", "4"]  # after --datasets


def _eval(tmp_path: Path, *args: str) -> tuple[int, dict | None]:
    out = tmp_path / "report.json"
    rc = main(["--quiet", "eval", *map(str, args), "--cache-dir", str(tmp_path / "cache"), "--json", str(out)])
    return rc, json.loads(out.read_text()) if out.exists() else None


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("text") / "held-out.txt"
    path.write_text(generated_text(30_000, seed=2))
    return str(path)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, tokenizer) -> tuple[Path, Path]:
    """A random two-layer float32 Llama with the generated tokenizer, and a copy with noise on every weight."""
    root = tmp_path_factory.mktemp("tiny-eval")
    model = tiny_model("llama", hidden_act="silu")
    model.save_pretrained(root / "base")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(root / "noisy")
    for folder in ("base", "noisy"):
        tokenizer.save_pretrained(root / folder)
    return root / "base", root / "noisy"


def test_stream_perplexity_matches_transformers_loss(tmp_path, smollm2_dir, smollm2_tokenizer):
    rc, report = _eval(tmp_path, smollm2_dir, "--datasets", "fortunes", *SMALL, "--dtype", "float32")
    assert rc == 0
    data = report["datasets"]["fortunes"]
    assert data["bos"] is False and data["windows"] == 4 and data["tokens_per_window"] == [127] * 4
    assert report["models"][0]["dtype"] == "float32" and report["models"][0]["saved_dtype"] == "bfloat16"

    # By hand: SmolLM2 adds no BOS, so the windows are the first 4 x 128 plain tokens.
    text = load_corpus("fortunes")
    ids = smollm2_tokenizer(text[: text.find("\n\n", 10_000)], add_special_tokens=False)["input_ids"]
    windows = torch.tensor(ids[: 4 * 128]).view(4, 128)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss.item() for w in windows]
    result = data["results"][0]
    assert result["window_nll"] == pytest.approx(losses, rel=1e-4)
    assert result["ppl"] == pytest.approx(math.exp(np.mean(losses)), rel=1e-4)
    assert result["ppl_ci"][0] <= result["ppl"] <= result["ppl_ci"][1]


def test_models_load_in_their_saved_dtype_by_default(tmp_path, smollm2_dir, capsys):
    rc, report = _eval(tmp_path, smollm2_dir, "--datasets", "fortunes", "--seq-len", "64", "--max-windows", "1")
    assert rc == 0 and report["models"][0]["dtype"] == "bfloat16"
    assert "| bfloat16 " in capsys.readouterr().out


def test_identical_models_tie(tmp_path, tiny_dirs, held_out):
    base, _ = tiny_dirs
    twin = tmp_path / "twin"
    shutil.copytree(base, twin)
    rc, report = _eval(tmp_path, base, twin, "--datasets", held_out, *SMALL, "--no-cache")
    assert rc == 0
    vs = report["datasets"][held_out]["results"][1]["vs_first"]
    assert vs["ci"][0] <= 0 <= vs["ci"][1] and vs["win_share"] == 0.5


def test_a_degraded_model_is_detected_as_worse(tmp_path, tiny_dirs, held_out, capsys):
    base, noisy = tiny_dirs
    plot = tmp_path / "ppl.png"
    rc, report = _eval(tmp_path, base, noisy, "--datasets", held_out, *SMALL, "--plot", plot)
    assert rc == 0
    first, second = report["datasets"][held_out]["results"]
    assert second["vs_first"]["ci"][0] > 0 and second["vs_first"]["win_share"] == 0
    assert second["vs_first"]["mean_nll_diff"] == pytest.approx(second["mean_nll"] - first["mean_nll"])
    assert [m["dtype"] for m in report["models"]] == ["float32", "float32"]
    assert len(second["window_nll"]) == 4
    assert plot.read_bytes().startswith(b"\x89PNG")
    table = capsys.readouterr().out
    assert f"| {held_out}" in table and "#2 " + str(noisy) in table


def test_samples_mode_weights_windows_by_tokens(tmp_path, tiny_dirs, held_out):
    base, _ = tiny_dirs
    samples = ["--mode", "samples", "--n-samples", "6", "--seq-len", "48"]
    rc, report = _eval(tmp_path, base, "--datasets", held_out, *samples)
    assert rc == 0
    data = report["datasets"][held_out]
    tokens, nll = np.array(data["tokens_per_window"]), np.array(data["results"][0]["window_nll"])
    assert data["windows"] == 6 and tokens.max() <= 47 and len(set(tokens)) > 1
    assert data["results"][0]["ppl"] == pytest.approx(math.exp((nll * tokens).sum() / tokens.sum()))


@pytest.mark.parametrize(
    "case, message",
    [
        ("unknown", "unknown corpus 'no-such-corpus'"),
        ("empty", "is empty"),
        ("tokenizers", "models with different tokenizers"),
    ],
)
def test_bad_input_fails_with_one_clear_line(case, message, tmp_path, tiny_dirs, held_out, capsys):
    base, _ = tiny_dirs
    models, dataset = [base], held_out
    if case == "unknown":
        dataset = "no-such-corpus"
    elif case == "empty":
        dataset = tmp_path / "empty.txt"
        dataset.write_text("  \n\n")
    else:
        other = tmp_path / "other"
        shutil.copytree(base, other)
        trained_tokenizer(vocab_size=500).save_pretrained(other)
        models.append(other)
    rc, _ = _eval(tmp_path, *models, "--datasets", dataset, "--seq-len", "32", "--max-windows", "1")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0]
