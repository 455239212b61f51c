"""The paper's merge policy: every rule occurrence, longest first (paper §3.4, App. D).

* prefill (pseudocode 3): for n = 4, 3, 2, scan left to right and merge each occurrence of an
  n-gram rule whose tokens are all still unmerged;
* decode (pseudocode 4): after each sampled token, if the newest plain tokens end with a rule
  n-gram (longest first), merge them now.

Both run in the native matcher ops (``vllm_umim.ops``, csrc/), whose Python references transcribe
the pseudocode.
"""

from __future__ import annotations

from vllm_umim.ops.matcher import NO_MATCH
from vllm_umim.policies.base import NO_MERGE, MergePolicy, Segmentation


class GreedyLongestMatch(MergePolicy):
    def segment(self, sequences: list[list[int]]) -> list[Segmentation]:
        if not sequences:
            return []
        spans = self.rules.find_spans(sequences)
        return [Segmentation.from_spans(tokens, codes, self.rules) for tokens, codes in zip(sequences, spans)]

    def decode_rule(self, plain_tokens: list[int], confidences: list[float | None]) -> int:
        rule_id = self.rules.match_suffix(plain_tokens)
        return NO_MERGE if rule_id == NO_MATCH else rule_id
