"""vLLM's Ray executor on CPU, for UMIM engines (``--distributed-executor-backend ray``).

vLLM 0.32 has no Ray support on its CPU platform: ``CpuPlatform.ray_device_key`` is ``""``
(``vllm/platforms/interface.py``), and ``initialize_ray_cluster`` /
``get_bundles_sorted_by_node`` (``vllm/v1/executor/ray_utils.py``) raise
``ValueError: current platform cpu does not support ray.`` for it. The device key cannot simply
be set to ``"CPU"`` either: vLLM would then ask Ray for actors with ``resources={"CPU": 1}``
(Ray: "Use the 'num_cpus' ... keyword instead of 'CPU'"), and each worker would read its device
ids from ``ray.get_runtime_context().get_accelerator_ids()["CPU"]``, which Ray never has (it
lists accelerators only: GPU, TPU, NPU, ...).

vLLM's documented extension point for executors is ``distributed_executor_backend`` = an
``Executor`` subclass. ``UmimCpuRayExecutor`` is vLLM's own ``RayExecutorV2`` (the class
``"ray"`` selects in 0.32) with exactly those three CPU gaps closed; UMIM's engine patch selects
it when a UMIM engine on CPU asks for ``"ray"``:

* placement-group bundles of one Ray ``CPU`` each (``current_platform.ray_device_key`` reads
  ``"CPU"`` while the executor starts, and only then: :func:`cpu_ray_device`);
* worker actors take no Ray resources of their own (they run inside their CPU bundle), like
  vLLM's GPU actors take ``num_cpus=0``;
* each worker reports no device ids (``UmimCpuRayWorkerProc``): a CPU worker has none.

Everything else — the message-queue control plane, the gloo process group for tensor
parallelism, the environment copied from the driver to every worker (``VLLM_*``, ``PYTHON*``...),
plugin loading in each worker (``WorkerWrapperBase.init_worker`` → ``load_general_plugins``),
the UMIM worker class from ``parallel_config.worker_cls`` — is vLLM's.
"""

from __future__ import annotations

import contextlib

import ray
from vllm.v1.executor import ray_executor_v2
from vllm.v1.executor.ray_executor_v2 import RayExecutorV2, RayWorkerProc

CPU_RAY_DEVICE_KEY = "CPU"  # the Ray resource each CPU worker's placement-group bundle holds


@contextlib.contextmanager
def cpu_ray_device(worker_proc):
    """While vLLM's ``RayExecutorV2._init_executor`` runs for a CPU engine: the platform's Ray
    device key reads ``"CPU"`` (vLLM's CPU platform has ``""``, which ``ray_utils`` refuses), and
    the executor spawns ``worker_proc`` actors instead of its ``RayWorkerProc`` (whose device-id
    lookup reads Ray's accelerator ids, where ``"CPU"`` never is). Both are restored after."""
    from vllm.platforms import current_platform

    missing = object()
    saved_key = current_platform.__dict__.get("ray_device_key", missing)
    saved_proc = ray_executor_v2.RayWorkerProc
    current_platform.ray_device_key = CPU_RAY_DEVICE_KEY
    ray_executor_v2.RayWorkerProc = worker_proc
    try:
        yield
    finally:
        ray_executor_v2.RayWorkerProc = saved_proc
        if saved_key is missing:
            del current_platform.ray_device_key
        else:
            current_platform.ray_device_key = saved_key


class UmimCpuRayWorkerProc(RayWorkerProc):
    """vLLM's Ray worker actor; a CPU worker has no accelerator ids to report."""

    def get_node_and_physical_gpu_ids(self) -> tuple[str, list[int]]:
        return ray.get_runtime_context().get_node_id(), []


class UmimCpuRayExecutor(RayExecutorV2):
    """``RayExecutorV2`` for vLLM's CPU platform (see the module docstring)."""

    uses_ray = True

    @staticmethod
    def _get_actor_resource_kwargs() -> dict:
        return {"num_gpus": 0}

    def _init_executor(self) -> None:
        with cpu_ray_device(worker_proc=UmimCpuRayWorkerProc):
            super()._init_executor()
