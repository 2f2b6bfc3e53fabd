"""Mixture-of-experts blocks as linears: the same function as transformers' fused experts, every
calibration token through every expert, and every expert quantized in a run."""

import copy
import json
from dataclasses import replace

import pytest
import torch
from conftest import read_tensors, save_tiny, tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from awqkit.cli import main
from awqkit.model.experts import (
    LinearExperts,
    experts_fused_back,
    linearize_experts,
    router_names,
    set_every_token,
    stored_expert_names,
)
from awqkit.model.layout import block_linears, find_decoder
from awqkit.model.walk import capture_block_inputs, search_token_indices, walk_blocks
from awqkit.quant.grid import dequantize_groupwise, quantize_groupwise

MOE = ["mixtral", "qwen2_moe", "qwen3_moe"]
# model type -> what its checkpoints call the MoE block and the experts' projections
QWEN = ("mlp", ("gate_proj", "up_proj", "down_proj"))
STORED = {"mixtral": ("block_sparse_moe", ("w1", "w3", "w2")), "qwen2_moe": QWEN, "qwen3_moe": QWEN}


def _eager(model_type: str, **overrides):
    return tiny_model(model_type, experts_implementation="eager", **overrides)


def fused_weights(experts: LinearExperts) -> tuple[torch.Tensor, torch.Tensor]:
    """``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I] from the experts' linears."""
    gate_up = torch.stack(
        [torch.cat([getattr(e, e.names.gate).weight, getattr(e, e.names.up).weight]) for e in experts]
    )
    down = torch.stack([getattr(e, e.names.down).weight for e in experts])
    return gate_up, down


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
    projections = STORED[model_type][1]
    assert {f"mlp.experts.{e}.{p}" for e in range(4) for p in projections} <= names
    assert not any(name.startswith("mlp.gate") or name.endswith("shared_expert_gate") for name in names)


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
def test_a_run_quantizes_every_expert_keeps_the_router_and_loads_in_transformers(
    model_type, tokenizer, calib_text, tmp_path
):
    from awqkit.config import QuantizeConfig
    from awqkit.pipeline import quantize

    source = save_tiny(tmp_path / "model", tokenizer, model_type=model_type, dtype=torch.float32)
    out = tmp_path / "out"
    config = QuantizeConfig(bits=4, group_size=32, n_grid=4, n_calib=8, seq_len=32, batch_size=2,
                            calib_data=str(calib_text), rounding="nearest")  # fmt: skip
    quantize(str(source), str(out), config, progress=False)
    saved, scales = load_file(str(out / "model.safetensors")), load_file(str(out / "awq_scales.safetensors"))
    # Mixtral's checkpoints say block_sparse_moe for the model's mlp: the output keeps the input's names
    original = load_file(str(source / "model.safetensors"))
    assert set(saved) == set(original)
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
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info


def _routed_walk(model_type: str, windows: torch.Tensor, **overrides):
    model = _eager(model_type, **overrides)
    linearize_experts(model)
    layout = find_decoder(model)
    inputs = capture_block_inputs(layout, windows, 2, torch.float32)
    indices = search_token_indices(windows.numel(), 40, 0)
    return model, list(walk_blocks(layout, inputs, search_indices=indices, every_token=False)), indices


@pytest.mark.parametrize("model_type", MOE)
def test_routed_calibration_gives_each_expert_its_routed_tokens_and_their_search_rows(model_type):
    windows = torch.randint(0, 49152, (4, 16), generator=torch.Generator().manual_seed(2))
    model, visits, indices = _routed_walk(model_type, windows)
    counts = [
        visits[0].stats[f"mlp.experts.{e}.{'w1' if model_type == 'mixtral' else 'gate_proj'}"].count for e in range(4)
    ]
    top_k = 2
    assert sum(counts) == windows.numel() * top_k  # each token reaches exactly its top-k experts
    for e in range(4):
        down = visits[0].stats[f"mlp.experts.{e}.{'w2' if model_type == 'mixtral' else 'down_proj'}"]
        gate = visits[0].stats[f"mlp.experts.{e}.{'w1' if model_type == 'mixtral' else 'gate_proj'}"]
        assert down.count == gate.count == counts[e]
        if counts[e]:  # its search tokens are the batch's search tokens routed to it: at most all of them
            assert 0 < gate.search_tokens().shape[0] <= len(indices)
    # routed or not, the walk's block outputs are the model's
    with torch.no_grad():
        full = model.model(windows).last_hidden_state
    assert torch.allclose(model.model.norm(torch.cat(visits[-1].outputs).view_as(full)), full, atol=1e-5, rtol=1e-4)


