"""``vllm-umim fetch-corpus``: write the offline corpus as ``train.txt`` / ``heldout.txt``."""

from __future__ import annotations

from pathlib import Path

from vllm_umim.cli.config_args import default_of
from vllm_umim.data.corpus import fetch_corpus


def register(subparsers) -> None:
    p = subparsers.add_parser("fetch-corpus", help="write the offline corpus as train.txt / heldout.txt")
    p.add_argument("name", nargs="?", default=default_of(fetch_corpus, "name"), help="corpus name (default: %(default)s)")
    p.add_argument("--out", type=Path, help="folder to write (default: under the vllm_umim cache)")


def run(args) -> None:
    print(fetch_corpus(args.name, out=args.out))
