"""The engine's wrappers (``vllm_umim.engine.patches``) and the setups they refuse. What they wrap is
pinned with every other vLLM internal in ``tests/engine/test_internals.py``."""

import os
from types import SimpleNamespace

import pytest
import vllm

from vllm_umim.engine.config import UmimConfig, check_vllm_config
from vllm_umim.engine.patches import PATCHED, apply_patches, unwrapped
from vllm_umim.engine.version import SUPPORTED_VLLM
from vllm_umim.errors import UmimError


def test_vllm_version_is_the_supported_one():
    assert vllm.__version__.split("+")[0] == SUPPORTED_VLLM


def test_every_wrapper_is_installed():
    apply_patches()
    assert unwrapped(PATCHED) == []


def fake_vllm_config(**overrides):
    values = dict(speculative=None, pp=1, tp=1, async_scheduling=False, hybrid=False, runner="generate", v2=False, kv=None)
    values.update(overrides)
    return SimpleNamespace(
        use_v2_model_runner=values["v2"],
        kv_transfer_config=values["kv"],
        speculative_config=values["speculative"],
        parallel_config=SimpleNamespace(pipeline_parallel_size=values["pp"], tensor_parallel_size=values["tp"]),
        scheduler_config=SimpleNamespace(async_scheduling=values["async_scheduling"]),
        model_config=SimpleNamespace(is_hybrid=values["hybrid"], is_attention_free=False, runner_type=values["runner"]),
    )


@pytest.mark.parametrize(
    "override, message",
    [
        ({"speculative": SimpleNamespace(method="eagle")}, "speculative decoding by 'eagle' .only n-gram speculation"),
        ({"speculative": SimpleNamespace(method="ngram_gpu")}, "speculative decoding by 'ngram_gpu'"),
        ({"pp": 2}, "pipeline parallelism"),
        ({"async_scheduling": True}, "async scheduling"),
        ({"hybrid": True}, "hybrid or recurrent"),
        ({"v2": True}, "VLLM_USE_V2_MODEL_RUNNER=0"),
        ({"kv": object()}, "a KV connector .--kv-transfer-config / kv_transfer_config"),
    ],
)
def test_unsupported_setups_are_refused(override, message):
    check_vllm_config(fake_vllm_config())
    check_vllm_config(fake_vllm_config(speculative=SimpleNamespace(method="ngram")))  # composes (docs/design.md)
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
    with pytest.raises(ValueError, match="unknown merge option umim_windw"):  # a misspelt flat option
        request_choice({"umim_windw": 4}, config)


def test_v1_model_runner_is_chosen_where_the_user_left_it_to_vllm(monkeypatch):
    from vllm_umim.engine.config import prefer_v1_model_runner

    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    prefer_v1_model_runner()
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    prefer_v1_model_runner()  # an explicit choice stays; check_vllm_config then refuses it
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "1"


def test_install_wrappers_wraps_once_and_unwrapped_names_what_is_not():
    from vllm_umim.engine.patches import install_wrappers

    class Owner:
        def method(self, a):
            return a

    table = [(Owner, "method", lambda original: lambda self, *args: original(self, *args) + 1)]
    assert unwrapped(table) == ["Owner.method is not wrapped"]
    install_wrappers(table)
    install_wrappers(table)  # idempotent
    assert unwrapped(table) == [] and Owner().method(1) == 2


def test_cpu_ray_device_is_scoped_to_the_executor_start():
    pytest.importorskip("ray")
    from vllm.platforms import current_platform
    from vllm.v1.executor import ray_executor_v2

    from vllm_umim.engine.ray_executor import UmimCpuRayWorkerProc, cpu_ray_device

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


# ---- setups refused at the engine config step -----------------------------------------------------
def umim_engine_args(model_dir, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    from tests.engine.conftest import RULES

    apply_patches()
    return EngineArgs(model=model_dir, additional_config={"umim": {"rules": str(RULES), "module": "mean"}}, **kwargs)


@pytest.mark.parametrize("kwargs", [
    {"kv_transfer_config": {"kv_connector": "OffloadingConnector", "kv_role": "kv_both"}},
    {"kv_offloading_size": 1.0},
], ids=["kv_transfer_config", "kv_offloading_size"])
def test_kv_connectors_are_refused_in_one_line(model_dir, kwargs):
    """Merge figures ride on kv_transfer_params, which a KV connector owns."""
    from vllm.config import KVTransferConfig

    if "kv_transfer_config" in kwargs:
        kwargs = {"kv_transfer_config": KVTransferConfig(**kwargs["kv_transfer_config"])}
    with pytest.raises(UmimError) as refused:
        umim_engine_args(model_dir, **kwargs).create_engine_config()
    message = str(refused.value)
    assert "\n" not in message and message.startswith("UMIM cannot run with a KV connector (--kv-transfer-config")
    assert "kv_transfer_params" in message


def test_explicit_hybrid_kv_cache_manager_is_refused(model_dir):
    with pytest.raises(UmimError, match="hybrid KV cache manager .*--no-disable-hybrid-kv-cache-manager"):
        umim_engine_args(model_dir, disable_hybrid_kv_cache_manager=False).create_engine_config()


def test_umim_engines_run_without_the_hybrid_kv_cache_manager(model_dir):
    """Its coordinator would let rolled-back positions into the prefix cache (docs/vllm-internals.md)."""
    from types import SimpleNamespace

    from vllm.v1.core.kv_cache_coordinator import HybridKVCacheCoordinator, KVCacheCoordinator

    config = umim_engine_args(model_dir).create_engine_config()
    assert config.scheduler_config.disable_hybrid_kv_cache_manager is True
    # why: with 3 positions that may be rolled back, the unitary coordinator caches 61 of 64 computed
    # tokens, the hybrid one all 64 (it honours num_reprefillable_tokens only for EAGLE groups)
    unitary = SimpleNamespace(num_reprefillable_tokens=3)
    hybrid = SimpleNamespace(num_reprefillable_tokens=3, _align_cacheable=lambda n: n - n % 16,
                             single_type_managers=[SimpleNamespace(use_eagle=False, block_size=16)])
    assert KVCacheCoordinator.get_num_cacheable_tokens(unitary, 64, 0) == 61
    assert HybridKVCacheCoordinator.get_num_cacheable_tokens(hybrid, 64, 0) == 64
