"""Prompt logprobs under merging (log-likelihood scoring through the engine).

Without an explicit ``extra_args["umim"]`` a request asking for prompt logprobs is served unmerged
(its rows index raw prompt positions, as stock callers expect). With one, its rows follow the
compressed prompt: a row whose target is a raw token carries that token's logprob under merging,
checked here against the HF reference runtime; a row whose target is a merged span carries NaN.
"""

import math

import pytest
import torch

from tests.engine.conftest import MAX_WINDOW, token_prompts
from vllm_umim import merge_stats
from vllm_umim.policies import MergeSettings
from vllm_umim.reference.runtime import merge_prompt

pytestmark = pytest.mark.slow

WINDOW = 8


def _params(extra=None):
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1, extra_args=extra)


def _target_logprobs(output):
    """[(target token or None for a NaN row, logprob)] per row after the first."""
    rows = []
    for row in output.prompt_logprobs[1:]:
        target = next(iter(row.items()))  # vLLM puts the prompt's own token first
        rows.append(target)
    return rows


def test_prompt_logprobs_unmerged_without_an_explicit_choice(umim_llm, stock_llm, heldout_prompts):
    prompts = heldout_prompts[:4]
    merged = umim_llm.generate(token_prompts(prompts), _params(), use_tqdm=False)
    stock = stock_llm.generate(token_prompts(prompts), _params(), use_tqdm=False)
    for prompt, out, ref in zip(prompts, merged, stock):
        assert merge_stats(out) is None and len(out.prompt_logprobs) == len(prompt)
        for row, ref_row in zip(out.prompt_logprobs[1:], ref.prompt_logprobs[1:]):
            assert row.keys() == ref_row.keys()
            assert all(row[t].logprob == pytest.approx(ref_row[t].logprob, abs=1e-4) for t in row)


def test_merged_prompt_logprobs_match_the_reference(umim_llm, heldout_prompts, reference_for):
    settings = MergeSettings(mode="prompt", window=WINDOW)
    reference = reference_for(settings)
    prompts = heldout_prompts[:6]
    outputs = umim_llm.generate(token_prompts(prompts), _params({"umim": {"mode": "prompt", "window": WINDOW}}), use_tqdm=False)
    compared = nan_rows = 0
    for prompt, output in zip(prompts, outputs):
        stats = merge_stats(output)
        elements = merge_prompt(prompt, reference.policy)
        assert stats is not None and stats["prompt_positions"] == len(elements) == len(output.prompt_logprobs)
        assert all(not e.merged for e in elements[-WINDOW:]) and [e.tokens[0] for e in elements[-WINDOW:]] == prompt[-WINDOW:]
        with torch.no_grad():
            embeds = reference.embed(elements)
            logits = reference.model(inputs_embeds=embeds[None], position_ids=torch.arange(len(elements))[None]).logits[0].float()
        expected = torch.log_softmax(logits, dim=-1)
        for position, (element, (token, logprob)) in enumerate(zip(elements[1:], _target_logprobs(output))):
            if element.merged:  # a span is not one token: no number
                assert math.isnan(logprob.logprob) and logprob.rank == -1
                nan_rows += 1
            else:
                assert token == element.tokens[0]
                assert logprob.logprob == pytest.approx(expected[position, token].item(), abs=2e-3)
                compared += 1
    assert nan_rows > 0 and compared > 0


def test_window_above_max_window_is_refused(umim_llm, heldout_prompts):
    with pytest.raises(Exception, match="window"):
        umim_llm.generate(token_prompts(heldout_prompts[:1]), _params({"umim": {"window": MAX_WINDOW + 1}}), use_tqdm=False)
