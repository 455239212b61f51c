"""Confidence gating at decode: merge a generated span only where the model found it predictable.

QuickMerge++ merges the tokens the model attends to diffusely and keeps salient ones intact;
selective expansion keeps important spans raw (see ``docs/related-methods.md`` in the shared
docs). The signal here is the cheapest one an engine has at decode: the probability the model
gave each of the span's tokens when it sampled it (its own softmax at temperature 1, before any
sampling parameter). A span merges only if every one of its tokens was sampled with probability
>= ``min_confidence``; a span reaching back into the prompt (no such probability) is not merged
at decode. Prompt merging is the inner policy's, unchanged (rule selection by harm,
``vllm-umim select-rules``, is the prompt-side gate).
"""

from __future__ import annotations

from vllm_umim.errors import OptionError
from vllm_umim.policies.base import NO_MERGE, MergePolicy, PolicyWrapper


class ConfidenceGate(PolicyWrapper):
    def __init__(self, inner: MergePolicy, min_confidence: float):
        super().__init__(inner)
        if not 0.0 <= min_confidence <= 1.0:
            raise OptionError(f"min_confidence must be in [0, 1], got {min_confidence}")
        self.min_confidence = min_confidence

    @property
    def needs_confidence(self) -> bool:
        return True

    def decode_rule(self, plain_tokens: list[int], confidences: list[float | None]) -> int:
        rule_id = self.inner.decode_rule(plain_tokens, confidences)
        if rule_id == NO_MERGE:
            return NO_MERGE
        span = confidences[-int(self.rules.span_lengths[rule_id]) :]
        confident = all(c is not None and c >= self.min_confidence for c in span)
        return rule_id if confident else NO_MERGE
