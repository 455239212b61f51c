"""Merge policies: *what* gets merged (paper §3.4, App. D; related methods in later files).

A policy decides, from the raw tokens and the rule table, which spans merge in a prompt and
whether the span the newest decoded token completes is merged now. The engine's scheduler and the
reference runtime use the same policy object, so engine == reference holds per policy.

``base`` (``MergePolicy``, ``Segmentation``) · ``greedy_longest`` (the paper's policy).
"""

from vllm_umim.policies.base import MergePolicy, Segmentation
from vllm_umim.policies.greedy_longest import GreedyLongestMatch

__all__ = ["GreedyLongestMatch", "MergePolicy", "Segmentation"]
