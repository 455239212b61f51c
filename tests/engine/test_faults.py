"""Fault isolation without an engine: the fault switch, explicit merge checks (no ``assert``), the
bounded policy cache, the chunked sampled-token probabilities and the window bounds. The engine
test is ``test_fault_isolation.py``."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.conftest import make_ruleset
from tests.engine.test_sequence import V, FakeRequest
from vllm_umim.engine.config import UmimConfig
from vllm_umim.engine.faults import FAULT_ENV, FAULT_KEY, FaultSwitch, request_fault
from vllm_umim.engine.model_runner import raw_prompt_token_ids, sampled_token_probabilities
from vllm_umim.engine.sequence import merge_newest
from vllm_umim.errors import InjectedFault, MergeStateError, OptionError, UmimError
from vllm_umim.policies import GreedyLongestMatch, MergeSettings
from vllm_umim.policies.base import DecodeMerge
from vllm_umim.policies.settings import MAX_WINDOW


# ---- the test switch ---------------------------------------------------------------------------
def test_fault_switch_raises_only_for_the_named_hook_and_request():
    switch = FaultSwitch.parse("decode:bad-, gather:xyz")
    assert switch.plan == (("decode", "bad-"), ("gather", "xyz"))
    with pytest.raises(InjectedFault, match="decode hook"):
        switch.check("decode", "cmpl-bad-1-abcd")
    switch.check("decode", "cmpl-good-1")  # no match: nothing
    switch.check("prefill", "cmpl-bad-1")  # other hook: nothing
    assert FaultSwitch.parse(None).plan == () and FaultSwitch.parse("").plan == ()


@pytest.mark.parametrize("value", ["decode", "merge:x", "decode:", ":x"])
def test_a_malformed_fault_switch_is_one_error(value):
    with pytest.raises(OptionError, match=f"{FAULT_ENV}: .* is not <hook>:<request id substring>"):
        FaultSwitch.parse(value)


def test_request_fault_reads_the_output():
    fault = {"hook": "decode", "error": "InjectedFault: x"}
    assert request_fault(SimpleNamespace(kv_transfer_params={FAULT_KEY: fault})) == fault
    assert request_fault(SimpleNamespace(kv_transfer_params=None)) is None


# ---- explicit checks instead of asserts ---------------------------------------------------------
def test_a_merge_out_of_step_is_an_error_that_changes_nothing():
    """Was an ``assert`` (gone under ``python -O``): now a MergeStateError raised before any change."""
    request = FakeRequest([1, 2, 3, 4, 5, 6, 7, 8], num_computed_tokens=5, policy=GreedyLongestMatch(make_ruleset([(6, 7, 8)])))
    with pytest.raises(MergeStateError, match="must follow a full step"):
        merge_newest(request, V, hash_block_size=4)
    assert request._all_token_ids == [1, 2, 3, 4, 5, 6, 7, 8] and request.num_computed_tokens == 5
    assert request.block_hashes == ["h0", "h1"] and request.umim.decode_merges == 0


def test_the_check_holds_under_python_O():
    code = ("from tests.engine.test_faults import test_a_merge_out_of_step_is_an_error_that_changes_nothing as t; t(); "
            "assert False, 'asserts are on'")
    run = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, cwd=".", timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


class WrongRulePolicy(GreedyLongestMatch):
    """A policy whose decode merge names a rule that is not the tokens at the frontier."""

    def decode_merge(self, ids, virtual_base, output_confidences=()):
        return DecodeMerge(rule_id=0, start=len(ids) - 2, length=2)


def test_a_merge_of_tokens_that_are_not_its_rule_is_an_error():
    request = FakeRequest([1, 2, 3, 4], num_computed_tokens=3, policy=WrongRulePolicy(make_ruleset([(6, 7)])))
    with pytest.raises(MergeStateError, match=r"tokens \[3, 4\] at 2 are not rule 0 \[6, 7\]"):
        merge_newest(request, V, hash_block_size=4)
    assert request._all_token_ids == [1, 2, 3, 4]


def test_the_reference_runtime_check_is_explicit_too():
    from vllm_umim.reference.runtime import Element, merge_after_token

    policy = WrongRulePolicy(make_ruleset([(6, 7)]))
    elements = [Element((t,), -1) for t in (1, 2, 3, 4)]
    with pytest.raises(MergeStateError, match="not rule 0"):
        merge_after_token(elements, policy)


# ---- bounds ---------------------------------------------------------------------------------------
def test_policy_cache_is_a_small_lru():
    from vllm_umim.engine.scheduler import POLICY_CACHE_SIZE, UmimScheduler

    scheduler = object.__new__(UmimScheduler)  # merge_policy reads only these two
    scheduler.umim_rules = make_ruleset([(1, 2)])
    scheduler.umim_policies = __import__("collections").OrderedDict()
    first = scheduler.merge_policy(MergeSettings(min_confidence=0.5))
    for i in range(10 * POLICY_CACHE_SIZE):  # a client sweeping umim_min_confidence
        scheduler.merge_policy(MergeSettings(min_confidence=i / (10 * POLICY_CACHE_SIZE)))
        if i % 7 == 0:
            assert scheduler.merge_policy(MergeSettings(min_confidence=0.5)) is first  # recently used: kept
    assert len(scheduler.umim_policies) == POLICY_CACHE_SIZE
    assert scheduler.merge_policy(MergeSettings(min_confidence=0.5)) is first
    oldest = next(iter(scheduler.umim_policies))
    for i in range(POLICY_CACHE_SIZE):
        scheduler.merge_policy(MergeSettings(window=i % MAX_WINDOW, min_confidence=0.25))
    assert oldest not in scheduler.umim_policies and len(scheduler.umim_policies) == POLICY_CACHE_SIZE


def test_window_bound_is_one_error_naming_the_field():
    MergeSettings(window=MAX_WINDOW)
    with pytest.raises(OptionError, match=f"window must be an integer from 0 to {MAX_WINDOW}, got 1000000"):
        MergeSettings(window=1_000_000)
    with pytest.raises(UmimError, match=f"max_window must be an integer from window \\(0\\) to {MAX_WINDOW}, got 129"):
        UmimConfig.from_dict({"rules": "r.bin", "max_window": MAX_WINDOW + 1})
    with pytest.raises(UmimError, match=f"UMIM option: window must be an integer from 0 to {MAX_WINDOW}"):
        UmimConfig.from_dict({"rules": "r.bin", "window": MAX_WINDOW + 1})
    config = UmimConfig.from_dict({"rules": "r.bin", "max_window": MAX_WINDOW})
    assert config.request_settings({"window": MAX_WINDOW}).window == MAX_WINDOW
    with pytest.raises(UmimError, match=f"extra_args\\['umim'\\]: window must be an integer from 0 to {MAX_WINDOW}"):
        config.request_settings({"window": 10**9})


# ---- the runner's gathers ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_rows", [1, 3, 16, 100])
def test_chunked_probabilities_equal_the_whole_batch_softmax(dtype, chunk_rows):
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(37, 1000, generator=generator) * 4).to(dtype)
    rows = torch.tensor([5, 0, 36, 17, 9, 9, 22])
    sampled = torch.randint(0, 1000, (len(rows),), generator=generator)
    whole = torch.softmax(logits.float(), dim=-1)[rows, sampled]
    chunked = sampled_token_probabilities(logits, rows, sampled, chunk_rows=chunk_rows)
    assert torch.equal(chunked, whole)
    assert sampled_token_probabilities(logits, rows[:0], sampled[:0]).shape == (0,)


def test_penalty_prompt_gather_pads_an_id_past_the_rule_table():
    """Only a row the runner reported as failed can hold one; it must not raise for the batch."""
    rules = make_ruleset([(7, 8)], vocab_size=V)
    batch = SimpleNamespace(num_reqs=2, vocab_size=V, num_prompt_tokens=np.array([2, 2]),
                            token_ids_cpu=np.array([[1, V + 50], [V + 0, 2]]))
    tokens = raw_prompt_token_ids(batch, rules.padded.long()).tolist()
    assert sorted(t for t in tokens[0] if t != V) == [1]  # the unknown id became pads
    assert sorted(t for t in tokens[1] if t != V) == [2, 7, 8]  # the healthy row is unchanged


class ProfilingRunner:
    """Stands in for vLLM's runner: its dummy sampler run records what UMIM holds during it."""

    def __init__(self, dtype):
        self.model = SimpleNamespace(compute_logits=lambda hidden: torch.zeros(len(hidden), 50, dtype=dtype))
        self.held = None

    def _dummy_sampler_run(self, hidden_states):
        reserve = getattr(self, "umim_profile_reserve", None)
        self.held = None if reserve is None else (tuple(reserve.shape), reserve.dtype)
        return "sampled"


