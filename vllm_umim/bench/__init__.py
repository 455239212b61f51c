"""The throughput benchmarks: vllm_umim next to stock vLLM on natural text.

* ``vllm-umim bench`` (``harness``, ``worker``, ``workloads``, ``summary``): both engines in their own
  processes, served alternately; ``throughput.json``, ``.md`` and ``.png``.
* ``vllm-umim bench-pair`` (:mod:`vllm_umim.bench.pair`): vLLM's own ``vllm bench throughput`` with and without
  ``--umim-rules``.
* ``tables``: the one Markdown-table writer (``throughput.md`` and the repository's results page).

This layer sits on the engine: it imports neither ``vllm_umim.server`` nor ``vllm_umim.cli``
(the ``--umim-*`` flags come through vLLM's plugin loader, as in ``vllm serve``).
"""
