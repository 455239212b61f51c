"""The vLLM methods vllm_umim wraps still exist with the parameters it relies on (vLLM 0.32.0)."""

import os
from types import SimpleNamespace

import pytest
import vllm

from vllm_umim.engine.config import UmimConfig, check_vllm_config
from vllm_umim.engine.patches import PATCHED, PINNED_VLLM, apply_patches, pin_violations
from vllm_umim.errors import UmimError


def test_vllm_version_is_the_pinned_one():
    assert vllm.__version__.split("+")[0] == PINNED_VLLM


def test_patched_methods_keep_their_signatures():
    apply_patches()
    assert pin_violations(PATCHED) == []


def test_patched_vllm_internals_exist():
    from vllm.v1.core.kv_cache_coordinator import KVCacheCoordinator
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.worker.gpu_input_batch import CachedRequestState, InputBatch
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    for owner, name in [
        (Scheduler, "_update_request_with_output"),
        (Scheduler, "_free_request"),
        (Scheduler, "add_request"),
        (GPUModelRunner, "_update_states"),
        (InputBatch, "_make_prompt_token_ids_cpu_tensor"),
        (KVCacheCoordinator, "get_num_cacheable_tokens"),
    ]:
        assert callable(getattr(owner, name)), f"{owner.__name__}.{name} is gone"
    assert isinstance(CachedRequestState.num_tokens, property)
    import inspect

    assert "num_reprefillable_tokens" in inspect.getsource(KVCacheCoordinator.get_num_cacheable_tokens)


def fake_vllm_config(**overrides):
    values = dict(speculative=None, pp=1, tp=1, async_scheduling=False, hybrid=False, runner="generate", v2=False)
    values.update(overrides)
    return SimpleNamespace(
        use_v2_model_runner=values["v2"],
        speculative_config=values["speculative"],
        parallel_config=SimpleNamespace(pipeline_parallel_size=values["pp"], tensor_parallel_size=values["tp"]),
        scheduler_config=SimpleNamespace(async_scheduling=values["async_scheduling"]),
        model_config=SimpleNamespace(is_hybrid=values["hybrid"], is_attention_free=False, runner_type=values["runner"]),
    )


@pytest.mark.parametrize(
    "override, message",
    [
        ({"speculative": object()}, "speculative decoding"),
        ({"pp": 2}, "pipeline parallelism"),
        ({"async_scheduling": True}, "async scheduling"),
        ({"hybrid": True}, "hybrid or recurrent"),
        ({"v2": True}, "VLLM_USE_V2_MODEL_RUNNER=0"),
    ],
)
def test_unsupported_setups_are_refused(override, message):
    check_vllm_config(fake_vllm_config())
    with pytest.raises(UmimError, match=message):
        check_vllm_config(fake_vllm_config(**override))


def test_options_are_checked():
    with pytest.raises(UmimError, match="needs a rules file"):
        UmimConfig.from_dict({})
    with pytest.raises(UmimError, match="unknown UMIM option"):
        UmimConfig.from_dict({"rules": "r.bin", "modul": "x"})
    with pytest.raises(UmimError, match="mode must be one of"):
        UmimConfig.from_dict({"rules": "r.bin", "mode": "always"})