@pytest.mark.parametrize("dtype, held", [(torch.float32, ((8, 50), torch.float32)), (torch.bfloat16, None)])
def test_profiling_holds_the_gated_rows_only_for_fp32_logits(dtype, held):
    from vllm_umim.engine.model_runner import UmimModelRunnerMixin

    runner = type("Runner", (UmimModelRunnerMixin, ProfilingRunner), {})(dtype)
    assert runner._dummy_sampler_run(torch.zeros(8, 16)) == "sampled"
    assert runner.held == held and not hasattr(runner, "umim_profile_reserve")


def test_runner_reports_an_id_past_the_rule_table_as_that_requests_fault():
    """The step's surrogate gather clamps ids; the per-request check before it must catch one past
    the table (it would otherwise silently embed as the last rule) and fault that request only."""
    from vllm_umim.engine.model_runner import UmimModelRunnerMixin

    runner = UmimModelRunnerMixin()
    runner.umim_virtual_base, runner.umim_id_limit = V, V + 10
    runner.umim_fault_switch, runner.umim_faults = FaultSwitch.parse("gather:inject"), {}
    assert runner._guarded("a", runner._check_virtual_ids, "a", [1, V + 9])
    assert not runner._guarded("b", runner._check_virtual_ids, "b", [1, V + 10])
    assert not runner._guarded("inject-c", runner._check_virtual_ids, "inject-c", [1])
    assert sorted(runner.umim_faults) == ["b", "inject-c"]
    assert runner.umim_faults["b"]["hook"] == "gather"
    assert runner.umim_faults["b"]["error"].startswith(f"MergeStateError: request b: id {V + 10} is past the rule table")
    assert runner.umim_faults["inject-c"]["error"].startswith("InjectedFault")
