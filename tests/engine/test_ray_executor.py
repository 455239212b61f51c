"""UMIM under vLLM's Ray executor (``distributed_executor_backend="ray"``) on a local Ray instance.

vLLM 0.32 refuses Ray on its CPU platform; UMIM engines get ``UmimCpuRayExecutor``
(``vllm_umim.engine.ray_executor``). The Ray engine runs in its own process
(``tests/engine/ray_engine_run.py``) and must give the same greedy tokens and merge figures as the
session's default-executor engine, with the UMIM worker, runner and rules in the Ray actor.
TP=2 under Ray: ``tests/engine/test_tensor_parallel.py`` (a 4-head model; SmolLM2-135M's 9 heads
do not split over 2 ranks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from vllm import SamplingParams

from tests.engine.conftest import ENGINE_ARGS, MAX_WINDOW, RULES, module_for_tests, token_prompts
from vllm_umim import merge_stats

pytest.importorskip("ray")
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
NUM_PROMPTS, MAX_TOKENS = 20, 32


def run_ray_engine(spec: dict, timeout: int = 600) -> dict:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "engine" / "ray_engine_run.py"), json.dumps(spec)],
        capture_output=True, text=True, cwd=ROOT, timeout=timeout,
    )
    line = next((text for text in result.stdout.splitlines() if text.startswith("RESULT ")), None)
    assert line, (result.stdout[-2000:], result.stderr[-4000:])
    return json.loads(line[len("RESULT "):])


def test_ray_executor_equals_default_executor(model_dir, umim_llm, heldout_prompts):
    prompts = heldout_prompts[:NUM_PROMPTS]
    options = {"rules": str(RULES), "module": module_for_tests(), "max_window": MAX_WINDOW}
    ray_run = run_ray_engine({"model": model_dir, "umim": options, "prompts": prompts, "max_tokens": MAX_TOKENS,
                              "engine": ENGINE_ARGS})
    expected = umim_llm.generate(token_prompts(prompts), SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)

    equal = sum(o["tokens"] == list(e.outputs[0].token_ids) for o, e in zip(ray_run["outputs"], expected))
    print(f"\nRay engine started in {ray_run['start_s']} s; {equal}/{NUM_PROMPTS} outputs equal; merges prefill "
          f"{sum(o['stats']['prefill_merges'] for o in ray_run['outputs'])}, decode "
          f"{sum(o['stats']['decode_merges'] for o in ray_run['outputs'])}; worker {ray_run['workers']}")
    assert ray_run["executor"] == "UmimCpuRayExecutor" and ray_run["ray_nodes"] == 1
    [worker] = ray_run["workers"]
    assert worker["ray_actor"] and worker["plugins_loaded"]
    assert (worker["worker"], worker["runner"]) == ("UmimCPUWorker", "UmimCPUModelRunner")
    assert worker["rules_loaded"] > 0
    got = [o["tokens"] for o in ray_run["outputs"]]
    want = [list(o.outputs[0].token_ids) for o in expected]
    assert sum(g == w for g, w in zip(got, want)) == NUM_PROMPTS, [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
    assert [o["stats"] for o in ray_run["outputs"]] == [merge_stats(o) for o in expected]
    assert sum(o["stats"]["prefill_merges"] for o in ray_run["outputs"]) > 0
    assert sum(o["stats"]["decode_merges"] for o in ray_run["outputs"]) > 0
