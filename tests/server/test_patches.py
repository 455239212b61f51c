"""The server's wrappers are installed and keep what they wrap callable as vLLM calls it. What they
wrap is pinned with every other vLLM internal in ``tests/engine/test_internals.py``."""

import inspect

from vllm_umim.engine.patches import unwrapped
from vllm_umim.server.patches import PATCHED, apply_patches


def test_every_wrapper_is_installed():
    apply_patches()
    assert unwrapped(PATCHED) == []


def test_wrapped_static_and_class_methods_keep_their_kind():
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    apply_patches()
    assert isinstance(inspect.getattr_static(EngineArgs, "add_cli_args"), staticmethod)
    assert isinstance(inspect.getattr_static(EngineArgs, "from_cli_args"), classmethod)
    assert AsyncEngineArgs.from_cli_args.__func__ is EngineArgs.from_cli_args.__func__  # inherited, so wrapped too
    assert inspect.isasyncgenfunction(AsyncLLM.generate)
    assert inspect.isasyncgenfunction(AsyncLLM.generate.umim_original)


def test_server_entry_point_is_registered():
    from importlib.metadata import entry_points

    plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert plugins.get("umim") == "vllm_umim.engine.plugin:register"
    assert plugins.get("umim_server") == "vllm_umim.server.plugin:register"
