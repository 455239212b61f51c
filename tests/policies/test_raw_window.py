"""Raw recent window: the newest W tokens stay raw at prefill and at decode."""

from tests.conftest import make_ruleset
from vllm_umim.policies import GreedyLongestMatch, MergeSettings, RawRecentWindow

RULES = make_ruleset([(1, 2), (3, 4), (5, 6)])
V = 64


def merged_spans(seg):
    return [tuple(seg.tokens[s:e]) for s, e, r in zip(seg.starts, seg.ends, seg.rule_ids) if r >= 0]


def test_the_prompt_tail_stays_raw():
    tokens = [1, 2, 3, 4, 5, 6]
    assert merged_spans(RawRecentWindow(GreedyLongestMatch(RULES), 0).segment([tokens])[0]) == [(1, 2), (3, 4), (5, 6)]
    (seg,) = RawRecentWindow(GreedyLongestMatch(RULES), 3).segment([tokens])
    assert merged_spans(seg) == [(1, 2)]  # (3, 4) would reach into the last 3 tokens
    assert seg.tokens == tokens and seg.num_elements == 5
    assert [t for s, e in zip(seg.starts, seg.ends) for t in seg.tokens[s:e]] == tokens
    (short,) = RawRecentWindow(GreedyLongestMatch(RULES), 8).segment([tokens])
    assert short.num_merged == 0 and short.num_elements == 6


def test_decode_merges_a_span_once_it_is_window_tokens_old():
    policy = MergeSettings(window=2).build(RULES)
    assert policy.decode_merge([9, 3, 4], V) is None
    assert policy.decode_merge([9, 3, 4, 7], V) is None
    merge = policy.decode_merge([9, 3, 4, 7, 8], V)
    assert (merge.start, merge.length, RULES.tokens_of(merge.rule_id)) == (1, 2, (3, 4))
    assert policy.decode_merge([3, 4], V) is None  # the whole sequence is inside the window
