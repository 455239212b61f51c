"""Merge figures on ``usage`` (no server: fake outputs and SSE events)."""

import asyncio
import json
from types import SimpleNamespace

from vllm_umim.server.usage import OutputTap, add_to_usage, add_to_usage_chunk, stream_with_usage, usage_figures

STATS = dict(raw_tokens=40, positions=30, raw_prompt_tokens=20, prompt_positions=14, prefill_merges=5,
             decode_merges=3, tokens_merged_away=10, kv_blocks_saved=1)


def output(stats=None, finished=True):
    return SimpleNamespace(finished=finished, kv_transfer_params={"umim": stats} if stats else None)


def test_figures_are_summed_over_prompts():
    figures = usage_figures([output(STATS), output(STATS), output(None)])
    assert figures["prompt_positions"] == 28
    assert figures["output_positions"] == 32
    assert figures["tokens_merged_away"] == 20 and figures["decode_merges"] == 6


def test_unmerged_requests_keep_stock_usage():
    usage = SimpleNamespace()
    add_to_usage(usage, [output(None)])
    assert not hasattr(usage, "umim")


def test_only_the_final_usage_chunk_changes():
    async def outputs():
        yield 0, output(STATS, finished=False)
        yield 0, output(STATS)

    async def run():
        tap = OutputTap(outputs())
        items = [item async for item in tap]
        assert len(items) == 2 and len(tap.finished) == 1
        content = 'data: {"choices":[{"text":"x"}],"usage":{"prompt_tokens":1}}\n\n'
        final = 'data: {"choices":[],"usage":{"prompt_tokens":20,"completion_tokens":20}}\n\n'

        async def events():
            for event in (content, final, "data: [DONE]\n\n"):
                yield event

        return [event async for event in stream_with_usage(events(), tap)]

    content, final, done = asyncio.run(run())
    assert "umim" not in content and done == "data: [DONE]\n\n"
    usage = json.loads(final[len("data: "):])["usage"]
    assert usage["prompt_tokens"] == 20 and usage["umim"]["tokens_merged_away"] == 10


def test_non_usage_events_pass_through():
    tap = OutputTap(None)
    tap.finished.append(output(STATS))
    for event in ('data: {"error": "x"}\n\n', "data: [DONE]\n\n", 'data: {"choices":[{"text":"usage"}]}\n\n'):
        assert add_to_usage_chunk(event, tap) == event


def test_deprecated_names_carry_the_same_figures():
    from vllm_umim.server.usage import DEPRECATED_ALIASES

    figures = usage_figures([output(STATS)])
    assert figures["merged_tokens"] == figures["positions"] == 30
    assert figures["kv_tokens_saved"] == figures["tokens_merged_away"] == 10
    assert all(figures[old] == figures[new] for old, new in DEPRECATED_ALIASES.items())
