"""Load test against a real ``vllm serve --umim-rules`` on 127.0.0.1 (bounded count and time).

Many concurrent streaming clients: merged, opted out (``vllm_xargs: {"umim": false}``) and some
that drop the connection mid-stream. Afterwards: no errors, no KV blocks left in use (vLLM's own
``vllm:kv_cache_usage_perc`` back to 0), merged greedy outputs equal the offline UMIM engine's,
opted-out outputs equal stock vLLM's, and the merge counters moved by the finished merged requests.
"""

import asyncio
import json
import time

import httpx
import pytest

pytestmark = pytest.mark.slow

CLIENTS = 24
MAX_TOKENS = 32
ABORT_AFTER_CHUNKS = 3
TIME_LIMIT_S = 600


def client_kind(i: int) -> str:
    return ("merged", "merged", "opt-out", "abort")[i % 4]


async def stream_one(client, server, prompt, kind):
    body = {"model": server.model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True, "stream_options": {"include_usage": True}}
    if kind == "opt-out":
        body["vllm_xargs"] = {"umim": False}
    token_ids, usage, chunks = [], None, 0
    async with client.stream("POST", server.url + "/v1/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            assert "error" not in event, event
            for choice in event["choices"]:
                token_ids += choice.get("token_ids") or []
                chunks += 1
            usage = event.get("usage") or usage
            if kind == "abort" and chunks >= ABORT_AFTER_CHUNKS:
                return None  # leaving the block closes the connection mid-stream
    return token_ids, usage


async def run_clients(server, prompts):
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=TIME_LIMIT_S, limits=limits) as client:
        tasks = [stream_one(client, server, prompts[i % len(prompts)], client_kind(i)) for i in range(CLIENTS)]
        return await asyncio.gather(*tasks)


def offline_outputs(llm, prompts):
    from vllm import SamplingParams

    from tests.engine.conftest import token_prompts

    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(token_prompts(prompts), params, use_tqdm=False)]


def kv_usage(metrics: dict) -> float:
    return sum(v for k, v in metrics.items() if k.startswith("vllm:kv_cache_usage_perc"))


def requests_in_flight(metrics: dict) -> float:
    return sum(v for k, v in metrics.items() if k.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting")))


def test_concurrent_streams_with_aborts(umim_server, heldout_prompts, umim_llm, stock_llm):
    prompts = heldout_prompts[:16]
    before = umim_server.metrics()
    started = time.monotonic()
    results = asyncio.run(asyncio.wait_for(run_clients(umim_server, prompts), TIME_LIMIT_S))
    assert time.monotonic() - started < TIME_LIMIT_S

    merged_reference = offline_outputs(umim_llm, prompts)
    stock_reference = offline_outputs(stock_llm, prompts)
    finished_merged, saved = 0, 0
    for i, result in enumerate(results):
        kind = client_kind(i)
        if kind == "abort":
            assert result is None
            continue
        token_ids, usage = result
        assert usage["completion_tokens"] == MAX_TOKENS == len(token_ids)
        if kind == "merged":
            assert token_ids == merged_reference[i % len(prompts)], f"client {i}"
            finished_merged += 1
            saved += usage["umim"]["tokens_merged_away"]
        else:
            assert token_ids == stock_reference[i % len(prompts)], f"client {i}"
            assert "umim" not in usage

    deadline = time.monotonic() + 60
    while (kv_usage(metrics := umim_server.metrics()) > 0 or requests_in_flight(metrics) > 0) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert requests_in_flight(metrics) == 0, "requests still running after every client finished or left"
    assert kv_usage(metrics) == 0, f"KV blocks still in use: {kv_usage(metrics):.4f}"
    assert metrics["vllm_umim:merged_requests_total"] - before.get("vllm_umim:merged_requests_total", 0) == finished_merged
    assert metrics["vllm_umim:tokens_merged_away_total"] - before.get("vllm_umim:tokens_merged_away_total", 0) == saved > 0
