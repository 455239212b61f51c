"""Merge policies: *what* gets merged (paper §3.4, App. D; related methods in later files).

A policy decides, from the raw tokens and the rule table, which spans merge in a prompt and
whether the span completed at the decode frontier is merged now. The engine's scheduler and the
reference runtime use the same policy object, so engine == reference holds per policy.

``base`` (``MergePolicy``, ``PolicyWrapper``, ``Segmentation``) · ``greedy_longest`` (the paper's
policy) · ``raw_window`` (the newest W tokens stay raw) · ``confidence_gate`` (decode merges only
of confidently sampled spans) · ``settings`` (engine / per-request options → a policy).
"""

from vllm_umim.policies.base import DecodeMerge, MergePolicy, PolicyWrapper, Segmentation
from vllm_umim.policies.confidence_gate import ConfidenceGate
from vllm_umim.policies.greedy_longest import GreedyLongestMatch
from vllm_umim.policies.raw_window import RawRecentWindow
from vllm_umim.policies.settings import MergeSettings

__all__ = [
    "ConfidenceGate", "DecodeMerge", "GreedyLongestMatch", "MergePolicy", "MergeSettings", "PolicyWrapper",
    "RawRecentWindow", "Segmentation",
]
