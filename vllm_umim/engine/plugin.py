"""vLLM general plugin entry point (``vllm.general_plugins`` = ``umim``).

vLLM calls ``register`` in the API process, the EngineCore and every worker. On the supported vLLM
(``vllm_umim.engine.version``) it installs the wrappers of ``vllm_umim.engine.patches``; nothing
changes unless ``additional_config["umim"]`` is set.

On any other vLLM it logs one warning and installs none of them, so every vLLM command that does
not ask for UMIM runs as if this package were absent. The one thing it adds there is a pass-through
check on ``EngineArgs.create_engine_config`` that refuses ``additional_config["umim"]`` with one
line naming both versions (without it, an engine asked for UMIM would silently run without it).
"""

from __future__ import annotations

import functools
import logging

from vllm_umim.engine.version import check_vllm_version, vllm_supported, warn_inert_once

logger = logging.getLogger("vllm.umim")  # under vLLM's own logger: its format and handler
GUARD_MARK = "umim_version_guard"


def register() -> None:
    if vllm_supported():
        from vllm_umim.engine.patches import apply_patches

        apply_patches()
        return
    warn_inert_once(logger)
    install_version_guard()


def install_version_guard() -> None:
    """On an unsupported vLLM: refuse ``additional_config["umim"]`` at the engine config step.
    Written against no particular vLLM signature; does nothing where vLLM has no such method."""
    try:
        from vllm.engine.arg_utils import EngineArgs

        original = EngineArgs.create_engine_config
    except (ImportError, AttributeError):
        return
    if getattr(original, GUARD_MARK, False):
        return

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        if "umim" in (getattr(self, "additional_config", None) or {}):
            check_vllm_version(asked_by="additional_config['umim']")
        return original(self, *args, **kwargs)

    setattr(create_engine_config, GUARD_MARK, True)
    EngineArgs.create_engine_config = create_engine_config
