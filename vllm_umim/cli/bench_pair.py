"""``vllm-umim bench-pair``: vLLM's own ``vllm bench throughput`` with ``--umim-rules`` against the
same command without it (``vllm_umim.bench.pair``). Arguments after ``--`` go to both runs."""

from __future__ import annotations

import shlex
import sys

from vllm_umim.cli.config_args import add_config_arguments, config_from_args


def register(subparsers) -> None:
    from vllm_umim.bench.pair import PairConfig

    p = subparsers.add_parser("bench-pair", help="vLLM's own `vllm bench throughput`, with and without --umim-rules")
    add_config_arguments(p, PairConfig)
    p.add_argument("extra", nargs="*", help="after --: more vllm bench throughput arguments, for both runs")


def run(args) -> None:
    from vllm_umim.bench.pair import PairConfig
    from vllm_umim.bench.pair import run as run_pair

    run_pair(config_from_args(PairConfig, args), shlex.join(["vllm-umim", *sys.argv[1:]]))
