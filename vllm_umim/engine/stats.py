"""Per-request merge figures, as the engine reports them on a finished ``RequestOutput``.

One vocabulary, in code, ``usage.umim``, ``/metrics`` and the README alike:

* raw tokens: what the user sent and received (prompt + output), as vLLM counts them;
* positions: the sequence after merging, one per RoPE position and KV slot;
* merges (``prefill_merges``, ``decode_merges``): spans merged, each rule n-gram into one position;
* tokens merged away: raw tokens - positions (the KV tokens saved);
* token reduction (TR): tokens merged away / raw tokens.
"""

from __future__ import annotations

STATS_KEY = "umim"  # key in RequestOutput.kv_transfer_params


def merge_stats(request_output) -> dict | None:
    """``{"raw_tokens", "positions", "raw_prompt_tokens", "prompt_positions", "prefill_merges",
    "decode_merges", "tokens_merged_away", "kv_blocks_saved"}`` for a finished merged request (summed over its samples when
    ``n > 1``); None if it ran unmerged."""
    params = getattr(request_output, "kv_transfer_params", None) or {}
    return params.get(STATS_KEY)


def combine_stats(per_sequence: list[dict]) -> dict:
    """Figures of a request with ``n > 1`` samples: vLLM runs each sample as its own engine
    request, so each reports its own figures; the request's are their sums (every figure is a
    count, and each sample holds its own KV)."""
    return {key: sum(s[key] for s in per_sequence) for key in per_sequence[0]}
