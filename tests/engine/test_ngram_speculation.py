"""UMIM with vLLM's n-gram speculation: greedy output equals the HF reference runtime token for
token (which merges at every decoded token and knows nothing of drafts), per merge policy, while
drafts are accepted and decode merges fire in the same requests; a request opting out is stock
vLLM's. One engine (fp32, eager) for the whole file; see docs/design.md, "With n-gram speculation".
"""

from __future__ import annotations

import os

import pytest
from vllm import LLM, SamplingParams

from tests.conftest import shut_down, until_last_use
from tests.engine.conftest import ENGINE_ARGS, MAX_WINDOW, RULES, module_for_tests, token_prompts
from tests.engine.test_engine_matches_reference import compare, merges_match_reference
from vllm_umim import merge_stats
from vllm_umim.bench.rows import NGRAM

pytestmark = pytest.mark.slow

MAX_TOKENS = 32
IN_PROCESS = "VLLM_ENABLE_V1_MULTIPROCESSING"
HELDOUT = 12
REPEATING = [  # text that repeats: the n-gram drafter finds its continuation earlier in the sequence
    "The cat sat on the mat. The dog sat on the log. The cat sat on the mat. The dog sat on the log. The cat sat",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22,",
    "One of the most important parts of the city is the river. One of the most important parts of the city is",
]


@pytest.fixture(scope="module")
def ngram_llm(request, model_dir):
    """The engine core runs in this process (its scheduler's counts are read); the worker does not."""
    options = {"rules": str(RULES), "module": module_for_tests(), "max_window": MAX_WINDOW}
    before = os.environ.get(IN_PROCESS)
    os.environ[IN_PROCESS] = "0"
    try:
        llm = LLM(model=model_dir, additional_config={"umim": options}, speculative_config=dict(NGRAM),
                  per_request_spec_decode_metrics="summary", **ENGINE_ARGS)
    finally:
        if before is None:
            os.environ.pop(IN_PROCESS, None)
        else:
            os.environ[IN_PROCESS] = before
    yield from until_last_use(request, llm, shut_down(llm))


def dropped_tokens(llm) -> int:
    """Tokens the scheduler dropped so far: sampled after a merge at an inner accepted draft."""
    return llm.llm_engine.engine_core.engine_core.scheduler.umim_dropped_tokens


@pytest.fixture(scope="module")
def prompts(heldout_prompts, tokenizer) -> list[list[int]]:
    return heldout_prompts[:HELDOUT] + [tokenizer(text, add_special_tokens=False)["input_ids"] for text in REPEATING]


def accepted_drafts(output) -> int:
    metrics = getattr(output, "spec_decode_metrics", None) or output.outputs[0].spec_decode_metrics
    return metrics.to_dict()["num_accepted_draft_tokens"] if metrics is not None else 0


POLICIES = [
    ("prompt", "prompt"),
    ("dynamic", "dynamic"),
    ("window-4", {"mode": "dynamic", "window": 4}),
    ("confidence-0.3", {"mode": "dynamic", "min_confidence": 0.3}),
]


@pytest.mark.parametrize("name,choice", POLICIES, ids=[name for name, _ in POLICIES])
def test_ngram_speculation_equals_reference(ngram_llm, reference_outputs, prompts, name, choice):
    from vllm_umim.policies import MergeSettings

    settings = MergeSettings(mode=choice) if isinstance(choice, str) else MergeSettings(**choice)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, extra_args={"umim": choice})
    dropped = dropped_tokens(ngram_llm)
    outputs = ngram_llm.generate(token_prompts(prompts), params, use_tqdm=False)
    dropped = dropped_tokens(ngram_llm) - dropped
    references = reference_outputs(settings, prompts, MAX_TOKENS)
    exact, ties = compare(outputs, references, prompts)
    assert exact >= len(prompts) - 2
    merges = merges_match_reference(outputs, references, ties)
    tied = {index for index, _, _ in ties}
    accepted = [accepted_drafts(o) for o in outputs]
    both = [i for i, o in enumerate(outputs) if i not in tied and accepted[i] and merge_stats(o)["decode_merges"]]
    print(f"{name}: {merges}, accepted drafts {sum(accepted)}, requests with accepted drafts and decode merges "
          f"{len(both)}, tokens dropped after a merge at an inner accepted draft {dropped}")
    assert sum(accepted) > 0 and merges["prefill"] > 0
    if settings.dynamic:  # drafts accepted and spans merged at decode, in the same exactly-matching requests
        assert merges["decode"] > 0 and both
    else:
        assert merges["decode"] == 0 and dropped == 0
    if name == "dynamic":  # merges at inner accepted drafts happened, and the tokens after them were dropped
        assert dropped > 0


def test_opted_out_request_is_stock(ngram_llm, reference_outputs, prompts):
    """``umim: False`` on the UMIM + n-gram engine: stock vLLM with n-gram speculation, which (greedy)
    is plain HF decoding up to near-ties."""
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, extra_args={"umim": False})
    outputs = ngram_llm.generate(token_prompts(prompts), params, use_tqdm=False)
    assert all(merge_stats(o) is None for o in outputs)
    references = reference_outputs(None, prompts, MAX_TOKENS)
    exact, _ = compare(outputs, references, prompts)
    assert exact >= len(prompts) - 2 and sum(accepted_drafts(o) for o in outputs) > 0
