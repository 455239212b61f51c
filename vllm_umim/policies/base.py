"""The merge policy interface and the segmentation it produces.

A *segmentation* of raw tokens is a list of *elements*: a plain token, or a merged span (one rule
id) that becomes one position. Every consumer reads segmentations, never the matcher's raw codes:
the engine (compressed prompt ids), the reference runtime (its elements), training and evaluation
(App. C windows).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from vllm_umim.errors import AlignmentError
from vllm_umim.ops.matcher import COVERED, SINGLE
from vllm_umim.rules import RuleSet

NO_MERGE = -1  # MergePolicy.decode_rule: the newest tokens are not merged (now)


@dataclass(frozen=True)
class DecodeMerge:
    """A decode-time merge: the ``length`` raw tokens at compressed index ``start`` become rule
    ``rule_id``; the elements after them (a raw recent window) move ``length - 1`` to the left."""

    rule_id: int
    start: int
    length: int


@dataclass
class Segmentation:
    """Raw ``tokens`` as elements: element j is ``tokens[starts[j]:ends[j]]``, merged as rule
    ``rule_ids[j]`` or a plain token (rule id -1)."""

    tokens: list[int]
    rule_ids: list[int]
    starts: list[int]
    ends: list[int]  # exclusive

    @property
    def num_elements(self) -> int:
        return len(self.rule_ids)

    @property
    def num_merged(self) -> int:
        return sum(r >= 0 for r in self.rule_ids)

    @property
    def first_merge(self) -> int:
        """Index of the first merged element (``num_elements`` if none)."""
        return next((j for j, r in enumerate(self.rule_ids) if r >= 0), self.num_elements)

    def merged_spans(self) -> list[list[int]]:
        """The tokens of each merged element, in order."""
        return [self.tokens[s:e] for r, s, e in zip(self.rule_ids, self.starts, self.ends) if r >= 0]

    def compressed_ids(self, virtual_base: int) -> list[int]:
        """One id per element: the token, or ``virtual_base + rule id`` for a merged span."""
        return [virtual_base + r if r >= 0 else self.tokens[s] for r, s in zip(self.rule_ids, self.starts)]

    @classmethod
    def from_spans(cls, tokens: list[int], spans: list[int], rules: RuleSet) -> "Segmentation":
        """Decode the matcher's per-position codes (rule id where a span starts, SINGLE, COVERED),
        checking that every span is its rule's tokens."""
        table, lengths = rules.padded.numpy(), rules.span_lengths.numpy()
        rule_ids, starts, ends = [], [], []
        i = 0
        while i < len(tokens):
            rule_id = spans[i]
            if rule_id == COVERED:
                raise AlignmentError(f"position {i} is covered by a span that does not start before it")
            n = int(lengths[rule_id]) if rule_id != SINGLE else 1
            if rule_id != SINGLE and not np.array_equal(table[rule_id, :n], tokens[i : i + n]):
                raise AlignmentError(f"rule {rule_id} does not match the tokens at {i}")
            rule_ids.append(rule_id)
            starts.append(i)
            ends.append(i + n)
            i += n
        return cls(list(tokens), rule_ids, starts, ends)


class MergePolicy(ABC):
    """Which n-grams of a rule set are merged, at prefill and at decode.

    A policy answers two questions: ``segment`` (the prompt's spans) and ``decode_rule`` (does the
    span the plain tokens at the decode *frontier* complete merge now?). The frontier is the
    newest token, or, with a raw recent window of W tokens (``window``), the token W places
    before it. ``decode_merge`` finds the frontier on a compressed sequence; every consumer (the
    engine's scheduler, the reference runtime) calls it, so they decide identically.
    """

    def __init__(self, rules: RuleSet):
        self.rules = rules

    @property
    def max_span(self) -> int:
        """Longest span this policy merges (how many tokens a decode check looks at)."""
        return self.rules.max_n

    @property
    def window(self) -> int:
        """Raw tokens kept unmerged behind the newest one (0: merge as soon as a span completes)."""
        return 0

    @property
    def needs_confidence(self) -> bool:
        """Whether ``decode_rule`` reads the sampled tokens' probabilities."""
        return False

    @abstractmethod
    def segment(self, sequences: list[list[int]]) -> list[Segmentation]:
        """Prefill: the segmentation of each raw token sequence."""

    @abstractmethod
    def decode_rule(self, plain_tokens: list[int], confidences: list[float | None]) -> int:
        """Decode: the rule to merge now, given the plain tokens ending at the frontier (at most
        ``max_span``, the newest last) and the probability the model gave each when it was
        sampled (None for a prompt token), or ``NO_MERGE``."""

    def decode_merge(self, ids: list[int], virtual_base: int, output_confidences: list[float] = ()) -> DecodeMerge | None:
        """The merge to make now on compressed sequence ``ids`` (plain tokens below
        ``virtual_base``, merged spans at or above it), right after a sampled token was appended.

        ``output_confidences[i]`` is the probability of raw output token i when it was sampled;
        only a policy that ``needs_confidence`` reads it (missing entries count as unknown).
        """
        frontier = len(ids) - self.window  # ids[frontier:] is the raw window: plain, unmerged
        tail = []
        for token in reversed(ids[max(frontier - self.max_span, 0) : max(frontier, 0)]):
            if token >= virtual_base:
                break
            tail.append(token)
        if len(tail) < 2:
            return None
        tail.reverse()
        # The frontier token is raw output token (outputs - 1 - window); older ones may be prompt.
        last = len(output_confidences) - 1 - self.window
        confidences = [output_confidences[i] if i >= 0 else None for i in range(last - len(tail) + 1, last + 1)]
        rule_id = self.decode_rule(tail, confidences)
        if rule_id == NO_MERGE:
            return None
        length = int(self.rules.span_lengths[rule_id])
        return DecodeMerge(rule_id, frontier - length, length)


class PolicyWrapper(MergePolicy):
    """A policy that refines another (``inner``): it delegates what it does not change."""

    def __init__(self, inner: MergePolicy):
        super().__init__(inner.rules)
        self.inner = inner

    @property
    def max_span(self) -> int:
        return self.inner.max_span

    @property
    def window(self) -> int:
        return self.inner.window

    @property
    def needs_confidence(self) -> bool:
        return self.inner.needs_confidence

    def segment(self, sequences: list[list[int]]) -> list[Segmentation]:
        return self.inner.segment(sequences)

    def decode_rule(self, plain_tokens: list[int], confidences: list[float | None]) -> int:
        return self.inner.decode_rule(plain_tokens, confidences)
