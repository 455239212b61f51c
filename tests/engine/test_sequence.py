"""Scheduler-side compressed sequences (no engine): prompt compression and decode merging."""


import math

import pytest

from tests.conftest import make_ruleset
from vllm_umim.engine.sequence import MergeState, compress_tokens, merge_newest
from vllm_umim.policies import GreedyLongestMatch, MergeSettings

V = 100  # virtual ids start here


class FakeRequest:
    """The parts of vllm.v1.request.Request that merge_newest touches."""

    def __init__(self, token_ids, num_computed_tokens, policy):
        self.request_id = "r"
        self._all_token_ids = list(token_ids)
        self.num_computed_tokens = num_computed_tokens
        self.num_output_tokens = len(token_ids)  # raw outputs (raw_prompt_tokens=0); tests that append update it
        self.block_hashes = [f"h{i}" for i in range(len(token_ids) // 4)]
        self.umim = MergeState(dynamic=True, policy=policy, raw_prompt_tokens=0, prompt_positions=0)

    def update_block_hashes(self):
        while (len(self.block_hashes) + 1) * 4 <= len(self._all_token_ids):
            self.block_hashes.append(f"new{len(self.block_hashes)}")


def test_compress_tokens_uses_virtual_ids():
    rules = make_ruleset([(1, 2), (3, 4, 5)])
    compressed, merges = compress_tokens([9, 1, 2, 3, 4, 5, 1], GreedyLongestMatch(rules), V)
    assert compressed == [9, V + 0, V + 1, 1] and merges == 2


def test_merge_rolls_back_n_minus_1_and_drops_stale_block_hashes():
    rules = make_ruleset([(6, 7, 8)])
    request = FakeRequest([1, 2, 3, 4, 5, 6, 7, 8], num_computed_tokens=7, policy=GreedyLongestMatch(rules))  # 8 is new
    event = merge_newest(request, V, hash_block_size=4)
    assert request._all_token_ids == [1, 2, 3, 4, 5, V + 0]
    assert request.num_computed_tokens == 5  # 6 and 7 rolled back; the surrogate is fed next
    assert request.block_hashes == ["h0"]  # the second block is no longer full
    assert (event.start, event.ids, event.span_length) == (5, (V,), 3)
    assert request.umim.decode_merges == 1 and request.umim.decode_tokens_merged_away == 2


def test_a_full_block_ending_at_the_surrogate_gets_a_new_hash():
    # After the merge the sequence is exactly two blocks; the second one's last slot changed from
    # raw token 8 to the surrogate, so its old hash (over raw tokens) must not survive.
    rules = make_ruleset([(8, 9)])
    request = FakeRequest([1, 2, 3, 4, 5, 6, 7, 8, 9], num_computed_tokens=8, policy=GreedyLongestMatch(rules))
    merge_newest(request, V, hash_block_size=4)
    assert request._all_token_ids == [1, 2, 3, 4, 5, 6, 7, V + 0]
    assert request.block_hashes == ["h0", "new1"]


def test_raw_window_merges_behind_it_and_rolls_back_to_the_span_start():
    rules = make_ruleset([(3, 4)])
    policy = MergeSettings(window=2).build(rules)
    request = FakeRequest([1, 2, 3, 4, 5], num_computed_tokens=4, policy=policy)  # frontier: 4 (5 in window)
    assert merge_newest(request, V, 4) is None  # (3, 4) ends 1 token behind the newest: inside W=2
    request._all_token_ids.append(6)
    request.num_computed_tokens = 5
    event = merge_newest(request, V, hash_block_size=4)
    assert request._all_token_ids == [1, 2, V + 0, 5, 6]  # the window (5, 6) moved left
    assert request.num_computed_tokens == 2  # surrogate, 5 and 6 are computed in the next step
    assert (event.start, event.ids, event.span_length) == (2, (V, 5, 6), 2)
    assert request.block_hashes == ["new0"]  # the first block changed: hashed again


def test_no_merge_across_a_merged_element_or_without_a_rule():
    policy = GreedyLongestMatch(make_ruleset([(6, 7)]))
    request = FakeRequest([1, V + 0, 7], num_computed_tokens=2, policy=policy)
    assert merge_newest(request, V, 4) is None
    request = FakeRequest([1, 2, 7], num_computed_tokens=2, policy=policy)
    assert merge_newest(request, V, 4) is None
    assert request._all_token_ids == [1, 2, 7] and request.num_computed_tokens == 2


def scheduler_for(virtual_base=V):
    """A UmimScheduler with only what its decode-merge hook reads (no vLLM scheduler behind it)."""
    from vllm_umim.engine.faults import FaultSwitch
    from vllm_umim.engine.scheduler import UmimScheduler

    scheduler = object.__new__(UmimScheduler)
    scheduler.virtual_base, scheduler.hash_block_size = virtual_base, 4
    scheduler.umim_fault_switch, scheduler.pending_merges, scheduler.umim_dropped_drafts = FaultSwitch(), [], set()
    scheduler.umim_dropped_tokens = 0
    return scheduler


def test_a_merge_at_an_inner_accepted_token_ends_the_step_there():
    """n-gram speculation: a step fed 5 (then drafts 6, 7) and vLLM accepted both and sampled 8, so
    it counts 7 positions computed. Appended one at a time, 7 completes rule (6, 7): the step is
    taken back to 7 (8 was sampled without the merge and is dropped, with the drafts after it), and
    the merge rolls back to the span's start as without speculation."""
    rules = make_ruleset([(6, 7)])
    scheduler = scheduler_for()
    request = FakeRequest([1, 2, 3, 4, 5, 6], num_computed_tokens=7, policy=GreedyLongestMatch(rules))  # 6 appended
    assert not scheduler._merge_newest(request, later_tokens=2)  # (5, 6) is no rule: nothing changes
    assert request.num_computed_tokens == 7
    request._all_token_ids.append(7)
    request.num_output_tokens += 1
    assert scheduler._merge_newest(request, later_tokens=1)
    assert request._all_token_ids == [1, 2, 3, 4, 5, V] and request.num_computed_tokens == 5
    (event,) = scheduler.pending_merges
    assert (event.start, event.ids, event.span_length, event.raw_outputs) == (5, (V,), 2, 7)
    assert scheduler.umim_dropped_drafts == {"r"} and scheduler.umim_dropped_tokens == 1


def test_an_inner_merge_with_a_step_count_that_does_not_add_up_is_refused():
    from vllm_umim.errors import MergeStateError

    request = FakeRequest([1, 2, 3, 4, 5, 6, 7], num_computed_tokens=9, policy=GreedyLongestMatch(make_ruleset([(6, 7)])))
    with pytest.raises(MergeStateError, match="must follow a full step"):
        scheduler_for()._merge_newest(request, later_tokens=1)  # 9 - 1 computed for 7 tokens: not the newest's step


def test_drafts_are_spelled_in_raw_tokens():
    from vllm_umim.engine.scheduler import raw_draft, token_confidence

    rules = make_ruleset([(6, 7), (3, 4, 5)])  # rule 0 = (6, 7), rule 1 = (3, 4, 5)
    assert raw_draft([9, 8, 2], rules, V) == [9, 8, 2]
    assert raw_draft([9, V + 1, 2], rules, V) == [9, 3, 4]
    assert raw_draft([V, 2, V + 1], rules, V) == [6, 7, 2]
    assert raw_draft([9, V + 5, 2], rules, V) == [9]  # past the table: the draft ends
    assert token_confidence(0.5, 0) == 0.5 and token_confidence([0.5, 0.25], 1) == 0.25
    assert all(math.isnan(c) for c in (token_confidence(0.5, 1), token_confidence([0.5], 1)))
