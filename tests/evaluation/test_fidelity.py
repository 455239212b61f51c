"""The fidelity suite's metrics and prompts (issue 13), without an engine."""

from __future__ import annotations

import json
import math
from functools import lru_cache

import pytest

from vllm_umim.evaluation.fidelity import Continuation, compare, equal_share, first_divergence, shared_context_kl, topk_kl
from vllm_umim.errors import FidelityArgumentError
from vllm_umim.evaluation.fidelity_run import parse_assignment
from vllm_umim.evaluation.fidelity_prompts import KINDS, PromptKindError, build_prompts, prompts_digest


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) == 3
    assert first_divergence([1, 2, 3], [9, 2, 3]) == 0
    assert first_divergence([1, 2, 3], [1, 2, 4]) == 2
    assert first_divergence([1, 2], [1, 2, 3]) == 2
    assert first_divergence([], []) == 0


def test_equal_share():
    assert equal_share([32, 32, 5, 0], 32) == 0.5
    assert equal_share([32], 32) == 1.0
    assert math.isnan(equal_share([], 32))


def test_topk_kl_is_zero_for_equal_distributions_and_exact_on_a_shared_support():
    p = {1: math.log(0.7), 2: math.log(0.3)}
    q = {1: math.log(0.4), 2: math.log(0.6)}
    assert topk_kl(p, dict(p)) == 0.0
    assert topk_kl(p, q) == pytest.approx(0.7 * math.log(0.7 / 0.4) + 0.3 * math.log(0.3 / 0.6))


def test_topk_kl_gives_a_missing_token_the_candidates_smallest_logprob():
    p = {1: math.log(0.6), 2: math.log(0.4)}
    q = {1: math.log(0.8), 3: math.log(0.1)}  # token 2 is not in q's top-k: it gets log 0.1
    assert topk_kl(p, q) == pytest.approx(0.6 * math.log(0.6 / 0.8) + 0.4 * math.log(0.4 / 0.1))
    assert topk_kl({}, q) == 0.0


def test_shared_context_kl_covers_steps_up_to_the_first_divergence_inclusive():
    same, other = {5: math.log(0.9), 6: math.log(0.1)}, {5: math.log(0.5), 6: math.log(0.5)}
    reference = Continuation([5, 5, 5, 5], [same] * 4)
    candidate = Continuation([5, 6, 6, 6], [same, other, other, other])
    kls = shared_context_kl(reference, candidate)
    assert len(kls) == 2 and kls[0] == 0.0 and kls[1] > 0
    assert len(shared_context_kl(reference, reference)) == 4


def test_compare_summarises_divergence_kl_and_token_reduction():
    lp = {1: 0.0}
    stats = {"raw_tokens": 14, "positions": 10, "raw_prompt_tokens": 10, "prompt_positions": 7,
             "prefill_merges": 3, "decode_merges": 1}
    references = [Continuation([1, 1, 1, 1], [lp] * 4), Continuation([1, 1, 1, 1], [lp] * 4)]
    candidates = [Continuation([1, 1, 1, 1], [lp] * 4, stats), Continuation([1, 2, 2, 2], [lp] * 4, stats)]
    figures = compare(references, candidates, length=4)
    assert figures["first_divergences"] == [4, 1]
    assert figures["first_divergence_mean"] == 2.5 and figures["first_divergence_median"] == 2.5
    assert figures["equal_share"] == 0.5
    assert figures["kl_mean"] == 0.0 and figures["kl_steps"] == 4 + 2
    assert figures["prompt_tr"] == pytest.approx(0.3) and figures["overall_tr"] == pytest.approx(1 - 10 / 14)
    assert figures["decode_merges"] == 2
    unmerged = compare(references, references, length=4)
    assert unmerged["equal_share"] == 1.0 and unmerged["prompt_tr"] is None and unmerged["decode_merges"] is None


def test_parse_assignment():
    assert parse_assignment('prompt="prompt"') == ("prompt", "prompt")
    assert parse_assignment("dynamic=dynamic") == ("dynamic", "dynamic")  # not JSON: a string
    assert parse_assignment("off=false") == ("off", False)
    assert parse_assignment('w8={"mode": "dynamic", "window": 8}') == ("w8", {"mode": "dynamic", "window": 8})
    with pytest.raises(FidelityArgumentError):
        parse_assignment("no-equals-sign")


