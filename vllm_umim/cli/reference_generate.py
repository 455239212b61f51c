"""``vllm-umim generate --engine reference``: the HF reference runtime (App. D)."""

from __future__ import annotations

import torch

from vllm_umim.module import model_identity, resolve_module
from vllm_umim.reference import Generation, ReferenceRuntime
from vllm_umim.rules import load_rules


def eos_token_ids(model, tokenizer) -> tuple[int, ...]:
    eos = model.generation_config.eos_token_id if model.generation_config else None
    eos = eos if eos is not None else tokenizer.eos_token_id
    return tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())


def load_reference(model_dir, rules_path, module_path, tokenizer, dynamic: bool) -> ReferenceRuntime:
    from transformers import AutoModelForCausalLM

    from vllm_umim.engine.config import UmimConfig

    rules = load_rules(rules_path)
    rules.check_tokenizer(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    path = module_path or UmimConfig(rules=str(rules_path)).module_path()
    module, _ = resolve_module(path, model.config.hidden_size, model_identity(model.config), rules.tokenizer_fingerprint)
    return ReferenceRuntime(model, rules, module, dynamic=dynamic)


def reference_generate(args, tokenizer, prompt_ids) -> Generation:
    runtime = load_reference(args.model, args.rules, args.module, tokenizer, args.dynamic)
    return runtime.generate(prompt_ids, max_new_tokens=args.max_tokens, eos_token_ids=eos_token_ids(runtime.model, tokenizer))
