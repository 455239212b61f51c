"""Prometheus counters for merging, served on vLLM's ``/metrics`` beside its own ``vllm:*`` series.

Registered in the API process (vLLM's ``/metrics`` route serves prometheus_client's registry, or
collects the multiprocess directory when ``PROMETHEUS_MULTIPROC_DIR`` is set, which counters
created here also write to). They are incremented once per finished merged request from its
figures (``RequestOutput.kv_transfer_params["umim"]``) by the ``AsyncLLM.generate`` wrapper in
``vllm_umim.server.patches``, so every API (completions, chat, responses) counts. The ``vllm_umim:``
prefix keeps them clear of vLLM's ``unregister_vllm_metrics`` (which drops ``vllm:*``).

Token reduction over a window: ``rate(tokens_merged_away) / rate(raw_tokens)``.

``vllm_umim:request_faults{hook=...}`` counts requests a UMIM engine hook failed for (served
unmerged, or finished with an error; ``vllm_umim.engine.faults``), from the fault their finished
output carries (``kv_transfer_params["umim_fault"]``).
"""

from __future__ import annotations

from vllm_umim.engine.faults import HOOKS, request_fault
from vllm_umim.engine.stats import merge_stats

# counter name (prometheus_client appends _total) -> (help, per-request figure it sums)
COUNTERS = {
    "vllm_umim:merged_requests": ("Finished requests served with UMIM merging", None),
    "vllm_umim:prefill_merges": ("Rule n-grams merged in prompts", "prefill_merges"),
    "vllm_umim:decode_merges": ("Rule n-grams merged while decoding", "decode_merges"),
    "vllm_umim:raw_tokens": ("Raw prompt + output tokens of merged requests", "raw_tokens"),
    "vllm_umim:positions": ("Positions (KV slots) of merged requests after merging", "positions"),
    "vllm_umim:tokens_merged_away": ("Raw tokens - positions: KV cache tokens saved by merging", "tokens_merged_away"),
    "vllm_umim:kv_blocks_saved": ("KV cache blocks saved by merging, at each request's end", "kv_blocks_saved"),
    # deprecated names of the two above (to be dropped in 0.2)
    "vllm_umim:merged_tokens": ("Deprecated: vllm_umim:positions", "positions"),
    "vllm_umim:kv_tokens_saved": ("Deprecated: vllm_umim:tokens_merged_away", "tokens_merged_away"),
}

FAULTS = "vllm_umim:request_faults"  # labelled by hook
FAULTS_HELP = "Requests a UMIM engine hook failed for (served unmerged or finished with an error), by hook"

_counters: dict | None = None


def counters() -> dict:
    """The counters, created on first use (in the process that serves ``/metrics``)."""
    global _counters
    if _counters is None:
        from prometheus_client import Counter

        _counters = {name: Counter(name, help_text) for name, (help_text, _) in COUNTERS.items()}
        faults = _counters[FAULTS] = Counter(FAULTS, FAULTS_HELP, ["hook"])
        for hook in HOOKS:
            faults.labels(hook=hook)  # every series on /metrics (at 0) from the start
    return _counters


def record_finished(request_output) -> None:
    """Count a finished ``RequestOutput``'s merge figures and UMIM fault (no-op for a request
    served unmerged without a fault)."""
    fault = request_fault(request_output)
    if fault:
        counters()[FAULTS].labels(hook=fault.get("hook", "unknown")).inc()
    stats = merge_stats(request_output)
    if not stats:
        return
    for name, counter in counters().items():
        if name in COUNTERS:
            key = COUNTERS[name][1]
            counter.inc(1 if key is None else max(0, stats[key]))
