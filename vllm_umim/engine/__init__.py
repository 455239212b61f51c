"""vLLM integration (paper §3.4, App. D): one module per vLLM component it extends.

``config`` (options, refused setups) · ``patches`` (the one wrapped vLLM method) · ``plugin``
(entry point) · ``sequence`` (compressed sequence of a request) · ``scheduler`` · ``model_runner``
· ``embedding`` (surrogate inputs) · ``worker`` · ``stats`` (per-request figures).
"""
