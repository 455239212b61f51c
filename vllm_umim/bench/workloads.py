"""Benchmark workloads on natural text: held-out Wikipedia articles and GSM8K questions.

Every prompt is a prefix of a real document, cut to a fixed number of raw tokens (never random
tokens: merge rules match natural text, and how often they match is what the benchmark is about).
Six scenarios (``SCENARIOS``; ``vllm-umim bench`` runs the first four unless told otherwise); their
defaults can be overridden on the command line.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from vllm_umim.errors import UmimError


@dataclass(frozen=True)
class Scenario:
    name: str
    num_prompts: int
    input_len: int
    output_len: int
    kv_blocks: int | None = None  # num_gpu_blocks_override (of kv_block_size() tokens): makes stock memory-bound
    never_matching_rules: bool = False  # UMIM runs rules that never match: pure overhead
    about: str = ""


SCENARIOS = {
    s.name: s
    for s in [
        Scenario("prefill-heavy", 16, 384, 8, about="long prompts, short outputs: prompt merging"),
        Scenario("decode-heavy", 16, 64, 96, kv_blocks=20, about="KV space too small for stock: merging fits more requests"),
        Scenario("decode-long", 16, 64, 256, kv_blocks=40, about="as decode-heavy with longer outputs: decode merges dominate"),
        Scenario("no-merge", 16, 128, 32, never_matching_rules=True, about="rules that never match: the cost of looking"),
        Scenario("natural", 32, 190, 64, about="held-out text shaped like vllm-umim bench-pair's ShareGPT run (~190 -> 64)"),
        Scenario("short-turns", 32, 48, 48, about="short chat-like turns: little to merge, many short requests"),
    ]
}
DEFAULT_SCENARIOS = ("prefill-heavy", "decode-heavy", "decode-long", "no-merge")


def kv_block_size() -> int:
    """16 tokens per KV block, except where vLLM's attention backend needs more: its CPU attention
    takes multiples of 32 only."""
    from vllm.platforms import current_platform

    return 32 if current_platform.is_cpu() else 16


def scenario(name: str, **overrides) -> Scenario:
    if name not in SCENARIOS:
        raise UmimError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    return replace(SCENARIOS[name], **{k: v for k, v in overrides.items() if v is not None})


def natural_documents() -> list[str]:
    """Held-out Wikipedia articles and GSM8K questions with their worked solutions, alternating."""
    from itertools import chain, zip_longest

    from vllm_umim.data.corpus import fetch_corpus, read_documents
    from vllm_umim.data.qa import load_gsm8k

    wiki = read_documents(fetch_corpus("wiki") / "heldout.txt")
    gsm8k = [f"Question: {q}\nAnswer: {a}" for q, a in load_gsm8k()]
    return [d for d in chain.from_iterable(zip_longest(wiki, gsm8k)) if d]


def natural_prompts(tokenizer, documents: list[str], num_prompts: int, input_len: int) -> list[list[int]]:
    """The first ``input_len`` raw tokens of the first ``num_prompts`` documents that are long enough
    (with :func:`natural_documents`, Wikipedia and GSM8K alternate where both are long enough)."""
    long_enough = []
    for document in documents:
        ids = tokenizer(document, add_special_tokens=False)["input_ids"]
        if len(ids) >= input_len:
            long_enough.append(ids[:input_len])
    if len(long_enough) < num_prompts:
        raise UmimError(f"only {len(long_enough)} documents have >= {input_len} tokens; ask for fewer prompts or shorter ones")
    return long_enough[:num_prompts]


def never_matching_rules(real_rules, tokenizer, texts_ids: list[list[int]]):
    """A RuleSet shaped like ``real_rules`` (same n-gram counts per length) that never matches.

    Its n-grams are built only from token ids absent from ``texts_ids`` (the workload's prompts)
    and taken from the top of the vocabulary (rare byte-level pieces a model practically never
    writes); the benchmark checks afterwards that no merge happened."""
    from vllm_umim.rules import RuleSet

    seen = np.zeros(real_rules.vocab_size, bool)
    for ids in texts_ids:
        seen[np.asarray(ids)] = True
    absent = np.flatnonzero(~seen)[::-1][:64]  # the 64 highest unused ids
    if len(absent) < 8:
        raise UmimError("the workload uses nearly the whole vocabulary; no never-matching rules can be built")
    rng = np.random.default_rng(0)
    ngrams, counts = {}, {}
    for n in real_rules.lengths:
        wanted = real_rules.count(n)
        grams = set()
        while len(grams) < min(wanted, len(absent) ** n):
            grams.add(tuple(rng.choice(absent, n).tolist()))
        ngrams[n] = np.array(sorted(grams), np.int32).reshape(-1, n)
        counts[n] = np.ones(len(grams), np.uint32)
    return RuleSet(real_rules.tokenizer_fingerprint, real_rules.vocab_size, real_rules.threshold, ngrams, counts)
