"""``vllm serve MODEL --umim-rules ...`` for real: starts, serves the OpenAI API as stock vLLM does,
and reports merge figures in ``usage`` and on ``/metrics``."""

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import MAX_WINDOW

pytestmark = pytest.mark.slow

PROMPT = "The history of the United States of America began"


def complete(server, **body):
    body = {"model": server.model, "prompt": PROMPT, "max_tokens": 24, "temperature": 0, **body}
    response = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def stream_events(server, path, body):
    events = []
    with httpx.stream("POST", server.url + path, json={**body, "stream": True}, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[len("data: "):]))
    return events


def test_help_lists_the_umim_flags():
    vllm_cli = Path(sys.executable).with_name("vllm")
    help_text = subprocess.run([vllm_cli, "serve", "--help=UMIM"], capture_output=True, text=True, timeout=300).stdout
    assert "--umim-rules" in help_text and "--umim-module" in help_text and "--umim-mode" in help_text


def test_completion_usage_carries_merge_figures(umim_server):
    result = complete(umim_server)
    usage = result["usage"]
    figures = usage["umim"]
    assert figures["prompt_positions"] < usage["prompt_tokens"]  # usage counts raw tokens, as stock
    assert figures["raw_tokens"] == usage["total_tokens"]
    assert figures["tokens_merged_away"] == figures["raw_tokens"] - figures["positions"] > 0
    assert figures["prefill_merges"] > 0


def test_opt_out_keeps_stock_usage(umim_server):
    usage = complete(umim_server, vllm_xargs={"umim": False})["usage"]
    assert "umim" not in usage
    bad = httpx.post(umim_server.url + "/v1/completions", timeout=60,
                     json={"model": umim_server.model, "prompt": PROMPT, "max_tokens": 4, "vllm_xargs": {"umim": "always"}})
    assert bad.status_code == 400, bad.text


def test_streamed_completion_final_usage_chunk(umim_server):
    body = {"model": umim_server.model, "prompt": PROMPT, "max_tokens": 24, "temperature": 0,
            "stream_options": {"include_usage": True}}
    events = stream_events(umim_server, "/v1/completions", body)
    text = "".join(choice["text"] for event in events for choice in event["choices"])
    assert text == complete(umim_server)["choices"][0]["text"]
    final = events[-1]
    assert final["choices"] == [] and final["usage"]["umim"]["tokens_merged_away"] > 0
    assert all("umim" not in (event.get("usage") or {}) for event in events[:-1])


def test_every_ending_carries_merge_figures(umim_server):
    """Length, stop string (the frontend finishes those itself), stop token: usage.umim and the
    counters, streamed or not."""
    full = complete(umim_server, logprobs=0, return_tokens_as_token_ids=True)["choices"][0]
    stop_token = int(full["logprobs"]["tokens"][12].removeprefix("token_id:"))
    middle = len(full["text"]) // 2
    endings = {"length": ({}, "length"), "stop string": ({"stop": [full["text"][middle : middle + 3]]}, "stop"),
               "stop token": ({"stop_token_ids": [stop_token]}, "stop")}
    before = umim_server.metrics()
    for name, (extra, finish_reason) in endings.items():
        usage = complete(umim_server, **extra)["usage"]
        choice = complete(umim_server, **extra)["choices"][0]
        events = stream_events(umim_server, "/v1/completions", {"model": umim_server.model, "prompt": PROMPT, "max_tokens": 24,
                                                                "temperature": 0, "stream_options": {"include_usage": True}, **extra})
        assert choice["finish_reason"] == finish_reason, name
        for figures in (usage.get("umim"), events[-1]["usage"].get("umim")):
            assert figures is not None, name
            assert figures["prompt_positions"] < usage["prompt_tokens"] and figures["tokens_merged_away"] > 0, name
    merged = umim_server.metrics()["vllm_umim:merged_requests_total"] - before.get("vllm_umim:merged_requests_total", 0)
    assert merged == 3 * len(endings)


def test_window_options_come_flat_in_vllm_xargs(umim_server):
    merged = complete(umim_server, vllm_xargs={"umim": "prompt"})["usage"]
    windowed = complete(umim_server, vllm_xargs={"umim": "prompt", "umim_window": MAX_WINDOW})["usage"]
    assert windowed["prompt_tokens"] == merged["prompt_tokens"]
    assert windowed["umim"]["prompt_positions"] > merged["umim"]["prompt_positions"]  # the prompt's tail stayed raw
    too_wide = httpx.post(umim_server.url + "/v1/completions", timeout=60, json={
        "model": umim_server.model, "prompt": PROMPT, "max_tokens": 4, "vllm_xargs": {"umim_window": MAX_WINDOW + 1}})
    assert too_wide.status_code == 400 and "max_window" in too_wide.text


def test_chat_completions_carry_merge_figures(umim_server):
    body = {"model": umim_server.model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 24, "temperature": 0}
    response = httpx.post(umim_server.url + "/v1/chat/completions", json=body, timeout=120).json()
    assert response["usage"]["umim"]["prompt_positions"] < response["usage"]["prompt_tokens"]
    events = stream_events(umim_server, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    text = "".join(choice["delta"].get("content") or "" for event in events for choice in event["choices"])
    assert text == response["choices"][0]["message"]["content"]
    assert events[-1]["usage"]["umim"] == response["usage"]["umim"]


def test_metrics_count_merges(umim_server):
    before = umim_server.metrics()
    figures = complete(umim_server)["usage"]["umim"]
    after = umim_server.metrics()
    delta = lambda name: after[f"vllm_umim:{name}_total"] - before.get(f"vllm_umim:{name}_total", 0)  # noqa: E731
    assert delta("merged_requests") == 1
    assert delta("tokens_merged_away") == figures["tokens_merged_away"]
    assert delta("prefill_merges") == figures["prefill_merges"]
    assert any(name.startswith("vllm:kv_cache_usage_perc") for name in after)  # vLLM's own, beside ours


def test_n_samples_sum_their_merge_figures(umim_server):
    single = complete(umim_server)["usage"]
    body = {"n": 2, "temperature": 1.0, "seed": 3}  # vLLM runs each sample as its own engine request
    for stream in (False, True):
        if stream:
            events = stream_events(umim_server, "/v1/completions", {"model": umim_server.model, "prompt": PROMPT, "max_tokens": 24,
                                                                    **body, "stream_options": {"include_usage": True}})
            usage = events[-1]["usage"]
        else:
            usage = complete(umim_server, **body)["usage"]
        figures = usage["umim"]
        assert figures["raw_tokens"] == 2 * usage["prompt_tokens"] + usage["completion_tokens"], stream
        assert figures["prompt_positions"] == 2 * single["umim"]["prompt_positions"], stream
        assert figures["prefill_merges"] == 2 * single["umim"]["prefill_merges"], stream


def test_responses_api_carries_merge_figures(umim_server):
    body = {"model": umim_server.model, "input": PROMPT, "max_output_tokens": 24, "temperature": 0}
    response = httpx.post(umim_server.url + "/v1/responses", json=body, timeout=120)
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    figures = usage["umim"]
    assert figures["raw_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert figures["prompt_positions"] < usage["input_tokens"] and figures["tokens_merged_away"] > 0
    events = stream_events(umim_server, "/v1/responses", body)
    completed = [event for event in events if event.get("type") == "response.completed"]
    assert len(completed) == 1 and completed[0]["response"]["usage"]["umim"] == figures
    opted_out = httpx.post(umim_server.url + "/v1/responses", json={**body, "vllm_xargs": {"umim": False}}, timeout=120)
    assert "umim" not in opted_out.json()["usage"]
