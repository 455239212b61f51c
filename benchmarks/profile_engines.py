"""Where the time goes: stock vLLM and vllm_umim on one workload, each under cProfile, in-process
(VLLM_ENABLE_V1_MULTIPROCESSING=0, so scheduler, runner and model share the profiled process).

    python -m benchmarks.profile_engines [--scenario no-merge] [--num-prompts 8] [vLLM engine args]

Prints, per engine, the wall time, the cumulative time of the main stages and the busiest
functions; writes ``<output-dir>/profile-<scenario>.json``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

from vllm_umim.bench import worker  # noqa: E402
from vllm_umim.bench.harness import build_parser, default_rules, engine_kwargs_of, prepare_scenario  # noqa: E402
from vllm_umim.bench.summary import profile_summary  # noqa: E402
from vllm_umim.bench.workloads import natural_documents, scenario  # noqa: E402
from vllm_umim.files import write_json_atomic


def main(argv=None) -> dict:
    from transformers import AutoTokenizer

    args = build_parser().parse_args(argv)
    if args.model is None or args.model == "Qwen/Qwen3-0.6B":
        from vllm_umim.data.model import fetch_model

        args.model = str(fetch_model("smollm2-135m"))
    args.umim_rules = args.umim_rules or default_rules()
    args.umim_module = args.umim_module or "mean"
    name = args.scenario[0]
    spec = scenario(name, num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len)
    engine_kwargs = engine_kwargs_of(args)
    work_dir = Path(tempfile.mkdtemp(prefix="umim-profile-"))
    tokenizer = AutoTokenizer.from_pretrained(engine_kwargs["model"])
    prompts_path, stock_kwargs, umim_kwargs = prepare_scenario(spec, engine_kwargs, tokenizer, natural_documents(), work_dir)
    prompts = json.loads(prompts_path.read_text())
    results = {}
    for label, kwargs in (("stock", stock_kwargs), ("umim", umim_kwargs)):
        engine = worker.build_engine(kwargs)
        worker.run(engine, prompts[:2], min(4, spec.output_len), args.temperature)  # warm-up
        path = work_dir / f"{label}.prof"
        run = worker.profiled_run(engine, prompts, spec.output_len, args.temperature, str(path))
        results[label] = {"run": run, "profile": profile_summary(path)}
        del engine
        summary = results[label]["profile"]
        print(f"== {label}: {run['elapsed_s']:.1f} s, {run['tokens_per_s']:.1f} tok/s; profiled total {summary['total_s']:.1f} s, "
              f"vllm_umim self time {summary['umim_self_s']:.3f} s")
        for stage, seconds in sorted(summary["stages_cumulative_s"].items(), key=lambda kv: -kv[1]):
            print(f"   {stage:40s} {seconds:8.3f} s")
        for row in summary["top_self_time"][:10]:
            print(f"   {row['self_s']:8.3f} s self  {row['calls']:7d} calls  {row['function']}")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    out = args.output_dir / f"profile-{name}.json"
    write_json_atomic({"scenario": spec.name, "load_average": os.getloadavg(), **results}, out)
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
