"""The frozen model a merge module is trained and evaluated against, with its tokenizer and the
rules checked against that tokenizer (paper §3.3: the LM stays frozen; only the module learns)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_umim.rules import RuleSet, load_rules


@dataclass
class FrozenModel:
    model: torch.nn.Module  # HF causal LM, fp32, eval mode, no gradients
    tokenizer: object
    rules: RuleSet


def load_frozen_model(model_path, rules_path) -> FrozenModel:
    """Tokenizer, rules (one MismatchError if they were mined with another tokenizer) and the model."""
    from transformers import AutoModelForCausalLM

    from vllm_umim.data.model import load_tokenizer

    tokenizer = load_tokenizer(model_path)
    rules = load_rules(rules_path)
    rules.check_tokenizer(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return FrozenModel(model, tokenizer, rules)
