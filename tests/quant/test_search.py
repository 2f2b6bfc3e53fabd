import torch

from awqkit.quant.grid import dequantize_groupwise, quantize_groupwise
from awqkit.quant.search import (
    alpha_grid,
    awq_scales,
    duo_scales,
    gram_output_error,
    linear_output_error,
    scale_candidates,
    search_alpha,
    search_scales,
    weight_abs_mean,
)


def _layer(seed: int = 0, out: int = 32, inp: int = 64, n: int = 256):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, inp, generator=g) * torch.linspace(0.1, 4.0, inp)  # uneven channel salience
    w = torch.randn(out, inp, generator=g)
    return w, x, x.double().square().mean(dim=0)


def _search(w, x, salience, n_grid):
    return search_alpha(w, salience, linear_output_error(x, w), bits=4, group_size=16, alphas=alpha_grid(n_grid))


def test_zero_salience_channel_gets_the_floor_not_a_bias():
    salience = torch.tensor([0.0, 4.0, 1e-12], dtype=torch.float64)
    s = awq_scales(salience, 0.5)
    assert s[0] == 1e-5 and s[1] == 2.0 and s[2] == 1e-5
    # The research code's bug computed (s + 1e-6)^alpha: for alpha=0.5 that is not 2.0.
    assert awq_scales(salience, 0.0).eq(1.0).all()


def test_non_finite_weights_statistics_and_errors_stop_the_search():
    import math

    import pytest

    from awqkit.errors import NonFiniteError

    w, x, salience = _layer()
    bad_w = w.clone()
    bad_w[3, 5] = float("nan")
    with pytest.raises(NonFiniteError, match="weight"):
        _search(bad_w, x, salience, 2)
    bad_salience = salience.clone()
    bad_salience[0] = math.inf
    with pytest.raises(NonFiniteError, match="statistics"):
        _search(w, x, bad_salience, 2)
    with pytest.raises(NonFiniteError, match="alpha 0"):
        search_alpha(w, salience, lambda w_hat: math.nan, bits=4, group_size=16, alphas=alpha_grid(2))


def test_error_equals_mse_of_biased_outputs():
    w, x, salience = _layer()
    bias = torch.randn(w.shape[0]) * 1e3
    result = search_alpha(
        w.double(), salience, linear_output_error(x.double(), w.double()), bits=4, group_size=16, alphas=alpha_grid(4)
    )
    w_hat = result.dequantized()
    y, y_hat = x.double() @ w.double().T + bias.double(), x.double() @ w_hat.T + bias.double()
    assert abs(result.error - (y - y_hat).pow(2).mean().item()) <= 1e-9 * result.error
    # in float32 the product is float32 and only the sums float64
    in_float = linear_output_error(x, w)(w_hat.float())
    assert abs(in_float - result.error) <= 1e-4 * result.error


def test_the_gram_error_equals_the_token_error_on_the_same_tokens():
    w, x, salience = _layer()
    x = x * torch.linspace(0.1, 10, x.shape[1])  # channels of very different size
    second_moment = x.double().T @ x.double() / x.shape[0]
    for alpha in (0.0, 0.5, 1.0):
        s = awq_scales(salience, alpha).float()
        w_hat = dequantize_groupwise(quantize_groupwise(w * s, 3, 16)) / s
        tokens, gram = linear_output_error(x, w)(w_hat), gram_output_error(second_moment, w)(w_hat)
        assert abs(gram - tokens) <= 1e-5 * tokens


def _argmin_with(error_of, w, x, salience, n_grid=10):
    errors = []
    for i in range(n_grid + 1):
        s = awq_scales(salience, i / n_grid).float()
        w_hat = dequantize_groupwise(quantize_groupwise(w * s, 4, 16)) / s
        errors.append(error_of(w_hat))
    return min(range(len(errors)), key=errors.__getitem__) / n_grid


def test_bias_cancels_so_a_large_bias_changes_nothing():
    w, x, salience = _layer(1)
    chosen = _search(w, x, salience, 10).alpha
    bias = torch.full((w.shape[0],), 50.0)
    # Both sides biased, computed the naive way in float64: same choice as the search.
    both = _argmin_with(
        lambda w_hat: ((x @ w.T + bias).double() - (x @ w_hat.T + bias).double()).pow(2).mean(), w, x, salience
    )
    assert both == chosen


def test_bias_on_one_side_only_would_change_the_choice():
    # The research code's real hazard: bias in the reference output but not in the quantized one.
    w, x, _ = _layer(1)
    x = x + 2.0  # real activations have a mean, which is what lets a one-sided bias leak in
    salience = x.double().square().mean(dim=0)
    chosen = _search(w, x, salience, 10).alpha
    bias = torch.randn(w.shape[0], generator=torch.Generator().manual_seed(5)) * 3
    one_sided = _argmin_with(lambda w_hat: ((x @ w.T + bias) - x @ w_hat.T).pow(2).mean(), w, x, salience)
    assert one_sided != chosen


