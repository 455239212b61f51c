"""One prompt through the reference runtime (App. D on plain HF transformers) or a vLLM engine with
UMIM, merged spans replayed for display (``vllm-umim generate`` and ``vllm-umim demo``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm_umim.reference.runtime import Generation, ReferenceRuntime

ENGINES = ("reference", "vllm")


@dataclass
class GenerateConfig:
    """Greedy generation of one prompt. Fields with a ``help`` are ``vllm-umim generate`` flags."""

    model: str = field(metadata={"help": "HF model folder"})
    rules: Path = field(metadata={"help": "rules file"})
    prompt: str = field(metadata={"help": "text to continue"})
    module: str | None = field(default=None, metadata={"help": "merge module file, or 'mean' (default: beside the rules)"})
    max_tokens: int = field(default=32, metadata={"help": "tokens to generate"})
    dynamic: bool = field(default=False, metadata={"help": "also merge during decoding (pseudocode 4)"})
    engine: str = field(default="reference", metadata={"choices": ENGINES, "help": "HF reference runtime or a vLLM engine"})
    enforce_eager: bool = field(default=False, metadata={"help": "vLLM engine without torch.compile (starts faster)"})


def eos_token_ids(model, tokenizer) -> tuple[int, ...]:
    eos = model.generation_config.eos_token_id if model.generation_config else None
    eos = eos if eos is not None else tokenizer.eos_token_id
    return tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())


def load_reference(model_dir, rules_path, module_path, tokenizer, dynamic: bool) -> ReferenceRuntime:
    """The fp32 reference runtime for these files (module default: the one beside the rules)."""
    import torch
    from transformers import AutoModelForCausalLM

    from vllm_umim.engine.config import UmimConfig
    from vllm_umim.module import model_identity, resolve_module
    from vllm_umim.reference.runtime import ReferenceRuntime
    from vllm_umim.rules import load_rules

    rules = load_rules(rules_path)
    rules.check_tokenizer(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    path = module_path or UmimConfig(rules=str(rules_path)).module_path()
    module, _ = resolve_module(path, model.config.hidden_size, model_identity(model.config), rules.tokenizer_fingerprint)
    return ReferenceRuntime(model, rules, module, dynamic=dynamic)


def reference_generate(config: GenerateConfig, tokenizer, prompt_ids: list[int]) -> Generation:
    runtime = load_reference(config.model, config.rules, config.module, tokenizer, config.dynamic)
    return runtime.generate(prompt_ids, max_new_tokens=config.max_tokens, eos_token_ids=eos_token_ids(runtime.model, tokenizer))


def engine_generate(config: GenerateConfig, tokenizer, prompt_ids: list[int]) -> Generation:
    """The same through a vLLM engine (fp32, vLLM's defaults otherwise, so the output can be
    compared with the reference runtime's); the merges are replayed from the output tokens."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_umim.engine.stats import merge_stats
    from vllm_umim.policies import GreedyLongestMatch
    from vllm_umim.reference.runtime import replay_merges
    from vllm_umim.rules import load_rules

    options = {"rules": str(config.rules), "mode": "dynamic" if config.dynamic else "prompt"}
    if config.module:
        options["module"] = config.module
    llm = LLM(model=str(config.model), dtype="float32", max_model_len=2048, enforce_eager=config.enforce_eager,
              additional_config={"umim": options})
    params = SamplingParams(temperature=0.0, max_tokens=config.max_tokens)
    output = llm.generate([TokensPrompt(prompt_token_ids=prompt_ids)], params, use_tqdm=False)[0]
    result = replay_merges(prompt_ids, list(output.outputs[0].token_ids), GreedyLongestMatch(load_rules(config.rules)), config.dynamic)
    stats = merge_stats(output)
    if stats and stats["positions"] != len(result.elements):
        print(f"warning: engine reports {stats['positions']} positions, replay gives {len(result.elements)}")
    return result


def generate(config: GenerateConfig, tokenizer, prompt_ids: list[int]) -> Generation:
    return (reference_generate if config.engine == "reference" else engine_generate)(config, tokenizer, prompt_ids)
