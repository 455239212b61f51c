"""vLLM features with UMIM on: opt-out and empty rules equal stock vLLM, prefix caching, sampling
parameters that refer to real tokens, and clear errors for bad requests."""

from __future__ import annotations

import pytest
from vllm import SamplingParams

from tests.engine.conftest import token_prompts
from vllm_umim import merge_stats

pytestmark = pytest.mark.slow

GREEDY = dict(temperature=0.0, max_tokens=24)


def token_ids(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_empty_rule_set_equals_stock(stock_llm, empty_rules_llm, heldout_prompts):
    prompts = token_prompts(heldout_prompts[:16])
    params = SamplingParams(**GREEDY, logprobs=2)
    stock = stock_llm.generate(prompts, params, use_tqdm=False)
    empty = empty_rules_llm.generate(prompts, params, use_tqdm=False)
    assert token_ids(empty) == token_ids(stock)
    for a, b in zip(empty, stock):
        assert [sorted(step) for step in a.outputs[0].logprobs] == [sorted(step) for step in b.outputs[0].logprobs]
        assert merge_stats(a)["tokens_merged_away"] == 0


def test_opt_out_requests_equal_stock_in_a_mixed_batch(stock_llm, umim_llm, heldout_prompts):
    prompts = token_prompts(heldout_prompts[:16])
    opt_out = SamplingParams(**GREEDY, extra_args={"umim": False})
    merged = SamplingParams(**GREEDY)
    mixed = umim_llm.generate(prompts, [opt_out if i % 2 == 0 else merged for i in range(16)], use_tqdm=False)
    stock = stock_llm.generate(prompts, SamplingParams(**GREEDY), use_tqdm=False)
    for i, (a, b) in enumerate(zip(mixed, stock)):
        if i % 2 == 0:
            assert list(a.outputs[0].token_ids) == list(b.outputs[0].token_ids)
            assert merge_stats(a) is None
        else:
            assert merge_stats(a)["positions"] < merge_stats(a)["raw_tokens"]


def test_prefix_cache_hit_on_repeated_merged_prompt(umim_llm, heldout_prompts):
    prompt = token_prompts([heldout_prompts[0] * 4])  # 256 raw tokens: several full blocks merged
    first = umim_llm.generate(prompt, SamplingParams(**GREEDY), use_tqdm=False)[0]
    second = umim_llm.generate(prompt, SamplingParams(**GREEDY), use_tqdm=False)[0]
    assert second.num_cached_tokens > 0
    assert list(second.outputs[0].token_ids) == list(first.outputs[0].token_ids)
    assert merge_stats(second) == merge_stats(first)


def test_max_tokens_stop_and_logprobs_refer_to_real_tokens(umim_llm, tokenizer, heldout_prompts):
    prompts = token_prompts(heldout_prompts[:4])
    outputs = umim_llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=37, logprobs=3, ignore_eos=True), use_tqdm=False)
    for output in outputs:
        completion = output.outputs[0]
        stats = merge_stats(output)
        assert len(completion.token_ids) == 37 and len(completion.logprobs) == 37
        assert stats["decode_merges"] > 0 or stats["prefill_merges"] > 0
        assert completion.text == tokenizer.decode(completion.token_ids)
        for token, step in zip(completion.token_ids, completion.logprobs):
            assert token in step
    # a stop string cuts the text exactly as stock vLLM would
    text = outputs[0].outputs[0].text
    stop = text[10:16]
    stopped = umim_llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=37, stop=[stop]), use_tqdm=False)[0]
    assert stopped.outputs[0].text == text[: text.index(stop)]
    assert stopped.outputs[0].finish_reason == "stop"


def test_seeded_sampling_and_n(umim_llm, heldout_prompts):
    prompts = token_prompts(heldout_prompts[:2])
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=7, n=3, max_tokens=20)
    a = umim_llm.generate(prompts, params, use_tqdm=False)
    b = umim_llm.generate(prompts, params, use_tqdm=False)
    for x, y in zip(a, b):
        assert len(x.outputs) == 3
        assert [list(c.token_ids) for c in x.outputs] == [list(c.token_ids) for c in y.outputs]
        assert all(len(c.token_ids) == 20 or c.finish_reason == "stop" for c in x.outputs)
        stats = merge_stats(x)  # summed over the 3 samples, each an engine request of its own
        assert stats["raw_prompt_tokens"] == 3 * len(x.prompt_token_ids)
        assert stats["raw_tokens"] == stats["raw_prompt_tokens"] + sum(len(c.token_ids) for c in x.outputs)


def test_penalties_and_min_tokens_see_raw_tokens(umim_llm, tokenizer, heldout_prompts):
    """Repetition penalty reads the raw prompt (a merged prompt has virtual ids); min_tokens counts raw tokens."""
    prompts = token_prompts(heldout_prompts[:3])
    params = SamplingParams(temperature=0.0, max_tokens=24, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.3, min_tokens=20)
    outputs = umim_llm.generate(prompts, params, use_tqdm=False)
    for output in outputs:
        assert len(output.outputs[0].token_ids) >= 20


def test_bad_request_field_is_one_clear_error(umim_llm, heldout_prompts):
    with pytest.raises(ValueError, match=r"extra_args\['umim'\] must be true, false, 'prompt', 'dynamic' or a dict"):
        umim_llm.generate(token_prompts(heldout_prompts[:1]), SamplingParams(max_tokens=4, extra_args={"umim": "sometimes"}), use_tqdm=False)
    with pytest.raises(ValueError, match=r"window 17 is above this engine's max_window 16"):
        umim_llm.generate(token_prompts(heldout_prompts[:1]), SamplingParams(max_tokens=4, extra_args={"umim": {"window": 17}}), use_tqdm=False)
    # the engine keeps serving
    assert umim_llm.generate(token_prompts(heldout_prompts[:1]), SamplingParams(max_tokens=4), use_tqdm=False)
