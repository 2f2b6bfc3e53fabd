import pytest
import torch
from conftest import tiny_model, walked_last_block_output
from transformers import GPT2Config, GPT2LMHeadModel

from awqkit.errors import UnsupportedModelError
from awqkit.model.layout import block_linears, find_decoder
from awqkit.model.linearize import linearize


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"])
def test_decoder_blocks_and_linears_are_found_generically(model_type):
    model = tiny_model(model_type)
    layout = find_decoder(model)
    assert layout.blocks_name == "model.layers"
    assert len(layout.blocks) == model.config.num_hidden_layers
    names = set(block_linears(layout.blocks[0]))
    assert names == {
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    }
    all_linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert "lm_head" in all_linears and not any("lm_head" in n for n in names)


def test_gpt2_conv1d_is_found_once_linearized_and_refused_in_one_line_before():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(UnsupportedModelError, match="no nn.Linear in its decoder blocks; supported: ") as error:
        find_decoder(model)
    assert "\n" not in str(error.value)
    linearize(model)
    assert sorted(block_linears(find_decoder(model).blocks[0])) == [
        "attn.c_attn",
        "attn.c_proj",
        "mlp.c_fc",
        "mlp.c_proj",
    ]


def _full_output(model, windows):
    layout = find_decoder(model)
    captured = []
    hook = layout.blocks[-1].register_forward_hook(lambda m, a, out: captured.append(out))
    with torch.no_grad():
        model(windows)
    hook.remove()
    return captured[0]


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma3_text"])
def test_block_walk_reproduces_the_full_forward(model_type):
    model = tiny_model(model_type)
    windows = torch.randint(0, 1000, (3, 24), generator=torch.Generator().manual_seed(0))
    full = _full_output(model, windows)
    walked = walked_last_block_output(model, windows)
    assert torch.allclose(walked, full, atol=1e-5, rtol=1e-5)


def test_gemma3_blocks_get_their_own_attention_arguments():
    # Block 5 is full attention, blocks 0-4 sliding: reusing block 0's mask and rotary tables
    # for every block would change the result.
    model = tiny_model("gemma3_text")
    assert model.config.layer_types[0] != model.config.layer_types[5]
    windows = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    full = _full_output(model, windows)
    from awqkit.model.walk import capture_block_inputs

    layout = find_decoder(model)
    per_block = capture_block_inputs(layout, windows, 2, torch.float32).args
    args0, args5 = per_block[0][0][1], per_block[5][0][1]
    assert not torch.equal(args0["position_embeddings"][0], args5["position_embeddings"][0])
    assert torch.allclose(walked_last_block_output(model, windows), full, atol=1e-5)
