"""KV accounting under load, run in its own process (``python -m tests.engine.kv_stress OUT.json``).

An in-process engine (no EngineCore subprocess) lets this script read the scheduler after every
step: 200 requests mixing dynamic, prompt-only and opt-out merging, varied prompt and output
lengths, aborts mid-generation, and a KV space small enough that vLLM must preempt. Checked:

* while running, no request holds more than ceil(compressed_len / block_size) + 1 blocks;
* after every request ended, every block is free again;
* preemptions did happen (else the test proves nothing about recompute).

Greedy outputs of the requests that finished are written out, so the test can compare them with
an engine that never preempts.
"""

from __future__ import annotations

import json
import math
import os
import sys

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")

NUM_REQUESTS = 200
BLOCK_SIZE = 32  # the CPU attention backend wants multiples of 32
NUM_BLOCKS = 40  # 1,280 token slots for up to 32 running requests: preemption is certain
MODES = [True, "prompt", False]  # dynamic (engine default), prompt-only, opted out


def stress_requests(prompts: list[list[int]]):
    """Deterministic mix: (request id, prompt ids, SamplingParams kwargs, abort step or None)."""
    requests = []
    for i in range(NUM_REQUESTS):
        base = prompts[i % len(prompts)]
        length = 16 + (i * 37) % 100
        prompt = (base * 3)[:length]
        params = dict(temperature=0.0, max_tokens=16 + (i * 13) % 48, ignore_eos=True, extra_args={"umim": MODES[i % 3]})
        abort_step = 5 + i % 20 if i % 10 == 7 else None
        requests.append((f"r{i}", prompt, params, abort_step))
    return requests


def external_id(request_id: str) -> str:
    """vLLM appends "-<8 random chars>" to the id a caller gives (InputProcessor.assign_request_id)."""
    return request_id.rsplit("-", 1)[0]


def run(model_dir: str, rules: str, module: str, prompts: list[list[int]], engine_args: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=model_dir,
        **engine_args,  # fp32 eager, or {} for vLLM's defaults (bf16, torch.compile)
        max_model_len=512,
        seed=0,
        block_size=BLOCK_SIZE,
        num_gpu_blocks_override=NUM_BLOCKS,
        max_num_seqs=32,
        max_num_batched_tokens=64,  # long prompts are prefilled in chunks
        enable_prefix_caching=True,
        additional_config={"umim": {"rules": rules, "module": module}},
    )
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    pool = scheduler.kv_cache_manager.block_pool
    free_at_start = pool.get_num_free_blocks()

    requests = stress_requests(prompts)
    aborts: dict[int, list[str]] = {}
    for request_id, prompt, params, abort_step in requests:
        engine.add_request(request_id, TokensPrompt(prompt_token_ids=prompt), SamplingParams(**params))
        if abort_step is not None:
            aborts.setdefault(abort_step, []).append(request_id)

    outputs, violations, preempted = {}, [], set()
    max_blocks_over_need = -math.inf
    step = 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                outputs[output.request_id] = list(output.outputs[0].token_ids)
        step += 1
        if step in aborts:
            engine.abort_request(aborts.pop(step))
        for request in scheduler.running:
            held = len(manager.req_to_blocks.get(request.request_id, ()))
            need = math.ceil(request.num_tokens / BLOCK_SIZE)
            max_blocks_over_need = max(max_blocks_over_need, held - need)
            if held > need + 1:
                violations.append((step, external_id(request.request_id), held, request.num_tokens))
        preempted |= {external_id(r.request_id) for r in scheduler.requests.values() if r.num_preemptions}
    return {
        "steps": step,
        "free_at_start": free_at_start,
        "free_at_end": pool.get_num_free_blocks(),
        "violations": violations[:20],
        "max_blocks_over_need": max_blocks_over_need,
        "preempted_requests": sorted(preempted),
        "finished": outputs,
        "aborted": sorted(r for r, *_ , a in requests if a is not None),
        "requests": [(r, p, params) for r, p, params, _ in requests],
    }


if __name__ == "__main__":
    config = json.loads(open(sys.argv[1]).read())
    result = run(config["model_dir"], config["rules"], config["module"], config["prompts"], config["engine_args"])
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)
