"""Plain HF-transformers implementation of the paper's inference algorithms (App. D): the oracle."""

from vllm_umim.reference.runtime import Element, Generation, ReferenceRuntime, bracketed, merge_after_token, merge_prompt

__all__ = ["Element", "Generation", "ReferenceRuntime", "bracketed", "merge_after_token", "merge_prompt"]