@lru_cache(maxsize=1)
def _tokenizer():
    from transformers import AutoTokenizer

    from vllm_umim.data.model import fetch_model

    return AutoTokenizer.from_pretrained(fetch_model("smollm2-135m"))


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_builders_are_deterministic_and_non_empty(kind):
    tokenizer = _tokenizer()
    first, second = build_prompts(kind, tokenizer, 12), build_prompts(kind, tokenizer, 12)
    assert len(first) == 12 and first == second and prompts_digest(first) == prompts_digest(second)
    assert all(p.kind == kind and p.text.strip() and p.token_ids for p in first)
    assert len({tuple(p.token_ids) for p in first}) == 12
    for p in first:
        assert p.token_ids == tokenizer(p.text, add_special_tokens=False)["input_ids"] or kind == "wiki"
    if kind == "wiki":
        assert all(72 < len(p.token_ids) <= 96 for p in first)
        assert all(not p.text[-1].isspace() for p in first)
    if kind == "chat":
        assert all(p.text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\n" in p.text for p in first)
        assert {p.source for p in first} == {"arc_easy", "arc_challenge", "openbookqa", "piqa", "instruction"}
    if kind == "gsm8k":
        assert all("\nAnswer: " in p.text and "<<" not in p.text for p in first)


def test_default_count_is_at_least_100_per_kind():
    tokenizer = _tokenizer()
    for kind in KINDS:
        assert len(build_prompts(kind, tokenizer)) >= 100


def test_unknown_kind_is_a_clear_error():
    with pytest.raises(PromptKindError, match="unknown prompt kind"):
        build_prompts("poetry", _tokenizer(), 3)


def test_cached_bf16_line_is_reused_only_for_the_same_model_length_and_prompts(tmp_path):
    from vllm_umim.evaluation.fidelity_run import _cached_bf16_line

    run = {"model": "m", "max_tokens": 32, "prompts": {"wiki": {"digest": "abc"}}}
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({**run, "bf16": {"wiki": {"equal_share": 0.5}, "chat": {}}}))
    assert _cached_bf16_line(earlier, run) == {"wiki": {"equal_share": 0.5}}
    with pytest.raises(FidelityArgumentError, match="prompts differ"):
        _cached_bf16_line(earlier, {**run, "prompts": {"wiki": {"digest": "other"}}})
    with pytest.raises(FidelityArgumentError, match="max_tokens"):
        _cached_bf16_line(earlier, {**run, "max_tokens": 16})
    earlier.write_text(json.dumps(run))
    with pytest.raises(FidelityArgumentError, match="no bf16 line"):
        _cached_bf16_line(earlier, run)


def test_a_cached_bf16_line_belongs_to_the_reference_model(tmp_path):
    from vllm_umim.evaluation.fidelity_run import _cached_bf16_line

    base = {"model": "base", "max_tokens": 32, "prompts": {"wiki": {"digest": "abc"}}}
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({**base, "bf16": {"wiki": {"equal_share": 0.5}}}))
    reader = {**base, "model": "reader", "reference_model": "base"}  # an adapted reader measured against its base
    assert _cached_bf16_line(earlier, reader) == {"wiki": {"equal_share": 0.5}}
    with pytest.raises(FidelityArgumentError, match="bf16 line is of 'base', this run's of 'reader'"):
        _cached_bf16_line(earlier, {**base, "model": "reader"})


def test_with_a_reference_model_every_row_is_against_its_unmerged_continuations(monkeypatch):
    import vllm

    from vllm_umim.evaluation import fidelity, fidelity_run

    def cont(tokens):
        return Continuation(tokens, [{t: 0.0} for t in tokens])

    started = []

    class FakeLLM:
        def __init__(self, model, **kwargs):
            started.append((model, kwargs["dtype"], "additional_config" in kwargs))

    base_says = cont([1, 2, 3, 4])
    monkeypatch.setattr(vllm, "LLM", FakeLLM)
    monkeypatch.setattr(fidelity, "generate_continuations", lambda llm, prompts, choice, n: [base_says for _ in prompts])
    monkeypatch.setattr(fidelity_run, "_shutdown", lambda llm: None)
    config = fidelity_run.FidelityConfig(rules="r.bin", model="reader", reference_model="base", max_tokens=4)
    mine = {"unmerged": {"wiki": [cont([1, 2, 9, 9])]}, "dynamic": {"wiki": [cont([1, 9, 9, 9])]}}
    figures, continuations = fidelity_run._against_reference_model(config, {"wiki": [[5, 6]]}, mine, {})
    assert started == [("base", "float32", False)]  # the reference: the base model, fp32, no UMIM
    assert continuations["unmerged"]["wiki"] == [base_says]
    assert figures[fidelity_run.RAW_ROW]["wiki"]["first_divergence_mean"] == 2  # the reader's drift on raw input
    assert figures["dynamic"]["wiki"]["first_divergence_mean"] == 1
