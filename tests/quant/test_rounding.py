import pytest
import torch

from awqkit.quant.grid import expand_groups, quantize_groupwise
from awqkit.quant.rounding import GreedyFlipRounding, make_rounding, outlier_mask, row_output_error


def _case(seed: int = 0, out: int = 24, inp: int = 96, bits: int = 4, group_size: int = 32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    act_mean = torch.randn(inp, generator=g).double() + 0.3
    return w, act_mean, bits, group_size


def _quantize(w, act_mean, bits, group_size, outlier_percent):
    nearest = quantize_groupwise(w, bits, group_size)
    greedy = quantize_groupwise(w, bits, group_size, GreedyFlipRounding(act_mean, outlier_percent))
    scale = expand_groups(nearest.scale, group_size, w.shape[1])
    u = w / scale + expand_groups(nearest.zero, group_size, w.shape[1])
    unit_impact = act_mean[None, :] * scale.double()
    return nearest, greedy, u, unit_impact


@pytest.mark.parametrize("seed", range(4))
def test_greedy_never_increases_row_error_and_moves_by_at_most_one(seed):
    w, act_mean, bits, group_size = _case(seed)
    nearest, greedy, u, unit_impact = _quantize(w, act_mean, bits, group_size, 0.05)
    e_nearest = row_output_error(u - nearest.q, unit_impact).abs()
    e_greedy = row_output_error(u - greedy.q, unit_impact).abs()
    assert (e_greedy <= e_nearest + 1e-9).all()
    assert e_greedy.sum() < 0.5 * e_nearest.sum()  # it does real work, not only "no worse"
    moved = (greedy.q - nearest.q).abs()
    assert moved.max() <= 1 and greedy.q.min() >= 0 and greedy.q.max() <= 2**bits - 1
    # A flip goes to the other neighbour of u: the integer stays within one step of u.
    assert ((u - greedy.q).abs()[moved == 1] < 1).all()
    assert torch.equal(greedy.scale, nearest.scale) and torch.equal(greedy.zero, nearest.zero)


def test_outlier_channels_are_never_flipped():
    w, act_mean, bits, group_size = _case(7)
    act_mean[5] = 50.0
    act_mean[60] = -40.0
    nearest, greedy, _, _ = _quantize(w, act_mean, bits, group_size, 0.05)
    mask = outlier_mask(act_mean, 0.05)
    assert mask[5] and mask[60] and mask.sum() == round(0.05 * 96)
    assert torch.equal(greedy.q[:, mask], nearest.q[:, mask])
    assert (greedy.q[:, ~mask] != nearest.q[:, ~mask]).any()


def test_zero_and_full_outlier_percent():
    w, act_mean, bits, group_size = _case(3)
    nearest, all_masked, _, _ = _quantize(w, act_mean, bits, group_size, 1.0)
    assert torch.equal(all_masked.q, nearest.q)  # nothing may flip: exactly nearest rounding
    _, none_masked, u, unit_impact = _quantize(w, act_mean, bits, group_size, 0.0)
    e = lambda q: row_output_error(u - q, unit_impact).abs()  # noqa: E731
    assert (e(none_masked.q) <= e(nearest.q) + 1e-9).all()
    assert (none_masked.q != nearest.q).any()
    with pytest.raises(ValueError):
        outlier_mask(act_mean, 1.5)


def test_greedy_is_vectorised_rowwise_equivalent():
    # Row independence: quantizing rows one at a time gives the same integers.
    w, act_mean, bits, group_size = _case(11, out=6)
    rounding = GreedyFlipRounding(act_mean, 0.05)
    whole = quantize_groupwise(w, bits, group_size, rounding).q
    rows = torch.cat([quantize_groupwise(w[i : i + 1], bits, group_size, rounding).q for i in range(6)])
    assert torch.equal(whole, rows)


def _greedy_row_by_the_definition(u, act_mean, scale, max_int, outlier):
    """One row, literally as specified: candidates sorted closest-first, every prefix tried."""
    q = u.round().clamp(0, max_int)
    impact = [float(act_mean[j] * scale[j]) for j in range(len(u))]
    error = sum(impact[j] * float(u[j] - q[j]) for j in range(len(u)))
    candidates = []
    for j in range(len(u)):
        step = 1.0 if u[j] >= q[j] else -1.0
        gain = impact[j] * step
        if 0 <= q[j] + step <= max_int and not outlier[j] and gain != 0 and (gain > 0) == (error > 0) and error != 0:
            candidates.append((0.5 - abs(float(u[j] - q[j])), j, step, gain))
    candidates.sort()
    best_k, best, total = 0, abs(error), 0.0
    for k, (_, _, _, gain) in enumerate(candidates, start=1):
        total += gain
        if abs(error - total) < best:
            best_k, best = k, abs(error - total)
    for _, j, step, _ in candidates[:best_k]:
        q[j] += step
    return q


@pytest.mark.parametrize("seed", range(3))
def test_greedy_matches_the_definition_row_by_row(seed):
    # Wide rows (more candidates than the first partial sort takes) and a zero point clamped at
    # the range's end exercise the widening and the range check.
    w, act_mean, bits, group_size = _case(seed, out=12, inp=320, group_size=64)
    w[0, :64] += 3.0  # a group with min > 0: zero clamps to 0 and u reaches past max_int
    greedy = quantize_groupwise(w, bits, group_size, GreedyFlipRounding(act_mean, 0.05))
    scale = expand_groups(greedy.scale, group_size, w.shape[1])
    u = w / scale + expand_groups(greedy.zero, group_size, w.shape[1])
    outlier = outlier_mask(act_mean, 0.05)
    for i in range(w.shape[0]):
        expected = _greedy_row_by_the_definition(u[i], act_mean, scale[i], 2**bits - 1, outlier)
        assert torch.equal(greedy.q[i], expected), f"row {i}"


def test_numpy_closest_columns_agree_with_topk_and_break_ties_by_column():
    # CPU runs the numpy keys; other devices run torch.topk: both must give the same order.
    from awqkit.quant.rounding import _closest_columns_numpy

    g = torch.Generator().manual_seed(5)
    distance = torch.rand(40, 300, generator=g) * 0.5
    distance[:, ::7] += 1.0  # non-candidates sort last
    for k in (1, 64, 300):
        expected = distance.topk(k, dim=1, largest=False, sorted=True).indices
        assert torch.equal(_closest_columns_numpy(distance)(k), expected)
    tied = torch.tensor([[0.25, 0.0, 0.25, 0.0, 1.0]])
    assert _closest_columns_numpy(tied)(5).tolist() == [[1, 3, 0, 2, 4]]


def test_gptq_at_a_grid_point_sees_the_input_through_the_scales():
    """W * s multiplies x / s: the factory's H is M / (s s^T). Against GPTQ given M itself, it
    lowers the true output error of Q(W*s)/s on x."""
    from awqkit.quant.gptq import gptq_rounding
    from awqkit.quant.grid import dequantize_groupwise
    from awqkit.quant.search import linear_output_error

    g = torch.Generator().manual_seed(3)
    x = torch.randn(1024, 64, generator=g) * 10 ** (2 * torch.rand(64, generator=g))
    w = torch.randn(32, 64, generator=g)
    m = x.double().T @ x.double() / x.shape[0]
    s = x.square().mean(0).pow(0.5)
    error = linear_output_error(x, w)

    def stored(rounding):
        return dequantize_groupwise(quantize_groupwise(w * s, 3, 16, rounding)) / s

    seen_through_s = make_rounding("gptq", x.mean(0), 0.05, m)(s)
    assert error(stored(seen_through_s)) < 0.9 * error(stored(gptq_rounding(m, 0.01, 128, True)))


def test_gptq_falls_back_to_nearest_where_h_cannot_be_factored_and_says_so():
    from awqkit.quant.grid import round_nearest

    factory = make_rounding("gptq", torch.zeros(4), 0.05, torch.full((4, 4), float("nan"), dtype=torch.float64))
    assert factory(torch.ones(4)) is round_nearest and factory.fell_back
    with pytest.raises(ValueError, match="gptq rounding needs the input's second moment"):
        make_rounding("gptq", torch.zeros(4), 0.05)
