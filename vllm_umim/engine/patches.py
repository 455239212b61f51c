"""Every change vLLM needs beyond its extension points, in one place, pinned to vLLM 0.32.0.

UMIM's scheduler and worker are selected through vLLM's own ``scheduler_cls`` / ``worker_cls``
config. vLLM has no hook that turns them on from ``additional_config``, nor one for CLI flags, usage
fields or per-request metrics, so these methods are wrapped (the work is in ``vllm_umim.server``):

* ``EngineArgs.create_engine_config``: when ``additional_config["umim"]`` is present, check the
  rules / module / tokenizer files (one clear error before any engine process starts), select the
  UMIM scheduler and worker, turn vLLM's "auto" async scheduling off (refuse it when asked for
  explicitly), choose the V1 model runner where the user left it to vLLM, and refuse unsupported
  setups.
* ``InputProcessor._validate_params``: reject a bad ``extra_args["umim"]`` in the API process
  (LLM.generate raises a ValueError, the OpenAI server answers 400), never in the engine, and
  turn ``vllm_xargs``' 0 / 1 (pydantic's coercion of JSON false / true) back into booleans.
* ``EngineArgs.add_cli_args``: add the "UMIM" argument group (``--umim-rules``, ``--umim-module``,
  ``--umim-mode``) to ``vllm serve`` and every CLI built on it.
* ``EngineArgs.from_cli_args``: copy the ``--umim-*`` flags into ``additional_config["umim"]`` (vLLM
  copies only its own fields) and check the files: a bad file is one ``vllm serve: error:`` line.
* ``RequestState.make_request_output``: with ``n > 1`` vLLM gives the request's output the KV
  transfer parameters of whichever sample finished last; sum every sample's merge figures instead.
* ``AsyncLLM.generate``: count each finished merged request on the Prometheus counters.
* ``OpenAIServingCompletion.request_output_to_completion_response`` and
  ``OpenAIServingChat.chat_completion_full_generator``: add ``usage.umim`` (merge figures).
* ``OpenAIServingCompletion.completion_stream_generator`` and
  ``OpenAIServingChat.chat_completion_stream_generator``: the same on the final usage chunk.
* ``OpenAIServingResponses._generate_with_builtin_tools`` keeps the engine outputs of every turn
  on the conversation context, and ``OpenAIServingResponses.responses_full_generator`` (which also
  builds the ``response.completed`` event of a stream) adds ``usage.umim`` from them.

``tests/engine/test_patches.py`` fails loudly when vLLM changes what these wrap.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import aclosing

import vllm
from vllm.engine.arg_utils import EngineArgs
from vllm.exceptions import VLLMValidationError
from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
from vllm.entrypoints.openai.responses.serving import OpenAIServingResponses
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.input_processor import InputProcessor
from vllm.v1.engine.output_processor import RequestState

from vllm_umim.engine.config import CONFIG_KEY, UmimConfig, check_vllm_config, prefer_v1_model_runner
from vllm_umim.errors import UmimError

PINNED_VLLM = "0.32.0"
SCHEDULER_CLS = "vllm_umim.engine.scheduler.UmimScheduler"
CPU_WORKER_CLS = "vllm_umim.engine.worker.UmimCPUWorker"
GPU_WORKER_CLS = "vllm_umim.engine.worker.UmimGPUWorker"

# (owner, attribute, the parameters the wrapper relies on)
PATCHED = [
    (EngineArgs, "create_engine_config", ("self", "usage_context", "headless")),
    (InputProcessor, "_validate_params", ("self", "params", "supported_tasks")),
    (EngineArgs, "add_cli_args", ("parser",)),
    (EngineArgs, "from_cli_args", ("cls", "args")),
    (RequestState, "make_request_output", (
        "self", "new_token_ids", "pooling_output", "finish_reason", "stop_reason", "kv_transfer_params",
        "ec_transfer_params", "error",
    )),
    (AsyncLLM, "generate", (
        "self", "prompt", "sampling_params", "request_id", "prompt_text", "lora_request", "tokenization_kwargs",
        "trace_headers", "priority", "data_parallel_rank", "session_id", "kv_hints", "reasoning_ended",
        "reasoning_parser_kwargs",
    )),
    (OpenAIServingCompletion, "request_output_to_completion_response", (
        "self", "final_res_batch", "request", "request_id", "created_time", "model_name", "tokenizer",
        "request_metadata",
    )),
    (OpenAIServingCompletion, "completion_stream_generator", (
        "self", "request", "engine_inputs", "result_generator", "request_id", "created_time", "model_name",
        "num_prompts", "tokenizer", "request_metadata",
    )),
    (OpenAIServingChat, "chat_completion_full_generator", (
        "self", "request", "result_generator", "request_id", "model_name", "conversation", "tokenizer",
        "request_metadata", "parser", "mm_token_counts",
    )),
    (OpenAIServingChat, "chat_completion_stream_generator", (
        "self", "request", "result_generator", "request_id", "model_name", "conversation", "tokenizer",
        "request_metadata", "chat_template_kwargs", "mm_token_counts",
    )),
    (OpenAIServingResponses, "_generate_with_builtin_tools", (
        "self", "request_id", "engine_input", "sampling_params", "context", "tok_params", "lora_request", "priority",
        "trace_headers", "session_id", "reasoning_parser_kwargs",
    )),
    (OpenAIServingResponses, "responses_full_generator", (
        "self", "request", "sampling_params", "result_generator", "context", "model_name", "tokenizer",
        "request_metadata", "created_time",
    )),
]
REQUEST_CHOICES = (True, False, "prompt", "dynamic")


def check_vllm_version() -> None:
    if vllm.__version__.split("+")[0] != PINNED_VLLM:
        raise RuntimeError(
            f"vllm_umim {__name__} is written against vLLM {PINNED_VLLM}, found {vllm.__version__}; "
            "re-check the patched methods (tests/engine/test_patches.py) before using this version"
        )


def validate_umim_files(engine_args: EngineArgs, config: UmimConfig) -> str:
    """Load rules and module once in the API process and check them against model and tokenizer;
    returns their content fingerprint."""
    from transformers import AutoConfig, AutoTokenizer

    from vllm_umim.engine.assets import files_fingerprint, load_engine_module, load_engine_rules

    rules = load_engine_rules(config.rules)
    tokenizer_path = engine_args.tokenizer or engine_args.model
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=engine_args.trust_remote_code)
    rules.check_tokenizer(tokenizer, what=f"tokenizer of {tokenizer_path}")
    hf_config = AutoConfig.from_pretrained(engine_args.model, trust_remote_code=engine_args.trust_remote_code)
    load_engine_module(config, hf_config, rules)
    return files_fingerprint(config, rules)


def _umim_create_engine_config(original):
    @functools.wraps(original)
    def create_engine_config(self: EngineArgs, *args, **kwargs):
        options = (self.additional_config or {}).get(CONFIG_KEY)
        if options is None:
            return original(self, *args, **kwargs)
        config = UmimConfig.from_dict(options)
        fingerprint = validate_umim_files(self, config)
        self.additional_config = {**self.additional_config, CONFIG_KEY: {**options, "fingerprint": fingerprint}}
        if self.scheduler_cls not in (None, SCHEDULER_CLS):
            raise UmimError(f"UMIM brings its own scheduler; remove scheduler_cls={self.scheduler_cls!r}")
        self.scheduler_cls = SCHEDULER_CLS
        if self.async_scheduling:
            raise UmimError(
                "UMIM cannot run with async scheduling (a merge decided after sampling would arrive one step "
                "late): drop --async-scheduling / async_scheduling=True, or pass --no-async-scheduling"
            )
        self.async_scheduling = False  # vLLM's "auto" (None) would turn it on on GPU
        prefer_v1_model_runner()
        vllm_config = original(self, *args, **kwargs)
        parallel = vllm_config.parallel_config
        if parallel.worker_cls not in ("auto", CPU_WORKER_CLS, GPU_WORKER_CLS, "vllm.v1.worker.cpu_worker.CPUWorker", "vllm.v1.worker.gpu_worker.Worker"):
            raise UmimError(f"UMIM brings its own worker; remove worker_cls={parallel.worker_cls!r}")
        parallel.worker_cls = CPU_WORKER_CLS if vllm_config.device_config.device_type == "cpu" else GPU_WORKER_CLS
        check_vllm_config(vllm_config)
        return vllm_config

    return create_engine_config


class RequestChoiceError(VLLMValidationError, ValueError):
    """A bad ``extra_args["umim"]``: a ValueError for ``LLM.generate`` callers; a validation error
    for the OpenAI server, which answers 400 (a plain ValueError becomes a 500 inside
    ``AsyncLLM.generate``)."""


def request_choice(value):
    """The per-request choice as the engine expects it (True, False, "prompt" or "dynamic").

    The OpenAI server's ``vllm_xargs`` is typed ``str | int | float``, so pydantic turns a JSON
    ``false`` / ``true`` into 0 / 1: those are read as the booleans they were.
    """
    if isinstance(value, int) and value in (0, 1):  # bool is an int too
        return bool(value)
    if isinstance(value, str) and value in REQUEST_CHOICES:
        return value
    raise RequestChoiceError(
        f"extra_args['{CONFIG_KEY}'] must be true, false, 'prompt' or 'dynamic', got {value!r}", parameter="vllm_xargs"
    )


def _umim_validate_params(original):
    @functools.wraps(original)
    def _validate_params(self, params, *args, **kwargs):
        result = original(self, params, *args, **kwargs)
        extra = getattr(params, "extra_args", None) or {}
        if CONFIG_KEY in extra:
            extra[CONFIG_KEY] = request_choice(extra[CONFIG_KEY])
        return result

    return _validate_params


def _umim_add_cli_args(original):
    @functools.wraps(original)
    def add_cli_args(parser):
        from vllm_umim.server.cli_args import add_umim_arguments

        parser = original(parser)
        add_umim_arguments(parser)
        return parser

    return add_cli_args


def _umim_from_cli_args(original):
    @functools.wraps(original)
    def from_cli_args(cls, args):
        from vllm_umim.server.cli_args import apply_umim_options
        from vllm_umim.server.metrics import counters

        engine_args = original(cls, args)
        if apply_umim_options(engine_args, args):
            counters()  # on /metrics (at 0) from the start
        return engine_args

    return from_cli_args


def _umim_make_request_output(original):
    @functools.wraps(original)
    def make_request_output(self, new_token_ids, pooling_output, finish_reason, stop_reason, kv_transfer_params=None,
                            *args, **kwargs):
        from vllm_umim.engine.stats import STATS_KEY, combine_stats

        parent = self.parent_req
        if parent is not None and finish_reason is not None and kv_transfer_params and STATS_KEY in kv_transfer_params:
            finished_samples = parent.__dict__.setdefault("umim_stats", [])
            finished_samples.append(kv_transfer_params[STATS_KEY])
            kv_transfer_params = {**kv_transfer_params, STATS_KEY: combine_stats(finished_samples)}
        return original(self, new_token_ids, pooling_output, finish_reason, stop_reason, kv_transfer_params, *args, **kwargs)

    return make_request_output


def _umim_generate(original):
    @functools.wraps(original)
    async def generate(self, *args, **kwargs):
        from vllm_umim.server.metrics import record_finished

        async with aclosing(original(self, *args, **kwargs)) as outputs:
            async for output in outputs:
                if output.finished:
                    record_finished(output)
                yield output

    return generate


def _umim_request_output_to_completion_response(original):
    @functools.wraps(original)
    def request_output_to_completion_response(self, final_res_batch, *args, **kwargs):
        from vllm_umim.server.usage import add_to_usage

        response = original(self, final_res_batch, *args, **kwargs)
        add_to_usage(response.usage, final_res_batch)
        return response

    return request_output_to_completion_response


def _umim_completion_stream_generator(original):
    @functools.wraps(original)
    def completion_stream_generator(self, request, engine_inputs, result_generator, *args, **kwargs):
        from vllm_umim.server.usage import OutputTap, stream_with_usage

        tap = OutputTap(result_generator)
        return stream_with_usage(original(self, request, engine_inputs, tap, *args, **kwargs), tap)

    return completion_stream_generator


def _umim_chat_completion_full_generator(original):
    @functools.wraps(original)
    async def chat_completion_full_generator(self, request, result_generator, *args, **kwargs):
        from vllm_umim.server.usage import OutputTap, add_to_usage

        tap = OutputTap(result_generator)
        response = await original(self, request, tap, *args, **kwargs)
        add_to_usage(getattr(response, "usage", None), tap.finished)
        return response

    return chat_completion_full_generator


def _umim_chat_completion_stream_generator(original):
    @functools.wraps(original)
    def chat_completion_stream_generator(self, request, result_generator, *args, **kwargs):
        from vllm_umim.server.usage import OutputTap, stream_with_usage

        tap = OutputTap(result_generator)
        return stream_with_usage(original(self, request, tap, *args, **kwargs), tap)

    return chat_completion_stream_generator


def _umim_generate_with_builtin_tools(original):
    @functools.wraps(original)
    def _generate_with_builtin_tools(self, request_id, engine_input, sampling_params, context, *args, **kwargs):
        from vllm_umim.server.usage import keep_finished_outputs

        keep_finished_outputs(context)
        return original(self, request_id, engine_input, sampling_params, context, *args, **kwargs)

    return _generate_with_builtin_tools


def _umim_responses_full_generator(original):
    @functools.wraps(original)
    async def responses_full_generator(self, request, sampling_params, result_generator, context, *args, **kwargs):
        from vllm_umim.server.usage import add_to_usage, finished_outputs

        response = await original(self, request, sampling_params, result_generator, context, *args, **kwargs)
        add_to_usage(getattr(response, "usage", None), finished_outputs(context))
        return response

    return responses_full_generator


WRAPPERS = {
    "create_engine_config": _umim_create_engine_config,
    "_validate_params": _umim_validate_params,
    "add_cli_args": _umim_add_cli_args,
    "from_cli_args": _umim_from_cli_args,
    "make_request_output": _umim_make_request_output,
    "generate": _umim_generate,
    "request_output_to_completion_response": _umim_request_output_to_completion_response,
    "completion_stream_generator": _umim_completion_stream_generator,
    "chat_completion_full_generator": _umim_chat_completion_full_generator,
    "chat_completion_stream_generator": _umim_chat_completion_stream_generator,
    "_generate_with_builtin_tools": _umim_generate_with_builtin_tools,
    "responses_full_generator": _umim_responses_full_generator,
}


def apply_patches() -> None:
    """Idempotent: wrap each method in PATCHED once (static and class methods stay what they are)."""
    check_vllm_version()
    for owner, name, _ in PATCHED:
        if hasattr(getattr(owner, name), "umim_original"):
            continue
        method = inspect.getattr_static(owner, name)
        is_descriptor = isinstance(method, (staticmethod, classmethod))
        original = method.__func__ if is_descriptor else method
        wrapper = WRAPPERS[name](original)
        wrapper.umim_original = original  # marks it patched; the pin test reads the original's signature
        setattr(owner, name, type(method)(wrapper) if is_descriptor else wrapper)


def patched_signatures() -> dict[str, list[str]]:
    """Current parameter names of each patched method (what the pin test compares)."""
    result = {}
    for owner, name, _ in PATCHED:
        method = getattr(owner, name)
        method = getattr(method, "umim_original", method)
        result[f"{owner.__name__}.{name}"] = list(inspect.signature(method).parameters)
    return result
