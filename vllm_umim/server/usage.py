"""Merge figures on the OpenAI ``usage`` object.

The engine reports a finished merged request's figures in ``RequestOutput.kv_transfer_params["umim"]``
(``vllm_umim.engine.stats``). The serving layer builds ``usage`` from token counts only, so the
wrappers in ``vllm_umim.server.patches`` add one ``usage.umim`` object:

* non-streaming: set on the response's ``usage`` (an ``OpenAIBaseModel``, extra fields allowed);
* streaming: the outputs are tapped on their way into vLLM's stream generator (:class:`OutputTap`)
  and the final usage chunk (``choices == []``, sent when ``stream_options.include_usage``) gets
  the object before it leaves (:func:`add_to_usage_chunk`).

* Responses API: the engine outputs of every turn are kept on the conversation context
  (:func:`keep_finished_outputs`) and ``usage.umim`` sums them (:func:`finished_outputs`); a
  stream's ``response.completed`` event carries the same response object.

With ``n > 1`` the figures are summed over the samples (``vllm_umim.engine.stats.combine_stats``).
Requests served unmerged (``vllm_xargs: {"umim": false}``) carry no ``umim`` object: their usage
is stock vLLM's.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable

from vllm_umim.engine.stats import merge_stats

USAGE_KEY = "umim"
# Names before the one vocabulary of vllm_umim.engine.stats; still sent, to be dropped in 0.2.
DEPRECATED_ALIASES = {
    "merged_tokens": "positions",
    "merged_prompt_tokens": "prompt_positions",
    "merged_output_tokens": "output_positions",
    "kv_tokens_saved": "tokens_merged_away",
}


def usage_figures(outputs: Iterable) -> dict | None:
    """Summed merge figures of finished ``RequestOutput``s (prompts of one API request), or None
    when none of them was merged."""
    stats = [s for s in map(merge_stats, outputs) if s]
    if not stats:
        return None
    total = lambda key: sum(s[key] for s in stats)  # noqa: E731
    figures = {
        "raw_tokens": total("raw_tokens"),
        "positions": total("positions"),
        "prompt_positions": total("prompt_positions"),
        "output_positions": total("positions") - total("prompt_positions"),
        "prefill_merges": total("prefill_merges"),
        "decode_merges": total("decode_merges"),
        "tokens_merged_away": total("tokens_merged_away"),
        "kv_blocks_saved": total("kv_blocks_saved"),
    }
    return {**figures, **{old: figures[new] for old, new in DEPRECATED_ALIASES.items()}}


def add_to_usage(usage, outputs: Iterable) -> None:
    """Set ``usage.umim`` from the finished outputs (no-op without usage or merge figures)."""
    figures = usage_figures(outputs)
    if usage is not None and figures is not None:
        setattr(usage, USAGE_KEY, figures)


class OutputTap:
    """Wraps a stream of ``RequestOutput`` (or ``(index, RequestOutput)``) and keeps the finished ones."""

    def __init__(self, outputs: AsyncIterator):
        self._outputs = outputs
        self.finished: list = []

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self._outputs.__anext__()
        output = item[1] if isinstance(item, tuple) else item
        if getattr(output, "finished", False):
            self.finished.append(output)
        return item

    async def aclose(self):  # vLLM may close the stream it was given
        close = getattr(self._outputs, "aclose", None)
        if close is not None:
            await close()


def add_to_usage_chunk(event: str, tap: OutputTap) -> str:
    """The SSE event with ``usage.umim`` added if it is the final usage chunk, else unchanged."""
    if not event.startswith("data: {") or '"usage"' not in event or '"choices":[]' not in event:
        return event
    figures = usage_figures(tap.finished)
    if figures is None:
        return event
    chunk = json.loads(event[len("data: ") :])
    if not isinstance(chunk.get("usage"), dict) or chunk.get("choices"):
        return event
    chunk["usage"][USAGE_KEY] = figures
    return f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"


async def stream_with_usage(events: AsyncIterator[str], tap: OutputTap):
    """vLLM's SSE stream, its final usage chunk carrying ``usage.umim``."""
    async for event in events:
        yield add_to_usage_chunk(event, tap)


FINISHED_ATTRIBUTE = "umim_finished_outputs"


def keep_finished_outputs(context) -> None:
    """Make a Responses API conversation context keep every finished engine output it is given
    (one per turn); its ``append_output`` is wrapped on this instance only."""
    if hasattr(context, FINISHED_ATTRIBUTE):
        return
    kept: list = []
    append_output = context.append_output

    def append_and_keep(output):
        if getattr(output, "finished", False):
            kept.append(output)
        return append_output(output)

    setattr(context, FINISHED_ATTRIBUTE, kept)
    context.append_output = append_and_keep


def finished_outputs(context) -> list:
    return getattr(context, FINISHED_ATTRIBUTE, [])
