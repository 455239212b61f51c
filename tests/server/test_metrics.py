"""The ``/metrics`` counters, fed from finished outputs (no server: the registry is read directly)."""

from __future__ import annotations

from types import SimpleNamespace

from vllm_umim.engine.faults import FAULT_KEY, HOOKS
from vllm_umim.engine.stats import STATS_KEY
from vllm_umim.server.metrics import FAULTS, counters, record_finished


def value(name: str, **labels) -> float:
    counter = counters()[name]
    return (counter.labels(**labels) if labels else counter)._value.get()


def finished(params):
    return SimpleNamespace(kv_transfer_params=params, finished=True)


def test_faults_are_counted_by_hook_beside_the_merge_figures():
    from prometheus_client import generate_latest

    counters()  # created once per process, as the server does at start
    text = generate_latest().decode()
    for hook in HOOKS:  # every series present (at its value) before any fault
        assert f'vllm_umim:request_faults_total{{hook="{hook}"}}' in text
    before = {hook: value(FAULTS, hook=hook) for hook in HOOKS}
    merged_before = value("vllm_umim:merged_requests")
    stats = {"raw_tokens": 10, "positions": 8, "raw_prompt_tokens": 6, "prompt_positions": 5, "prefill_merges": 1,
             "decode_merges": 1, "tokens_merged_away": 2, "kv_blocks_saved": 0}

    record_finished(finished({FAULT_KEY: {"hook": "decode", "error": "InjectedFault: x"}}))  # ended with an error
    record_finished(finished({FAULT_KEY: {"hook": "prefill", "error": "AlignmentError: y"}}))  # served unmerged
    record_finished(finished({STATS_KEY: stats}))  # healthy
    record_finished(finished(None))  # unmerged, healthy

    after = {hook: value(FAULTS, hook=hook) for hook in HOOKS}
    assert {h: after[h] - before[h] for h in HOOKS} == {"admission": 0, "prefill": 1, "decode": 1, "gather": 0, "figures": 0}
    assert value("vllm_umim:merged_requests") - merged_before == 1
