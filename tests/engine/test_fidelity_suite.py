"""The fidelity suite (issue 13) through the session's fp32 UMIM engine, on a few prompts per kind."""

from __future__ import annotations

import pytest

from vllm_umim.evaluation.fidelity import MAX_TOKENS, run_variants
from vllm_umim.evaluation.fidelity_prompts import KINDS, build_prompts

pytestmark = pytest.mark.slow

PROMPTS_PER_KIND = 6


def test_fidelity_suite_unmerged_equals_itself_and_merging_reduces_tokens(umim_llm, tokenizer):
    prompts = {kind: [p.token_ids for p in build_prompts(kind, tokenizer, PROMPTS_PER_KIND)] for kind in KINDS}
    figures, continuations = run_variants(umim_llm, prompts, {"off": False, "dynamic": "dynamic"})
    for kind in KINDS:
        off, dynamic = figures["off"][kind], figures["dynamic"][kind]
        assert off["first_divergences"] == [MAX_TOKENS] * PROMPTS_PER_KIND, kind
        assert off["equal_share"] == 1.0 and off["kl_mean"] == pytest.approx(0.0, abs=1e-6)
        assert off["prompt_tr"] is None  # served unmerged: no merge figures
        assert dynamic["prompts"] == PROMPTS_PER_KIND and dynamic["overall_tr"] > 0, kind
        assert all(len(c.token_ids) == MAX_TOKENS for c in continuations["dynamic"][kind])  # ignore_eos: equal lengths
