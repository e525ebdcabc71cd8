"""Rank statistics: average ranks with ties, Spearman's correlation."""

from __future__ import annotations

import pytest

from layerzo.core.stats import average_ranks, paired_gain, spearman


def test_ties_share_the_mean_of_their_ranks():
    assert average_ranks([0.5, 0.7, 0.5, 0.9]) == [1.5, 3.0, 1.5, 4.0]
    assert average_ranks([]) == []


def test_spearman_is_one_for_any_increasing_map_and_minus_one_reversed():
    xs = [0.1, 0.4, 0.2, 0.9, 0.5]
    assert spearman(xs, [x ** 3 + 7 for x in xs]) == pytest.approx(1.0)
    assert spearman(xs, [-x for x in xs]) == pytest.approx(-1.0)


def test_spearman_matches_the_textbook_formula_without_ties():
    a, b = [1, 2, 3, 4, 5], [2, 1, 4, 3, 5]
    d2 = sum((x - y) ** 2 for x, y in zip(a, b))
    assert spearman(a, b) == pytest.approx(1 - 6 * d2 / (5 * (25 - 1)))


def test_spearman_is_undefined_for_constant_or_tiny_inputs():
    assert spearman([1, 1, 1], [1, 2, 3]) is None
    assert spearman([1, 2], [2, 1]) is None
    with pytest.raises(ValueError):
        spearman([1, 2, 3], [1, 2])


def test_paired_gain_is_the_mean_difference_with_the_textbook_standard_error():
    mean, se = paired_gain([1.0, 2.0, 3.0, 4.0], [0.5, 1.0, 2.5, 3.0])  # differences 0.5, 1, 0.5, 1
    assert mean == pytest.approx(0.75)
    assert se == pytest.approx((1 / 12) ** 0.5 / 2)  # sample variance 1/12, n = 4
    # a shift shared by every example is exact (SE 0); one pair has no spread to estimate
    assert paired_gain([1.0, 2.0], [0.9, 1.9]) == (pytest.approx(0.1), pytest.approx(0.0))
    assert paired_gain([1.0], [0.0]) == (1.0, float("inf"))
    with pytest.raises(ValueError, match="one length"):
        paired_gain([1.0, 2.0], [1.0])
