"""The engine's wrapped vLLM methods, in one place, pinned to vLLM 0.32.0.

UMIM's scheduler and worker are selected through vLLM's own ``scheduler_cls`` / ``worker_cls``
config. vLLM has no hook that turns them on from ``additional_config``, so these methods are
wrapped (the server's wrappers live in ``vllm_umim.server.patches``):

* ``EngineArgs.create_engine_config``: when ``additional_config["umim"]`` is present, check the
  rules / module / tokenizer files (one clear error before any engine process starts), record
  their content fingerprint in the config (so vLLM's compile cache follows the files) and their
  sha256 (the EngineCore and workers refuse a file changed since), select the
  UMIM scheduler and worker, turn vLLM's "auto" async scheduling off (refuse it when asked for
  explicitly), choose the V1 model runner where the user left it to vLLM, and refuse unsupported
  setups (a KV connector among them: merge figures ride on ``kv_transfer_params``); turn vLLM's
  hybrid KV cache manager off (see ``HYBRID_KV_REFUSAL``).
* ``InputProcessor._validate_params``: read a request's ``extra_args["umim"]`` (and the flat
  ``umim_window`` / ``umim_min_confidence`` of ``vllm_xargs``) into its merge settings in the API
  process, so a bad value is rejected there (LLM.generate raises a ValueError, the OpenAI server
  answers 400), never in the engine; ``vllm_xargs``' 0 / 1 (pydantic's coercion of JSON false /
  true) are read as the booleans they were.
* ``RequestState.make_request_output``: with ``n > 1`` vLLM gives the request's output the KV
  transfer parameters of whichever sample finished last; sum every sample's merge figures instead.

``docs/vllm-internals.md`` lists these and every other vLLM internal UMIM relies on; the table it is
generated from (``vllm_umim.engine.internals``) pins each, and ``tests/engine/test_internals.py``
fails loudly, naming the item, when vLLM changes one.
"""

from __future__ import annotations

import functools
import inspect

from vllm.engine.arg_utils import EngineArgs
from vllm.exceptions import VLLMValidationError
from vllm.v1.engine.input_processor import InputProcessor
from vllm.v1.engine.output_processor import RequestState

from vllm_umim.engine.assets import validate_umim_files
from vllm_umim.engine.config import (
    CONFIG_KEY, FLAT_REQUEST_KEYS, KV_CONNECTOR_REFUSAL, UmimConfig, check_vllm_config, prefer_v1_model_runner,
)
from vllm_umim.engine.operating_point import resolve_operating_point
from vllm_umim.engine.stats import STATS_KEY, combine_stats
from vllm_umim.engine.version import check_vllm_version
from vllm_umim.errors import UmimError

SCHEDULER_CLS = "vllm_umim.engine.scheduler.UmimScheduler"
CPU_WORKER_CLS = "vllm_umim.engine.worker.UmimCPUWorker"
GPU_WORKER_CLS = "vllm_umim.engine.worker.UmimGPUWorker"
STOCK_WORKER_CLS = ("auto", "vllm.v1.worker.cpu_worker.CPUWorker", "vllm.v1.worker.gpu_worker.Worker")

# vLLM's hybrid KV cache manager (several KV cache groups: sliding-window models such as Gemma 3)
# honours KVCacheCoordinator.num_reprefillable_tokens only for EAGLE groups, so it would put blocks
# a decode merge may still rewrite into the prefix cache. With it off, every layer's KV lives in one
# group (sliding-window layers still attend within their window but keep the KV outside it: more memory).
HYBRID_KV_REFUSAL = (
    "vLLM's hybrid KV cache manager (it would cache KV blocks that a decode merge may still rewrite)"
)


def _create_engine_config(original):
    @functools.wraps(original)
    def create_engine_config(self: EngineArgs, *args, **kwargs):
        options = (self.additional_config or {}).get(CONFIG_KEY)
        if options is None:
            return original(self, *args, **kwargs)
        options = resolve_operating_point(options)  # a folder's rules file and merge settings, spelled out
        config = UmimConfig.from_dict(options)
        if self.kv_transfer_config is not None or self.kv_offloading_size is not None:
            raise UmimError(f"UMIM cannot run with {KV_CONNECTOR_REFUSAL}")  # before any file is read
        checked = validate_umim_files(self, config)  # fingerprint, and the files' sha256 the engine processes verify
        self.additional_config = {**self.additional_config, CONFIG_KEY: {**options, **checked}}
        if self.scheduler_cls not in (None, SCHEDULER_CLS):
            raise UmimError(f"UMIM brings its own scheduler; remove scheduler_cls={self.scheduler_cls!r}")
        self.scheduler_cls = SCHEDULER_CLS
        if self.async_scheduling:
            raise UmimError(
                "UMIM cannot run with async scheduling (a merge decided after sampling would arrive one step "
                "late): drop --async-scheduling / async_scheduling=True, or pass --no-async-scheduling"
            )
        self.async_scheduling = False  # vLLM's "auto" (None) would turn it on on GPU
        if self.disable_hybrid_kv_cache_manager is False:
            raise UmimError(f"UMIM cannot run with {HYBRID_KV_REFUSAL}: drop --no-disable-hybrid-kv-cache-manager")
        self.disable_hybrid_kv_cache_manager = True  # see HYBRID_KV_REFUSAL
        prefer_v1_model_runner()
        vllm_config = original(self, *args, **kwargs)
        parallel = vllm_config.parallel_config
        if parallel.worker_cls not in (*STOCK_WORKER_CLS, CPU_WORKER_CLS, GPU_WORKER_CLS):
            raise UmimError(f"UMIM brings its own worker; remove worker_cls={parallel.worker_cls!r}")
        on_cpu = vllm_config.device_config.device_type == "cpu"
        parallel.worker_cls = CPU_WORKER_CLS if on_cpu else GPU_WORKER_CLS
        if on_cpu and parallel.distributed_executor_backend == "ray":
            from vllm_umim.engine.ray_executor import UmimCpuRayExecutor  # imports ray: only when asked for

            parallel.distributed_executor_backend = UmimCpuRayExecutor  # vLLM: "ray" or an Executor subclass
        check_vllm_config(vllm_config)
        return vllm_config

    return create_engine_config


