"""GPTQ rounding: a literal column-by-column implementation, identity H, static groups, rows."""

import pytest
import torch

from awqkit.quant.gptq import GptqRounding, act_order, gptq_rounding, inverse_cholesky
from awqkit.quant.grid import dequantize_groupwise, expand_groups, groupwise_qparams, quantize_groupwise
from awqkit.quant.search import linear_output_error


def _case(seed: int = 0, out: int = 40, inp: int = 96, tokens: int = 512):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, inp, generator=g) * 10 ** torch.rand(inp, generator=g)
    x += torch.randn(tokens, 1, generator=g) * torch.randn(inp, generator=g)  # correlated channels
    w = torch.randn(out, inp, generator=g)
    second_moment = x.double().T @ x.double() / tokens
    return x, w, second_moment


def literal_gptq(w, second_moment, bits, group_size, damp, order=None):
    """GPTQ as the paper writes it, one column at a time in weight units, no lazy blocks."""
    scale, zero = groupwise_qparams(w, bits, group_size)
    scale, zero = (expand_groups(t, group_size, w.shape[1]).double() for t in (scale, zero))
    h = second_moment.clone()
    h += damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    columns = list(range(w.shape[1])) if order is None else order.tolist()
    h = h[columns][:, columns]
    u_factor = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)  # U^T U = H^-1
    work = w.double()[:, columns].clone()
    scale, zero = scale[:, columns], zero[:, columns]
    q = torch.zeros_like(work)
    for j in range(work.shape[1]):
        q[:, j] = torch.clamp(torch.round(work[:, j] / scale[:, j] + zero[:, j]), 0, 2**bits - 1)
        error = (work[:, j] - (q[:, j] - zero[:, j]) * scale[:, j]) / u_factor[j, j]
        work[:, j + 1 :] -= error[:, None] * u_factor[j, j + 1 :][None, :]
    out = torch.zeros_like(q)
    out[:, columns] = q
    return out


@pytest.mark.parametrize("ordered", [False, True])
@pytest.mark.parametrize("block_size", [1, 16, 128])
def test_gptq_equals_the_literal_column_by_column_loop(ordered, block_size):
    x, w, second_moment = _case()
    rounding = gptq_rounding(second_moment, 0.01, block_size, ordered)
    got = quantize_groupwise(w, 3, 32, rounding).q
    expected = literal_gptq(w, second_moment, 3, 32, 0.01, act_order(second_moment) if ordered else None)
    # float32 lazy blocks against a float64 loop: equal here (3840 weights), but a weight landing
    # within float32 rounding of a boundary may differ on another CPU's kernels
    assert int((got != expected.float()).sum()) <= 2


def test_gptq_lowers_the_output_error_well_below_nearest():
    x, w, second_moment = _case(1)
    nearest = quantize_groupwise(w, 3, 32)
    gptq = quantize_groupwise(w, 3, 32, gptq_rounding(second_moment, 0.01, 32, True))
    error = linear_output_error(x, w)
    assert error(dequantize_groupwise(gptq)) < 0.85 * error(dequantize_groupwise(nearest))


def test_identity_h_is_nearest_rounding_bit_for_bit():
    _, w, _ = _case(2)
    rounding = gptq_rounding(torch.eye(w.shape[1], dtype=torch.float64), 0.01, 16, True)
    assert torch.equal(quantize_groupwise(w, 4, 32, rounding).q, quantize_groupwise(w, 4, 32).q)


def test_the_grid_is_static_so_every_export_holds_plain_groups():
    _, w, second_moment = _case(3)
    nearest = quantize_groupwise(w, 4, 32)
    gptq = quantize_groupwise(w, 4, 32, gptq_rounding(second_moment, 0.01, 32, True))
    assert torch.equal(gptq.scale, nearest.scale) and torch.equal(gptq.zero, nearest.zero)
    assert gptq.q.min() >= 0 and gptq.q.max() <= 15 and not torch.equal(gptq.q, nearest.q)


def test_a_row_rounded_in_a_block_of_rows_is_the_row_rounded_in_the_whole_weight():
    _, w, second_moment = _case(4, out=96)
    rounding = gptq_rounding(second_moment, 0.01, 16, True)
    whole = quantize_groupwise(w, 4, 32, rounding).q
    parts = [quantize_groupwise(w[rows], 4, 32, rounding).q for rows in (slice(0, 32), slice(32, 96))]
    assert torch.equal(torch.cat(parts), whole)


def test_dampening_rises_until_cholesky_succeeds_and_none_when_it_never_does():
    singular = torch.ones(6, 6, dtype=torch.float64)  # rank one
    upper = inverse_cholesky(singular, 0.01)
    assert upper is not None and torch.allclose(upper.T @ upper, torch.linalg.inv(singular + 0.01 * torch.eye(6)))
    assert inverse_cholesky(torch.full((4, 4), float("nan"), dtype=torch.float64), 0.01) is None
    assert inverse_cholesky(torch.zeros(3, 3, dtype=torch.float64), 0.01) is not None  # a dead input: damp alone


def test_act_order_takes_the_most_active_inputs_first():
    h = torch.diag(torch.tensor([1.0, 5.0, 5.0, 0.5]))
    assert act_order(h).tolist() == [1, 2, 0, 3]
    assert isinstance(gptq_rounding(h.double(), 0.01, 8, True), GptqRounding)
