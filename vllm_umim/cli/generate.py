"""``vllm-umim generate``: one prompt with merging, merged spans [bracketed], through the reference
runtime or a vLLM engine."""

from __future__ import annotations

from vllm_umim.cli.config_args import add_config_arguments, config_from_args
from vllm_umim.evaluation.generate import GenerateConfig


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate with merging, merged spans [bracketed]")
    add_config_arguments(p, GenerateConfig)


def run(args) -> None:
    from vllm_umim.data.model import bos_prefix, load_tokenizer
    from vllm_umim.reference import bracketed
    from vllm_umim.evaluation.generate import generate

    config = config_from_args(GenerateConfig, args)
    tokenizer = load_tokenizer(config.model)
    prompt_ids = bos_prefix(tokenizer) + tokenizer(config.prompt, add_special_tokens=False)["input_ids"]
    result = generate(config, tokenizer, prompt_ids)
    print(bracketed(result.elements, tokenizer))
    raw, compressed = result.raw_length, len(result.elements)
    print(
        f"\n-- {config.engine}: {raw} raw tokens -> {compressed} positions "
        f"(token reduction {100 * (1 - compressed / raw):.1f} %; prefill merges {result.prefill_merges}, "
        f"decode merges {result.decode_merges})"
    )
