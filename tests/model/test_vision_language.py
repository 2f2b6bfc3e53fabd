"""A vision-language model: its language model's blocks quantized, everything else kept as it was."""

import json

import torch
from conftest import read_tensors
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForImageTextToText

from awqkit.cli import main
from awqkit.model.layout import find_decoder
from awqkit.model.load import model_class

TEXT = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            num_hidden_layers=2, vocab_size=640, model_type="llama", pad_token_id=0)  # fmt: skip
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
              patch_size=14, model_type="clip_vision_model")  # fmt: skip
PREPROCESSOR = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 28}}


def _tiny_llava(folder, tokenizer):
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llava", text_config=TEXT, vision_config=VISION, architectures=["LlavaForConditionalGeneration"]
    )
    model = AutoModelForImageTextToText.from_config(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    return model


def test_the_language_model_is_found_inside_a_vision_language_model(tokenizer, tmp_path):
    model = _tiny_llava(tmp_path / "llava", tokenizer)
    assert model_class(model.config) is AutoModelForImageTextToText
    assert find_decoder(model).blocks_name == "model.language_model.layers"


def test_vision_tower_and_projector_stay_as_they_were_and_are_listed(tokenizer, calib_text, tmp_path):
    model = _tiny_llava(tmp_path / "llava", tokenizer)
    out = tmp_path / "q"
    args = ["--quiet", "quantize", str(tmp_path / "llava"), "--out", str(out), "--calib-data", str(calib_text)]
    fast = ["--n-calib", "2", "--seq-len", "32", "--n-grid", "2", "--group-size", "16", "--bits", "8"]
    assert main([*args, *fast, "--scales", "shared", "--format", "compressed-tensors"]) == 0

    original, written = load_file(tmp_path / "llava" / "model.safetensors"), read_tensors(out)
    vision = [n for n in original if n.startswith(("vision_tower.", "multi_modal_projector."))]
    assert vision
    for name in vision:
        assert torch.equal(written[name], original[name]), name
    assert any(n.endswith("q_proj.weight_packed") for n in written)  # the language model's blocks are packed

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    ignored = set(config["quantization_config"]["ignore"])
    vision_linears = [
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "language_model" not in n
    ]
    assert vision_linears and set(vision_linears) <= ignored  # the model's names, which transformers matches
    assert {n.removesuffix(".weight") for n in vision if n.endswith("proj.weight")} <= ignored  # the checkpoint's
    assert json.loads((out / "preprocessor_config.json").read_text()) == PREPROCESSOR

    loaded = AutoModelForImageTextToText.from_pretrained(out).eval()
    ids = torch.randint(3, 600, (1, 16))
    with torch.no_grad():
        error = (loaded(ids).logits - model(ids).logits).norm() / model(ids).logits.norm()
    assert error < 0.02
