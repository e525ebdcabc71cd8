"""Rank statistics for comparing layer rankings, and a paired difference with its standard error (pure functions, no torch)."""

from __future__ import annotations

import math
from typing import Sequence


def average_ranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n of ``values`` (1 = smallest); tied values share the mean of their ranks.

    Accuracies on a few hundred examples tie often (many layers stay at the
    zero-shot accuracy), and a tie must not read as an order.
    """
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson on average ranks); None if n < 3 or either side is constant."""
    if len(a) != len(b):
        raise ValueError(f"spearman needs two sequences of one length, got {len(a)} and {len(b)}")
    if len(a) < 3:
        return None
    ra, rb = average_ranks(a), average_ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    sa = math.sqrt(sum((x - ma) ** 2 for x in ra))
    sb = math.sqrt(sum((y - mb) ** 2 for y in rb))
    return cov / (sa * sb) if sa > 0 and sb > 0 else None


def paired_gain(before: Sequence[float], after: Sequence[float]) -> tuple[float, float]:
    """Mean of ``before[i] - after[i]`` and its standard error (sample std / sqrt n; inf below 2 pairs)."""
    if len(before) != len(after) or not before:
        raise ValueError(f"paired_gain needs two non-empty sequences of one length, got {len(before)} and {len(after)}")
    d = [b - a for b, a in zip(before, after)]
    mean = sum(d) / len(d)
    if len(d) < 2:
        return mean, math.inf
    return mean, math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))
