"""GPT-2's Conv1D as nn.Linear: the same function, read from and written back to the stored form."""

import torch
from conftest import read_tensors
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from awqkit.cli import main
from awqkit.model.linearize import TransposedLinear, as_stored, linearize, transposed_weights


def _gpt2(vocab_size: int = 640) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=vocab_size)).eval()


def test_conv1d_becomes_a_linear_computing_the_same_and_goes_back_as_stored():
    model = _gpt2()
    stored = {n: t.clone() for n, t in model.transformer.h[0].state_dict().items()}
    ids = torch.randint(0, 640, (2, 16))
    with torch.no_grad():
        before = model(ids).logits
    linearize(model)
    block = model.transformer.h[0]
    assert isinstance(block.attn.c_attn, TransposedLinear)
    assert torch.equal(block.attn.c_attn.weight, stored["attn.c_attn.weight"].T)
    with torch.no_grad():
        after = model(ids).logits
    assert torch.allclose(after, before, rtol=1e-5, atol=1e-5 * float(before.abs().max()))
    assert transposed_weights(block) == {
        "attn.c_attn.weight",
        "attn.c_proj.weight",
        "mlp.c_fc.weight",
        "mlp.c_proj.weight",
    }
    back = as_stored(block, "h.0.", {f"h.0.{n}": t for n, t in block.state_dict().items()})
    assert all(torch.equal(back[f"h.0.{n}"], t) for n, t in stored.items())


def test_a_gpt2_checkpoint_quantizes_and_its_fake_output_loads_in_transformers(tokenizer, calib_text, tmp_path):
    model = _gpt2(len(tokenizer))
    model.save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    args = ["--quiet", "quantize", str(tmp_path / "gpt2"), "--calib-data", str(calib_text), "--bits", "8"]
    args += ["--n-calib", "2", "--seq-len", "32", "--n-grid", "2", "--group-size", "16"]
    for out, extra in (("research", []), ("shared", ["--scales", "shared"])):
        assert main([*args, "--out", str(tmp_path / out), *extra]) == 0
        stored, written = load_file(tmp_path / "gpt2" / "model.safetensors"), read_tensors(tmp_path / out)
        assert {n: t.shape for n, t in written.items()} == {n: t.shape for n, t in stored.items()}
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / out).eval()
        ids = torch.randint(0, len(tokenizer), (2, 16))
        with torch.no_grad():
            error = (loaded(ids).logits - model(ids).logits).norm() / model(ids).logits.norm()
        assert error < 0.02, out
