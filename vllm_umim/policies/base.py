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
    """Which n-grams of a rule set are merged, at prefill and at decode."""

    def __init__(self, rules: RuleSet):
        self.rules = rules

    @property
    def max_span(self) -> int:
        """Longest span this policy merges (how many newest tokens a decode check looks at)."""
        return self.rules.max_n

    @abstractmethod
    def segment(self, sequences: list[list[int]]) -> list[Segmentation]:
        """Prefill: the segmentation of each raw token sequence."""

    @abstractmethod
    def decode_rule(self, newest_plain_tokens: list[int]) -> int:
        """Decode: the rule to merge now, given the trailing plain tokens (at most ``max_span``,
        the newest last), or ``NO_MERGE``."""
