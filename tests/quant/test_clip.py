import torch

from awqkit.quant.clip import CLIP_RATIOS, clip_ratios, clip_search, group_output_errors
from awqkit.quant.grid import dequantize_groupwise, quantize_groupwise, round_nearest
from awqkit.quant.search import alpha_grid, linear_output_error, search_alpha


def _layer(seed: int = 0, out: int = 12, inp: int = 40, n: int = 128):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, inp, generator=g) * torch.linspace(0.2, 3.0, inp)
    w = torch.randn(out, inp, generator=g)
    w[:, 3] *= 8  # an outlier column: clipping it trades its error for the rest of its group's
    return w, x


def test_group_output_errors_equal_the_definition_ragged_last_group_included():
    w, x = _layer(1)
    d = torch.randn(w.shape, generator=torch.Generator().manual_seed(2))
    group_size = 16  # 40 columns: groups of 16, 16 and 8
    errors = group_output_errors(x, d, group_size)
    assert errors.shape == (12, 3)
    for r in range(12):
        for g in range(3):
            cols = slice(g * group_size, min((g + 1) * group_size, 40))
            literal = (x[:, cols] @ d[r, cols]).pow(2).mean()
            assert torch.allclose(errors[r, g], literal, rtol=1e-4), (r, g)


def test_each_group_keeps_the_ratio_of_least_own_error_and_frozen_rows_keep_one():
    w, x = _layer(3)
    frozen = torch.zeros(12, dtype=torch.bool)
    frozen[:4] = True
    ratios = clip_ratios(w, x, bits=3, group_size=8, frozen_rows=frozen)
    assert (ratios[:4] == 1).all() and (ratios[4:] < 1).any()
    assert set(ratios.unique().tolist()) <= set(torch.tensor(CLIP_RATIOS).tolist())
    for r in range(4, 12):  # the chosen ratio's own error is the least over the grid
        for g in range(5):
            own = []
            for ratio in CLIP_RATIOS:
                q = quantize_groupwise(w, 3, 8, clip=torch.full((12, 5), ratio))
                own.append(group_output_errors(x, w - dequantize_groupwise(q), 8)[r, g].item())
            grid = torch.tensor(CLIP_RATIOS).tolist()  # float32, as the ratios are stored
            assert own[grid.index(ratios[r, g].item())] == min(own)


def test_clipping_never_raises_the_layer_error_and_the_grid_includes_no_shrink():
    for seed in range(6):
        w, x = _layer(seed)
        salience = x.double().square().mean(dim=0)
        error_of = linear_output_error(x, w)
        result = search_alpha(w, salience, error_of, bits=3, group_size=8, alphas=alpha_grid(5))
        clipped = clip_search(w, result, x, error_of, rounding=lambda s: round_nearest)
        assert clipped.error <= result.error and clipped.alpha == result.alpha
        assert clipped.clip is not None and clipped.clip.shape == (12, 5)
        if (clipped.clip < 1).any():  # kept only when the whole layer's error fell
            assert clipped.error < result.error
            assert clipped.error == error_of(dequantize_groupwise(clipped.quantized) / clipped.scales)
        else:
            assert torch.equal(clipped.quantized.q, result.quantized.q)
    assert CLIP_RATIOS[0] == 1.0
