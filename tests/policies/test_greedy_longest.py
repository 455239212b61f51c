"""The paper's merge policy: its segmentations and decode decisions, and the Segmentation checks."""

import pytest

from tests.conftest import make_ruleset
from vllm_umim.errors import AlignmentError
from vllm_umim.ops.matcher import COVERED, SINGLE
from vllm_umim.policies import GreedyLongestMatch, Segmentation
from vllm_umim.policies.base import NO_MERGE

RULES = make_ruleset([(1, 2), (2, 3), (1, 2, 3, 4), (5, 6)])
V = 64


def test_longest_first_then_left_to_right():
    (seg,) = GreedyLongestMatch(RULES).segment([[9, 1, 2, 3, 4, 5, 6, 2, 3]])
    merged = [tuple(seg.tokens[s:e]) for s, e, r in zip(seg.starts, seg.ends, seg.rule_ids) if r >= 0]
    assert merged == [(1, 2, 3, 4), (5, 6), (2, 3)]
    assert seg.num_elements == 4 and seg.num_merged == 3 and seg.first_merge == 1
    assert seg.compressed_ids(V)[0] == 9 and all(i >= V for i in seg.compressed_ids(V)[1:])
    # the elements tile the raw tokens exactly
    assert [t for s, e in zip(seg.starts, seg.ends) for t in seg.tokens[s:e]] == seg.tokens


def test_decode_merges_the_longest_rule_the_newest_tokens_complete():
    policy = GreedyLongestMatch(RULES)
    assert RULES.tokens_of(policy.decode_rule([1, 2, 3, 4], [None] * 4)) == (1, 2, 3, 4)
    assert RULES.tokens_of(policy.decode_rule([7, 5, 6], [None] * 3)) == (5, 6)
    assert policy.decode_rule([6, 5], [None] * 2) == NO_MERGE and policy.decode_rule([5], [None]) == NO_MERGE
    assert policy.max_span == 4 and policy.window == 0


def test_decode_merge_finds_the_span_on_a_compressed_sequence():
    policy = GreedyLongestMatch(RULES)
    merge = policy.decode_merge([9, V + 3, 1, 2, 3, 4], V)
    assert (merge.start, merge.length, RULES.tokens_of(merge.rule_id)) == (2, 4, (1, 2, 3, 4))
    assert policy.decode_merge([9, 5, V + 3, 6], V) is None  # a merged element breaks the span


def test_segmentation_refuses_codes_that_do_not_tile_the_tokens():
    rule = RULES.padded.tolist().index([5, 6, -1, -1])
    with pytest.raises(AlignmentError, match="covered by a span"):
        Segmentation.from_spans([5, 6], [COVERED, SINGLE], RULES)
    with pytest.raises(AlignmentError, match="does not match the tokens"):
        Segmentation.from_spans([5, 7], [rule, COVERED], RULES)
