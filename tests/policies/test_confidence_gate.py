"""Confidence gate: decode merges only of spans the model sampled with high probability."""

import pytest

from tests.conftest import make_ruleset
from vllm_umim.policies import ConfidenceGate, GreedyLongestMatch, MergeSettings

RULES = make_ruleset([(3, 4), (5, 6, 7)])
V = 64


def test_spans_merge_only_when_every_token_was_confident():
    policy = MergeSettings(min_confidence=0.5).build(RULES)
    assert isinstance(policy, ConfidenceGate) and policy.needs_confidence
    ids = [1, 2, 3, 4]  # prompt [1, 2], outputs [3, 4]
    assert policy.decode_merge(ids, V, [0.9, 0.8]).length == 2
    assert policy.decode_merge(ids, V, [0.9, 0.4]) is None
    assert policy.decode_merge(ids, V, [0.4, 0.9]) is None
    assert policy.decode_merge(ids, V, [float("nan"), 0.9]) is None  # unknown is not confident


def test_a_span_reaching_into_the_prompt_is_not_merged_at_decode():
    policy = MergeSettings(min_confidence=0.1).build(RULES)
    assert policy.decode_merge([1, 3, 4], V, [0.99]) is None  # 3 is a prompt token: no probability
    assert GreedyLongestMatch(RULES).decode_merge([1, 3, 4], V, [0.99]) is not None


def test_window_and_gate_compose():
    policy = MergeSettings(window=1, min_confidence=0.5).build(RULES)
    assert policy.window == 1 and policy.needs_confidence
    ids = [1, 5, 6, 7, 8]  # outputs 5, 6, 7, 8; 8 is the raw window
    assert policy.decode_merge(ids, V, [0.9, 0.9, 0.9, 0.1]).start == 1  # 8's probability does not matter
    assert policy.decode_merge(ids, V, [0.9, 0.2, 0.9, 0.9]) is None


@pytest.mark.parametrize("bad", [{"window": -1}, {"window": 1.5}, {"min_confidence": 2}, {"mode": "x"}, {"windw": 3}])
def test_bad_settings_name_the_problem(bad):
    with pytest.raises(ValueError, match=next(iter(bad)).rstrip("w") if "windw" not in bad else "unknown merge option"):
        MergeSettings().with_options(bad)
