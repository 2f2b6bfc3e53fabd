"""Mixture-of-experts blocks as linears: the same function as transformers' fused experts, every
calibration token through every expert, and every expert quantized in a run."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from awqkit.architectures import block_linears, find_decoder
from awqkit.calibration import capture_block_inputs, search_token_indices, walk_blocks
from awqkit.experts import LinearExperts, fused_weights, linearize_experts, set_every_token
from awqkit.quant import dequantize_groupwise, quantize_groupwise
from conftest import save_tiny, tiny_model, walked_last_block_output

MOE = ["mixtral", "qwen3_moe"]


def _eager(model_type: str, **overrides):
    return tiny_model(model_type, experts_implementation="eager", **overrides)


@pytest.mark.parametrize("model_type", MOE)
def test_linear_experts_compute_the_fused_experts_function_routed_or_every_token(model_type):
    model = _eager(model_type)
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
    linear = copy.deepcopy(model)
    assert linearize_experts(linear) == 2  # one per layer
    for every_token in (False, True):
        set_every_token(linear, every_token)
        with torch.no_grad():
            assert torch.allclose(linear(ids).logits, reference, atol=1e-5, rtol=1e-5)
    experts = [m for m in linear.modules() if isinstance(m, LinearExperts)]
    originals = [layer.mlp.experts for layer in model.model.layers]
    for mine, theirs in zip(experts, originals):
        gate_up, down = fused_weights(mine)
        assert torch.equal(gate_up, theirs.gate_up_proj) and torch.equal(down, theirs.down_proj)


@pytest.mark.parametrize("model_type", MOE)
def test_every_expert_linear_is_found_and_the_router_is_not(model_type):
    model = _eager(model_type)
    linearize_experts(model)
    names = set(block_linears(find_decoder(model).blocks[0]))
    projections = {"mixtral": ("w1", "w3", "w2"), "qwen3_moe": ("gate_proj", "up_proj", "down_proj")}[model_type]
    assert {f"mlp.experts.{e}.{p}" for e in range(4) for p in projections} <= names
    assert not any(name.startswith("mlp.gate") for name in names)


@pytest.mark.parametrize("model_type", MOE)
def test_the_walk_sees_every_token_at_every_expert_and_equals_the_routed_forward(model_type):
    model = _eager(model_type)
    windows = torch.randint(0, 49152, (4, 16), generator=torch.Generator().manual_seed(1))
    linearize_experts(model)
    layout = find_decoder(model)
    inputs = capture_block_inputs(layout, windows, 2, torch.float32)
    visits = list(walk_blocks(layout, inputs, search_indices=search_token_indices(windows.numel(), 32, 0)))
    for visit in visits:
        for e in range(4):
            for name, stats in visit.stats.items():
                if name.startswith(f"mlp.experts.{e}."):
                    assert stats.count == windows.numel(), name  # all tokens, routed to it or not
    # the block outputs are the routed ones: the walk ends where the model's forward does
    last = torch.cat(visits[-1].outputs)
    with torch.no_grad():
        full = model.model(windows).last_hidden_state
    final = model.model.norm(last.view_as(full))
    assert torch.allclose(final, full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model_type", MOE)
def test_a_run_quantizes_every_expert_keeps_the_router_and_loads_in_transformers(model_type, tokenizer, calib_text, tmp_path):
    from awqkit.config import QuantizeConfig
    from awqkit.pipeline import quantize

    source = save_tiny(tmp_path / "model", tokenizer, model_type=model_type, dtype=torch.float32)
    out = tmp_path / "out"
    config = QuantizeConfig(bits=4, group_size=32, n_grid=4, n_calib=8, seq_len=32, batch_size=2,
                            calib_data=str(calib_text), rounding="nearest")  # fmt: skip
    quantize(str(source), str(out), config, progress=False)
    saved, scales = load_file(str(out / "model.safetensors")), load_file(str(out / "awq_scales.safetensors"))
    # Mixtral's checkpoints say block_sparse_moe for the model's mlp (transformers renames on load)
    stored = load_file(str(source / "model.safetensors"))
    original = {name.replace(".block_sparse_moe.", ".mlp."): tensor for name, tensor in stored.items()}
    experts = [name for name in saved if ".experts." in name]
    assert len(experts) == 2 * 4 * 3
    for name in experts:  # Q(W*s)/s of the expert's own weight, s its own AWQ scales
        s = scales[name.removesuffix(".weight")]
        expected = dequantize_groupwise(quantize_groupwise(original[name] * s, 4, 32)) / s
        assert torch.equal(saved[name], expected) and not torch.equal(saved[name], original[name]), name
    for name, tensor in original.items():
        if ".experts." not in name and not name.endswith("_proj.weight"):
            assert torch.equal(saved[name], tensor), name  # router, norms, embeddings untouched
    record = json.loads((out / "awqkit.json").read_text())["layers"]
    assert {name.removesuffix(".weight") for name in experts} <= set(record)
    reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
