"""Merge settings as engine options and per-request options, and the policy they build.

One frozen value object per combination, so the engine builds each policy once and a request
names its settings in ``SamplingParams(extra_args={"umim": {...}})``::

    {"mode": "dynamic", "window": 16, "min_confidence": 0.5}
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_umim.errors import OptionError
from vllm_umim.policies.base import MergePolicy
from vllm_umim.policies.confidence_gate import ConfidenceGate
from vllm_umim.policies.greedy_longest import GreedyLongestMatch
from vllm_umim.policies.raw_window import RawRecentWindow
from vllm_umim.rules import RuleSet

MODES = ("dynamic", "prompt")
# Largest raw recent window (and engine max_window): a decode merge rolls back up to max_span - 1 +
# max_window positions, which stay out of the prefix cache and are recomputed. 128 covers the
# longest continuation a log-likelihood evaluation keeps raw (vllm_umim.evaluation.harness, 64).
MAX_WINDOW = 128


@dataclass(frozen=True)
class MergeSettings:
    """``mode``: "dynamic" (prompt and decode merging, pseudocode 4) or "prompt" (pseudocode 3);
    ``window``: raw recent window W (``RawRecentWindow``); ``min_confidence``: decode gate
    (``ConfidenceGate``, 0 = off)."""

    mode: str = "dynamic"
    window: int = 0
    min_confidence: float = 0.0

    FIELDS = ("mode", "window", "min_confidence")

    def __post_init__(self):
        if self.mode not in MODES:
            raise OptionError(f"mode must be one of {MODES}, got {self.mode!r}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or not 0 <= self.window <= MAX_WINDOW:
            raise OptionError(f"window must be an integer from 0 to {MAX_WINDOW}, got {self.window!r}")
        c = self.min_confidence
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0.0 <= c <= 1.0:
            raise OptionError(f"min_confidence must be a number in [0, 1], got {c!r}")

    @property
    def dynamic(self) -> bool:
        return self.mode == "dynamic"

    def as_options(self) -> dict:
        """Every field by name: the form ``with_options`` and ``extra_args["umim"]`` take."""
        return {name: getattr(self, name) for name in self.FIELDS}

    def with_options(self, options: dict) -> "MergeSettings":
        """These settings with ``options`` (a subset of FIELDS) overriding them."""
        unknown = set(options) - set(self.FIELDS)
        if unknown:
            raise OptionError(f"unknown merge option(s) {sorted(unknown)}; expected {', '.join(self.FIELDS)}")
        merged = {**self.as_options(), **options}
        if isinstance(merged["min_confidence"], int) and not isinstance(merged["min_confidence"], bool):
            merged["min_confidence"] = float(merged["min_confidence"])
        return MergeSettings(**merged)

    def build(self, rules: RuleSet) -> MergePolicy:
        """The paper's greedy longest match, gated and windowed as these settings say."""
        policy: MergePolicy = GreedyLongestMatch(rules)
        if self.min_confidence > 0:
            policy = ConfidenceGate(policy, self.min_confidence)
        if self.window > 0:
            policy = RawRecentWindow(policy, self.window)
        return policy
