import pytest
import torch
from conftest import fold_random_scales, tiny_model

from awqkit.config import QuantizeConfig
from awqkit.model.layout import find_decoder
from awqkit.model.scale_groups import ARCHITECTURES, architecture_of
from awqkit.model.walk import capture_block_inputs, search_token_indices, walk_blocks
from awqkit.pipeline import quantize_model
from awqkit.quant.block import module_output_error
from awqkit.quant.fold import divide_output, fold_normalizer
from awqkit.quant.grid import dequantize_groupwise

TYPES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"]


def _randomise_norms(model: torch.nn.Module) -> None:
    # Fresh norms are all ones (or zeros for Gemma): random ones make a wrong fold visible.
    g = torch.Generator().manual_seed(7)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) * 2 - 0.5)


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["grouped-query", "multi-head"])
@pytest.mark.parametrize("model_type", TYPES)
def test_folded_model_computes_the_same_function(model_type, kv_heads):
    model = tiny_model(model_type, num_key_value_heads=kv_heads).double()
    _randomise_norms(model)
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
        folded = fold_random_scales(model)
        # v -> o folds only when v's outputs are o's inputs one to one (no grouped-query attention).
        per_block = 4 if kv_heads == 4 else 3
        assert folded == per_block * len(find_decoder(model).blocks)
        # Gemma's RMSNorm computes in float32 whatever the weights: float tolerance, not float64's.
        tolerance = 1e-5 if model_type == "gemma3_text" else 1e-10
        assert torch.allclose(model(ids).logits, reference, atol=tolerance * reference.abs().max(), rtol=0)


def test_gemma_norm_folds_through_one_plus_weight():
    norm = tiny_model("gemma3_text").model.layers[0].input_layernorm
    norm.weight.data.uniform_(-0.5, 0.5)
    x = torch.randn(3, norm.weight.numel())
    s = torch.rand(norm.weight.numel()) + 0.5
    expected = norm(x) / s
    divide_output(norm, s, norm_offset=ARCHITECTURES["gemma3_text"].norm_offset)
    assert torch.allclose(norm(x), expected, atol=1e-6)


def test_a_model_type_the_table_lacks_gets_the_tables_result_from_found_groups():
    known, unknown = tiny_model("llama"), tiny_model("llama")
    unknown.config.model_type = "somethingnew"
    assert architecture_of(unknown) is None
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    config = QuantizeConfig(group_size=16, n_grid=2, scales="shared")
    table, found = (quantize_model(m, ids, config, progress=False) for m in (known, unknown))
    assert found.layers == table.layers and all(torch.equal(found.scales[n], table.scales[n]) for n in table.scales)
    assert all(torch.equal(t, unknown.state_dict()[n]) for n, t in known.state_dict().items())


def test_module_error_is_zero_for_the_original_weights():
    model = tiny_model("llama")
    layout = find_decoder(model)
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    inputs = capture_block_inputs(layout, ids, 8, torch.float32)
    visit = next(walk_blocks(layout, inputs, search_indices=search_token_indices(32, 8, 0), record_modules=["mlp"]))
    mlp = visit.block.mlp
    w = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
    error_of = module_output_error(mlp, ["gate_proj.weight", "up_proj.weight"], [96, 96], visit.module_inputs["mlp"])
    assert error_of(w) == 0.0
    assert error_of(w * 1.01) > 0.0


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
@pytest.mark.parametrize(
    "module, weights", [("self_attn", ["q_proj", "k_proj", "v_proj"]), ("mlp", ["gate_proj", "up_proj"])]
)
def test_module_error_is_the_mse_of_the_batched_output_and_its_window_sums_split(model_type, module, weights):
    from torch.func import functional_call

    from awqkit.quant.rows import row_blocks

    model = tiny_model(model_type)
    layout = find_decoder(model)
    ids = torch.randint(0, 49152, (4, 16), generator=torch.Generator().manual_seed(1))
    inputs = capture_block_inputs(layout, ids, 4, torch.float32)
    visit = next(walk_blocks(layout, inputs, search_indices=search_token_indices(64, 8, 0), record_modules=[module]))
    part = visit.block.get_submodule(module)
    linears = [part.get_submodule(name) for name in weights]
    w = torch.cat([linear.weight for linear in linears]).detach()
    w_hat = w + 0.02 * torch.randn(w.shape, generator=torch.Generator().manual_seed(2))
    sizes = [linear.out_features for linear in linears]
    names = [f"{name}.weight" for name in weights]
    error_of = module_output_error(part, names, sizes, visit.module_inputs[module])
    assert error_of.n_parts == 4  # one part per calibration window
    args, kwargs = visit.module_inputs[module]
    with torch.no_grad():  # the module on the whole batch at once, as the block runs it
        reference = part(*args, **kwargs)[0] if module == "self_attn" else part(*args, **kwargs)
        changed = functional_call(part, dict(zip(names, w_hat.split(sizes))), args, kwargs)
        changed = changed[0] if module == "self_attn" else changed
    literal = (changed.double() - reference.double()).pow(2).mean().item()
    assert literal > 0 and abs(error_of(w_hat) - literal) <= 1e-5 * literal
    whole = error_of.window_sums(w_hat, range(4))
    split = [error_of.window_sums(w_hat, range(b.start, b.stop)) for b in row_blocks(4, 3, 1)]
    assert torch.equal(torch.cat(split), whole)


