"""A set of merge rules: the frequent 2..4-grams of paper §3.1, with global rule ids.

Rule ids are dense: all 2-grams (sorted lexicographically), then all 3-grams, then all 4-grams.
The engine represents a merged span in a compressed sequence as the virtual token id
``vocab_size + rule_id``, so a rule id is part of the engine's token space.

A rule set may carry *harm scores* (issue 13, ``vllm_umim.evaluation.rule_harm``): per rule the
mean KL divergence its merge causes at the aligned rows of App. C, and the number of occurrences
it was scored on. NaN harm (with count 0) means "not scored". Scores never change rule ids or the
rules' fingerprint: a scored file is the same rule set, usable with the same merge module.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np
import torch

from vllm_umim.errors import MismatchError, OptionError

MAX_SPAN = 4  # the paper caps n at 4 (App. A, "Reasons for 2- to 4-grams")


def harm_problem(harm: np.ndarray, counts: np.ndarray) -> str | None:
    """What is wrong with a (harm float32, harm_count uint32) pair of tables, or None if they are
    legal: harm is finite and >= 0 where scored (count >= 1), NaN exactly where count is 0."""
    if harm.shape != counts.shape:
        return f"harm has {harm.shape[0] if harm.ndim else 0} values but harm_count {counts.shape[0] if counts.ndim else 0}"
    scored = ~np.isnan(harm)
    if np.isinf(harm).any():
        return f"harm of rule row {int(np.argmax(np.isinf(harm)))} is infinite"
    if (harm[scored] < 0).any():
        row = int(np.flatnonzero(scored)[np.argmax(harm[scored] < 0)])
        return f"harm of rule row {row} is negative ({float(harm[row])})"
    if (scored != (counts > 0)).any():
        row = int(np.argmax(scored != (counts > 0)))
        return (f"rule row {row} has harm {float(harm[row])} but harm_count {int(counts[row])} "
                "(NaN harm means unscored and needs count 0; a score needs count >= 1)")
    return None


def spell_raw(ids: np.ndarray, virtual_base: int, table: np.ndarray) -> np.ndarray:
    """``ids`` (raw tokens and virtual ids ``virtual_base + rule id``, §3.2) with every virtual id
    spelled as its rule's tokens from ``table`` (the -1-padded [R, 4] ``RuleSet.padded``): int64.
    A virtual id past the table spells nothing (only a row the engine reported failed holds one)."""
    ids = np.asarray(ids, dtype=np.int64)
    slots = np.full((len(ids), table.shape[1]), -1, dtype=np.int64)
    plain = ids < virtual_base
    slots[plain, 0] = ids[plain]
    rule_ids = ids[~plain] - virtual_base
    known = rule_ids < len(table)
    spans = np.full((len(rule_ids), table.shape[1]), -1, dtype=np.int64)
    spans[known] = table[rule_ids[known]]
    slots[~plain] = spans
    return slots[slots >= 0]


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the tokenizer's (token, id) vocabulary, sorted by id: 16 hex digits."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    digest = hashlib.sha256()
    for token, token_id in vocab:
        digest.update(f"{token_id}\t{token}\n".encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:16]


@dataclass
class RuleSet:
    """Merge rules mined for one tokenizer.

    ``ngrams[n]`` is an int32 array [count_n, n], unique rows sorted lexicographically;
    ``counts[n]`` their corpus frequencies. ``meta`` carries how they were mined (and selected).
    ``harm[n]`` (float32, NaN = unscored) and ``harm_counts[n]`` (uint32) are the optional harm
    scores, row for row beside ``ngrams[n]``; both None for an unscored rule set.
    """

    tokenizer_fingerprint: str
    vocab_size: int
    threshold: int
    ngrams: dict[int, np.ndarray]
    counts: dict[int, np.ndarray]
    meta: dict = field(default_factory=dict)
    harm: dict[int, np.ndarray] | None = None
    harm_counts: dict[int, np.ndarray] | None = None

    # ---- sizes and ids -------------------------------------------------------------------------
    @property
    def lengths(self) -> list[int]:
        return sorted(self.ngrams)

    @property
    def max_n(self) -> int:
        return max(self.lengths, default=0)

    def count(self, n: int) -> int:
        return len(self.ngrams.get(n, ()))

    def __len__(self) -> int:
        return sum(self.count(n) for n in self.lengths)

    @cached_property
    def padded(self) -> torch.Tensor:
        """int32 [R, 4]: row = rule id, tokens padded with -1 (the matcher ops' rule table)."""
        rows = [np.pad(self.ngrams[n], ((0, 0), (0, MAX_SPAN - n)), constant_values=-1) for n in self.lengths]
        table = np.concatenate(rows) if rows else np.zeros((0, MAX_SPAN), np.int32)
        return torch.from_numpy(np.ascontiguousarray(table, dtype=np.int32))

    @cached_property
    def span_lengths(self) -> torch.Tensor:
        """int64 [R]: n of each rule."""
        return (self.padded >= 0).sum(dim=1)

    @cached_property
    def index(self) -> torch.Tensor:
        """Open-addressing hash index over ``padded`` (built once by the native op)."""
        from vllm_umim.ops import build_rule_index

        return build_rule_index(self.padded)

    @cached_property
    def rule_ids(self) -> dict[tuple[int, ...], int]:
        """{n-gram tuple: rule id}: the plain lookup the Python references use."""
        return {tuple(int(t) for t in row[row >= 0]): rid for rid, row in enumerate(self.padded.numpy())}

    def tokens_of(self, rule_id: int) -> tuple[int, ...]:
        row = self.padded[rule_id]
        return tuple(int(t) for t in row[row >= 0])

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the rule tables: identifies this exact rule set (16 hex digits)."""
        digest = hashlib.sha256(self.tokenizer_fingerprint.encode())
        digest.update(self.padded.numpy().tobytes())
        return digest.hexdigest()[:16]

    # ---- harm scores (issue 13) ---------------------------------------------------------------
    @property
    def scored(self) -> bool:
        return self.harm is not None

    def harm_scores(self) -> np.ndarray:
        """float32 [len(self)] by rule id: mean harm of each rule, NaN where unscored."""
        if self.harm is None:
            return np.full(len(self), np.nan, np.float32)
        return np.concatenate([self.harm[n] for n in self.lengths] or [np.zeros(0)]).astype(np.float32)

    def harm_count_by_rule(self) -> np.ndarray:
        """uint32 [len(self)] by rule id: occurrences each rule's harm was measured on (0 = unscored)."""
        if self.harm_counts is None:
            return np.zeros(len(self), np.uint32)
        return np.concatenate([self.harm_counts[n] for n in self.lengths] or [np.zeros(0)]).astype(np.uint32)

    def with_harm(self, harm: np.ndarray, counts: np.ndarray, meta: dict | None = None) -> "RuleSet":
        """A copy with harm scores attached (by rule id); ``meta`` entries are added to its meta.
        Raises ValueError for illegal scores (see :func:`harm_problem`)."""
        harm = np.asarray(harm, np.float32)
        counts = np.asarray(counts, np.uint32)
        if harm.shape != (len(self),):
            raise OptionError(f"expected {len(self)} harm scores (one per rule), got shape {harm.shape}")
        problem = harm_problem(harm, counts)
        if problem:
            raise OptionError(f"illegal harm scores: {problem}")
        bounds = np.cumsum([0] + [self.count(n) for n in self.lengths])
        by_n = {n: slice(bounds[i], bounds[i + 1]) for i, n in enumerate(self.lengths)}
        return replace(
            self,
            meta={**self.meta, **(meta or {})},
            harm={n: harm[s].copy() for n, s in by_n.items()},
            harm_counts={n: counts[s].copy() for n, s in by_n.items()},
        )

    def subset(self, keep: np.ndarray, meta: dict | None = None) -> "RuleSet":
        """A new rule set of the rules where ``keep`` (bool [len(self)], by rule id) is True, with
        their counts and scores. Its rule ids are renumbered (dense again, same order)."""
        keep = np.asarray(keep, bool)
        if keep.shape != (len(self),):
            raise OptionError(f"expected a keep mask of {len(self)} rules, got shape {keep.shape}")
        bounds = np.cumsum([0] + [self.count(n) for n in self.lengths])
        masks = {n: keep[bounds[i] : bounds[i + 1]] for i, n in enumerate(self.lengths)}
        kept = [n for n in self.lengths if masks[n].any()]

        def pick(tables):
            return None if tables is None else {n: tables[n][masks[n]] for n in kept}

        return RuleSet(
            tokenizer_fingerprint=self.tokenizer_fingerprint,
            vocab_size=self.vocab_size,
            threshold=self.threshold,
            ngrams=pick(self.ngrams),
            counts=pick(self.counts),
            meta={**self.meta, **(meta or {})},
            harm=pick(self.harm),
            harm_counts=pick(self.harm_counts),
        )

    # ---- checks --------------------------------------------------------------------------------
    def check_tokenizer(self, tokenizer, what: str = "tokenizer") -> None:
        """Raise MismatchError unless these rules were mined with this tokenizer's vocabulary."""
        actual = tokenizer_fingerprint(tokenizer)
        if actual != self.tokenizer_fingerprint:
            raise MismatchError(
                f"rules were mined for tokenizer {self.tokenizer_fingerprint}, but the {what} has "
                f"fingerprint {actual}: mine rules with this model's tokenizer (vllm-umim mine)"
            )

    # ---- matching (native ops; Python references live in vllm_umim.ops) ------------------------
    def find_spans(self, sequences: list[list[int]]) -> list[list[int]]:
        """Prefill segmentation of each sequence (pseudocode 3): per position, the rule id where a
        span starts, SINGLE (-1) or COVERED (-2) (``vllm_umim.ops.matcher``)."""
        from vllm_umim.ops import find_spans
        from vllm_umim.ops.matcher import SINGLE

        lengths = [len(s) for s in sequences]
        flat = torch.tensor([t for s in sequences for t in s], dtype=torch.int64)
        cu = torch.tensor([0] + list(np.cumsum(lengths)), dtype=torch.int64)
        if len(self) == 0:
            out = torch.full_like(flat, SINGLE, dtype=torch.int32)
        else:
            out = find_spans(flat, cu, self.padded, self.index, max_n=self.max_n)
        return [out[cu[b] : cu[b + 1]].tolist() for b in range(len(sequences))]

    def match_suffix(self, tail: list[int]) -> int:
        """Decode check (pseudocode 4): rule id of the longest rule ending ``tail`` (raw tokens), or
        NO_MATCH (-1)."""
        from vllm_umim.ops import match_suffix
        from vllm_umim.ops.matcher import NO_MATCH

        if len(self) == 0 or len(tail) < 2:
            return NO_MATCH
        tail = tail[-MAX_SPAN:]
        row = [0] * (MAX_SPAN - len(tail)) + list(tail)
        result = match_suffix(
            torch.tensor([row], dtype=torch.int64),
            torch.tensor([len(tail)], dtype=torch.int32),
            self.padded,
            self.index,
            max_n=self.max_n,
        )
        return int(result[0])

    def summary(self) -> str:
        per_n = ", ".join(f"{n}-grams: {self.count(n)}" for n in self.lengths)
        return (
            f"{len(self)} rules ({per_n}); threshold {self.threshold}; vocab {self.vocab_size}; "
            f"tokenizer {self.tokenizer_fingerprint}; rules {self.fingerprint}"
        )
