import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from awqkit.quant import dequantize_groupwise, expand_groups, quantize_groupwise


def _weights(seed: int, out: int, inp: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) + shift


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    out=st.integers(1, 6),
    inp=st.integers(1, 40),
    group_size=st.integers(1, 48),
    bits=st.integers(2, 8),
)
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
    # Min-max scaling: error at most half a step, plus what clamping the zero point costs.
    step_error = (w - w_hat).abs() / scale
    assert step_error.max() <= 0.5 + 1e-4 or bool((qw.zero == 0).any() | (qw.zero == max_int).any())


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


def test_constant_group_is_exact():
    w = torch.full((3, 8), 0.75)
    w_hat = dequantize_groupwise(quantize_groupwise(w, 4, 8))
    # scale falls back to 1e-8: the constant must come back within that tolerance, not blow up.
    assert torch.isfinite(w_hat).all()
    assert torch.allclose(w_hat, torch.zeros_like(w), atol=1e-6) or torch.allclose(w_hat, w, atol=1e-5)


def test_all_negative_group_clamps_zero_and_keeps_order():
    w = -torch.rand(2, 16) - 1.0
    qw = quantize_groupwise(w, 3, 16)
    w_hat = dequantize_groupwise(qw)
    assert (qw.zero <= 7).all() and (qw.zero >= 0).all()
    # Monotone: a larger weight never gets a smaller integer within a group.
    order = w.argsort(dim=1)
    assert (qw.q.gather(1, order).diff(dim=1) >= 0).all()
    assert (w_hat <= 0).all()


@pytest.mark.parametrize("bits, group_size", [(1, 8), (9, 8), (4, 0)])
def test_bad_arguments_are_refused(bits, group_size):
    with pytest.raises(ValueError):
        quantize_groupwise(torch.ones(2, 8), bits, group_size)


def test_more_bits_means_less_error():
    w = _weights(0, 32, 256)
    errors = [(w - dequantize_groupwise(quantize_groupwise(w, b, 64))).pow(2).mean() for b in range(2, 9)]
    assert all(a > b for a, b in zip(errors, errors[1:]))
