"""``vllm-umim fidelity``: greedy continuations through vLLM, UMIM on vs off, beside stock bf16 vs
fp32 (``vllm_umim.evaluation.fidelity_run``).

Example::

    vllm-umim fidelity --rules artifacts/smollm2-135m/rules.bin \\
        --module artifacts/smollm2-135m/module.safetensors --json fidelity.json
"""

from __future__ import annotations

from vllm_umim.cli.config_args import add_config_arguments, config_from_args
from vllm_umim.evaluation.fidelity_run import DEFAULT_VARIANTS, FidelityConfig, parse_assignment


def register(subparsers) -> None:
    p = subparsers.add_parser("fidelity", help="greedy continuations through vLLM: UMIM on vs off, beside stock bf16 vs fp32")
    add_config_arguments(p, FidelityConfig)
    p.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                   help='per-request UMIM setting sent as extra_args={"umim": JSON} (repeatable; default: '
                        + " ".join(DEFAULT_VARIANTS) + "); a value that is not JSON is taken as a string")
    p.add_argument("--engine-option", action="append", default=[], metavar="KEY=JSON",
                   help='merged into additional_config["umim"] of the fp32 engine (repeatable)')


def run(args) -> None:
    from vllm_umim.evaluation.fidelity_run import run_fidelity

    assignments = {}
    if args.variant:
        assignments["variants"] = dict(map(parse_assignment, args.variant))
    config = config_from_args(FidelityConfig, args, engine_options=dict(map(parse_assignment, args.engine_option)),
                              **assignments)
    run_fidelity(config)
