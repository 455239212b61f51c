"""``vllm-umim ceiling``: how much of a merged span's meaning one frozen input position can carry
(``vllm_umim.evaluation.ceiling``; the design note is docs/ceiling.md).

The command that measured the committed ``artifacts/smollm2-135m/ceiling/ceiling.json``::

    vllm-umim ceiling --model ~/.cache/vllm_umim/models/smollm2-135m \\
        --rules artifacts/smollm2-135m/rules.bin --module artifacts/smollm2-135m/module.safetensors \\
        --heldout-corpus ~/.cache/vllm_umim/corpora/wiki/heldout.txt \\
        --train-corpus ~/.cache/vllm_umim/corpora/wiki/train.txt \\
        --out artifacts/smollm2-135m/ceiling/ceiling.json --scratch-dir ceiling-scratch \\
        --train-windows 320 --val-windows 16 --rule-epochs 3 --context-epochs 2 \\
        --oracle-max-steps 24 --oracle-patience 5
"""

from __future__ import annotations

import time

from vllm_umim.cli.config_args import add_config_arguments, config_from_args


def register(subparsers) -> None:
    from vllm_umim.evaluation.ceiling import CeilingConfig

    p = subparsers.add_parser("ceiling", help="the ceiling of one frozen input position: module, per-rule, "
                                              "per-context and per-occurrence surrogates against the unmerged model")
    add_config_arguments(p, CeilingConfig)


def run(args) -> None:
    from vllm_umim.evaluation.ceiling import CeilingConfig, run_ceiling

    run_ceiling(config_from_args(CeilingConfig, args), log=lambda *a: print(time.strftime("%H:%M:%S"), *a, flush=True))
