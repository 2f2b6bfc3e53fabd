import math

import numpy as np
import pytest

from awqkit.eval.stats import bootstrap_means, paired_difference, perplexity, win_share


def test_identical_nlls_give_a_zero_difference_and_even_wins():
    nll = np.random.default_rng(0).normal(3.0, 0.5, 50)
    diff = paired_difference(nll, nll, np.ones(50))
    assert diff.mean_nll_diff == 0 and diff.ci == (0.0, 0.0) and diff.win_share == 0.5


def test_bootstrap_weights_windows_by_tokens_and_is_seeded():
    values, tokens = np.array([1.0, 3.0]), np.array([3.0, 1.0])
    means = bootstrap_means(values, tokens, 500, seed=7)
    assert np.array_equal(means, bootstrap_means(values, tokens, 500, seed=7))
    # Resamples are {1,1}, {3,3} or one of each, whose token-weighted mean is 1.5.
    assert set(np.round(means, 9)) == {1.0, 1.5, 3.0}
    assert perplexity(values, tokens) == pytest.approx(math.exp(1.5))


def test_win_share_counts_ties_half():
    assert win_share(np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 2.0, 2.0, 5.0])) == pytest.approx(2.5 / 4)
