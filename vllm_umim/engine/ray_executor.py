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
  ``"CPU"`` while the executor starts, and only then: ``cpu_ray_device`` in
  ``vllm_umim.engine.patches``);
* worker actors take no Ray resources of their own (they run inside their CPU bundle), like
  vLLM's GPU actors take ``num_cpus=0``;
* each worker reports no device ids (``UmimCpuRayWorkerProc``): a CPU worker has none.

Everything else — the message-queue control plane, the gloo process group for tensor
parallelism, the environment copied from the driver to every worker (``VLLM_*``, ``PYTHON*``...),
plugin loading in each worker (``WorkerWrapperBase.init_worker`` → ``load_general_plugins``),
the UMIM worker class from ``parallel_config.worker_cls`` — is vLLM's.
"""

from __future__ import annotations

import ray
from vllm.v1.executor.ray_executor_v2 import RayExecutorV2, RayWorkerProc


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
        from vllm_umim.engine.patches import cpu_ray_device

        with cpu_ray_device(worker_proc=UmimCpuRayWorkerProc):
            super()._init_executor()
