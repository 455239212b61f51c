"""vLLM integration (paper §3.4, App. D): one module per vLLM component it extends.

``config`` (options, refused setups) · ``assets`` (rules and module files: load, check,
fingerprint) · ``patches`` (the engine's wrapped vLLM methods) · ``internals`` (every vLLM internal
UMIM relies on, pinned; rendered as docs/vllm-internals.md) · ``version`` (the supported vLLM) ·
``plugin`` (entry point; inert on another vLLM) · ``ray_executor`` (vLLM's Ray executor on CPU) ·
``sequence`` (compressed sequence of a request) · ``scheduler`` · ``model_runner`` · ``embedding``
(surrogate inputs) · ``worker`` · ``stats`` (per-request figures). Nothing here imports the server.
"""
