"""Scheduler-side compressed sequences (no engine): prompt compression and decode merging."""

from types import SimpleNamespace

from tests.conftest import make_ruleset
from vllm_umim.engine.sequence import MergeState, compress_tokens, merge_newest, newest_plain_tokens
from vllm_umim.policies import GreedyLongestMatch

V = 100  # virtual ids start here


class FakeRequest:
    """The parts of vllm.v1.request.Request that merge_newest touches."""

    def __init__(self, token_ids, num_computed_tokens):
        self.request_id = "r"
        self._all_token_ids = list(token_ids)
        self.num_computed_tokens = num_computed_tokens
        self.block_hashes = [f"h{i}" for i in range(len(token_ids) // 4)]
        self.umim = MergeState(dynamic=True, raw_prompt_tokens=0, prompt_positions=0)

    def update_block_hashes(self):
        while (len(self.block_hashes) + 1) * 4 <= len(self._all_token_ids):
            self.block_hashes.append(f"new{len(self.block_hashes)}")


def test_compress_tokens_uses_virtual_ids():
    rules = make_ruleset([(1, 2), (3, 4, 5)])
    compressed, merges = compress_tokens([9, 1, 2, 3, 4, 5, 1], GreedyLongestMatch(rules), V)
    assert compressed == [9, V + 0, V + 1, 1] and merges == 2


def test_newest_plain_tokens_stop_at_a_merged_element():
    assert newest_plain_tokens([1, 2, V + 3, 4, 5], V, 4) == [4, 5]
    assert newest_plain_tokens([1, 2, 3, 4, 5], V, 4) == [2, 3, 4, 5]


def test_merge_rolls_back_n_minus_1_and_drops_stale_block_hashes():
    rules = make_ruleset([(6, 7, 8)])
    request = FakeRequest([1, 2, 3, 4, 5, 6, 7, 8], num_computed_tokens=7)  # 8 is new, not computed
    event = merge_newest(request, GreedyLongestMatch(rules), V, hash_block_size=4)
    assert request._all_token_ids == [1, 2, 3, 4, 5, V + 0]
    assert request.num_computed_tokens == 5  # 6 and 7 rolled back; the surrogate is fed next
    assert request.block_hashes == ["h0"]  # the second block is no longer full
    assert (event.position, event.virtual_id, event.span_length) == (5, V, 3)
    assert request.umim.decode_merges == 1 and request.umim.decode_tokens_merged_away == 2


def test_no_merge_across_a_merged_element_or_without_a_rule():
    rules = make_ruleset([(6, 7)])
    request = FakeRequest([1, V + 0, 7], num_computed_tokens=2)
    assert merge_newest(request, GreedyLongestMatch(rules), V, 4) is None
    request = FakeRequest([1, 2, 7], num_computed_tokens=2)
    assert merge_newest(request, GreedyLongestMatch(rules), V, 4) is None
    assert request._all_token_ids == [1, 2, 7] and request.num_computed_tokens == 2
