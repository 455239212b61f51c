"""``vllm-umim lm-eval``: task accuracy through the engine with lm-evaluation-harness, stock vLLM
(fp32 and bf16) and UMIM operating points on the same items, with paired differences
(``vllm_umim.evaluation.harness``).

    vllm-umim lm-eval --model ~/.cache/vllm_umim/models/smollm2-135m \\
        --point artifacts/smollm2-135m/balanced --output-dir artifacts/smollm2-135m/lm-eval

Wire it with ``register(subparsers)``; ``run(args)`` is the subcommand's function.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from vllm_umim.errors import UmimError


def register(subparsers) -> None:
    from vllm_umim.evaluation.harness import DEFAULT_TASKS, LOGLIKELIHOOD_WINDOW, PRIMARY_METRIC

    p = subparsers.add_parser(
        "lm-eval", help="task accuracy (lm-evaluation-harness, offline tasks): stock fp32/bf16 and operating points, paired",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="model folder (or id vLLM can load offline)")
    p.add_argument("--output-dir", required=True, type=Path, help="items/<system>/<task>.json, results.json, results.md")
    p.add_argument("--point", action="append", default=[], metavar="FOLDER",
                   help="an operating-point folder (rules.bin, module, merge.json); repeatable; named after the folder")
    p.add_argument("--umim", action="append", default=[], metavar="NAME=JSON",
                   help='a system from rules + settings, e.g. \'w8={"rules": "rules.bin", "mode": "prompt", "window": 8}\'; repeatable')
    p.add_argument("--system-model", action="append", default=[], metavar="NAME=FOLDER",
                   help="run system NAME (a --point or --umim one) on this model folder instead of --model, e.g. an "
                        "adapted reader merged into the weights (vllm-umim merge-reader); a NAME not among them adds "
                        "that model unmerged; paired against stock fp32 on --model all the same; repeatable")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help=f"comma-separated, of: {', '.join(PRIMARY_METRIC)}")
    p.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    p.add_argument("--task-limit", action="append", default=[], metavar="TASK=N", help="items for one task; repeatable")
    p.add_argument("--no-bf16", action="store_true", help="leave out stock vLLM in bf16")
    p.add_argument("--point-dtype", default="float32", help="dtype of the UMIM systems")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--compile", action="store_true", help="torch.compile the engines (default: eager, faster to start)")
    p.add_argument("--loglikelihood-window", type=int, default=LOGLIKELIHOOD_WINDOW,
                   help="longest scored continuation a UMIM engine keeps raw; longer ones are served unmerged and counted")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, metavar="F",
                   help="vLLM's share of memory an engine may hold (on CPU too); lower it where other engines run beside "
                        "(vLLM's CPU worker refuses to start when less than that share is free)")
    p.add_argument("--kl-top-k", type=int, default=0, metavar="K",
                   help="also the per-token KL to stock fp32 on the scored continuations, from top-K prompt logprobs "
                        "(at most the engine's max_logprobs, 20; 0: off)")


def _pairs(values: list[str], what: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name or not rest:
            raise UmimError(f"{what} must be NAME=VALUE, got {value!r}")
        pairs[name] = rest
    return pairs


def build_config(args):
    from vllm_umim.evaluation.harness import LmEvalConfig, System, point_system, stock_systems

    systems = stock_systems(("float32",) if args.no_bf16 else ("float32", "bfloat16"))
    for folder in args.point:
        if not Path(folder).exists():
            raise UmimError(f"--point {folder}: no such folder or file")
        systems.append(point_system(folder, dtype=args.point_dtype))
    for name, text in _pairs(args.umim, "--umim").items():
        try:
            options = json.loads(text)
        except json.JSONDecodeError as e:
            raise UmimError(f"--umim {name}: not JSON ({e})") from None
        if not isinstance(options, dict) or "rules" not in options:
            raise UmimError(f"--umim {name}: needs a JSON object with \"rules\"")
        systems.append(System(name, args.point_dtype, options))
    for name, folder in _pairs(args.system_model, "--system-model").items():
        if not Path(folder).expanduser().exists():
            raise UmimError(f"--system-model {name}: no such model folder {folder}")
        named = {s.name: i for i, s in enumerate(systems)}
        if name in named:
            systems[named[name]] = dataclasses.replace(systems[named[name]], model=str(Path(folder).expanduser()))
        else:
            systems.append(System(name, args.point_dtype, None, str(Path(folder).expanduser())))
    try:
        limits = {task: int(n) for task, n in _pairs(args.task_limit, "--task-limit").items()}
    except ValueError:
        raise UmimError(f"--task-limit needs TASK=INTEGER, got {args.task_limit}") from None
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    return LmEvalConfig(model=args.model, output_dir=args.output_dir, systems=systems, tasks=tasks, limit=args.limit,
                        limits=limits, max_model_len=args.max_model_len, enforce_eager=not args.compile,
                        loglikelihood_window=args.loglikelihood_window, kl_top_k=args.kl_top_k,
                        engine_args={} if args.gpu_memory_utilization is None else
                        {"gpu_memory_utilization": args.gpu_memory_utilization})


def run(args) -> None:
    from vllm_umim.evaluation.harness import render_table, run_lm_eval

    results = run_lm_eval(build_config(args))
    print(render_table(results))
    print(f"wrote {args.output_dir / 'results.json'} and {args.output_dir / 'results.md'}")
