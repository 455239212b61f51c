"""vLLM integration (paper §3.4, App. D): one module per vLLM component it extends.

``config`` (options, refused setups) · ``assets`` (rules and module files: load, check,
fingerprint) · ``patches`` (the engine's wrapped vLLM methods, pinned) · ``plugin`` (entry point) ·
``sequence`` (compressed sequence of a request) · ``scheduler`` · ``model_runner`` · ``embedding``
(surrogate inputs) · ``worker`` · ``stats`` (per-request figures). Nothing here imports the server.
"""
