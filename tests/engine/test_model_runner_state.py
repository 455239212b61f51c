"""Worker-side mirror of compressed sequences (no engine)."""

from types import SimpleNamespace

import numpy as np
from vllm.v1.worker.gpu_input_batch import CachedRequestState

from tests.conftest import make_ruleset
from vllm_umim.engine.model_runner import UmimRequestState, raw_prompt_token_ids

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
