"""vLLM general plugin entry point (``vllm.general_plugins`` = ``umim``).

vLLM calls ``register`` in the API process, the EngineCore and every worker. It only installs the
patches of ``vllm_umim.engine.patches``; nothing changes unless ``additional_config["umim"]`` is set.
"""


def register() -> None:
    from vllm_umim.engine.patches import apply_patches

    apply_patches()
