"""The reference runtime against plain HF computation on a tiny random Llama."""

import pytest
import torch

from tests.conftest import make_ruleset
from vllm_umim.module import MergeModule, MergeModuleConfig
from vllm_umim.reference import ReferenceRuntime, merge_prompt
from vllm_umim.policies import GreedyLongestMatch
from vllm_umim.reference.runtime import replay_merges

PROMPT = [5, 9, 17, 3, 40, 41, 42, 7, 9, 17, 12]


def trained_like_module(hidden_size, seed=1):
    torch.manual_seed(seed)
    module = MergeModule(MergeModuleConfig(hidden_size, num_heads=4))
    for p in module.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    return module


def greedy_without_cache(runtime, elements):
    """Logits of the last position, recomputed from scratch over the whole compressed sequence."""
    embeds = runtime.embed(elements)
    out = runtime.model(inputs_embeds=embeds[None], position_ids=torch.arange(len(elements))[None])
    return int(out.logits[0, -1].argmax())


def test_empty_rules_match_hf_generate(tiny_model):
    runtime = ReferenceRuntime(tiny_model, make_ruleset([]), MergeModule(MergeModuleConfig(32)))
    ours = runtime.generate(PROMPT, max_new_tokens=12).output_token_ids
    hf = tiny_model.generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert ours == hf[0, len(PROMPT):].tolist()


def test_prompt_merging_follows_pseudocode_3(tiny_model):
    rules = make_ruleset([(9, 17), (40, 41, 42), (41, 42), (3, 40)])
    elements = merge_prompt(PROMPT, GreedyLongestMatch(rules))
    # 3-grams are merged before 2-grams, so (3, 40) loses to (40, 41, 42)
    assert [e.tokens for e in elements] == [(5,), (9, 17), (3,), (40, 41, 42), (7,), (9, 17), (12,)]
    assert all(e.merged == (len(e.tokens) > 1) for e in elements)


@pytest.mark.parametrize("dynamic", [False, True])
def test_cached_decoding_equals_recomputation(tiny_model, dynamic):
    """Every step's greedy token equals a from-scratch forward over the compressed sequence:
    the KV rollback (cache.crop) and compacted positions are right."""
    plain = ReferenceRuntime(tiny_model, make_ruleset([]), None).generate(PROMPT, max_new_tokens=16)
    out = plain.output_token_ids
    rules = make_ruleset([(9, 17)] + [tuple(out[i : i + 2]) for i in range(0, 12, 3)] + [tuple(out[4:7])])
    runtime = ReferenceRuntime(tiny_model, rules, trained_like_module(32), dynamic=dynamic)
    result = runtime.generate(PROMPT, max_new_tokens=16)
    assert result.prefill_merges == 2
    assert (result.decode_merges > 0) == dynamic
    # replay the run step by step without any cache
    replayed = replay_merges(PROMPT, result.output_token_ids, GreedyLongestMatch(rules), dynamic)
    assert [e.tokens for e in replayed.elements] == [e.tokens for e in result.elements]
    elements = merge_prompt(PROMPT, GreedyLongestMatch(rules))
    for step, token in enumerate(result.output_token_ids):
        assert greedy_without_cache(runtime, elements) == token, f"step {step}"
        partial = replay_merges(PROMPT, result.output_token_ids[: step + 2], GreedyLongestMatch(rules), dynamic)
        elements = partial.elements[:-1]


def test_sampling_is_seeded(tiny_model):
    runtime = ReferenceRuntime(tiny_model, make_ruleset([(9, 17)]), trained_like_module(32))
    a = runtime.generate(PROMPT, max_new_tokens=8, temperature=0.8, top_p=0.9, top_k=20, seed=3).output_token_ids
    b = runtime.generate(PROMPT, max_new_tokens=8, temperature=0.8, top_p=0.9, top_k=20, seed=3).output_token_ids
    assert a == b and len(a) == 8


def test_stops_at_eos(tiny_model):
    runtime = ReferenceRuntime(tiny_model, make_ruleset([]), None)
    first = runtime.generate(PROMPT, max_new_tokens=4).output_token_ids
    result = runtime.generate(PROMPT, max_new_tokens=10, eos_token_ids=(first[1],))
    assert result.output_token_ids == first[: first.index(first[1]) + 1] and result.finish_reason == "stop"


def test_context_module_decoding_equals_recomputation(tiny_model):
    """A context-aware module (module/context.py) reads the raw tokens before each span, also
    after decode merges and KV rollbacks: cached decoding equals recomputation from scratch."""
    plain = ReferenceRuntime(tiny_model, make_ruleset([]), None).generate(PROMPT, max_new_tokens=16)
    out = plain.output_token_ids
    rules = make_ruleset([(9, 17)] + [tuple(out[i : i + 2]) for i in range(0, 12, 3)])
    module = trained_like_module(32).with_context(5)
    torch.nn.init.normal_(module.context.mix_out.weight, std=0.3)
    runtime = ReferenceRuntime(tiny_model, rules, module, dynamic=True)
    result = runtime.generate(PROMPT, max_new_tokens=16)
    assert result.prefill_merges == 2 and result.decode_merges > 0
    free = ReferenceRuntime(tiny_model, rules, trained_like_module(32), dynamic=True)
    assert not torch.equal(runtime.embed(result.elements), free.embed(result.elements))  # context changes surrogates
    elements = merge_prompt(PROMPT, GreedyLongestMatch(rules))
    for step, token in enumerate(result.output_token_ids):
        assert greedy_without_cache(runtime, elements) == token, f"step {step}"
        partial = replay_merges(PROMPT, result.output_token_ids[: step + 2], GreedyLongestMatch(rules), True)
        elements = partial.elements[:-1]
