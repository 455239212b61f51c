"""Accuracy intervals and paired differences on synthetic per-item scores."""

import math
import random

import pytest

from vllm_umim.evaluation.paired import accuracy_interval, paired_difference


def test_wilson_interval_known_values():
    # 40 of 100: Wilson 95 % interval [0.3094, 0.4980] (textbook value)
    interval = accuracy_interval([1.0] * 40 + [0.0] * 60)
    assert interval.estimate == pytest.approx(0.4)
    assert interval.low == pytest.approx(0.3094, abs=1e-4) and interval.high == pytest.approx(0.4980, abs=1e-4)
    zero = accuracy_interval([0.0] * 50)  # all wrong: the interval still has width
    assert zero.low == pytest.approx(0.0, abs=1e-12) and 0.05 < zero.high < 0.08


def test_paired_difference_is_narrower_than_unpaired_when_systems_agree():
    rng = random.Random(0)
    a = [float(rng.random() < 0.6) for _ in range(1000)]
    b = list(a)
    for i in rng.sample(range(1000), 20):  # 20 discordant items
        b[i] = 1.0 - b[i]
    d = paired_difference(b, a)
    assert d.a_only + d.b_only == 20 and d.n == 1000
    assert d.estimate == pytest.approx((d.a_only - d.b_only) / 1000)
    var = (20 / 1000 - d.estimate**2) * 1000 / 999  # sample variance of d in {-1, 0, 1}
    assert d.high - d.estimate == pytest.approx(1.959964 * math.sqrt(var / 1000))
    unpaired_half = 1.96 * math.sqrt(2 * 0.6 * 0.4 / 1000)
    assert d.high - d.low < unpaired_half  # the paired interval can show "within 1 point"
    assert d.high - d.low < 0.02


def test_paired_difference_covers_the_true_shift():
    # b is a with 5 % of a's correct items flipped wrong: true difference -0.05 * p
    rng = random.Random(1)
    covered = 0
    for _ in range(200):
        a = [float(rng.random() < 0.5) for _ in range(400)]
        b = [0.0 if x and rng.random() < 0.05 else x for x in a]
        d = paired_difference(b, a)
        covered += d.low <= -0.025 <= d.high
    assert covered >= 180  # ~95 % coverage


def test_identical_systems_and_bad_input():
    d = paired_difference([1.0, 0.0, 1.0], [1.0, 0.0, 1.0])
    assert (d.estimate, d.low, d.high, d.a_only, d.b_only) == (0.0, 0.0, 0.0, 0, 0)
    with pytest.raises(ValueError, match="same items"):
        paired_difference([1.0], [1.0, 0.0])
    with pytest.raises(ValueError):
        accuracy_interval([])


def test_sign_test_exact_values():
    from vllm_umim.evaluation.paired import sign_test

    assert sign_test(0, 4) == 0.125  # 2 * (1/2)^4
    assert sign_test(0, 0) == 1.0 and sign_test(3, 3) == 1.0
    assert sign_test(1, 9) == pytest.approx(2 * 11 / 1024)
    assert paired_difference([0.0] * 4 + [1.0] * 96, [1.0] * 100).p_value == 0.125