def _never_route_to(router: torch.nn.Module, expert: int) -> None:
    """``router`` as transformers' top-k router (softmax, top-k, renormalised), never choosing ``expert``."""

    def forward(hidden: torch.Tensor):
        logits = torch.nn.functional.linear(hidden.reshape(-1, router.weight.shape[1]), router.weight)
        logits[:, expert] = float("-inf")
        probs = logits.float().softmax(dim=-1)
        top, index = probs.topk(router.top_k, dim=-1)
        return logits, (top / top.sum(dim=-1, keepdim=True)).to(logits.dtype), index

    router.forward = forward


def test_an_expert_no_token_reaches_falls_back_to_rtn_and_is_counted(capsys, tokenizer, calib_text, tmp_path):
    from awqkit.config import QuantizeConfig
    from awqkit.data.tokens import calibration_data
    from awqkit.pipeline import quantize_model

    model = tiny_model("qwen3_moe", experts_implementation="eager")
    reference = copy.deepcopy(model)
    linearize_experts(reference)
    original = reference.state_dict()
    for layer in model.model.layers:
        _never_route_to(layer.mlp.gate, 3)
    config = QuantizeConfig(group_size=32, n_grid=2, n_calib=8, seq_len=32, batch_size=2, calib_data=str(calib_text),
                            moe_calibration="routed")  # fmt: skip
    result = quantize_model(model, calibration_data(tokenizer, config), config, progress=False)
    rtn = {name for name, layer in result.layers.items() if layer.fallback == "rtn"}
    assert rtn == {
        f"model.layers.{i}.mlp.experts.3.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")
    }
    for name in rtn:
        assert result.layers[name].alpha == 0.0 and result.layers[name].error is None
        w = original[f"{name}.weight"]
        assert torch.equal(model.get_submodule(name).weight.data, dequantize_groupwise(quantize_groupwise(w, 4, 32)))
    # every token through every expert: the same expert is calibrated and searched like the others
    model = tiny_model("qwen3_moe", experts_implementation="eager")
    for layer in model.model.layers:
        _never_route_to(layer.mlp.gate, 3)
    everyone = quantize_model(
        model, calibration_data(tokenizer, config), replace(config, moe_calibration="all"), progress=False
    )
    assert not any(layer.fallback for layer in everyone.layers.values())


