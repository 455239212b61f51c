"""``vllm-umim bench``: throughput of stock vLLM and vllm_umim side by side (``vllm_umim.bench.harness``).

The flags are vLLM's own engine arguments (``EngineArgs.add_cli_args``, the ``--umim-*`` ones
included, from this package's ``umim_server`` plugin as in ``vllm serve``) plus the fields of
:class:`~vllm_umim.bench.harness.BenchConfig`. Both engines get the same engine arguments; the stock
one runs without ``--umim-*``.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex

from vllm_umim.cli.config_args import add_config_arguments, config_from_args
from vllm_umim.errors import UmimError


def register(subparsers) -> None:
    # No option prefix of its own: every argument, "--help" included, goes to the parser below,
    # which needs vLLM's EngineArgs (built only when the command runs, so `vllm-umim --help` stays fast).
    p = subparsers.add_parser(
        "bench", help="throughput vs stock vLLM (prefill-heavy, decode-heavy KV-bound, no-merge)", add_help=False, prefix_chars="\0"
    )
    p.add_argument("bench_args", nargs=argparse.REMAINDER)


def bench_parser():
    from vllm.engine.arg_utils import EngineArgs
    from vllm.plugins import load_general_plugins
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vllm_umim.bench.harness import BenchConfig

    load_general_plugins()  # this package's umim_server plugin adds the --umim-* flags, as in vllm serve
    parser = FlexibleArgumentParser(prog="vllm-umim bench", description=__doc__.splitlines()[0])
    EngineArgs.add_cli_args(parser)
    if not any(action.dest == "umim_rules" for action in parser._actions):
        raise UmimError("the --umim-* flags come from the vLLM plugin 'umim_server', which VLLM_PLUGINS leaves out")
    add_config_arguments(parser.add_argument_group("benchmark"), BenchConfig)
    # vLLM's own defaults (torch.compile, bf16 on CPU; CUDA graphs on GPU), as users run it:
    # --enforce-eager and --dtype float32 are vLLM's flags for the other setups
    parser.set_defaults(max_model_len=1024, seed=0)
    return parser


def engine_kwargs_of(args) -> dict:
    """The EngineArgs fields the command line changed from their defaults (what both engines get)."""
    import json

    from vllm.engine.arg_utils import EngineArgs

    engine_args = EngineArgs.from_cli_args(args)
    default = EngineArgs(model=engine_args.model)
    changed = {}
    for field in dataclasses.fields(EngineArgs):
        value = getattr(engine_args, field.name)
        if value != getattr(default, field.name):
            json.dumps(value)  # must travel to the worker as JSON
            changed[field.name] = value
    changed["model"] = engine_args.model
    return changed


def run(args) -> None:
    from vllm_umim.bench.harness import BenchConfig, default_rules
    from vllm_umim.bench.harness import run as run_bench

    bench_args = args.bench_args
    parsed = bench_parser().parse_args(bench_args)
    if parsed.model is None or parsed.model == "Qwen/Qwen3-0.6B":  # vLLM's default model: ours instead
        from vllm_umim.data.model import fetch_model

        parsed.model = str(fetch_model("smollm2-135m"))
    if parsed.umim_rules is None:
        parsed.umim_rules = default_rules()
    config = config_from_args(BenchConfig, parsed)
    if config.rows:  # each row against stock instead of UMIM against stock
        from vllm_umim.bench.rows import run as run_bench
    run_bench(engine_kwargs_of(parsed), config, shlex.join(["vllm-umim", "bench", *bench_args]))
