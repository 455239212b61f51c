"""Fault isolation in a running engine: the test switch (``VLLM_UMIM_FAULT``) makes each UMIM hook
raise in turn for one request among healthy ones. The engine must survive, the healthy requests
must come out token for token as from an engine without faults, and the faulty one must be
reported as designed (``vllm_umim.engine.faults``): served unmerged (admission, prefill segmentation),
finished with an error (decode merge, runner gather) or finished without figures (output figures)."""

from __future__ import annotations

import os

import pytest
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

from tests.conftest import shut_down, until_last_use
from tests.engine.conftest import ENGINE_ARGS, MAX_WINDOW, RULES, module_for_tests, token_prompts
from vllm_umim import merge_stats
from vllm_umim.engine.faults import FAULT_ENV, HOOKS, request_fault

pytestmark = pytest.mark.slow

GREEDY = dict(temperature=0.0, max_tokens=32)
HEALTHY_SETTINGS = [  # what the healthy requests exercise beside the faulty one
    {},
    {"extra_args": {"umim": {"min_confidence": 0.5}}},  # the runner's chunked sampled-token probabilities
    {"extra_args": {"umim": {"window": 8}}},
    {"repetition_penalty": 1.3},  # the batch's penalty gather over compressed prompts
    {"extra_args": {"umim": False}},
]


@pytest.fixture(scope="module")
def faulty_llm(request, model_dir):
    """A UMIM engine like ``umim_llm`` with every hook set to fail for request ids ``fault-<hook>``."""
    os.environ[FAULT_ENV] = ",".join(f"{hook}:fault-{hook}" for hook in HOOKS)
    try:  # read once, when the engine's processes start
        options = {"rules": str(RULES), "module": module_for_tests(), "max_window": MAX_WINDOW}
        llm = LLM(model=model_dir, additional_config={"umim": options}, **ENGINE_ARGS)
    finally:
        del os.environ[FAULT_ENV]
    yield from until_last_use(request, llm, shut_down(llm))


@pytest.fixture(scope="module")
def healthy(heldout_prompts):
    return [(heldout_prompts[i], SamplingParams(**GREEDY, **settings)) for i, settings in enumerate(HEALTHY_SETTINGS)]


@pytest.fixture(scope="module")
def expected(umim_llm, healthy, heldout_prompts):
    """From the engine without faults: the healthy requests' outputs, and, for a prompt that merges
    while decoding (so the decode hook is reached), its merged and its unmerged outputs."""
    healthy_out = umim_llm.generate(token_prompts([p for p, _ in healthy]), [s for _, s in healthy], use_tqdm=False)
    candidates = heldout_prompts[10:20]
    merged = umim_llm.generate(token_prompts(candidates), SamplingParams(**GREEDY), use_tqdm=False)
    index = next(i for i, out in enumerate(merged) if merge_stats(out)["decode_merges"] >= 2)
    unmerged = umim_llm.generate(token_prompts([candidates[index]]), SamplingParams(**GREEDY, extra_args={"umim": False}),
                                 use_tqdm=False)[0]
    return {"healthy": healthy_out, "prompt": candidates[index], "merged": merged[index], "unmerged": unmerged}


def run_together(llm: LLM, requests: list[tuple[str, list[int], SamplingParams]]) -> dict:
    """Add every request, then step the engine until all finished: one concurrent batch."""
    engine = llm.llm_engine
    for request_id, prompt, params in requests:
        engine.add_request(request_id, TokensPrompt(prompt_token_ids=prompt), params)
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    return finished


def tokens(output) -> list[int]:
    return list(output.outputs[0].token_ids)


@pytest.mark.parametrize("hook", HOOKS)
def test_a_fault_ends_only_its_request(faulty_llm, healthy, expected, hook):
    requests = [(f"healthy-{hook}-{i}", prompt, params) for i, (prompt, params) in enumerate(healthy)]
    requests.insert(2, (f"fault-{hook}", expected["prompt"], SamplingParams(**GREEDY)))
    finished = run_together(faulty_llm, requests)

    assert len(finished) == len(requests)
    for i, reference in enumerate(expected["healthy"]):
        output = finished[f"healthy-{hook}-{i}"]
        assert tokens(output) == tokens(reference), f"healthy request {i} changed"
        assert output.outputs[0].finish_reason == reference.outputs[0].finish_reason
        assert merge_stats(output) == merge_stats(reference) and request_fault(output) is None

    faulty = finished[f"fault-{hook}"]
    completion = faulty.outputs[0]
    fault = request_fault(faulty)
    assert fault is not None and fault["hook"] == hook and "InjectedFault" in fault["error"]
    if hook in ("admission", "prefill"):  # nothing computed yet: served unmerged, exactly as opted out
        assert completion.finish_reason == "length" and merge_stats(faulty) is None
        assert tokens(faulty) == tokens(expected["unmerged"])
    elif hook == "figures":  # served merged as usual, without its figures
        assert completion.finish_reason == "length" and merge_stats(faulty) is None
        assert tokens(faulty) == tokens(expected["merged"])
    else:  # the sequence or the worker's row may be half-way through a merge: ended with an error
        assert completion.finish_reason == "error"
        merged = tokens(expected["merged"])
        assert tokens(faulty) == merged[: len(tokens(faulty))]  # what it did receive is right
        assert len(tokens(faulty)) < len(merged)


def test_the_engine_serves_after_every_fault(faulty_llm, healthy, expected):
    outputs = faulty_llm.generate(token_prompts([p for p, _ in healthy]), [s for _, s in healthy], use_tqdm=False)
    assert [tokens(o) for o in outputs] == [tokens(o) for o in expected["healthy"]]
    again = faulty_llm.generate(token_prompts([expected["prompt"]]), SamplingParams(**GREEDY), use_tqdm=False)[0]
    assert tokens(again) == tokens(expected["merged"]) and merge_stats(again) == merge_stats(expected["merged"])
