"""``vllm-umim``: fetch the offline model and corpus, mine rules, inspect them, train, evaluate, generate.

One module per subcommand, each with ``register(subparsers)`` (adds its parser and flags) and
``run(args)`` (runs it); this file only builds the top parser from them and turns a :class:`~vllm_umim.errors.UmimError` into one
line on stderr (exit status 2). Commands that start a vLLM engine or load a model keep those
imports inside ``run``, so ``vllm-umim inspect`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys

from vllm_umim.cli import (
    bench,
    bench_pair,
    ceiling,
    demo,
    evaluate,
    fetch_corpus,
    fetch_model,
    fidelity,
    generate,
    inspect_rules,
    lm_eval,
    merge_reader,
    mine,
    readers,
    score_rules,
    select_rules,
    teacher_cache,
    train,
    training_mix,
)
from vllm_umim.errors import UmimError

COMMANDS = (fetch_model, fetch_corpus, training_mix, mine, inspect_rules, generate, demo, train, merge_reader, teacher_cache, evaluate,
            fidelity, lm_eval, score_rules, select_rules, ceiling, readers, bench, bench_pair)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-umim", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        known = set(sub.choices)
        command.register(sub)
        for name in sub.choices.keys() - known:
            sub.choices[name].set_defaults(func=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    # results on stdout, logs on stderr: vLLM logs to stdout unless told (read when vLLM is imported)
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UmimError as exc:
        print(f"vllm-umim: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