def test_the_command_line_counts_fallbacks(tokenizer, calib_text, tmp_path, capsys):

    source = save_tiny(tmp_path / "model", tokenizer, model_type="qwen3_moe")
    argv = ["quantize", str(source), "--out", str(tmp_path / "out"), "--calib-data", str(calib_text), "--n-calib", "4",
            "--seq-len", "32", "--batch-size", "2", "--n-grid", "2", "--group-size", "32", "--moe-calibration", "routed",
            "--min-tokens", "100000", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert "32 linears" in said and "32 saw fewer than 100000 tokens and got RTN" in said, said


@pytest.mark.parametrize("model_type", MOE)
def test_folding_shared_scales_into_the_moe_norm_keeps_the_function_with_the_router_compensated(model_type):
    from awqkit.model.scale_groups import architecture_of
    from awqkit.quant.fold import fold_scales

    model = _eager(model_type)
    linearize_experts(model)
    block = model.model.layers[0]
    x = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(3))
    position = torch.arange(12)[None].expand(2, -1)
    rotary = model.model.rotary_emb(x, position)

    def output(b):
        with torch.no_grad():
            out = b(x, position_embeddings=rotary, position_ids=position)
        return out[0] if isinstance(out, tuple) else out

    reference = output(block)
    groups = architecture_of(model).groups(block)
    norm_group = next(g for g in groups if g.smooth == "post_attention_layernorm")
    # 4 experts x gate, up (Qwen2-MoE: and its shared expert's, whose sigmoid gate is compensated too)
    shared = model_type == "qwen2_moe"
    assert norm_group.compensate == ("mlp.gate", "mlp.shared_expert_gate")[: 1 + shared]
    assert len(norm_group.balance) == 8 + 2 * shared
    g = torch.Generator().manual_seed(4)
    for group in groups:
        if group.smooth and "expert" in group.smooth or group is norm_group:
            fold_scales(
                block,
                group,
                torch.rand(
                    64 if group is norm_group else block.get_submodule(group.balance[0]).in_features, generator=g
                )
                + 0.5,
            )
    assert torch.allclose(output(block), reference, atol=1e-5, rtol=1e-4)
    # without the router's compensation the routing, and so the output, changes
    block.mlp.gate.weight.data.mul_(torch.rand(64, generator=g) + 0.5)
    assert not torch.allclose(output(block), reference, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("model_type", MOE)
def test_shared_scales_pack_every_expert_for_compressed_tensors_and_transformers_loads_it(
    model_type, tokenizer, calib_text, tmp_path
):

    source = save_tiny(tmp_path / "model", tokenizer, model_type=model_type, dtype=torch.float32)
    mlp, projections = STORED[model_type]
    out = tmp_path / "out"
    assert main(["quantize", str(source), "--out", str(out), "--calib-data", str(calib_text), "--n-calib", "8",
                 "--seq-len", "32", "--batch-size", "2", "--n-grid", "4", "--group-size", "32", "--scales", "shared",
                 "--objective", "module", "--rounding", "greedy", "--symmetric", "--format", "compressed-tensors",
                 "--quiet"]) == 0  # fmt: skip
    saved, scales = load_file(str(out / "model.safetensors")), load_file(str(out / "awq_scales.safetensors"))
    original = load_file(str(source / "model.safetensors"))
    packed = {name.removesuffix(".weight_packed") for name in saved if name.endswith(".weight_packed")}
    assert {
        f"model.layers.{i}.{mlp}.experts.{e}.{p}" for i in range(2) for e in range(4) for p in projections
    } <= packed
    for layer in range(2):  # the router stays float, its columns times the shared s of the experts it routes to
        router = f"model.layers.{layer}.{mlp}.gate.weight"
        s = scales[f"model.layers.{layer}.{mlp}.experts.0.{projections[0]}"]
        assert torch.allclose(saved[router], original[router] * s, rtol=1e-6, atol=0)
    ignored = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert {f"model.layers.0.{mlp}.gate", f"model.layers.1.{mlp}.gate", "lm_head"} <= set(ignored)
    if model_type == "qwen2_moe":  # the shared expert is packed, its one-output sigmoid gate stays float
        assert {f"model.layers.0.mlp.shared_expert.{p}" for p in projections} <= packed
        assert "model.layers.0.mlp.shared_expert_gate" in ignored
        assert saved["model.layers.0.mlp.shared_expert_gate.weight"].is_floating_point()
    assert not any(".shared_expert." in name for name in ignored)
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info


def test_moe_refusals_are_one_line(tokenizer, calib_text, tmp_path, capsys):

    source = save_tiny(tmp_path / "model", tokenizer, model_type="mixtral")
    capsys.readouterr()  # transformers' own progress bars while saving
    common = ["quantize", str(source), "--calib-data", str(calib_text), "--n-calib", "4", "--seq-len", "32",
              "--group-size", "32", "--scales", "shared"]  # fmt: skip
    for extra, said in (
        (["--format", "awq"], "format awq cannot hold mixture-of-experts weights"),
        (["--moe-calibration", "routed"], "use --moe-calibration all"),
    ):
        out = tmp_path / "out"
        assert main([*common, "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and said in err[0], err
        assert not out.exists()


def _tiny_moe(model_type: str, **overrides) -> torch.nn.Module:
    from transformers import AutoConfig

    torch.manual_seed(0)
    params = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4)
    params |= dict(num_hidden_layers=1, vocab_size=512, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    params |= dict(num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2)
    params |= dict(moe_intermediate_size=32, intermediate_size_mlp=96, first_k_dense_replace=0, n_group=1, topk_group=1)
    config = AutoConfig.for_model(model_type, **{**params, **overrides})
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize(
    "model_type, overrides",
    [("olmoe", {}), ("glm4_moe", {}),
     # experts without a gate, down(act(up(x))), beside Mamba-2 and attention blocks
     ("nemotron_h", dict(layers_block_type=["linear_attention", "moe", "full_attention"], num_hidden_layers=3,
                         mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16, n_groups=1,
                         moe_shared_expert_intermediate_size=64))],
)  # fmt: skip
def test_experts_of_a_type_outside_the_table_convert_when_they_compute_the_same(model_type, overrides):
    _linearize_keeping_the_logits(_tiny_moe(model_type, **overrides))


def _linearize_keeping_the_logits(model: torch.nn.Module) -> torch.Tensor:
    """Converts ``model``'s one fused experts module, asserts the logits stay; returns the ids."""
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
    assert linearize_experts(model) == 1
    with torch.no_grad():
        after = model(ids).logits
    assert torch.allclose(after, before, rtol=1e-5, atol=1e-5 * float(before.abs().max()))
    return ids


class _SquaredExperts(torch.nn.Module):
    """Fused experts whose forward is not an MLP of their weights: down(act(gate) * up)^2."""

    def __init__(self, experts: torch.nn.Module):
        super().__init__()
        self.gate_up_proj, self.down_proj, self.act_fn = experts.gate_up_proj, experts.down_proj, experts.act_fn

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for token in range(hidden_states.shape[0]):
            for slot, e in enumerate(top_k_index[token].tolist()):
                gate, up = (hidden_states[token] @ self.gate_up_proj[e].T).chunk(2)
                out[token] += top_k_weights[token, slot] * ((self.act_fn(gate) * up) @ self.down_proj[e].T) ** 2
        return out


def test_fused_experts_that_per_expert_linears_do_not_reproduce_are_refused():
    from awqkit.errors import UnsupportedModelError

    model = _tiny_moe("olmoe")
    model.model.layers[0].mlp.experts = _SquaredExperts(model.model.layers[0].mlp.experts)
    with pytest.raises(UnsupportedModelError, match="'olmoe' keeps fused mixture-of-experts weights that"):
        linearize_experts(model)


def test_llama4_experts_run_on_their_stacked_routing_weighted_rows_and_see_only_routed_tokens():
    """Llama-4 calls its experts on every token, stacked per expert and weighted by the router's
    score (zero where not routed): the linears compute the same, and each expert's statistics
    hold its routed tokens only, with the search rows among them."""
    model = _tiny_moe("llama4_text", num_key_value_heads=2, num_experts_per_tok=1)
    ids = _linearize_keeping_the_logits(model)
    layout = find_decoder(model)
    inputs = capture_block_inputs(layout, ids, 2, torch.float32)
    (visit,) = walk_blocks(layout, inputs, search_indices=search_token_indices(ids.numel(), 8, 0))
    routed = {e: visit.stats[f"feed_forward.experts.{e}.gate_proj"].count for e in range(4)}
    assert sum(routed.values()) == ids.numel()  # top-1: each token at one expert
    for e in range(4):
        stats = visit.stats[f"feed_forward.experts.{e}.gate_proj"]
        assert all(torch.all(rows.abs().sum(dim=1) > 0) for *_, rows in stats.batches.values())


def test_gpt_oss_experts_convert_in_their_layout_with_biases_and_the_models_own_gating():
    """[E, H, 2I] with gate and up interleaved, biases, clamped SwiGLU: found by behaviour."""
    model = _tiny_moe("gpt_oss", num_key_value_heads=2)
    fused = model.model.layers[0].mlp.experts
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
    assert linearize_experts(model) == 1
    experts = model.model.layers[0].mlp.experts
    layout, shapes = experts.fused.layout, experts.fused.shapes
    assert (layout.transposed, layout.interleaved) == (True, True)
    assert shapes["gate_up_proj"] == tuple(fused.gate_up_proj.shape)
    # expert 1's gate is column 2k of its fused [H, 2I] block, its up column 2k + 1
    assert torch.equal(experts[1].gate_proj.weight, fused.gate_up_proj[1][:, 0::2].T)
    assert torch.equal(experts[1].up_proj.bias, fused.gate_up_proj_bias[1][1::2])
    assert torch.equal(experts[1].down_proj.weight, fused.down_proj[1].T)
    with torch.no_grad():
        after = model(ids).logits
    assert torch.allclose(after, before, rtol=1e-5, atol=1e-5 * float(before.abs().max()))
    state = {f"x.{n}": t for n, t in experts.state_dict().items()}
    assert {n: t.shape for n, t in experts_fused_back(torch.nn.ModuleDict({"x": experts}), "", state).items()} == {
        f"x.{n}": p.shape for n, p in fused.named_parameters()
    }
    for name, tensor in experts_fused_back(torch.nn.ModuleDict({"x": experts}), "", state).items():
        assert torch.equal(tensor, fused.get_parameter(name.removeprefix("x."))), name


def test_a_checkpoint_holding_fused_experts_streams_and_its_fake_output_is_fused_again(tokenizer, calib_text, tmp_path):
    model = _tiny_moe("gpt_oss", num_key_value_heads=2, vocab_size=len(tokenizer), num_hidden_layers=2)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    args = ["--quiet", "quantize", str(tmp_path / "m"), "--calib-data", str(calib_text), "--bits", "8"]
    args += ["--n-calib", "2", "--seq-len", "32", "--n-grid", "2", "--group-size", "16"]
    assert main([*args, "--out", str(tmp_path / "fake")]) == 0
    stored, written = load_file(tmp_path / "m" / "model.safetensors"), read_tensors(tmp_path / "fake")
    assert sorted(written) == sorted(stored)  # the fused names and shapes, as transformers reads them
    assert all(written[n].shape == stored[n].shape for n in stored)
    assert not torch.equal(
        written["model.layers.0.mlp.experts.gate_up_proj"], stored["model.layers.0.mlp.experts.gate_up_proj"]
    )
    assert main([*args, "--out", str(tmp_path / "packed"), "--scales", "shared", "--format", "compressed-tensors",
                 "--symmetric"]) == 0  # fmt: skip
    packed = read_tensors(tmp_path / "packed")
    assert "model.layers.1.mlp.experts.3.gate_proj.weight_packed" in packed
    assert torch.equal(packed["model.layers.1.mlp.experts.3.up_proj.bias"],
                       stored["model.layers.1.mlp.experts.gate_up_proj_bias"][3][1::2])  # fmt: skip


@pytest.mark.parametrize(
    "model_type, names",
    [("minimax", ("w1", "w3", "w2")), ("phimoe", ("w1", "w3", "w2")), ("olmoe", ("gate_proj", "up_proj", "down_proj")),
     ("nemotron_h", (None, "up_proj", "down_proj")), ("gpt_oss", None)],
)  # fmt: skip
def test_expert_names_are_those_transformers_merges_from_checkpoints(model_type, names):
    """The per-expert names come from transformers' own conversions, so a streamed checkpoint's
    tensors are found; none where checkpoints store the fused tensors (gpt-oss)."""
    with torch.device("meta"):
        model = _tiny_moe(model_type, num_key_value_heads=2)
    found = stored_expert_names(model)
    assert (found and (found.gate, found.up, found.down)) == names


def test_a_router_that_is_an_nn_linear_stays_float():
    model = _tiny_moe("phimoe")  # its router subclasses nn.Linear and its forward reads the weight
    linearize_experts(model)
    block = find_decoder(model).blocks[0]
    assert "mlp.router" in dict(block.named_modules())
    assert "mlp.router" not in block_linears(block)
    assert "model.layers.0.mlp.router" in router_names(model)
