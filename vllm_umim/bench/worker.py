"""One engine, stock vLLM or vllm_umim, in its own process; driven by ``vllm_umim.bench.harness``.

    python -m vllm_umim.bench.worker SPEC_JSON RESULT_FD

SPEC_JSON: ``{"engine_kwargs": {...EngineArgs fields...}, "label": "stock"}``. Commands arrive as
JSON lines on stdin (``{"prompts": path, "output_len": n, "temperature": t, "profile": path|null,
"return_tokens": bool, "unmerged": bool}``,
or ``{"quit": true}``); each run's measurements go back as one JSON line on RESULT_FD (stdout and
stderr carry vLLM's log). The run loop is ``vllm bench throughput``'s: add every request, then
step the engine until all finish; ``ignore_eos`` with a fixed output length.
"""

from __future__ import annotations

import json
import os
import sys
import time

from vllm.v1.metrics.loggers import StatLoggerBase


class PeakKvLogger(StatLoggerBase):
    """vLLM stat logger keeping the peak KV-cache usage and the preemptions of the current run."""

    instances: list["PeakKvLogger"] = []

    def __init__(self, vllm_config, engine_index: int = 0):
        self.num_blocks = vllm_config.cache_config.num_gpu_blocks_override or vllm_config.cache_config.num_gpu_blocks
        self.reset()
        PeakKvLogger.instances.append(self)

    def reset(self) -> None:
        self.peak_usage, self.preemptions = 0.0, 0
        self.draft_tokens = self.accepted_tokens = 0  # n-gram speculation (vLLM's speculative_config)

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        if scheduler_stats is not None:
            self.peak_usage = max(self.peak_usage, scheduler_stats.kv_cache_usage)
            spec = scheduler_stats.spec_decoding_stats
            if spec is not None:
                self.draft_tokens += spec.num_draft_tokens
                self.accepted_tokens += spec.num_accepted_tokens
        if iteration_stats is not None:
            self.preemptions += iteration_stats.num_preempted_reqs

    def log_engine_initialized(self):
        pass


def build_engine(engine_kwargs: dict):
    from vllm import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    engine_args = EngineArgs(**engine_kwargs, disable_log_stats=False)
    return LLMEngine.from_engine_args(engine_args, stat_loggers=[PeakKvLogger])


def run(engine, prompts: list[list[int]], output_len: int, temperature: float, return_tokens: bool = False,
        unmerged: bool = False) -> dict:
    """Serve every prompt once; wall time from the first request added to the last one finished.
    ``steps``: engine steps taken. With ``return_tokens``, per request in prompt order: its output
    ids (``token_ids``) and its positions at its end (``request_positions``; raw tokens where it ran
    unmerged). ``unmerged``: every request opts out of merging (``extra_args={"umim":
    False}``; stock vLLM ignores it)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_umim import merge_stats

    engine.reset_prefix_cache()  # repetitions must not reuse each other's KV
    stats_logger = PeakKvLogger.instances[-1]
    stats_logger.reset()
    params = SamplingParams(temperature=temperature, max_tokens=output_len, ignore_eos=True, seed=0,
                            extra_args={"umim": False} if unmerged else None)
    outputs = []
    steps = 0
    started = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"bench-{i}", TokensPrompt(prompt_token_ids=prompt), params)
    while engine.has_unfinished_requests():
        outputs += [output for output in engine.step() if output.finished]
        steps += 1
    elapsed = time.perf_counter() - started

    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    prompt_tokens = sum(map(len, prompts))
    merged = [s for s in map(merge_stats, outputs) if s]
    total = lambda key: sum(s[key] for s in merged)  # noqa: E731
    result = {
        "elapsed_s": elapsed,
        "steps": steps,
        "num_requests": len(outputs),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "requests_per_s": len(outputs) / elapsed,
        "tokens_per_s": (prompt_tokens + output_tokens) / elapsed,  # raw tokens, as users count them
        "output_tokens_per_s": output_tokens / elapsed,
        "peak_kv_usage": stats_logger.peak_usage,
        "num_kv_blocks": stats_logger.num_blocks,
        "peak_kv_blocks": round(stats_logger.peak_usage * stats_logger.num_blocks) if stats_logger.num_blocks else None,
        "preemptions": stats_logger.preemptions,
        "merged_requests": len(merged),
        "raw_tokens": total("raw_tokens") if merged else None,
        "positions": total("positions") if merged else None,
        "raw_prompt_tokens": total("raw_prompt_tokens") if merged else None,
        "prompt_positions": total("prompt_positions") if merged else None,
        "prefill_merges": total("prefill_merges") if merged else 0,
        "decode_merges": total("decode_merges") if merged else 0,
        "tokens_merged_away": total("tokens_merged_away") if merged else 0,
        "draft_tokens": stats_logger.draft_tokens,
        "accepted_tokens": stats_logger.accepted_tokens,
    }
    if return_tokens:
        by_index = {int(o.request_id.split("-")[1]): o for o in outputs}
        in_order = [by_index[i] for i in range(len(prompts))]
        result["token_ids"] = [list(o.outputs[0].token_ids) for o in in_order]
        result["request_positions"] = [(merge_stats(o) or {}).get("positions") or len(p) + len(o.outputs[0].token_ids)
                                       for o, p in zip(in_order, prompts)]
    return result


def profiled_run(engine, prompts, output_len, temperature, path: str) -> dict:
    """``run`` under cProfile (meaningful with VLLM_ENABLE_V1_MULTIPROCESSING=0: scheduler and model
    in this process); the raw profile goes to ``path``."""
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    result = run(engine, prompts, output_len, temperature)
    profiler.disable()
    profiler.dump_stats(path)
    return result


def main() -> None:
    spec = json.loads(sys.argv[1])
    results = os.fdopen(int(sys.argv[2]), "w", buffering=1)
    started = time.perf_counter()
    engine = build_engine(spec["engine_kwargs"])
    results.write(json.dumps({"ready": spec["label"], "startup_s": time.perf_counter() - started}) + "\n")
    for line in sys.stdin:
        command = json.loads(line)
        if command.get("quit"):
            break
        with open(command["prompts"]) as f:
            prompts = json.load(f)
        if command.get("profile"):
            result = profiled_run(engine, prompts, command["output_len"], command["temperature"], command["profile"])
        else:
            result = run(engine, prompts, command["output_len"], command["temperature"], command.get("return_tokens", False),
                         command.get("unmerged", False))
        results.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
