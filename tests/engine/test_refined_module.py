"""A merge module with a per-rule refinement (module/refinement.py) through vLLM: the engine feeds
exactly the refined surrogates, so its greedy output equals the HF reference with the same module
(dynamic mode: refined spans merged at prefill and while decoding), and differs from the unrefined module's where the residuals matter."""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams

from tests.engine.conftest import ENGINE_ARGS, RULES, engine_until_done, module_for_tests, token_prompts
from tests.engine.test_engine_matches_reference import compare, merges_match_reference
from vllm_umim.policies import MergeSettings
from vllm_umim.reference import ReferenceRuntime

pytestmark = pytest.mark.slow

PROMPTS = 12
MAX_TOKENS = 32  # as test_engine_matches_reference: the unrefined module's references are shared
REFINED = 64  # n-grams with a residual: the spans merged most often in the test prompts


@pytest.fixture(scope="module")
def refined_module(tmp_path_factory, hf_model, rules, heldout_prompts):
    """(path, module): this session's module refined for the prompts' most merged spans, with
    residuals as large as the surrogates themselves (seeded), so every refined merge changes input."""
    from vllm_umim.module import model_identity, resolve_module, save_module
    from vllm_umim.module.batches import segment
    from vllm_umim.module.refinement import most_frequent_spans
    from vllm_umim.rules.ruleset import MAX_SPAN

    base, _ = resolve_module(module_for_tests(), hf_model.config.hidden_size, model_identity(hf_model.config),
                             rules.tokenizer_fingerprint)
    spans = (span for seg in segment(heldout_prompts[:PROMPTS], rules) for span in seg.merged_spans())
    module = base.refined(most_frequent_spans(spans, REFINED, MAX_SPAN))
    scale = hf_model.get_input_embeddings().weight.std()
    module.refinement.residuals.data = torch.randn(module.refinement.residuals.shape, generator=torch.Generator().manual_seed(0)) * scale
    path = tmp_path_factory.mktemp("refined") / "module.safetensors"
    save_module(module, path, model_identity(hf_model.config), rules.tokenizer_fingerprint, rules.fingerprint)
    return str(path), module.eval()


@pytest.fixture(scope="module")
def refined_llm(model_dir, refined_module):
    yield from engine_until_done(model=model_dir, additional_config={"umim": {"rules": str(RULES), "module": refined_module[0]}},
                                 **ENGINE_ARGS)


def test_refined_module_engine_equals_reference(refined_llm, refined_module, reference_outputs, hf_model, rules,
                                                heldout_prompts, tokenizer):
    prompts = heldout_prompts[:PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, extra_args={"umim": "dynamic"})
    outputs = refined_llm.generate(token_prompts(prompts), params, use_tqdm=False)
    runtime = ReferenceRuntime(hf_model, rules, refined_module[1], dynamic=True)
    eos = (tokenizer.eos_token_id,)
    references = [runtime.generate(p, MAX_TOKENS, eos_token_ids=eos) for p in prompts]
    exact, ties = compare(outputs, references, prompts)
    assert exact >= PROMPTS - 2
    merges = merges_match_reference(outputs, references, ties)
    assert merges["prefill"] > 0 and merges["decode"] > 0
    unrefined = [r.output_token_ids for r in reference_outputs(MergeSettings(mode="dynamic"), prompts, MAX_TOKENS)]
    changed = sum(list(o.outputs[0].token_ids) != u for o, u in zip(outputs, unrefined))
    print(f"dynamic: {exact}/{PROMPTS} exact, {merges}, {changed} outputs changed by the refinement")
    assert changed > 0  # the residuals reach the model: an engine ignoring them would match the unrefined module