def test_request_choice_reads_vllm_xargs_coercion_and_flat_options():
    from vllm_umim.engine.config import UmimConfig
    from vllm_umim.engine.patches import request_choice

    config = UmimConfig.from_dict({"rules": "r.bin", "max_window": 16})
    engine = {"mode": "dynamic", "window": 0, "min_confidence": 0.0}
    assert request_choice({"umim": 0}, config) is False and request_choice({"umim": 1}, config) == engine  # JSON false/true
    assert request_choice({"umim": False}, config) is False
    assert request_choice({"umim": "prompt"}, config) == {**engine, "mode": "prompt"}
    assert request_choice({"umim": {"window": 8}}, config) == {**engine, "window": 8}
    flat = {"umim": "prompt", "umim_window": 4, "umim_min_confidence": 0.5}  # vllm_xargs cannot carry a dict
    assert request_choice(flat, config) == {"mode": "prompt", "window": 4, "min_confidence": 0.5} and "umim_window" not in flat
    assert request_choice({"umim_window": 2}, config) == {**engine, "window": 2}
    assert request_choice({"umim": False, "umim_window": 2}, config) is False
    for bad, message in [(2, "must be true, false"), ("always", "must be true, false"), (0.5, "must be true, false"),
                         (None, "must be true, false"), ({"window": 32}, "above this engine's max_window 16"),
                         ({"min_confidence": 1.5}, "min_confidence must be"), ({"windw": 1}, "unknown merge option")]:
        with pytest.raises(ValueError, match=message):
            request_choice({"umim": bad}, config)


def test_v1_model_runner_is_chosen_where_the_user_left_it_to_vllm(monkeypatch):
    from vllm_umim.engine.config import prefer_v1_model_runner

    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    prefer_v1_model_runner()
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    prefer_v1_model_runner()  # an explicit choice stays; check_vllm_config then refuses it
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "1"


def test_pin_check_fails_on_a_changed_or_unwrapped_method():
    from vllm_umim.engine.patches import install_wrappers

    class Owner:
        def method(self, a):
            return a

    table = [(Owner, "method", ("self", "b"), lambda original: lambda self, *args: original(self, *args))]
    assert pin_violations(table) == ["Owner.method is not wrapped", "Owner.method('self', 'a'): the wrapper relies on ('self', 'b')"]
    install_wrappers(table)
    assert pin_violations(table) == ["Owner.method('self', 'a'): the wrapper relies on ('self', 'b')"]


def test_cpu_ray_executor_pins():
    """What UmimCpuRayExecutor (vLLM's Ray executor on the CPU platform) relies on in vLLM 0.32.0."""
    pytest.importorskip("ray")
    from vllm_umim.engine.patches import cpu_ray_pin_violations

    assert cpu_ray_pin_violations() == []


def test_cpu_ray_device_is_scoped_to_the_executor_start():
    pytest.importorskip("ray")
    from vllm.platforms import current_platform
    from vllm.v1.executor import ray_executor_v2

    from vllm_umim.engine.patches import cpu_ray_device
    from vllm_umim.engine.ray_executor import UmimCpuRayWorkerProc

    stock_proc, stock_key = ray_executor_v2.RayWorkerProc, current_platform.ray_device_key
    assert stock_key == ""  # vLLM's CPU platform: no Ray
    with cpu_ray_device(worker_proc=UmimCpuRayWorkerProc):
        assert current_platform.ray_device_key == "CPU" and ray_executor_v2.RayWorkerProc is UmimCpuRayWorkerProc
    assert current_platform.ray_device_key == stock_key and ray_executor_v2.RayWorkerProc is stock_proc
    assert "ray_device_key" not in current_platform.__dict__


def test_ray_backend_selects_the_cpu_ray_executor_for_umim_engines_only(model_dir):
    pytest.importorskip("ray")
    from vllm.engine.arg_utils import EngineArgs

    from tests.engine.conftest import RULES
    from vllm_umim.engine.ray_executor import UmimCpuRayExecutor

    apply_patches()
    umim = {"umim": {"rules": str(RULES), "module": "mean"}}
    config = EngineArgs(model=model_dir, distributed_executor_backend="ray", additional_config=umim).create_engine_config()
    assert config.parallel_config.distributed_executor_backend is UmimCpuRayExecutor and config.parallel_config.use_ray
    stock = EngineArgs(model=model_dir, distributed_executor_backend="ray").create_engine_config()
    assert stock.parallel_config.distributed_executor_backend == "ray"  # stock engines: vLLM's own refusal stands
