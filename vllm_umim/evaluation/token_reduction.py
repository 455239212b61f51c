"""Token reduction (TR, paper §4.1): the fraction of sequence positions saved by merging,
``TR = 1 - (#elements after merging) / (#raw tokens)``, pooled over a corpus (the count itself is
the rules layer's, ``vllm_umim.rules.selection.token_reduction``)."""

from __future__ import annotations

from pathlib import Path


def tokenized_documents(tokenizer, corpus: str | Path, max_documents: int | None = None) -> list[list[int]]:
    """The non-empty documents of a one-document-per-line corpus, tokenized (no special tokens)."""
    from vllm_umim.data.corpus import read_documents

    docs = read_documents(corpus)[:max_documents]
    out = []
    for i in range(0, len(docs), 256):
        out += [ids for ids in tokenizer(docs[i : i + 256], add_special_tokens=False)["input_ids"] if ids]
    return out


def corpus_token_reduction(rules, tokenizer, corpus: str | Path, max_documents: int | None = None, policy=None) -> dict:
    """TR of a one-document-per-line corpus, each document merged on its own as a prompt: by greedy
    longest match, or by ``policy`` (a ``MergePolicy``, e.g. one keeping a raw window at the end)."""
    from vllm_umim.rules.selection import tokens_merged_away

    documents = tokenized_documents(tokenizer, corpus, max_documents)
    raw = sum(len(ids) for ids in documents)
    if policy is None:
        positions = raw - tokens_merged_away(rules, documents)
    else:
        positions = sum(segmentation.num_elements for segmentation in policy.segment(documents))
    return {"documents": len(documents), "raw_tokens": raw, "positions": positions, "tr": 1.0 - positions / raw if raw else 0.0}
