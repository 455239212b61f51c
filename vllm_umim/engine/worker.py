"""Workers that build the UMIM model runner (vLLM's ``worker_cls`` config; no knob for runners).

Each worker lets vLLM set up the device, then replaces the runner it built with the same runner
class extended by ``UmimModelRunnerMixin``.
"""

from __future__ import annotations

import torch
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from vllm_umim.engine.model_runner import UmimModelRunnerMixin


class UmimCPUModelRunner(UmimModelRunnerMixin, CPUModelRunner):
    pass


class UmimCPUWorker(CPUWorker):
    def init_device(self):
        super().init_device()
        if self.use_v2_model_runner:
            raise RuntimeError("UMIM needs vLLM's V1 model runner: set VLLM_USE_V2_MODEL_RUNNER=0")
        self.model_runner = UmimCPUModelRunner(self.vllm_config, torch.device("cpu"))

    def umim_input_embeddings(self, rule_ids: list[int]) -> list[list[float]]:  # LLM.collective_rpc
        return self.model_runner.umim_input_embeddings(rule_ids)


def _gpu_worker_cls():
    """The GPU twin (built lazily: importing vLLM's GPU worker needs a CUDA platform)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    class UmimGPUModelRunner(UmimModelRunnerMixin, GPUModelRunner):
        pass

    class UmimGPUWorker(Worker):
        def init_device(self):
            super().init_device()
            if getattr(self, "use_v2_model_runner", False):
                raise RuntimeError("UMIM needs vLLM's V1 model runner: set VLLM_USE_V2_MODEL_RUNNER=0")
            self.model_runner = UmimGPUModelRunner(self.vllm_config, self.device)

        def umim_input_embeddings(self, rule_ids: list[int]) -> list[list[float]]:  # LLM.collective_rpc
            return self.model_runner.umim_input_embeddings(rule_ids)

    return UmimGPUWorker


def __getattr__(name):
    if name == "UmimGPUWorker":
        return _gpu_worker_cls()
    raise AttributeError(name)
