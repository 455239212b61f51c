"""Accuracy and paired accuracy differences with 95 % intervals, from per-item scores.

A task's accuracy is the mean of per-item scores in [0, 1] (1/0 for correct/incorrect); its
interval is Wilson's score interval (well behaved near 0 and 1, where a small model's GSM8K sits).
Two systems scored on the *same* items differ by the mean of the per-item differences
``d_i = a_i - b_i``; its interval is the normal approximation on those differences,
``mean(d) ± z · sd(d) / sqrt(n)`` — the paired statistic, much narrower than the two accuracies'
intervals when the systems agree on most items (McNemar's setting: only the discordant items
carry variance). ``a_only`` / ``b_only`` report those items both ways, and ``p_value`` is the
exact two-sided sign test on them (McNemar's exact test for 0/1 scores): with few discordant items
the normal interval is only approximate, and the exact test is the one to read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from vllm_umim.errors import StatisticsError

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


def accuracy_interval(scores: Sequence[float], z: float = Z95) -> Interval:
    """Mean of ``scores`` with Wilson's score interval (exact for 0/1 scores)."""
    n = len(scores)
    if n == 0:
        raise StatisticsError("no scores")
    p = sum(scores) / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Interval(p, max(center - half, 0.0), min(center + half, 1.0), n)


@dataclass(frozen=True)
class PairedDifference:
    """``mean(a - b)`` over shared items with its interval; ``a_only``: items only ``a`` got right
    (score a > score b), ``b_only`` the reverse."""

    estimate: float
    low: float
    high: float
    n: int
    a_only: int
    b_only: int
    p_value: float

    def to_dict(self) -> dict:
        return asdict(self)


def paired_difference(a: Sequence[float], b: Sequence[float], z: float = Z95) -> PairedDifference:
    """Difference of two systems' scores on the same items (``a[i]`` and ``b[i]`` are one item)."""
    if len(a) != len(b):
        raise StatisticsError(f"paired scores need the same items: {len(a)} vs {len(b)}")
    n = len(a)
    if n == 0:
        raise StatisticsError("no scores")
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    half = z * math.sqrt(var / n)
    a_only, b_only = sum(x > y for x, y in zip(a, b)), sum(x < y for x, y in zip(a, b))
    return PairedDifference(mean, mean - half, mean + half, n, a_only, b_only, sign_test(a_only, b_only))


def sign_test(a_only: int, b_only: int) -> float:
    """Exact two-sided p-value that items go either way with probability 1/2 (McNemar's exact test)."""
    total = a_only + b_only
    if total == 0:
        return 1.0
    tail = sum(math.comb(total, k) for k in range(min(a_only, b_only) + 1)) / 2**total
    return min(1.0, 2 * tail)
