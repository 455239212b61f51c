"""``vllm-umim bench``: the throughput benchmark (``benchmarks/bench_throughput.py``), stock vLLM
and vllm_umim side by side. Every argument is passed through; ``vllm-umim bench --help`` lists them
(vLLM's engine arguments, ``--umim-*``, and the benchmark's own)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from vllm_umim.errors import UmimError

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_throughput.py"


def add_bench_parser(subparsers) -> None:
    # No option prefix of its own: every argument, "--help" included, goes to the benchmark's parser.
    p = subparsers.add_parser(
        "bench", help="throughput vs stock vLLM (prefill-heavy, decode-heavy KV-bound, no-merge)", add_help=False, prefix_chars="\0"
    )
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> None:
    if not SCRIPT.is_file():
        raise UmimError(f"the benchmark lives in the repository checkout ({SCRIPT} is missing); install with pip install -e")
    spec = importlib.util.spec_from_file_location("bench_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(args.bench_args)


register, run = add_bench_parser, cmd_bench  # the subcommand interface of vllm_umim.cli.main
