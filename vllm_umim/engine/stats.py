"""Per-request merge figures, as the engine reports them on a finished ``RequestOutput``."""

from __future__ import annotations

STATS_KEY = "umim"  # key in RequestOutput.kv_transfer_params


def merge_stats(request_output) -> dict | None:
    """``{"raw_tokens", "compressed_tokens", "prefill_merges", "decode_merges", "kv_tokens_saved",
    "kv_blocks_saved", ...}`` for a finished merged request; None if it ran unmerged."""
    params = getattr(request_output, "kv_transfer_params", None) or {}
    return params.get(STATS_KEY)
