"""``vllm-umim bench``: the throughput benchmark (``vllm_umim.bench.harness``), stock vLLM and
vllm_umim side by side. Every argument is passed through; ``vllm-umim bench --help`` lists them
(vLLM's engine arguments, ``--umim-*``, and the benchmark's own)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    # No option prefix of its own: every argument, "--help" included, goes to the benchmark's parser.
    p = subparsers.add_parser(
        "bench", help="throughput vs stock vLLM (prefill-heavy, decode-heavy KV-bound, no-merge)", add_help=False, prefix_chars="\0"
    )
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=run)


def run(args) -> None:
    from vllm_umim.bench.harness import main

    main(args.bench_args)
