import torch
from conftest import tiny_model

from awqkit.model.layout import find_decoder
from awqkit.model.walk import capture_block_inputs, search_token_indices, walk_blocks


def test_statistics_match_the_inputs_and_shared_inputs_share_them():
    model = tiny_model("llama")
    windows = torch.randint(0, 1000, (4, 16), generator=torch.Generator().manual_seed(0))
    layout = find_decoder(model)
    captured = {}
    attn, mlp = layout.blocks[0].self_attn, layout.blocks[0].mlp
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, key=key: captured.setdefault(key, []).append(args[0]))
        for key, m in (("q", attn.q_proj), ("o", attn.o_proj), ("down", mlp.down_proj))
    ]
    indices = search_token_indices(windows.numel(), 20, 3)
    inputs = capture_block_inputs(layout, windows, 3, torch.float32)
    stats = next(walk_blocks(layout, inputs, search_indices=indices, gram=True)).stats
    for hook in hooks:
        hook.remove()
    assert stats["self_attn.q_proj"] is stats["self_attn.k_proj"] is stats["self_attn.v_proj"]
    assert stats["mlp.gate_proj"] is stats["mlp.up_proj"]
    assert stats["self_attn.o_proj"] is not stats["self_attn.q_proj"]
    for key, name in (("q", "self_attn.q_proj"), ("o", "self_attn.o_proj"), ("down", "mlp.down_proj")):
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in captured[key][-2:]]).double()  # walk's 2 batches
        assert stats[name].count == 64
        assert torch.allclose(stats[name].mean_square(), x.square().mean(0))
        assert torch.allclose(stats[name].mean(), x.mean(0))
        assert torch.equal(stats[name].search_tokens(), x[indices].float())
        # E[x x^T] over every token, from the batches' float32 products added in float64
        assert torch.allclose(stats[name].second_moment(), x.T @ x / 64, rtol=1e-5, atol=1e-6)
