"""Instruction templates over a Wikipedia opening, and whether a tokenizer can format a chat.

Shared by the chat prompts of the fidelity suite (:mod:`vllm_umim.evaluation.fidelity_prompts`,
over held-out articles) and the chat records of the training mix
(:mod:`vllm_umim.data.training_mix`, over train articles): the same formats, disjoint texts.
"""

from __future__ import annotations

INSTRUCTION_WORDS = 60  # words of a Wikipedia opening quoted in an instruction
INSTRUCTIONS = (
    "Summarize this paragraph in one sentence:\n\n{text}",
    "Write a short title for this paragraph:\n\n{text}",
    "List three key facts from this text:\n\n{text}",
)


def has_chat_template(tokenizer) -> bool:
    """Whether the tokenizer has a chat template (base models such as Gemma 3 270M have none)."""
    return bool(getattr(tokenizer, "chat_template", None))
