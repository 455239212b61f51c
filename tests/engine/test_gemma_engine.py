"""A second architecture through the engine: Gemma 3 270M (scaled input embeddings, tied head,
sliding-window attention, 262k vocabulary, BOS), with the rules and module trained for it.

Greedy fp32 output of the engine equals the HF reference runtime token for token and merge for
merge (near-ties excepted, as for SmolLM2), in prompt-only and dynamic mode; artifacts of one
model refuse the other with one MismatchError. One Gemma engine per session (``gemma_llm``).
"""

from __future__ import annotations

import pytest
from vllm import SamplingParams

from tests.engine.conftest import GEMMA_RULES, gemma_module_for_tests, token_prompts
from tests.engine.test_engine_matches_reference import compare, merges_match_reference
from vllm_umim import merge_stats
from vllm_umim.errors import MismatchError

pytestmark = pytest.mark.slow

PROMPTS = 12
PROMPT_TOKENS = 48  # after <bos>; short: every step's logits are 262k wide
MAX_TOKENS = 20  # 12 prompts x 20 tokens keep the file near two minutes of CI time (24 x 24: 13 min on 2 loaded cores)
SMOLLM2 = __import__("pathlib").Path(__file__).resolve().parents[2] / "artifacts" / "smollm2-135m"


@pytest.fixture(scope="module")
def gemma_prompts(gemma_tokenizer) -> list[list[int]]:
    from vllm_umim.data.corpus import fetch_corpus, read_documents
    from vllm_umim.module.batches import bos_prefix

    bos = bos_prefix(gemma_tokenizer)
    assert bos == [gemma_tokenizer.bos_token_id]
    prompts = []
    for document in read_documents(fetch_corpus("wiki") / "heldout.txt"):
        ids = gemma_tokenizer(document, add_special_tokens=False)["input_ids"]
        if len(ids) >= PROMPT_TOKENS:
            prompts.append(bos + ids[:PROMPT_TOKENS])
        if len(prompts) == PROMPTS:
            return prompts
    raise AssertionError("not enough held-out documents")


@pytest.fixture(scope="module")
def gemma_references(gemma_hf_model):
    from vllm_umim.module import model_identity, resolve_module
    from vllm_umim.reference import ReferenceRuntime
    from vllm_umim.rules import load_rules

    rules = load_rules(GEMMA_RULES)
    config = gemma_hf_model.config
    module, _ = resolve_module(gemma_module_for_tests(), config.hidden_size, model_identity(config), rules.tokenizer_fingerprint)
    return {mode: ReferenceRuntime(gemma_hf_model, rules, module, dynamic=mode == "dynamic") for mode in ("prompt", "dynamic")}


@pytest.mark.parametrize("mode", ["prompt", "dynamic"])
def test_gemma_engine_equals_reference(gemma_llm, gemma_references, gemma_prompts, gemma_tokenizer, mode):
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, extra_args={"umim": mode})
    outputs = gemma_llm.generate(token_prompts(gemma_prompts), params, use_tqdm=False)
    runtime = gemma_references[mode]
    references = [runtime.generate(p, MAX_TOKENS, eos_token_ids=(gemma_tokenizer.eos_token_id,)) for p in gemma_prompts]
    exact, ties = compare(outputs, references, gemma_prompts)
    assert exact >= PROMPTS - 2
    merges = merges_match_reference(outputs, references, ties)
    figures = [merge_stats(o) for o in outputs]
    tr = 1 - sum(f["positions"] for f in figures) / sum(f["raw_tokens"] for f in figures)
    print(f"gemma {mode}: {exact}/{PROMPTS} exact, merges {merges}, TR {tr:.1%}")
    assert merges["prefill"] > 0 and (merges["decode"] > 0) == (mode == "dynamic")
    # the merged engine is not the unmerged model in disguise: BOS is kept and text is sensible
    assert all(o.prompt_token_ids[0] == gemma_tokenizer.bos_token_id for o in outputs)


def test_gemma_engine_surrogates_are_the_references(gemma_llm, gemma_references):
    """The decoder input the engine builds for a virtual id (wrapper, then vLLM's sqrt(d)
    ``normalizer``) is the reference's surrogate: the embedding-scale fix, checked inside the
    worker rather than through greedy tokens (a lightly trained module is nearly scale-equivariant,
    so greedy output alone could miss a wrong scale)."""
    import torch

    from vllm_umim.reference.runtime import Element

    runtime = gemma_references["prompt"]
    rule_ids = [0, 1, 777, len(runtime.rules) - 1]
    engine_rows = torch.tensor(gemma_llm.collective_rpc("umim_input_embeddings", args=(rule_ids,))[0])
    reference_rows = runtime.embed([Element(runtime.rules.tokens_of(r), r) for r in rule_ids])
    torch.testing.assert_close(engine_rows, reference_rows, rtol=1e-4, atol=1e-5)


def engine_config(model_dir, **umim):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_umim.engine.patches import apply_patches

    apply_patches()
    return EngineArgs(model=model_dir, dtype="float32", enforce_eager=True, max_model_len=256,
                      additional_config={"umim": umim}).create_engine_config()


@pytest.mark.parametrize("rules,module,match", [
    (SMOLLM2 / "rules.bin", "mean", "rules were mined for tokenizer"),
    (SMOLLM2 / "rules.bin", str(SMOLLM2 / "module.safetensors"), "rules were mined for tokenizer"),
    (GEMMA_RULES, str(SMOLLM2 / "module.safetensors"), "trained for a model with hidden_size=576"),
], ids=["smollm2-rules", "smollm2-rules-and-module", "smollm2-module"])
def test_smollm2_artifacts_refuse_gemma(gemma_dir, rules, module, match):
    with pytest.raises(MismatchError, match=match):
        engine_config(gemma_dir, rules=str(rules), module=module)


@pytest.mark.parametrize("rules,module,match", [
    (GEMMA_RULES, "mean", "rules were mined for tokenizer"),
    (SMOLLM2 / "rules.bin", "gemma-module", "trained for a model with hidden_size=640"),
], ids=["gemma-rules", "gemma-module"])
def test_gemma_artifacts_refuse_smollm2(model_dir, rules, module, match):
    if module == "gemma-module":
        module = gemma_module_for_tests()
        if module == "mean":
            pytest.skip("no trained Gemma module in artifacts/gemma3-270m")
    with pytest.raises(MismatchError, match=match):
        engine_config(model_dir, rules=str(rules), module=module)
