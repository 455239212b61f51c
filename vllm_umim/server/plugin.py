"""vLLM general plugin entry point of the server layer (``vllm.general_plugins`` = ``umim_server``).

vLLM calls ``register`` in every process it starts (API server, EngineCore, workers), beside the
engine's own ``umim`` entry point. It installs ``vllm_umim.server.patches`` (the ``--umim-*`` flags,
``usage.umim``, ``/metrics`` counters); nothing changes for a request unless UMIM is configured.
"""


def register() -> None:
    from vllm_umim.server.patches import apply_patches

    apply_patches()
