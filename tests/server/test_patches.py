"""The server's wrapped vLLM methods still exist with the parameters they rely on (vLLM 0.32.0)."""

import inspect

from vllm_umim.engine.patches import pin_violations
from vllm_umim.server.patches import PATCHED, apply_patches


def test_patched_methods_keep_their_signatures():
    apply_patches()
    assert pin_violations(PATCHED) == []


def test_wrapped_static_and_class_methods_keep_their_kind():
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    apply_patches()
    assert isinstance(inspect.getattr_static(EngineArgs, "add_cli_args"), staticmethod)
    assert isinstance(inspect.getattr_static(EngineArgs, "from_cli_args"), classmethod)
    assert AsyncEngineArgs.from_cli_args.__func__ is EngineArgs.from_cli_args.__func__  # inherited, so wrapped too
    assert inspect.isasyncgenfunction(AsyncLLM.generate)
    assert inspect.isasyncgenfunction(AsyncLLM.generate.umim_original)


def test_serving_methods_still_build_usage_where_wrapped():
    """The usage wrappers rely on where vLLM builds usage: in these methods' own bodies."""
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion

    apply_patches()
    for owner, name in [
        (OpenAIServingCompletion, "request_output_to_completion_response"),
        (OpenAIServingCompletion, "completion_stream_generator"),
        (OpenAIServingChat, "chat_completion_full_generator"),
        (OpenAIServingChat, "chat_completion_stream_generator"),
    ]:
        source = inspect.getsource(getattr(owner, name).umim_original)
        assert "UsageInfo(" in source, f"{owner.__name__}.{name} no longer builds the usage object"
    stream_source = inspect.getsource(OpenAIServingChat.chat_completion_stream_generator.umim_original)
    assert "choices=[]" in stream_source and "usage=final_usage" in stream_source


def test_server_entry_point_is_registered():
    from importlib.metadata import entry_points

    plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert plugins.get("umim") == "vllm_umim.engine.plugin:register"
    assert plugins.get("umim_server") == "vllm_umim.server.plugin:register"
