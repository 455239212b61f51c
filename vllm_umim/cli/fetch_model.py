"""``vllm-umim fetch-model``: write an offline Hugging Face folder for a known model."""

from __future__ import annotations

from pathlib import Path

from vllm_umim.cli.config_args import default_of
from vllm_umim.data.model import fetch_model


def register(subparsers) -> None:
    p = subparsers.add_parser("fetch-model", help="write an offline HF folder for a known model")
    p.add_argument("name", nargs="?", default=default_of(fetch_model, "name"),
                   help="smollm2-135m (Llama, instruct; default) or gemma3-270m (Gemma 3, base model)")
    p.add_argument("--out", type=Path, help="folder to write (default: under the vllm_umim cache)")


def run(args) -> None:
    print(fetch_model(args.name, out=args.out))
