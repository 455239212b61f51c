"""What serving an adapted reader through vLLM's LoRA path costs (issue 20, design 3, way (i)).

    python -m benchmarks.lora_cost --reader RUN/module.reader --json benchmarks/results/lora-cost/lora-cost.json

An adapted reader (``vllm-umim train --reader-rank``) can be served two ways: folded into the
weights (``vllm-umim merge-reader``: an ordinary model folder, the same speed as the base model),
or as a LoRA adapter per request, so that opted-out requests run the base model unchanged. The
second needs ``enable_lora=True``, and vLLM 0.32 turns torch.compile off on CPU when LoRA is
enabled. This measures that price with stock vLLM alone (no UMIM), all three engines up at once
and taking turns every repetition (order rotated), on the natural workload of ``vllm-umim bench``
(held-out text, 32 x 190 -> 64 tokens, greedy, ``ignore_eos``):

* ``stock``: vLLM in its defaults (torch.compile, bf16);
* ``lora-off``: the same with ``enable_lora=True`` serving requests without an adapter;
* ``lora-on``: that engine serving every request with the reader's adapter (``LoRARequest``).

Ratios are output tokens per second over stock's in the same repetition (median, range, mean with
its 95 % interval). Nothing here is UMIM-specific: it is the floor the per-request path starts from.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

ROWS = ("stock", "lora-off", "lora-on")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(Path.home() / ".cache" / "vllm_umim" / "models" / "smollm2-135m"))
    parser.add_argument("--reader", required=True, help="the adapters' folder (PEFT layout), e.g. RUN/module.reader")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=190)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")

    import json

    import vllm
    from vllm import LLM, SamplingParams
    from vllm.config import CompilationMode
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from vllm_umim.bench.summary import spread
    from vllm_umim.bench.workloads import natural_documents, natural_prompts
    from vllm_umim.data.model import load_tokenizer
    from vllm_umim.files import write_json_atomic
    from vllm_umim.training.reader import adapter_sha256

    rank = json.loads((Path(args.reader) / "adapter_config.json").read_text())["r"]
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in
               natural_prompts(load_tokenizer(args.model), natural_documents(), args.prompts, args.input_len)]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    started = time.perf_counter()
    engines = {"stock": LLM(args.model, seed=0),
               "lora": LLM(args.model, seed=0, enable_lora=True, max_lora_rank=max(8, rank), max_loras=1)}
    start_seconds = round(time.perf_counter() - started, 1)
    compiled = {name: llm.llm_engine.vllm_config.compilation_config.mode != CompilationMode.NONE for name, llm in engines.items()}
    adapter = LoRARequest("reader", 1, str(Path(args.reader).resolve()))
    serve = {"stock": lambda: engines["stock"].generate(prompts, params, use_tqdm=False),
             "lora-off": lambda: engines["lora"].generate(prompts, params, use_tqdm=False),
             "lora-on": lambda: engines["lora"].generate(prompts, params, use_tqdm=False, lora_request=adapter)}
    for row in ROWS:  # warm-up: first requests, the adapter's load
        serve[row]()
    runs = {row: [] for row in ROWS}
    for rep in range(args.repetitions):
        order = ROWS[rep % len(ROWS):] + ROWS[:rep % len(ROWS)]
        for row in order:
            t0 = time.perf_counter()
            outputs = serve[row]()
            seconds = time.perf_counter() - t0
            tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
            runs[row].append({"seconds": seconds, "output_tokens": tokens, "tok_per_s": tokens / seconds})
    result = {
        "vllm": vllm.__version__, "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "model": args.model, "reader": args.reader, "reader_sha256": adapter_sha256(args.reader), "lora_rank": rank,
        "workload": {"prompts": args.prompts, "input_len": args.input_len, "output_len": args.output_len,
                     "source": "natural (vllm_umim.bench.workloads)"},
        "repetitions": args.repetitions, "engine_start_seconds": start_seconds,
        "torch_compile": {"stock": compiled["stock"], "lora-off": compiled["lora"], "lora-on": compiled["lora"]},
        "runs": runs,
        "ratio_to_stock": {row: spread([r["tok_per_s"] / s["tok_per_s"] for r, s in zip(runs[row], runs["stock"])])
                           for row in ROWS if row != "stock"},
    }
    write_json_atomic(result, args.json)
    for row, figures in result["ratio_to_stock"].items():
        print(f"{row}: {figures['median']:.3f} [{figures['min']:.3f}-{figures['max']:.3f}] of stock "
              f"(torch.compile {'on' if result['torch_compile'][row] else 'off'})")
    return result


if __name__ == "__main__":
    main()
