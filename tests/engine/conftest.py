"""Engine-test settings and the engines only the engine tests use. The SmolLM2 fixtures and the
engines other packages share too (``stock_llm``, ``umim_llm``) are in ``tests/conftest.py``."""

from __future__ import annotations

import functools
import gc
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import shut_down, until_last_use

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
# The HF reference runs in this process beside the engines' busy OpenMP workers: with more than
# one thread its OpenMP barriers spin against them (measured here: 17x slower).
torch.set_num_threads(1)

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "smollm2-135m"
RULES = ARTIFACTS / "rules.bin"
ENGINE_ARGS = dict(dtype="float32", enforce_eager=True, max_model_len=1024, seed=0)  # fast and exact: most tests
COMPILED_ARGS = dict(dtype="float32", max_model_len=1024, seed=0)  # torch.compile, fp32: compiled == eager
DEFAULT_ENGINE_ARGS = dict(max_model_len=1024, seed=0)  # vLLM's defaults as users run them: bf16, torch.compile
MAX_WINDOW = 16  # umim_llm serves per-request raw windows up to this


@functools.lru_cache(maxsize=1)
def module_for_tests() -> str:
    """The shipped trained module if present, else the untrained mean-pooling baseline.

    Decided once per session, so every engine and reference in it uses the same module."""
    trained = ARTIFACTS / "module.safetensors"
    return str(trained) if trained.is_file() else "mean"


@pytest.fixture(scope="session")
def empty_rules(tmp_path_factory, tokenizer) -> str:
    from vllm_umim.rules import RuleSet, save_rules, tokenizer_fingerprint

    path = tmp_path_factory.mktemp("rules") / "empty.bin"
    empty = RuleSet(tokenizer_fingerprint(tokenizer), len(tokenizer), 5, {2: np.zeros((0, 2), np.int32)}, {2: np.zeros(0, np.uint32)})
    save_rules(empty, path)
    return str(path)


def engine_until_done(**kwargs):
    """An engine for a fixture, shut down when the fixture's scope ends."""
    from vllm import LLM

    llm = LLM(**kwargs)
    yield llm
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def engine_until_last_use(request, **kwargs):
    """An engine for a fixture, shut down after the last test of the run that uses the fixture
    (``tests/conftest.py``): the memory it holds is free for the engines later tests start."""
    from vllm import LLM

    llm = LLM(**kwargs)
    yield from until_last_use(request, llm, shut_down(llm))


@pytest.fixture(scope="package")
def default_umim_llm(request, model_dir):
    yield from engine_until_last_use(request, model=model_dir, additional_config={"umim": {"rules": str(RULES), "module": module_for_tests()}},
                                     **DEFAULT_ENGINE_ARGS)


@pytest.fixture(scope="package")
def empty_rules_llm(request, model_dir, empty_rules):
    yield from engine_until_last_use(request, model=model_dir, additional_config={"umim": {"rules": empty_rules, "module": "mean"}},
                                     **ENGINE_ARGS)


@pytest.fixture(scope="package")
def hf_model(model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def rules():
    from vllm_umim.rules import load_rules

    return load_rules(RULES)


@pytest.fixture(scope="package")
def reference_runtimes(hf_model, rules):
    """The HF reference runtime (the correctness oracle) per merge mode, with this session's module."""
    from vllm_umim.module import model_identity, resolve_module
    from vllm_umim.reference import ReferenceRuntime

    module, _ = resolve_module(module_for_tests(), hf_model.config.hidden_size, model_identity(hf_model.config), rules.tokenizer_fingerprint)
    return {mode: ReferenceRuntime(hf_model, rules, module, dynamic=mode == "dynamic") for mode in ("prompt", "dynamic")}


@pytest.fixture(scope="package")
def reference_for(reference_runtimes, hf_model, rules):
    """``reference_for(settings)``: the reference runtime with the policy ``MergeSettings`` builds."""
    from vllm_umim.reference import ReferenceRuntime

    module = reference_runtimes["dynamic"].merge_module
    return lambda settings: ReferenceRuntime(hf_model, rules, module, dynamic=settings.dynamic, policy=settings.build(rules))


@pytest.fixture(scope="package")
def reference_outputs(reference_for, hf_model, tokenizer):
    """``reference_outputs(settings, prompts, max_tokens)``: the reference runtime's greedy outputs
    for ``prompts`` under ``MergeSettings`` (None: plain HF decoding, no merging). Each (settings,
    prompt, max_tokens) is generated once per run: the tests of several engines check the same
    prompts against the same oracle, and the reference (one prompt at a time) is their slow part."""
    from vllm_umim.reference import ReferenceRuntime
    from vllm_umim.rules import RuleSet

    runtimes = {None: ReferenceRuntime(hf_model, RuleSet("", 0, 0, {}, {}), None)}
    found = {}

    def outputs(settings, prompts, max_tokens: int) -> list:
        if settings not in runtimes:
            runtimes[settings] = reference_for(settings)
        for prompt in prompts:
            key = (settings, tuple(prompt), max_tokens)
            if key not in found:
                found[key] = runtimes[settings].generate(prompt, max_tokens, eos_token_ids=(tokenizer.eos_token_id,))
        return [found[(settings, tuple(prompt), max_tokens)] for prompt in prompts]

    return outputs


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def token_prompts(prompts):
    from vllm.inputs import TokensPrompt

    return [TokensPrompt(prompt_token_ids=p) for p in prompts]


# ---- a second architecture: Gemma 3 270M (scaled embeddings, 262k vocabulary, needs <bos>) ----
GEMMA_ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "gemma3-270m"
GEMMA_RULES = GEMMA_ARTIFACTS / "rules.bin"
GEMMA_ENGINE_ARGS = dict(dtype="float32", enforce_eager=True, max_model_len=256, seed=0)


def gemma_module_for_tests() -> str:
    trained = GEMMA_ARTIFACTS / "module.safetensors"
    return str(trained) if trained.is_file() else "mean"


@pytest.fixture(scope="session")
def gemma_dir() -> str:
    from vllm_umim.data.model import fetch_model

    return str(fetch_model("gemma3-270m"))


@pytest.fixture(scope="session")
def gemma_tokenizer(gemma_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gemma_dir)


@pytest.fixture(scope="module")
def gemma_llm(gemma_dir):
    """The Gemma engine (fp32, eager) of the module that asks for it, shut down after it: with a
    262k vocabulary it and the HF model below hold ~3 GB that later engines of the session need."""
    options = {"rules": str(GEMMA_RULES), "module": gemma_module_for_tests()}
    yield from engine_until_done(model=gemma_dir, additional_config={"umim": options}, **GEMMA_ENGINE_ARGS)


@pytest.fixture(scope="module")
def gemma_hf_model(gemma_dir):
    from transformers import AutoModelForCausalLM

    yield AutoModelForCausalLM.from_pretrained(gemma_dir, dtype=torch.float32).eval()
    gc.collect()
