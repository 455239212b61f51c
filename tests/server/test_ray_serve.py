"""``vllm serve MODEL --umim-rules R --distributed-executor-backend ray`` on this node: the
EngineCore starts a local Ray instance (2 CPUs here), the worker is UMIM's Ray actor, and the
completions equal the default-executor offline engine's, merge figures included."""

from __future__ import annotations

import httpx
import pytest
from vllm import SamplingParams

from tests.engine.conftest import MAX_WINDOW as ENGINE_MAX_WINDOW
from tests.engine.conftest import token_prompts
from tests.server.conftest import RULES, SERVER_ENV, module_for_tests, server_args
from vllm_umim import merge_stats

pytest.importorskip("ray")
pytestmark = pytest.mark.slow
NUM_PROMPTS, MAX_TOKENS = 4, 32


def test_vllm_serve_with_ray_executor_equals_default_executor(model_dir, umim_llm, heldout_prompts):
    from vllm_umim.server.launch import VllmServer

    prompts = heldout_prompts[:NUM_PROMPTS]
    args = server_args(rules=RULES, module=module_for_tests(), **{"max-window": ENGINE_MAX_WINDOW})
    # the EngineCore's ray.init() starts the local instance; Ray's memory monitor (kills a worker when the
    # whole node passes 95 % memory) is off on this shared machine
    env = {**SERVER_ENV, "RAY_USAGE_STATS_ENABLED": "0", "RAY_memory_monitor_refresh_ms": "0"}
    with VllmServer(model_dir, args + ["--distributed-executor-backend", "ray"], env=env, start_timeout=900) as server:
        answers = []
        for prompt in prompts:
            body = {"model": model_dir, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
            response = httpx.post(server.url + "/v1/completions", json=body, timeout=300)
            assert response.status_code == 200, response.text
            answers.append(response.json())
        log = server.log_path.read_text(errors="replace")
        print(f"\nvllm serve --distributed-executor-backend ray started in {server.startup_s:.0f} s")
    assert "UmimCpuRayWorkerProc" in log  # the model ran in UMIM's Ray worker actor
    expected = umim_llm.generate(token_prompts(prompts), SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    assert [a["choices"][0]["text"] for a in answers] == [o.outputs[0].text for o in expected]
    for answer, output in zip(answers, expected):
        got, want = answer["usage"]["umim"], merge_stats(output)
        assert (got["prefill_merges"], got["decode_merges"], got["positions"]) == (
            want["prefill_merges"], want["decode_merges"], want["positions"])
    assert sum(a["usage"]["umim"]["prefill_merges"] for a in answers) > 0
    assert sum(a["usage"]["umim"]["decode_merges"] for a in answers) > 0
