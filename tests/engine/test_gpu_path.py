"""The GPU path (skipped without CUDA): what vLLM 0.32.0 does differently on a GPU, handled.

On CUDA, vLLM's defaults differ from the CPU build the other engine tests run on: torch.compile and
CUDA graphs are on (the surrogate embedding runs inside the captured graph, reading the persistent
``input_ids`` buffer), async scheduling's "auto" turns it on, and Model Runner V2 is picked whenever
Triton is present. Each test asserts that UMIM handles one of these. Run this file alone (its
engines take ``gpu_memory_utilization`` 0.25 each): ``python -m pytest -q tests/engine/test_gpu_path.py``.
"""

from __future__ import annotations

import gc

import pytest
import torch

from tests.engine.conftest import RULES, module_for_tests, token_prompts

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (vLLM's GPU model runner)"),
]

V2_ENV = "VLLM_USE_V2_MODEL_RUNNER"
GPU_WORKER_CLS = "vllm_umim.engine.worker.UmimGPUWorker"
# vLLM's defaults otherwise (bf16, torch.compile, FULL_AND_PIECEWISE CUDA graphs); logprobs after
# penalties, so a near-tie is judged on the logits the sampler really compared
GPU_ARGS = dict(max_model_len=1024, seed=0, gpu_memory_utilization=0.25, logprobs_mode="processed_logprobs")
NUM_PROMPTS, MAX_TOKENS = 32, 32
TIE = 0.25  # nats: bf16 compiled and eager kernels may swap a top-1/top-2 pair closer than this
MIN_EXACT = 0.8
SAMPLING = {
    "greedy": {},
    "penalties": dict(repetition_penalty=1.2, presence_penalty=0.3, frequency_penalty=0.3),  # prompt ids on GPU
}


def umim_options(**options) -> dict:
    return {"umim": {"rules": str(RULES), "module": module_for_tests(), **options}}


def engine_config(model_dir, umim: bool = True, **engine_args):
    from vllm import envs
    from vllm.engine.arg_utils import EngineArgs

    from vllm_umim.engine.patches import apply_patches

    apply_patches()
    getattr(envs, "disable_envs_cache", lambda: None)()  # read VLLM_USE_V2_MODEL_RUNNER as set now
    extra = {"additional_config": umim_options()} if umim else {}
    return EngineArgs(model=model_dir, **extra, **engine_args).create_engine_config()


# ---- configuration: what vLLM picks on CUDA, and what UMIM makes of it ----------------------------

def test_stock_gpu_defaults_are_async_scheduling_and_runner_v2(model_dir, monkeypatch):
    """The premise of the next tests (vllm/config/vllm.py: VllmConfig async "auto", use_v2_model_runner)."""
    monkeypatch.delenv(V2_ENV, raising=False)
    config = engine_config(model_dir, umim=False)
    assert config.scheduler_config.async_scheduling is True
    assert config.use_v2_model_runner is True


def test_async_scheduling_off_by_default_and_refused_naming_the_flag(model_dir, monkeypatch):
    from vllm_umim.errors import UmimError

    monkeypatch.setenv(V2_ENV, "0")
    config = engine_config(model_dir)
    assert config.scheduler_config.async_scheduling is False
    assert config.max_concurrent_batches == 1  # EngineCore.step, not step_with_batch_queue
    assert config.parallel_config.worker_cls == GPU_WORKER_CLS and not config.use_v2_model_runner
    with pytest.raises(UmimError, match="--no-async-scheduling"):
        engine_config(model_dir, async_scheduling=True)


def test_model_runner_v2_refused_or_avoided_before_any_worker_starts(model_dir, monkeypatch):
    """Unset, vLLM picks V2 on CUDA; UMIM must refuse it naming the env var, or turn it off itself.
    A refusal inside the worker (UmimGPUWorker.init_device) only reaches the user as "Engine core
    initialization failed", after the model runner was built."""
    monkeypatch.delenv(V2_ENV, raising=False)
    try:
        config = engine_config(model_dir)
    except Exception as error:  # noqa: BLE001 - any refusal will do, if it names the fix
        assert f"{V2_ENV}=0" in str(error), error
        return
    assert not config.use_v2_model_runner, f"UMIM accepted Model Runner V2; it needs {V2_ENV}=0"


# ---- engines: CUDA graphs replay virtual ids exactly like eager execution --------------------------

@pytest.fixture(scope="module")
def v1_runner_env():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(V2_ENV, "0")  # what a GPU user types (until UMIM sets it itself)
        yield


def start_engine(model_dir, options: dict, **engine_args):
    from vllm import LLM

    llm = LLM(model=model_dir, additional_config=umim_options(**options), **GPU_ARGS, **engine_args)
    yield llm
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def eager_llm(model_dir, v1_runner_env):
    yield from start_engine(model_dir, {}, enforce_eager=True)


@pytest.fixture(scope="module", params=["table", "on_the_fly"])
def graph_llm(request, model_dir, v1_runner_env):
    yield from start_engine(model_dir, {} if request.param == "table" else {"table_budget_mib": 0})


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


@pytest.mark.parametrize("sampling", sorted(SAMPLING))
def test_cuda_graphs_match_eager(graph_llm, eager_llm, heldout_prompts, sampling):
    from vllm import SamplingParams
    from vllm.config import CUDAGraphMode

    from vllm_umim import merge_stats

    assert graph_llm.llm_engine.vllm_config.compilation_config.cudagraph_mode != CUDAGraphMode.NONE
    assert eager_llm.llm_engine.vllm_config.compilation_config.cudagraph_mode == CUDAGraphMode.NONE
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=2, **SAMPLING[sampling])
    prompts = token_prompts(heldout_prompts[:NUM_PROMPTS])
    graphs = graph_llm.generate(prompts, params, use_tqdm=False)
    eager = eager_llm.generate(prompts, params, use_tqdm=False)
    exact, decode_merges = 0, 0
    for index, (graph_out, eager_out) in enumerate(zip(graphs, eager)):
        graph_ids, eager_ids = list(graph_out.outputs[0].token_ids), list(eager_out.outputs[0].token_ids)
        decode_merges += merge_stats(graph_out)["decode_merges"]
        step = first_difference(graph_ids, eager_ids)
        if step is None:
            exact += 1
            assert merge_stats(graph_out) == merge_stats(eager_out), index
            continue
        top = sorted((lp.logprob for lp in eager_out.outputs[0].logprobs[min(step, len(eager_ids) - 1)].values()), reverse=True)
        margin = top[0] - top[1] if len(top) > 1 else 0.0
        assert margin < TIE, (
            f"prompt {index}: CUDA graphs and eager differ at step {step}, eager's top-2 margin {margin:.3f} "
            f"(not a near-tie)\ngraphs {graph_ids}\neager  {eager_ids}"
        )
    print(f"\n{sampling}: {exact}/{len(prompts)} exact, {decode_merges} decode merges under CUDA graphs")
    assert exact >= MIN_EXACT * len(prompts)
    assert decode_merges > 0  # rollbacks really happened between graph replays
