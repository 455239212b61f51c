"""``vllm-umim readers``: trained designs for what reads a merged span, side by side on the
ceiling's held-out windows (``vllm_umim.evaluation.readers``; results in docs/ceiling.md).

    vllm-umim readers --model ~/.cache/vllm_umim/models/smollm2-135m --rules artifacts/smollm2-135m/rules.bin \\
        --heldout-corpus ~/.cache/vllm_umim/corpora/wiki/heldout.txt \\
        --designs shipped=artifacts/smollm2-135m/module.safetensors,context8=ctx.safetensors,reader8=rd.safetensors+rd.reader \\
        --out artifacts/smollm2-135m/readers/readers.json
"""

from __future__ import annotations

import time

from vllm_umim.cli.config_args import add_config_arguments, config_from_args


def register(subparsers) -> None:
    from vllm_umim.evaluation.readers import ReadersConfig

    p = subparsers.add_parser("readers", help="trained merge modules and adapted readers against the unmerged model on the "
                                              "ceiling's held-out windows (KL, top-1, two-stage PPL, reader drift)")
    add_config_arguments(p, ReadersConfig)


def run(args) -> None:
    from vllm_umim.evaluation.readers import ReadersConfig, run_readers

    run_readers(config_from_args(ReadersConfig, args), log=lambda *a: print(time.strftime("%H:%M:%S"), *a, flush=True))
