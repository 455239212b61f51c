"""Worker-side mirror of compressed sequences (no engine)."""

from types import SimpleNamespace

import numpy as np
import pytest
from vllm.v1.worker.gpu_input_batch import CachedRequestState

from tests.conftest import make_ruleset
from vllm_umim.engine.model_runner import (
    UmimModelRunnerMixin, UmimRequestState, raw_prompt_token_ids, raw_token_rows, spec_decode_logits_rows,
)

V = 100


def request_state(prompt, outputs):
    state = CachedRequestState(
        req_id="r", prompt_token_ids=list(prompt), mm_features=[], sampling_params=None, generator=None,
        block_ids=([],), num_computed_tokens=0, output_token_ids=list(outputs),
    )
    state.__class__ = UmimRequestState
    return state


def test_merges_shrink_num_tokens_and_keep_raw_outputs():
    state = request_state([1, V + 4, 2], [5, 6, 7])  # compressed prompt of 3, then 3 sampled tokens
    assert state.num_tokens == 6
    state.apply_merge(start=4, ids=(V + 9,), span_length=2)  # (6, 7) merged
    assert state.num_tokens == 5 and state.output_token_ids == [5, 6, 7]
    assert state.compressed_tail() == [V + 9]
    state.output_token_ids += [8, 3]  # two more sampled
    assert state.compressed_tail() == [V + 9, 8, 3]
    state.apply_merge(start=5, ids=(V + 1,), span_length=2)  # (8, 3) merged
    assert state.compressed_tail() == [V + 9, V + 1] and state.num_tokens == 6


def test_merge_reaching_into_the_prompt():
    state = request_state([1, 2, 3], [4])
    state.apply_merge(start=2, ids=(V,), span_length=2)  # prompt's 3 + sampled 4
    assert state.first_merge == 2 and state.compressed_tail() == [V] and state.num_tokens == 3


def test_merge_behind_a_raw_window_moves_the_window_left():
    state = request_state([1, 2], [3, 4, 5, 6])  # (3, 4) merges once 2 tokens (5, 6) are behind it
    state.apply_merge(start=2, ids=(V + 7, 5, 6), span_length=2)
    assert state.compressed_tail() == [V + 7, 5, 6] and state.num_tokens == 5
    state.output_token_ids.append(8)
    assert state.compressed_tail() == [V + 7, 5, 6, 8]


def test_penalties_see_the_raw_prompt_tokens():
    rules = make_ruleset([(7, 8), (3, 4, 5)], vocab_size=V)  # rule 0 = (7, 8), rule 1 = (3, 4, 5)
    batch = SimpleNamespace(
        num_reqs=2,
        vocab_size=V,
        num_prompt_tokens=np.array([3, 2]),
        token_ids_cpu=np.array([[1, V + 1, V + 0, 9], [V + 0, 2, 0, 0]]),
    )
    tokens = raw_prompt_token_ids(batch, rules.padded.long())
    for row, raw in zip(tokens.tolist(), [[1, 3, 4, 5, 7, 8], [7, 8, 2]]):
        assert sorted(t for t in row if t != V) == sorted(raw)


def test_a_merge_drops_the_outputs_sampled_after_it():
    """With n-gram speculation the runner appended 6, 7, 8 (two accepted drafts and one more); the
    scheduler merged (5, 6) at 6 and dropped 7, 8: the event's raw output count trims them."""
    from vllm_umim.engine.sequence import MergeEvent
    from vllm_umim.errors import MergeStateError

    runner = SimpleNamespace(_check_virtual_ids=lambda req_id, ids: None)
    state = request_state([1, 2], [4, 5, 6, 7, 8])
    UmimModelRunnerMixin._apply_merge(runner, state, MergeEvent("r", 3, (V + 2,), 2, raw_outputs=3))
    assert state.output_token_ids == [4, 5, 6] and state.num_tokens == 4 and state.compressed_tail() == [V + 2]
    with pytest.raises(MergeStateError, match="holds 3 output tokens, the merge was made after 5"):
        UmimModelRunnerMixin._apply_merge(runner, state, MergeEvent("r", 3, (V + 2,), 2, raw_outputs=5))


def test_the_ngram_drafter_sees_rows_in_raw_tokens():
    rules = make_ruleset([(7, 8), (3, 4, 5)], vocab_size=V)  # rule 0 = (7, 8), rule 1 = (3, 4, 5)
    table = rules.padded.numpy().astype(np.int64)
    token_ids = np.array([[1, V + 1, V + 0, 9, 0], [2, 2, 0, 0, 0], [V + 9, 6, 0, 0, 0]], dtype=np.int32)
    counts = np.array([4, 2, 2], dtype=np.int32)
    assert raw_token_rows(token_ids, counts, 2, V, table) is not None
    assert raw_token_rows(token_ids[1:2], counts[1:2], 1, V, table) is None  # nothing merged: the rows as they are
    rows, lengths = raw_token_rows(token_ids, counts, 3, V, table)
    assert rows.dtype == token_ids.dtype and lengths.dtype == counts.dtype
    assert lengths.tolist() == [7, 2, 1]  # an id past the rule table spells nothing
    assert rows[0, :7].tolist() == [1, 3, 4, 5, 7, 8, 9] and rows[1, :2].tolist() == [2, 2] and rows[2, :1].tolist() == [6]


def test_confidence_rows_with_drafts():
    """Three requests with 2, 0 and 3 drafts: logits rows 0-2, 3, 4-7 (one per sampled token)."""
    import torch

    metadata = SimpleNamespace(num_draft_tokens=[2, 0, 3], cu_num_sampled_tokens=torch.tensor([3, 4, 8]))
    rows, counts = spec_decode_logits_rows(metadata, [2, 0])
    assert rows.tolist() == [4, 5, 6, 7, 0, 1, 2] and counts == [4, 3]