def test_search_keeps_the_best_grid_point_and_beats_rtn():
    w, x, salience = _layer(3)
    result = _search(w, x, salience, 20)
    assert len(result.errors) == 21 and result.error == min(result.errors)
    assert result.alpha == result.errors.index(min(result.errors)) / 20
    assert result.error < result.errors[0]  # salience-aware scaling beats plain RTN here
    # Q(W*s) lives on the integer grid; the stored float weight is Q(W*s)/s.
    assert torch.allclose(result.dequantized() * result.scales, dequantize_groupwise(result.quantized))


def test_alpha_zero_alone_is_plain_round_to_nearest():
    w, x, salience = _layer(4)
    rtn = search_alpha(w, salience, linear_output_error(x, w), bits=4, group_size=16, alphas=[0.0])
    assert rtn.scales.eq(1.0).all()
    assert torch.equal(rtn.dequantized(), dequantize_groupwise(quantize_groupwise(w, 4, 16)))


def test_stacked_linears_quantize_as_each_alone_at_the_same_scales():
    # Groups run along rows, so stacking linears that share an input changes no integer.
    w, x, salience = _layer(5)
    a, b = w[:20], w[20:]
    stacked = search_alpha(w, salience, linear_output_error(x, w), bits=4, group_size=16, alphas=[0.5])
    alone = [
        search_alpha(part, salience, linear_output_error(x, part), bits=4, group_size=16, alphas=[0.5])
        for part in (a, b)
    ]
    assert torch.equal(stacked.quantized.q, torch.cat([r.quantized.q for r in alone]))
    n_a, n_b = a.shape[0], b.shape[0]
    summed_squares = (alone[0].error * n_a + alone[1].error * n_b) / (n_a + n_b)
    assert abs(stacked.error - summed_squares) <= 1e-5 * stacked.error


def test_dividing_s_by_a_constant_keeps_the_integers_and_the_stored_function():
    # Min-max grids are scale-equivariant: W * s / c quantizes to the same integers, scales / c.
    w, x, salience = _layer(6)
    result = _search(w, x, salience, 10)
    c = 37.0
    divided = result.divided(c)
    assert torch.equal(divided.quantized.q, result.quantized.q) and torch.equal(
        divided.quantized.zero, result.quantized.zero
    )
    assert torch.allclose(divided.scales * c, result.scales) and divided.alpha == result.alpha
    fresh = quantize_groupwise(w * divided.scales, 4, 16)  # the same integers from scratch, but for float ties
    assert (fresh.q != divided.quantized.q).float().mean() < 1e-3
    assert torch.allclose(divided.dequantized(), result.dequantized(), rtol=1e-5, atol=1e-6)


def test_duo_scales_equal_the_formula_computed_literally():
    w, x, salience = _layer(7, out=6, inp=8)
    group_size = 4
    act = x.double().abs().mean(dim=0)
    # mean over rows of |w| / max|w| of the row's group, by loops
    w_mean = torch.zeros(8, dtype=torch.float64)
    for j in range(8):
        g = j // group_size
        for r in range(6):
            w_mean[j] += abs(w[r, j].item()) / w[r, g * group_size : (g + 1) * group_size].abs().max().item() / 6
    alpha = 0.3
    expected = act.pow(alpha) / w_mean.pow(1 - alpha)
    assert torch.allclose(weight_abs_mean(w, group_size).double(), w_mean, rtol=1e-6)
    assert torch.allclose(duo_scales(act, weight_abs_mean(w, group_size).double(), alpha), expected, rtol=1e-6)


def test_both_scalings_search_the_two_grids_and_keep_the_best_first():
    w, x, salience = _layer(8)
    act = x.double().abs().mean(dim=0)
    both = scale_candidates("both", alpha_grid(4), salience, act, w, 16)
    assert [(c.scaling, c.alpha) for c in both] == [("activation", a) for a in alpha_grid(4)] + [
        ("duo", a) for a in alpha_grid(4)
    ]
    result = search_scales(w, both, linear_output_error(x, w), bits=4, group_size=16)
    assert len(result.errors) == 10 and result.error == min(result.errors)
    assert (result.scaling, result.alpha) == [(c.scaling, c.alpha) for c in both][result.errors.index(result.error)]
    activation = _search(w, x, salience, 4)
    assert result.error <= activation.error  # the activation grid is part of it