class RequestChoiceError(VLLMValidationError, ValueError):
    """A bad ``extra_args["umim"]``: a ValueError for ``LLM.generate`` callers; a validation error
    for the OpenAI server, which answers 400 (a plain ValueError becomes a 500 inside
    ``AsyncLLM.generate``)."""


def request_choice(extra_args: dict, config: UmimConfig):
    """A request's UMIM choice as the engine reads it: False (unmerged) or a dict of every merge
    setting. Raises RequestChoiceError naming the bad value.

    The OpenAI server's ``vllm_xargs`` is typed ``str | int | float``, so pydantic turns a JSON
    ``false`` / ``true`` into 0 / 1 (read as the booleans they were), and a dict cannot be sent:
    there the options come flat, ``umim_window`` / ``umim_min_confidence`` beside ``umim``.
    """
    choice = extra_args.get(CONFIG_KEY, True)
    unknown = sorted(key for key in extra_args if key.startswith(CONFIG_KEY + "_") and key not in FLAT_REQUEST_KEYS)
    if unknown:  # a misspelt flat option would otherwise be ignored without a word
        raise RequestChoiceError(f"vllm_xargs: unknown merge option {', '.join(unknown)} (the flat options are "
                                 f"{', '.join(FLAT_REQUEST_KEYS)})", parameter="vllm_xargs")
    flat = {FLAT_REQUEST_KEYS[key]: extra_args.pop(key) for key in list(extra_args) if key in FLAT_REQUEST_KEYS}
    try:
        if flat:  # flat options refine what "umim" chose, unless it opted out
            chosen = config.request_settings(True if isinstance(choice, dict) else choice)
            if chosen is not None:
                choice = {**(choice if isinstance(choice, dict) else chosen.as_options()), **flat}
        settings = config.request_settings(choice)
    except UmimError as e:
        raise RequestChoiceError(str(e), parameter="vllm_xargs") from None
    return False if settings is None else settings.as_options()


def _validate_params(original):
    @functools.wraps(original)
    def _validate_params(self, params, *args, **kwargs):
        result = original(self, params, *args, **kwargs)
        extra = getattr(params, "extra_args", None)
        if extra and any(key == CONFIG_KEY or key.startswith(CONFIG_KEY + "_") for key in extra):
            config = self.__dict__.get("umim_config")
            if config is None:
                config = self.__dict__["umim_config"] = UmimConfig.from_vllm_config(self.vllm_config) or False
            if config:  # an engine without UMIM ignores the key
                extra[CONFIG_KEY] = request_choice(extra, config)
        return result

    return _validate_params


def _make_request_output(original):
    @functools.wraps(original)
    def make_request_output(self, new_token_ids, pooling_output, finish_reason, stop_reason, kv_transfer_params=None,
                            *args, **kwargs):
        parent = self.parent_req
        if parent is not None and finish_reason is not None and kv_transfer_params and STATS_KEY in kv_transfer_params:
            finished_samples = parent.__dict__.setdefault("umim_stats", [])
            finished_samples.append(kv_transfer_params[STATS_KEY])
            kv_transfer_params = {**kv_transfer_params, STATS_KEY: combine_stats(finished_samples)}
        return original(self, new_token_ids, pooling_output, finish_reason, stop_reason, kv_transfer_params, *args, **kwargs)

    return make_request_output


# (owner, attribute, wrapper factory); the signature each wrapper relies on is pinned in
# vllm_umim.engine.internals
PATCHED = [
    (EngineArgs, "create_engine_config", _create_engine_config),
    (InputProcessor, "_validate_params", _validate_params),
    (RequestState, "make_request_output", _make_request_output),
]


def install_wrappers(patched: list) -> None:
    """Idempotent: wrap each ``(owner, name, factory)`` method once (static and class methods
    stay what they are). The server layer installs its own table through this too. Refuses (one
    line naming both versions) on a vLLM other than the supported one."""
    check_vllm_version()
    for owner, name, factory in patched:
        if hasattr(getattr(owner, name), "umim_original"):
            continue
        method = inspect.getattr_static(owner, name)
        is_descriptor = isinstance(method, (staticmethod, classmethod))
        original = method.__func__ if is_descriptor else method
        wrapper = factory(original)
        wrapper.umim_original = original  # marks it patched; the pin tests read the original's signature
        setattr(owner, name, type(method)(wrapper) if is_descriptor else wrapper)


def apply_patches() -> None:
    install_wrappers(PATCHED)


def unwrapped(patched: list) -> list[str]:
    """The methods of a ``(owner, name, factory)`` table that are not wrapped (after
    ``install_wrappers``, none: the tests assert it)."""
    return [f"{owner.__name__}.{name} is not wrapped" for owner, name, _ in patched
            if not hasattr(getattr(owner, name), "umim_original")]