@pytest.mark.parametrize("objective", ["linear", "module"])
@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_shared_scales_store_grid_weights_and_keep_the_function_up_to_quantization(model_type, objective):
    model = tiny_model(model_type)
    _randomise_norms(model)
    ids = torch.randint(0, 49152, (4, 32), generator=torch.Generator().manual_seed(0))
    config = QuantizeConfig(
        scales="shared", objective=objective, group_size=16, n_grid=4, batch_size=2, bits=8, format="compressed-tensors"
    )
    with torch.no_grad():
        reference = model(ids).logits
    result = quantize_model(model, ids, config, progress=False)
    linears = dict(model.named_modules())
    assert len(result.quantized) == len(result.layers) == 7 * len(find_decoder(model).blocks)
    for name, q in result.quantized.items():
        # The stored weight is Q(W*s) itself: exactly the grid values, no division by s.
        assert torch.equal(linears[name].weight.data, dequantize_groupwise(q)), name
    # One alpha per scale group: q, k, v agree; gate, up agree.
    prefix = "model.layers.0."
    assert len({result.layers[prefix + f"self_attn.{p}_proj"].alpha for p in "qkv"}) == 1
    assert result.layers[prefix + "mlp.gate_proj"].alpha == result.layers[prefix + "mlp.up_proj"].alpha
    assert torch.equal(result.scales[prefix + "self_attn.q_proj"], result.scales[prefix + "self_attn.v_proj"])
    # o_proj cannot take a fold from v_proj under grouped-query attention: s = 1.
    assert result.layers[prefix + "self_attn.o_proj"].alpha == 0.0
    assert result.scales[prefix + "self_attn.o_proj"].eq(1.0).all()
    with torch.no_grad():
        # 8-bit: the folded, quantized model stays close to the original.
        assert (model(ids).logits - reference).abs().max() < 0.05 * reference.abs().max()


def test_per_linear_and_module_objective_do_not_mix():
    with pytest.raises(ValueError, match="shared"):
        QuantizeConfig(objective="module").validate()
    with pytest.raises(ValueError, match="shared"):
        QuantizeConfig(format="awq").validate()
    with pytest.raises(ValueError, match="4-bit"):
        QuantizeConfig(format="awq", scales="shared", bits=3).validate()


def test_fold_normalizer_centres_plain_folds_and_caps_offset_norms_at_one():
    s = torch.tensor([1e-5, 1.0, 1e3])
    linear, norm = torch.nn.Linear(3, 3), torch.nn.LayerNorm(3)
    c = fold_normalizer(linear, s)
    assert c == pytest.approx((1e-5 * 1e3) ** 0.5)
    assert (s / c).max() == pytest.approx(1 / (s / c).min())  # [1/r, r] around 1
    assert fold_normalizer(norm, s) == pytest.approx(c)  # a plain norm: the same
    assert fold_normalizer(norm, s, norm_offset=1.0) == pytest.approx(1e3)  # (1 + w) norm: s / c <= 1
    assert fold_normalizer(linear, s, norm_offset=1.0) == pytest.approx(c)  # the offset is a norm's only


def test_a_fold_into_part_of_a_fused_linear_divides_those_rows_only():
    fused = torch.nn.Linear(8, 12, bias=True)
    x, s = torch.randn(3, 8), torch.rand(4) + 0.5
    expected = fused(x).detach().clone()
    expected[:, 4:8] /= s
    with torch.no_grad():
        divide_output(fused, s, rows=(4, 8))
    assert torch.allclose(fused(x), expected, atol=1e-6)
