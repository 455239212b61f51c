"""The OpenAI server's wrapped vLLM methods, in one place, pinned to vLLM 0.32.0.

vLLM has no hook for CLI flags, usage fields or per-request metrics, so these methods are wrapped
(installed by this package's own plugin entry point, ``vllm_umim.server.plugin``; the engine's
wrappers are in ``vllm_umim.engine.patches``, which knows nothing of the server):

* ``EngineArgs.add_cli_args``: add the "UMIM" argument group (``--umim-rules``, ``--umim-module``,
  ``--umim-mode``, ``--umim-table-budget-mib``) to ``vllm serve`` and every CLI built on it.
* ``EngineArgs.from_cli_args``: copy the ``--umim-*`` flags into ``additional_config["umim"]`` (vLLM
  copies only its own fields) and check the files: a bad file is one ``vllm serve: error:`` line.
* ``AsyncLLM.generate``: count each finished merged request on the Prometheus counters.
* ``OpenAIServingCompletion.request_output_to_completion_response`` and
  ``OpenAIServingChat.chat_completion_full_generator``: add ``usage.umim`` (merge figures).
* ``OpenAIServingCompletion.completion_stream_generator`` and
  ``OpenAIServingChat.chat_completion_stream_generator``: the same on the final usage chunk.
* ``OpenAIServingResponses._generate_with_builtin_tools`` keeps the engine outputs of every turn
  on the conversation context, and ``OpenAIServingResponses.responses_full_generator`` (which also
  builds the ``response.completed`` event of a stream) adds ``usage.umim`` from them.

``docs/vllm-internals.md`` lists these with every other vLLM internal UMIM relies on; the table it
is generated from (``vllm_umim.engine.internals``) pins each, and ``tests/engine/test_internals.py``
fails loudly, naming the item, when vLLM changes one.
"""

from __future__ import annotations

import functools
from contextlib import aclosing

from vllm.engine.arg_utils import EngineArgs
from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
from vllm.entrypoints.openai.responses.serving import OpenAIServingResponses
from vllm.v1.engine.async_llm import AsyncLLM

from vllm_umim.engine.patches import install_wrappers
from vllm_umim.server.cli_args import add_umim_arguments, apply_umim_options
from vllm_umim.server.metrics import counters, record_finished
from vllm_umim.server.usage import OutputTap, add_to_usage, finished_outputs, keep_finished_outputs, stream_with_usage


def _add_cli_args(original):
    @functools.wraps(original)
    def add_cli_args(parser):
        parser = original(parser)
        add_umim_arguments(parser)
        return parser

    return add_cli_args


def _from_cli_args(original):
    @functools.wraps(original)
    def from_cli_args(cls, args):
        engine_args = original(cls, args)
        if apply_umim_options(engine_args, args):
            counters()  # on /metrics (at 0) from the start
        return engine_args

    return from_cli_args


def _generate(original):
    @functools.wraps(original)
    async def generate(self, *args, **kwargs):
        async with aclosing(original(self, *args, **kwargs)) as outputs:
            async for output in outputs:
                if output.finished:
                    record_finished(output)
                yield output

    return generate


def _request_output_to_completion_response(original):
    @functools.wraps(original)
    def request_output_to_completion_response(self, final_res_batch, *args, **kwargs):
        response = original(self, final_res_batch, *args, **kwargs)
        add_to_usage(response.usage, final_res_batch)
        return response

    return request_output_to_completion_response


def _completion_stream_generator(original):
    @functools.wraps(original)
    def completion_stream_generator(self, request, engine_inputs, result_generator, *args, **kwargs):
        tap = OutputTap(result_generator)
        return stream_with_usage(original(self, request, engine_inputs, tap, *args, **kwargs), tap)

    return completion_stream_generator


def _chat_completion_full_generator(original):
    @functools.wraps(original)
    async def chat_completion_full_generator(self, request, result_generator, *args, **kwargs):
        tap = OutputTap(result_generator)
        response = await original(self, request, tap, *args, **kwargs)
        add_to_usage(getattr(response, "usage", None), tap.finished)
        return response

    return chat_completion_full_generator


def _chat_completion_stream_generator(original):
    @functools.wraps(original)
    def chat_completion_stream_generator(self, request, result_generator, *args, **kwargs):
        tap = OutputTap(result_generator)
        return stream_with_usage(original(self, request, tap, *args, **kwargs), tap)

    return chat_completion_stream_generator


def _generate_with_builtin_tools(original):
    @functools.wraps(original)
    def _generate_with_builtin_tools(self, request_id, engine_input, sampling_params, context, *args, **kwargs):
        keep_finished_outputs(context)
        return original(self, request_id, engine_input, sampling_params, context, *args, **kwargs)

    return _generate_with_builtin_tools


def _responses_full_generator(original):
    @functools.wraps(original)
    async def responses_full_generator(self, request, sampling_params, result_generator, context, *args, **kwargs):
        response = await original(self, request, sampling_params, result_generator, context, *args, **kwargs)
        add_to_usage(getattr(response, "usage", None), finished_outputs(context))
        return response

    return responses_full_generator


# (owner, attribute, wrapper factory); the signature each wrapper relies on is pinned in
# vllm_umim.engine.internals (one inventory of every vLLM internal UMIM relies on)
PATCHED = [
    (EngineArgs, "add_cli_args", _add_cli_args),
    (EngineArgs, "from_cli_args", _from_cli_args),
    (AsyncLLM, "generate", _generate),
    (OpenAIServingCompletion, "request_output_to_completion_response", _request_output_to_completion_response),
    (OpenAIServingCompletion, "completion_stream_generator", _completion_stream_generator),
    (OpenAIServingChat, "chat_completion_full_generator", _chat_completion_full_generator),
    (OpenAIServingChat, "chat_completion_stream_generator", _chat_completion_stream_generator),
    (OpenAIServingResponses, "_generate_with_builtin_tools", _generate_with_builtin_tools),
    (OpenAIServingResponses, "responses_full_generator", _responses_full_generator),
]


def apply_patches() -> None:
    """Idempotent: install the server's wrappers (the engine's too: the server needs both)."""
    from vllm_umim.engine.patches import apply_patches as apply_engine_patches

    apply_engine_patches()
    install_wrappers(PATCHED)
