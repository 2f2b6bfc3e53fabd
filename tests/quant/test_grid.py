import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from awqkit.quant.grid import GroupQuantized, dequantize_groupwise, expand_groups, quantize_groupwise


def _weights(seed: int, out: int, inp: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) + shift


def _step_errors(w: torch.Tensor, qw: GroupQuantized) -> torch.Tensor:
    """|w - dequantized w| in units of each value's group step."""
    scale = expand_groups(qw.scale, qw.group_size, w.shape[1])
    return (w - dequantize_groupwise(qw)).abs() / scale


# Float32 rounding in w / scale + zero and (q - zero) * scale, relative to one step.
HALF_STEP = 0.5 + 1e-4
# Weight shapes, group sizes (ragged and 1 included) and bit widths the properties hold over.
GRIDS = dict(
    seed=st.integers(0, 2**16),
    out=st.integers(1, 6),
    inp=st.integers(1, 40),
    group_size=st.integers(1, 48),
    bits=st.integers(2, 8),
)


@settings(max_examples=60, deadline=None)
@given(**GRIDS)
def test_dequantized_values_lie_on_each_groups_grid(seed, out, inp, group_size, bits):
    w = _weights(seed, out, inp)
    qw = quantize_groupwise(w, bits, group_size)
    max_int = 2**bits - 1
    assert qw.q.shape == w.shape and qw.scale.shape == (out, -(-inp // group_size))
    assert torch.equal(qw.q, qw.q.round()) and qw.q.min() >= 0 and qw.q.max() <= max_int
    assert qw.zero.min() >= 0 and qw.zero.max() <= max_int
    w_hat = dequantize_groupwise(qw)
    scale = expand_groups(qw.scale, group_size, inp)
    zero = expand_groups(qw.zero, group_size, inp)
    assert torch.allclose(w_hat / scale + zero, qw.q, atol=1e-4)
    assert _step_errors(w, qw).max() <= HALF_STEP


@settings(max_examples=60, deadline=None)
@given(
    **GRIDS,
    shift=st.sampled_from([-50.0, -4.0, 4.0, 50.0]),
)
def test_single_sign_groups_come_back_within_half_a_step(seed, out, inp, group_size, bits, shift):
    # Shifted by several standard deviations nearly every group is all-positive or all-negative.
    w = _weights(seed, out, inp, shift)
    qw = quantize_groupwise(w, bits, group_size)
    assert _step_errors(w, qw).max() <= HALF_STEP


def test_ragged_last_group_has_its_own_scale_and_zero():
    w = torch.zeros(1, 10)
    w[0, :8] = torch.linspace(-1, 1, 8)
    w[0, 8:] = torch.tensor([-3.0, 4.5])  # a last group of 2 with a much wider range
    qw = quantize_groupwise(w, 4, 4)
    assert qw.scale.shape == (1, 3)
    assert torch.allclose(qw.scale[0, 2], torch.tensor(0.5))
    assert torch.allclose(dequantize_groupwise(qw)[0, 8:], w[0, 8:])
    # The full groups are unaffected by the outlying tail.
    ref = quantize_groupwise(w[:, :8], 4, 4)
    assert torch.equal(qw.q[:, :8], ref.q)


def test_single_sign_group_keeps_its_values():
    # The old zero point, round(-1.0 / step) = -15, clamped to 0, returned [1, 1, 1, 1].
    w = torch.tensor([[1.0, 1.5, 2.0, 1.2]])
    qw = quantize_groupwise(w, 4, 4)
    assert qw.zero.item() == 0 and qw.scale.item() == pytest.approx(2.0 / 15)
    # 1.0 is 7.5 steps above 0: a tie, rounded to even, so exactly half a step off.
    assert qw.q.tolist() == [[7.0, 11.0, 15.0, 9.0]]
    assert _step_errors(w, qw).max() <= HALF_STEP


def test_constant_group_comes_back():
    w = torch.full((3, 8), 0.75)
    qw = quantize_groupwise(w, 4, 8)
    assert torch.allclose(dequantize_groupwise(qw), w, atol=1e-6)
    assert _step_errors(w, qw).max() <= HALF_STEP


@pytest.mark.parametrize("width", [1, 2, 3])
def test_ragged_last_group_of_one_sign_comes_back(width):
    # A 5-wide row at group 4 ends in a group of width 1; wider tails likewise, all positive.
    w = torch.cat([torch.tensor([[-1.0, 0.3, 0.9, -0.2]]), torch.tensor([[0.7, 0.8, 0.75][:width]])], dim=1)
    qw = quantize_groupwise(w, 4, 4)
    assert qw.scale.shape == (1, 2)
    assert _step_errors(w, qw).max() <= HALF_STEP
    assert (dequantize_groupwise(qw)[0, 4:] - w[0, 4:]).abs().max() <= 0.8 / 15 / 2 + 1e-6


def test_group_size_one_is_exact_up_to_half_a_step():
    w = _weights(0, 8, 16, shift=1.0)
    qw = quantize_groupwise(w, 4, 1)
    # Each value is its own group's end of range: it lands on 0 or max_int, so comes back exactly.
    assert torch.allclose(dequantize_groupwise(qw), w, rtol=1e-6, atol=0)
    assert _step_errors(w, qw).max() <= HALF_STEP


def test_zero_is_representable_in_every_group():
    w = _weights(1, 4, 24, shift=3.0)
    w[:, ::5] = 0.0
    assert (dequantize_groupwise(quantize_groupwise(w, 3, 8))[:, ::5] == 0).all()


def _old_qparams(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The formula before 0 was kept in range, written out for one evenly divided matrix."""
    max_int = 2**bits - 1
    grouped = w.view(w.shape[0], -1, group_size)
    w_min, w_max = grouped.amin(dim=2), grouped.amax(dim=2)
    scale = ((w_max - w_min) / max_int).clamp(min=1e-8)
    zero = torch.round(-w_min / scale).clamp(0, max_int)
    return scale, zero


@pytest.mark.parametrize("bits, group_size", [(2, 4), (4, 16), (8, 32)])
def test_mixed_sign_groups_are_unchanged_bit_for_bit(bits, group_size):
    w = _weights(2, 16, 64)
    grouped = w.view(16, -1, group_size)
    # Every group gets a negative and a positive value, the rest stays random.
    grouped[..., 0] = -grouped[..., 0].abs() - 0.01
    grouped[..., 1] = grouped[..., 1].abs() + 0.01
    scale, zero = _old_qparams(w, bits, group_size)
    qw = quantize_groupwise(w, bits, group_size)
    assert torch.equal(qw.scale, scale) and torch.equal(qw.zero, zero)
    expected_q = (grouped / scale[..., None] + zero[..., None]).round().clamp(0, 2**bits - 1).view_as(w)
    assert torch.equal(qw.q, expected_q)


def test_all_negative_group_keeps_order():
    w = -torch.rand(2, 16) - 1.0
    qw = quantize_groupwise(w, 3, 16)
    w_hat = dequantize_groupwise(qw)
    # All values below 0: the zero point sits at the top of the integer range.
    assert (qw.zero == 7).all()
    # Monotone: a larger weight never gets a smaller integer within a group.
    order = w.argsort(dim=1)
    assert (qw.q.gather(1, order).diff(dim=1) >= 0).all()
    assert (w_hat <= 0).all() and _step_errors(w, qw).max() <= HALF_STEP


@pytest.mark.parametrize("bits, group_size", [(1, 8), (9, 8), (4, 0)])
def test_bad_arguments_are_refused(bits, group_size):
    with pytest.raises(ValueError):
        quantize_groupwise(torch.ones(2, 8), bits, group_size)


def test_more_bits_means_less_error():
    w = _weights(0, 32, 256)
    errors = [(w - dequantize_groupwise(quantize_groupwise(w, b, 64))).pow(2).mean() for b in range(2, 9)]
    assert all(a > b for a, b in zip(errors, errors[1:]))


@settings(max_examples=60, deadline=None)
@given(
    **GRIDS,
    shift=st.sampled_from([0.0, -4.0, 4.0]),
)
def test_symmetric_grids_put_zero_at_half_the_range_and_round_trip_within_half_a_step(
    seed, out, inp, group_size, bits, shift
):
    w = _weights(seed, out, inp, shift)
    qw = quantize_groupwise(w, bits, group_size, symmetric=True)
    assert qw.symmetric and (qw.zero == 2 ** (bits - 1)).all()
    assert qw.q.min() >= 0 and qw.q.max() <= 2**bits - 1
    # The scale is max|w| / (2^(b-1) - 1/2), compressed-tensors' symmetric int grid.
    absmax = w.abs().reshape(out, -1) if group_size >= inp else None
    if absmax is not None:
        assert torch.allclose(qw.scale[:, 0], (absmax.amax(dim=1) / (2 ** (bits - 1) - 0.5)).clamp(min=1e-8))
    assert _step_errors(w, qw).max() <= HALF_STEP
    assert (
        dequantize_groupwise(quantize_groupwise(torch.zeros(out, inp), bits, group_size, symmetric=True)) == 0
    ).all()


def test_clip_shrinks_each_groups_range_by_its_ratio_and_clamps_beyond():
    w = torch.tensor([[-1.0, -0.5, 0.25, 2.0, 1.0, 0.5, -3.0, 0.0]])
    clip = torch.tensor([[0.5, 1.0]])
    qw = quantize_groupwise(w, 4, 4, clip=clip)
    unclipped = quantize_groupwise(w, 4, 4)
    assert torch.allclose(qw.scale, torch.tensor([[1.5 / 15, 4.0 / 15]]))  # [-0.5, 1.0] and [-3, 1]
    assert torch.equal(qw.q[:, 4:], unclipped.q[:, 4:])  # ratio 1: the group as without clipping
    w_hat = dequantize_groupwise(qw)
    assert w_hat[0, 3].item() == pytest.approx(1.0, abs=qw.scale[0, 0].item() / 2)  # 2.0 clamps to the range's end
    assert w_hat[0, 0].item() == pytest.approx(-0.5, abs=qw.scale[0, 0].item() / 2)
    assert torch.equal(quantize_groupwise(w, 4, 4, clip=torch.ones(1, 2)).q, unclipped.q)


@pytest.mark.parametrize("in_features", [32, 33])
def test_no_rows_quantize_to_no_rows(in_features):
    """A worker's share of a weight smaller than one row chunk per worker is empty."""
    quantized = quantize_groupwise(torch.zeros(0, in_features), 4, 16)
    assert quantized.q.shape == (0, in_features) and quantized.scale.shape == (0, -(-in_features // 16))
    assert dequantize_groupwise(quantized).shape == (0, in_features)
