"""``vllm-umim eval``: alignment metrics, token reduction, two-stage PPL and QA of merge modules
(``vllm_umim.evaluation.eval_run``).

Example::

    OMP_NUM_THREADS=1 vllm-umim eval --model DIR --rules rules.bin --module module.safetensors \\
        --corpus heldout.txt --windows 64 --qa --limit 50 --json eval.json --threads 1
"""

from __future__ import annotations

from vllm_umim.cli.config_args import add_config_arguments, config_from_args
from vllm_umim.evaluation.eval_run import EvalConfig


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="alignment metrics, token reduction, two-stage PPL and QA of a merge module")
    add_config_arguments(p, EvalConfig)


def run(args) -> None:
    from vllm_umim.evaluation.eval_run import run_eval

    run_eval(config_from_args(EvalConfig, args))
