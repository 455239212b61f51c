"""Token reduction (TR, paper §4.1): the fraction of sequence positions saved by merging,
``TR = 1 - (#elements after merging) / (#raw tokens)``, pooled over a corpus."""

from __future__ import annotations

from pathlib import Path


def count_elements(rules, sequences: list[list[int]]) -> tuple[int, int]:
    """(raw tokens, merged elements) over ``sequences`` (prompt-merging, pseudocode 3)."""
    raw = merged = 0
    for spans in rules.find_spans(sequences) if sequences else []:
        raw += len(spans)
        merged += sum(1 for s in spans if s != -2)
    return raw, merged


def token_reduction(rules, sequences: list[list[int]]) -> float:
    raw, merged = count_elements(rules, sequences)
    return 1.0 - merged / raw if raw else 0.0


def tokenized_documents(tokenizer, corpus: str | Path, max_documents: int | None = None) -> list[list[int]]:
    """The non-empty documents of a one-document-per-line corpus, tokenized (no special tokens)."""
    from vllm_umim.data.corpus import read_documents

    docs = read_documents(corpus)[:max_documents]
    out = []
    for i in range(0, len(docs), 256):
        out += [ids for ids in tokenizer(docs[i : i + 256], add_special_tokens=False)["input_ids"] if ids]
    return out


def corpus_token_reduction(rules, tokenizer, corpus: str | Path, max_documents: int | None = None) -> dict:
    """TR of a one-document-per-line corpus, each document merged on its own."""
    from vllm_umim.data.corpus import read_documents

    docs = read_documents(corpus)[:max_documents]
    raw = merged = 0
    for i in range(0, len(docs), 256):
        ids = tokenizer(docs[i : i + 256], add_special_tokens=False)["input_ids"]
        r, m = count_elements(rules, [x for x in ids if x])
        raw, merged = raw + r, merged + m
    return {"documents": len(docs), "raw_tokens": raw, "positions": merged, "tr": 1.0 - merged / raw if raw else 0.0}
