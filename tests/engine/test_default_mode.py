"""UMIM in vLLM's defaults: torch.compile (and bf16 on CPU), as users run it.

* compiled == eager, greedy fp32, on the 60 held-out prompts, prompt and dynamic modes (a prompt may
  differ only where the HF reference itself sees a near-tie at the first differing step). The
  compiled engine computes its surrogates on the fly (a zero table budget: the merge module runs in
  the compiled step) and the eager one reads the precomputed table, so the same comparison shows the
  on-the-fly source compile-safe and equal to the table (one compiled engine start, not two);
* the untouched defaults (bf16 + torch.compile) merge at prefill and decode, serve real text, and
  hit the prefix cache; preemption in the defaults is in test_kv_accounting.py.
"""

from __future__ import annotations

import pytest
from vllm import SamplingParams

from tests.engine.conftest import first_difference, token_prompts
from vllm_umim import merge_stats

pytestmark = pytest.mark.slow

MAX_TOKENS = 32
TIE = 1e-3  # as in test_engine_matches_reference


@pytest.fixture(scope="module")
def compiled_umim_llm(model_dir):
    """fp32 + torch.compile, its rule set 'exceeding' a zero table budget: the merge module runs in
    every compiled step (only this module uses it; released at its end)."""
    from vllm import LLM

    from tests.engine.conftest import COMPILED_ARGS, RULES, module_for_tests

    umim = {"rules": str(RULES), "module": module_for_tests(), "table_budget_mib": 0}
    llm = LLM(model=model_dir, additional_config={"umim": umim}, **COMPILED_ARGS)
    yield llm
    release(llm)


def compilation_on(llm) -> bool:
    from vllm.config import CompilationMode

    return llm.llm_engine.vllm_config.compilation_config.mode != CompilationMode.NONE


def test_the_default_engines_really_compile(compiled_umim_llm, default_umim_llm, umim_llm):
    import torch

    assert compilation_on(compiled_umim_llm) and compilation_on(default_umim_llm) and not compilation_on(umim_llm)
    assert default_umim_llm.llm_engine.vllm_config.model_config.dtype == torch.bfloat16


@pytest.mark.parametrize("mode", ["prompt", "dynamic"])
def test_compiled_equals_eager(compiled_umim_llm, umim_llm, reference_runtimes, heldout_prompts, tokenizer, mode):
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, extra_args={"umim": mode})
    compiled = compiled_umim_llm.generate(token_prompts(heldout_prompts), params, use_tqdm=False)
    eager = umim_llm.generate(token_prompts(heldout_prompts), params, use_tqdm=False)
    ties = []
    for index, (c, e) in enumerate(zip(compiled, eager)):
        step = first_difference(list(c.outputs[0].token_ids), list(e.outputs[0].token_ids))
        if step is None:
            assert merge_stats(c) == merge_stats(e), index
            continue
        reference = reference_runtimes[mode].generate(heldout_prompts[index], MAX_TOKENS, eos_token_ids=(tokenizer.eos_token_id,))
        assert reference.margins[step] < TIE, f"prompt {index}: compiled and eager differ at step {step}, margin {reference.margins[step]:.4f}"
        ties.append((index, step))
    print(f"\n{mode}: {len(heldout_prompts) - len(ties)}/{len(heldout_prompts)} compiled == eager; near-ties {ties}")
    assert len(ties) <= 3
    decode_merges = sum(merge_stats(c)["decode_merges"] for c in compiled)
    assert (decode_merges > 0) == (mode == "dynamic")


def test_defaults_merge_and_serve_text(default_umim_llm, umim_llm, tokenizer, heldout_prompts):
    prompts = token_prompts(heldout_prompts[:16])
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    bf16 = default_umim_llm.generate(prompts, params, use_tqdm=False)
    fp32 = umim_llm.generate(prompts, params, use_tqdm=False)
    for b, f in zip(bf16, fp32):
        completion = b.outputs[0]
        assert len(completion.token_ids) == MAX_TOKENS and completion.text == tokenizer.decode(completion.token_ids)
        # prompt merging depends on the tokens only, never on the dtype
        assert merge_stats(b)["prompt_positions"] == merge_stats(f)["prompt_positions"]
    assert sum(merge_stats(b)["prefill_merges"] for b in bf16) > 0
    assert sum(merge_stats(b)["decode_merges"] for b in bf16) > 0
    divergence = [first_difference(list(b.outputs[0].token_ids), list(f.outputs[0].token_ids)) for b, f in zip(bf16, fp32)]
    print(f"\nbf16 compiled vs fp32 eager, first divergence per prompt (None = equal): {divergence}")


def test_defaults_prefix_cache_hit_on_repeated_merged_prompt(default_umim_llm, heldout_prompts):
    prompt = token_prompts([heldout_prompts[1] * 4])
    params = SamplingParams(temperature=0.0, max_tokens=16)
    first = default_umim_llm.generate(prompt, params, use_tqdm=False)[0]
    second = default_umim_llm.generate(prompt, params, use_tqdm=False)[0]
    assert second.num_cached_tokens > 0
    assert list(second.outputs[0].token_ids) == list(first.outputs[0].token_ids)
    assert merge_stats(second) == merge_stats(first)


def release(llm) -> None:
    """Shut the engine's processes down now: the session's many engines share 24 GiB."""
    import contextlib
    import gc

    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()
    gc.collect()
