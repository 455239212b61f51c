"""Every change vLLM needs beyond its extension points, in one place, pinned to vLLM 0.32.0.

UMIM's scheduler and worker are selected through vLLM's own ``scheduler_cls`` / ``worker_cls``
config. vLLM has no hook that turns them on from ``additional_config``, so one method is wrapped:

* ``EngineArgs.create_engine_config``: when ``additional_config["umim"]`` is present, check the
  rules / module / tokenizer files (one clear error before any engine process starts), select the
  UMIM scheduler and worker, turn async scheduling off, and refuse unsupported setups.
* ``InputProcessor._validate_params``: reject a bad ``extra_args["umim"]`` in the API process
  (a ValueError: LLM.generate raises it, the OpenAI server answers 400), never in the engine.

``tests/engine/test_patches.py`` fails loudly when vLLM changes what these wrap.
"""

from __future__ import annotations

import functools
import inspect

import vllm
from vllm.engine.arg_utils import EngineArgs
from vllm.v1.engine.input_processor import InputProcessor

from vllm_umim.engine.config import CONFIG_KEY, UmimConfig, check_vllm_config
from vllm_umim.errors import UmimError

PINNED_VLLM = "0.32.0"
SCHEDULER_CLS = "vllm_umim.engine.scheduler.UmimScheduler"
CPU_WORKER_CLS = "vllm_umim.engine.worker.UmimCPUWorker"
GPU_WORKER_CLS = "vllm_umim.engine.worker.UmimGPUWorker"

# (owner, attribute, the parameters the wrapper relies on)
PATCHED = [
    (EngineArgs, "create_engine_config", ("self", "usage_context", "headless")),
    (InputProcessor, "_validate_params", ("self", "params", "supported_tasks")),
]
REQUEST_CHOICES = (True, False, "prompt", "dynamic")


def check_vllm_version() -> None:
    if vllm.__version__.split("+")[0] != PINNED_VLLM:
        raise RuntimeError(
            f"vllm_umim {__name__} is written against vLLM {PINNED_VLLM}, found {vllm.__version__}; "
            "re-check the patched methods (tests/engine/test_patches.py) before using this version"
        )


def validate_umim_files(engine_args: EngineArgs, config: UmimConfig) -> None:
    """Load rules and module once in the API process and check them against model and tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    from vllm_umim.engine.assets import load_engine_module, load_engine_rules

    rules = load_engine_rules(config.rules)
    tokenizer_path = engine_args.tokenizer or engine_args.model
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=engine_args.trust_remote_code)
    rules.check_tokenizer(tokenizer, what=f"tokenizer of {tokenizer_path}")
    hf_config = AutoConfig.from_pretrained(engine_args.model, trust_remote_code=engine_args.trust_remote_code)
    load_engine_module(config, hf_config, rules)


def _umim_create_engine_config(original):
    @functools.wraps(original)
    def create_engine_config(self: EngineArgs, *args, **kwargs):
        options = (self.additional_config or {}).get(CONFIG_KEY)
        if options is None:
            return original(self, *args, **kwargs)
        config = UmimConfig.from_dict(options)
        validate_umim_files(self, config)
        if self.scheduler_cls not in (None, SCHEDULER_CLS):
            raise UmimError(f"UMIM brings its own scheduler; remove scheduler_cls={self.scheduler_cls!r}")
        self.scheduler_cls = SCHEDULER_CLS
        self.async_scheduling = False
        vllm_config = original(self, *args, **kwargs)
        parallel = vllm_config.parallel_config
        if parallel.worker_cls not in ("auto", CPU_WORKER_CLS, GPU_WORKER_CLS, "vllm.v1.worker.cpu_worker.CPUWorker", "vllm.v1.worker.gpu_worker.Worker"):
            raise UmimError(f"UMIM brings its own worker; remove worker_cls={parallel.worker_cls!r}")
        parallel.worker_cls = CPU_WORKER_CLS if vllm_config.device_config.device_type == "cpu" else GPU_WORKER_CLS
        check_vllm_config(vllm_config)
        return vllm_config

    create_engine_config.umim_original = original
    return create_engine_config


def _umim_validate_params(original):
    @functools.wraps(original)
    def _validate_params(self, params, *args, **kwargs):
        result = original(self, params, *args, **kwargs)
        extra = getattr(params, "extra_args", None) or {}
        if CONFIG_KEY in extra and extra[CONFIG_KEY] not in REQUEST_CHOICES:
            raise ValueError(f"extra_args['{CONFIG_KEY}'] must be true, false, 'prompt' or 'dynamic', got {extra[CONFIG_KEY]!r}")
        return result

    _validate_params.umim_original = original
    return _validate_params


WRAPPERS = {"create_engine_config": _umim_create_engine_config, "_validate_params": _umim_validate_params}


def apply_patches() -> None:
    """Idempotent: wrap each method in PATCHED once."""
    check_vllm_version()
    for owner, name, _ in PATCHED:
        method = getattr(owner, name)
        if not hasattr(method, "umim_original"):
            setattr(owner, name, WRAPPERS[name](method))


def patched_signatures() -> dict[str, list[str]]:
    """Current parameter names of each patched method (what the pin test compares)."""
    result = {}
    for owner, name, _ in PATCHED:
        method = getattr(owner, name)
        method = getattr(method, "umim_original", method)
        result[f"{owner.__name__}.{name}"] = list(inspect.signature(method).parameters)
    return result
