"""Run one UMIM engine under vLLM's Ray executor on a local Ray instance, print its greedy outputs.

    python tests/engine/ray_engine_run.py '{"model": ..., "umim": {...}, "prompts": [[ids]], "max_tokens": 32,
                                           "engine": {extra LLM kwargs}}'

Prints ``RESULT {"outputs": [{"tokens", "stats"}], "workers": [...], "ray_nodes": N, "start_s": s}``. The
Ray instance is local and small (``num_cpus=2``, no dashboard); ``RAY_ADDRESS`` points the
EngineCore process (which calls ``ray.init()`` itself) at it instead of a second instance.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with a function (worker introspection)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray's memory monitor kills a worker when the whole node passes 95 % memory; on this shared test
# machine that is other people's processes, so the local instance runs without it.
os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")


def describe_worker(wrapper) -> dict:
    """Runs inside each vLLM worker process (given vLLM's worker wrapper): which classes serve, and
    whether UMIM loaded its files there."""
    import os

    import vllm.plugins

    worker = getattr(wrapper, "worker", wrapper)
    runner = worker.model_runner
    return {
        "pid": os.getpid(),
        "worker": type(worker).__name__,
        "runner": type(runner).__name__,
        "rules_loaded": int(runner.umim_rule_table.shape[0]) if hasattr(runner, "umim_rule_table") else None,
        "plugins_loaded": bool(getattr(vllm.plugins, "plugins_loaded", False)),
        "ray_actor": __import__("ray").get_runtime_context().get_actor_id() is not None,
    }


def main() -> None:
    import ray
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_umim import merge_stats

    spec = json.loads(sys.argv[1])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    started = time.perf_counter()
    llm = LLM(model=spec["model"], distributed_executor_backend="ray", additional_config={"umim": spec["umim"]},
              **spec.get("engine", {}))
    start_s = time.perf_counter() - started
    backend = llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend
    params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"])
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], params, use_tqdm=False)
    result = {
        "outputs": [{"tokens": list(o.outputs[0].token_ids), "stats": merge_stats(o)} for o in outs],
        "workers": llm.collective_rpc(describe_worker),
        "executor": getattr(backend, "__name__", backend),
        "ray_nodes": len(ray.nodes()),
        "start_s": round(start_s, 1),
    }
    print("RESULT " + json.dumps(result), flush=True)
    llm.llm_engine.engine_core.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
