"""vLLM general plugin entry point of the server layer (``vllm.general_plugins`` = ``umim_server``).

vLLM calls ``register`` in every process it starts (API server, EngineCore, workers), beside the
engine's own ``umim`` entry point. It installs ``vllm_umim.server.patches`` (the ``--umim-*`` flags,
``usage.umim``, ``/metrics`` counters); nothing changes for a request unless UMIM is configured.

On a vLLM other than the supported one (``vllm_umim.engine.version``) it installs nothing; a command
line with ``--umim-*`` flags is then refused with one line naming both versions (the engine's entry
point logs the warning and refuses ``additional_config["umim"]``).
"""

from __future__ import annotations

import sys

from vllm_umim.engine.version import unsupported_message, umim_flags_in, vllm_supported


def register() -> None:
    if vllm_supported():
        from vllm_umim.server.patches import apply_patches

        apply_patches()
        return
    flags = umim_flags_in(sys.argv[1:])
    if flags:
        raise SystemExit(f"error: {unsupported_message(asked_by=' '.join(dict.fromkeys(flags)))}")
