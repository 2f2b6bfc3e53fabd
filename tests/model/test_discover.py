"""Scale groups found from the block reproduce the table, and fold only where the function stays."""

import json
import logging

import pytest
import torch
from conftest import output_hashes, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

import awqkit.model.scale_groups
from awqkit.cli import main
from awqkit.model.discover import discover_architecture
from awqkit.model.layout import find_decoder
from awqkit.model.scale_groups import ARCHITECTURES, ScaleGroup, foldable
from awqkit.model.walk import capture_block_inputs, first_window_probe

FAST = ["--n-calib", "4", "--seq-len", "64", "--n-grid", "4", "--max-search-tokens", "128", "--group-size", "16"]


def _discovered(model: torch.nn.Module):
    layout = find_decoder(model)
    inputs = capture_block_inputs(layout, torch.randint(0, 400, (2, 16)), 2, torch.float32)
    return discover_architecture(layout.blocks[0], first_window_probe(inputs)), layout.blocks[0]


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"])
def test_discovery_reproduces_the_table(model_type):
    architecture, block = _discovered(tiny_model(model_type))
    table = ARCHITECTURES[model_type]
    # The table names v_proj for o_proj even where grouped-query attention keeps it from folding.
    expected = tuple(g if foldable(g, block) else ScaleGroup(None, g.balance, g.module) for g in table.scale_groups)
    assert architecture.scale_groups == expected
    assert architecture.norm_offset == table.norm_offset


def _tiny(model_type: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    params = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
    params |= dict(num_hidden_layers=2, vocab_size=512, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**params, **overrides})).eval()


ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
# Model types outside the table: (where 1/s folds -> its readers, norms' offset).
BEYOND_THE_TABLE = {
    # (1 + weight) norms, found by behaviour
    "gemma2": ({"input_layernorm": ATTENTION, "pre_feedforward_layernorm": ("mlp.gate_proj", "mlp.up_proj"), "mlp.up_proj": ("mlp.down_proj",)}, 1.0),
    # attention and MLP in parallel, reading one norm
    "cohere": ({"input_layernorm": (*ATTENTION, "mlp.gate_proj", "mlp.up_proj"), "mlp.up_proj": ("mlp.down_proj",)}, 0.0),
    # a LayerNorm with bias; v_proj -> out_proj without grouped-query attention; 1/s through ReLU
    "opt": ({"self_attn_layer_norm": ATTENTION, "self_attn.v_proj": ("self_attn.out_proj",), "final_layer_norm": ("fc1",), "fc1": ("fc2",)}, 0.0),
    # norms after attention and MLP: q, k, v read the block's input, which no op of the block makes
    "olmo2": ({"mlp.up_proj": ("mlp.down_proj",)}, 0.0),
    # fused qkv and gate_up projections: down_proj's 1/s folds into up's half of gate_up's rows
    "phi3": ({"input_layernorm": ("self_attn.qkv_proj",), "post_attention_layernorm": ("mlp.gate_up_proj",), "mlp.gate_up_proj[96:192]": ("mlp.down_proj",)}, 0.0),
    # GELU between the MLP's linears: folding into the first would change the function
    "gpt_neox": ({"input_layernorm": ("attention.query_key_value",), "post_attention_layernorm": ("mlp.dense_h_to_4h",)}, 0.0),
}  # fmt: skip


@pytest.mark.parametrize("model_type", BEYOND_THE_TABLE)
def test_discovery_folds_exactly_where_the_block_computes_the_same_function(model_type):
    architecture, block = _discovered(_tiny(model_type))
    folds, offset = BEYOND_THE_TABLE[model_type]
    assert {g.folds_into: g.balance for g in architecture.scale_groups if g.smooth} == folds
    assert architecture.norm_offset == offset
    covered = sorted(name for g in architecture.scale_groups for name in g.balance)
    assert covered == sorted(n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear))


def test_discovered_groups_give_the_table_runs_bytes(tiny_llama_dir, calib_text, tmp_path, monkeypatch, caplog):
    args = ["--quiet", "quantize", str(tiny_llama_dir), "--calib-data", str(calib_text), *FAST]
    shared = ["--scales", "shared", "--format", "compressed-tensors", "--rounding", "greedy", "--objective", "module"]
    assert main([*args, "--out", str(tmp_path / "table"), *shared]) == 0
    monkeypatch.setattr(awqkit.model.scale_groups, "ARCHITECTURES", {})
    with caplog.at_level(logging.INFO, logger="awqkit"):
        assert main([*args, "--out", str(tmp_path / "found"), *shared]) == 0
    assert "scale groups found from block 0 (and 1 like it)" in caplog.text
    assert output_hashes(tmp_path / "found") == output_hashes(tmp_path / "table")


