"""``vllm-umim merge-reader``: fold an adapted reader's LoRA adapters (``vllm-umim train
--reader-rank``, PEFT layout in ``<module>.reader/``) into the model's weights, a model folder vLLM
serves like any other (``vllm serve OUT --umim-rules ...`` with the module trained beside the
adapters). Requests that opt out of merging then run the adapted model too."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vllm_umim.cli.config_args import add_config_arguments, config_from_args


@dataclass
class MergeReaderJob:
    model: Path = field(metadata={"help": "the base model folder the reader was trained on"})
    reader: Path = field(metadata={"help": "the adapters' folder (PEFT layout: adapter_config.json, adapter_model.safetensors)"})
    output: Path = field(metadata={"flags": ("-o", "--output"), "help": "the merged model folder to write"})


def register(subparsers) -> None:
    p = subparsers.add_parser("merge-reader", help="fold an adapted reader's LoRA adapters into the model weights (a servable model folder)")
    add_config_arguments(p, MergeReaderJob)


def run(args) -> None:
    from vllm_umim.training.reader import merge_reader

    job = config_from_args(MergeReaderJob, args)
    print(f"wrote {merge_reader(job.model, job.reader, job.output)}")
