"""Raw recent window: the newest W tokens are never merged (token compression with selective
expansion keeps a window of the most recent T_w tokens uncompressed; see
``docs/related-methods.md`` in the shared docs).

* prefill: the prompt's last W tokens stay raw; the inner policy segments the rest;
* decode: the frontier is W tokens behind the newest one: a span merges once its last token is
  W tokens old. The W raw tokens after it then move to new positions, so the engine rolls back
  to the span's start and recomputes them (1 + W positions instead of 1): the price of the window.

W = 0 is the inner policy unchanged.
"""

from __future__ import annotations

from vllm_umim.errors import OptionError
from vllm_umim.ops.matcher import SINGLE
from vllm_umim.policies.base import MergePolicy, PolicyWrapper, Segmentation


class RawRecentWindow(PolicyWrapper):
    def __init__(self, inner: MergePolicy, window: int):
        super().__init__(inner)
        if window < 0:
            raise OptionError(f"window must be >= 0, got {window}")
        self._window = window

    @property
    def window(self) -> int:
        return self._window

    def segment(self, sequences: list[list[int]]) -> list[Segmentation]:
        cut = [max(len(tokens) - self._window, 0) for tokens in sequences]
        heads = self.inner.segment([list(tokens[:n]) for tokens, n in zip(sequences, cut)])
        return [with_raw_tail(head, tokens) for head, tokens in zip(heads, sequences)]


def with_raw_tail(head: Segmentation, tokens: list[int]) -> Segmentation:
    """``head`` (a segmentation of a prefix of ``tokens``) followed by the rest as plain tokens."""
    rest = range(len(head.tokens), len(tokens))
    return Segmentation(
        list(tokens),
        head.rule_ids + [SINGLE] * len(rest),
        head.starts + list(rest),
        head.ends + [i + 1 for i in rest],
    )