@pytest.mark.parametrize("model_type", ["gemma2", "cohere", "opt"])
def test_a_model_type_beyond_the_table_deploys_with_its_function_kept(model_type, tokenizer, calib_text, tmp_path):
    model = _tiny(model_type, vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    args = ["--quiet", "quantize", str(tmp_path / "model"), "--out", str(out), "--calib-data", str(calib_text)]
    assert main([*args, *FAST, "--scales", "shared", "--bits", "8"]) == 0
    records = json.loads((out / "awqkit.json").read_text())["layers"]
    assert sum(r["folded_into"] is not None for r in records.values()) >= len(records) / 2
    quantized = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, len(tokenizer), (1, 32))
    with torch.no_grad():
        before, after = model(ids).logits, quantized(ids).logits
    # 8 bits with every fold in place: a fold that changed the function would be of order one.
    assert (after - before).norm() / before.norm() < 0.03


BEYOND_ATTENTION = {
    # Mamba: dt_proj's weight is used without calling it, so it has a group of its own (nearest)
    "mamba": dict(),
    # a decoder that unpacks its blocks' output into two values; Mamba-2 and attention blocks
    "bamba": dict(attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=32, mamba_d_state=16),
    # short-convolution blocks and attention blocks
    "lfm2": dict(layer_types=["conv", "full_attention"]),
    # gated delta-net linear attention (a short convolution inside) and full attention
    "qwen3_5_text": dict(num_hidden_layers=4),
    # Mamba-2 mixers, MLPs and attention, each a block of its own
    "nemotron_h": dict(
        layers_block_type=["linear_attention", "mlp", "full_attention"], mamba_num_heads=4, mamba_head_dim=16,
        ssm_state_size=16, n_groups=1,
    ),
}  # fmt: skip


@pytest.mark.parametrize("model_type", BEYOND_ATTENTION)
def test_state_space_and_hybrid_decoders_get_groups_for_each_kind_of_block(
    model_type, tokenizer, calib_text, tmp_path, caplog
):
    """Each kind of block its own groups; convolution and state-space parameters stay float; the
    function is kept at 8 bits."""
    model = _tiny(model_type, vocab_size=len(tokenizer), **BEYOND_ATTENTION[model_type])
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    args = ["quantize", str(tmp_path / "model"), "--out", str(out), "--calib-data", str(calib_text)]
    with caplog.at_level(logging.INFO, logger="awqkit"):
        assert main([*args, *FAST, "--scales", "shared", "--objective", "module", "--bits", "8"]) == 0
    kinds = {
        tuple(n for n, m in b.named_modules() if isinstance(m, torch.nn.Linear)) for b in find_decoder(model).blocks
    }
    assert len([r for r in caplog.records if "scale groups found" in r.getMessage()]) == len(kinds)
    quantized = AutoModelForCausalLM.from_pretrained(out).eval()
    # convolutions' weights and the state-space parameters (A_log, D, dt_bias); norms take 1/s
    convolutions = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Conv1d)}
    kept = {
        n: p for n, p in model.named_parameters() if n in convolutions or n.rsplit(".", 1)[1] not in ("weight", "bias")
    }
    assert kept and all(torch.equal(quantized.get_parameter(n), p) for n, p in kept.items())
    ids = torch.randint(0, len(tokenizer), (1, 32))
    with torch.no_grad():
        before, after = model(ids).logits, quantized(ids).logits
    assert (after - before).norm() / before.norm() < 0.03


def test_discovered_groups_give_the_table_runs_bytes_on_smollm2(smollm2_dir, tmp_path, monkeypatch, caplog):
    args = ["--quiet", "quantize", "smollm2", "--calib-data", "fortunes", "--n-calib", "4", "--seq-len", "64"]
    args += ["--group-size", "64", "--n-grid", "4", "--scales", "shared", "--format", "compressed-tensors"]
    assert main([*args, "--out", str(tmp_path / "table")]) == 0
    monkeypatch.setattr(awqkit.model.scale_groups, "ARCHITECTURES", {})
    with caplog.at_level(logging.INFO, logger="awqkit"):
        assert main([*args, "--out", str(tmp_path / "found")]) == 0
    assert "scale groups found from block 0 (and 29 like it)" in caplog.text
    assert output_hashes(tmp_path / "found") == output_hashes(tmp_path / "table")
