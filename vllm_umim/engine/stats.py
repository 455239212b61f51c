"""Per-request merge figures, as the engine reports them on a finished ``RequestOutput``."""

from __future__ import annotations

STATS_KEY = "umim"  # key in RequestOutput.kv_transfer_params


def merge_stats(request_output) -> dict | None:
    """``{"raw_tokens", "compressed_tokens", "prefill_merges", "decode_merges", "kv_tokens_saved",
    "kv_blocks_saved", ...}`` for a finished merged request (summed over its samples when
    ``n > 1``); None if it ran unmerged."""
    params = getattr(request_output, "kv_transfer_params", None) or {}
    return params.get(STATS_KEY)


def combine_stats(per_sequence: list[dict]) -> dict:
    """Figures of a request with ``n > 1`` samples: vLLM runs each sample as its own engine
    request, so each reports its own figures; the request's are their sums (every figure is a
    count, and each sample holds its own KV)."""
    return {key: sum(s[key] for s in per_sequence) for key in per_sequence[0]}
