"""N-gram matcher: which token spans UMIM merges (paper §3.1, §3.4, App. D).

The native ops (csrc/, registered as ``torch.ops.umim.*``) do the work; the ``*_reference``
functions below transcribe the paper's pseudocode 3 and 4 and define what the ops must return.

A rule set is an int32 tensor ``rules`` [R, 4]: row r holds the 2..4 token ids of rule r padded
with -1, and r is the rule id. ``index = build_rule_index(rules)`` is its hash table.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

import vllm_umim._C  # noqa: F401  (registers torch.ops.umim.*)

from vllm_umim.errors import OptionError

MAX_N = 4  # longest rule: the paper merges 2-, 3- and 4-grams
SINGLE = -1  # find_spans: the position stays a single token
COVERED = -2  # find_spans: the position is inside a span that starts earlier
NO_MATCH = -1  # match_suffix: the newest tokens end no rule


def pack_rules(rules: Sequence[Sequence[int]]) -> torch.Tensor:
    """Rules as lists of 2..4 token ids -> int32 [R, 4] tensor padded with -1 (id = position)."""
    packed = torch.full((len(rules), MAX_N), -1, dtype=torch.int32)
    for r, rule in enumerate(rules):
        if not 2 <= len(rule) <= MAX_N:
            raise OptionError(f"rule {r} has {len(rule)} tokens; rules have 2..{MAX_N}")
        packed[r, : len(rule)] = torch.tensor(rule, dtype=torch.int32)
    return packed


def build_rule_index(rules: torch.Tensor) -> torch.Tensor:
    """Hash index over the merge rules R (§3.1): int32 [capacity], a rule id or -1 per slot.

    Built on CPU and returned on ``rules.device``. Raises if a rule is malformed or duplicated.
    """
    _check_tensor("rules", rules, torch.int32, (None, MAX_N))
    return torch.ops.umim.build_rule_index(rules.cpu()).to(rules.device)


def find_spans(
    tokens: torch.Tensor,
    cu_seqlens: torch.Tensor,
    rules: torch.Tensor,
    index: torch.Tensor,
    max_n: int = MAX_N,
) -> torch.Tensor:
    """Prefill merging (§3.4, App. D pseudocode 3) of sequences packed flat.

    tokens: int64 [N]; sequence b is ``tokens[cu_seqlens[b]:cu_seqlens[b + 1]]``.
    Returns int32 [N]: the rule id where a merged span starts, SINGLE (-1) for a position that
    stays a token, COVERED (-2) for the rest of a span. Spans never cross sequences.
    """
    _check_rule_table(rules, index, max_n)
    _check_tensor("tokens", tokens, torch.int64, (None,), rules.device)
    _check_tensor("cu_seqlens", cu_seqlens, torch.int64, (None,), rules.device)
    if cu_seqlens.numel() == 0:
        raise OptionError("cu_seqlens must have B + 1 >= 1 entries")
    return torch.ops.umim.find_spans(tokens, cu_seqlens, rules, index, max_n)


def match_suffix(
    tails: torch.Tensor,
    num_raw: torch.Tensor,
    rules: torch.Tensor,
    index: torch.Tensor,
    max_n: int = MAX_N,
) -> torch.Tensor:
    """Decode-time merge check (§3.4, App. D pseudocode 4) for a batch of requests.

    tails: int64 [B, 4], the last 4 elements of each compressed sequence, newest in column 3.
    num_raw: int32 [B], how many trailing elements are plain tokens (capped at 4 by the caller).
    Returns int32 [B]: the rule id of the longest n <= min(max_n, num_raw) whose last n tokens
    form a rule (merge them now), or NO_MATCH (-1).
    """
    _check_rule_table(rules, index, max_n)
    _check_tensor("tails", tails, torch.int64, (None, MAX_N), rules.device)
    _check_tensor("num_raw", num_raw, torch.int32, (tails.shape[0],), rules.device)
    return torch.ops.umim.match_suffix(tails, num_raw, rules, index, max_n)


def _check_tensor(name, t, dtype, shape, device=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise OptionError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise OptionError(f"{name} must be {dtype}, got {t.dtype}")
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        want = ", ".join("*" if s is None else str(s) for s in shape)
        raise OptionError(f"{name} must have shape [{want}], got {list(t.shape)}")
    if device is not None and t.device != device:
        raise OptionError(f"{name} is on {t.device} but rules are on {device}")


def _check_rule_table(rules: torch.Tensor, index: torch.Tensor, max_n: int) -> None:
    _check_tensor("rules", rules, torch.int32, (None, MAX_N))
    _check_tensor("index", index, torch.int32, (None,), rules.device)
    cap = index.shape[0]
    if cap < 16 or cap & (cap - 1) or cap < 2 * rules.shape[0]:
        raise OptionError(f"index (capacity {cap}) was not built by build_rule_index(rules)")
    if not 2 <= max_n <= MAX_N:
        raise OptionError(f"max_n must be in [2, {MAX_N}], got {max_n}")


# ---------------------------------------------------------------- references (paper pseudocode)


def find_spans_reference(
    sequences: list[list[int]], rule_ids: dict[tuple[int, ...], int], max_n: int = MAX_N
) -> list[list[int]]:
    """Pseudocode 3 verbatim per sequence, then z_merged rewritten in find_spans' format."""
    result = []
    for z in sequences:
        z_merged = list(z)
        for n in range(max_n, 1, -1):
            while True:
                found = False
                for i in range(len(z_merged) - n + 1):
                    span = tuple(z_merged[i : i + n])
                    if span in rule_ids:
                        z_merged = z_merged[:i] + [span] + z_merged[i + n :]
                        found = True
                        break
                if not found:
                    break
        row = []
        for element in z_merged:
            if isinstance(element, tuple):
                row += [rule_ids[element]] + [COVERED] * (len(element) - 1)
            else:
                row.append(SINGLE)
        result.append(row)
    return result


def match_suffix_reference(
    z_merged: list[int | tuple[int, ...]], rule_ids: dict[tuple[int, ...], int], max_n: int = MAX_N
) -> int:
    """Pseudocode 4's check after a new token: z_merged holds plain tokens (int) and merged
    spans (tuple); returns the id of the rule to merge now, or NO_MATCH."""
    for n in range(max_n, 1, -1):
        if len(z_merged) >= n:
            span = tuple(z_merged[-n:])
            if span in rule_ids:
                return rule_ids[span]
    return NO_MATCH
