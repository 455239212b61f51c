"""vllm_umim: UMIM token merging (Universal Multi-step Input Merging) for vLLM.

Read top-down: ``rules`` (which n-grams merge, §3.1), ``ops`` (native matcher), ``module`` (the
merge module, §3.2), ``training`` (distillation, §3.3), ``evaluation`` (App. C, F.2),
``reference`` (plain HF implementation of App. D, the correctness oracle), ``engine`` (vLLM
integration), ``server`` and ``cli``.
"""

__version__ = "0.1.0"

from vllm_umim.engine.stats import merge_stats  # noqa: E402  (light: no vLLM import)

__all__ = ["merge_stats", "__version__"]
