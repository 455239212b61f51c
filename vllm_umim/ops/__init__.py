"""Native UMIM ops (csrc/, ``torch.ops.umim.*``) with their pure-Python references."""

from vllm_umim.ops.matcher import (
    COVERED,
    MAX_N,
    SINGLE,
    build_rule_index,
    find_spans,
    find_spans_reference,
    match_suffix,
    match_suffix_reference,
    pack_rules,
)

__all__ = [
    "COVERED",
    "MAX_N",
    "SINGLE",
    "build_rule_index",
    "find_spans",
    "find_spans_reference",
    "match_suffix",
    "match_suffix_reference",
    "pack_rules",
]
