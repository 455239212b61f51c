"""Mining merge rules from a corpus (paper §3.1, App. A, pseudocode 1).

1. Tokenize every document with the model's tokenizer (no special tokens).
2. Count every contiguous n-gram, n in 2..max_n, inside documents (never across two).
3. Keep n-grams with frequency >= threshold (tau).
4. Hierarchical overlap filtering, as pseudocode 1: for n from max_n down to 2, drop an n-gram
   that lies inside a longer n-gram still in the set, so only the longest spans are retained.
   (``filter_contained=False`` skips this step; the matcher's longest-first order then decides.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from tqdm import tqdm

from vllm_umim.errors import OptionError
from vllm_umim.rules.ruleset import RuleSet, tokenizer_fingerprint

SEPARATOR = -1  # placed between documents so no n-gram spans two of them


@dataclass
class MiningReport:
    """What mining did: token count, candidates and kept rules per n, seconds spent."""

    num_documents: int = 0
    num_tokens: int = 0
    frequent: dict[int, int] = field(default_factory=dict)
    kept: dict[int, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def tokenize_documents(documents: list[str], tokenizer, batch_size: int = 256, progress: bool = True) -> np.ndarray:
    """One int64 stream: each document's token ids followed by SEPARATOR."""
    pieces = []
    for start in tqdm(range(0, len(documents), batch_size), desc="tokenize", unit="batch", disable=not progress):
        batch = documents[start : start + batch_size]
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            pieces.append(np.asarray(ids, dtype=np.int64))
            pieces.append(np.array([SEPARATOR], dtype=np.int64))
    return np.concatenate(pieces) if pieces else np.zeros(0, np.int64)


def count_ngrams(stream: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Unique n-grams of ``stream`` not touching a SEPARATOR, sorted, with their counts."""
    if len(stream) < n:
        return np.zeros((0, n), np.int32), np.zeros(0, np.int64)
    windows = sliding_window_view(stream, n)
    windows = windows[(windows != SEPARATOR).all(axis=1)]
    grams, counts = np.unique(windows, axis=0, return_counts=True)
    return grams.astype(np.int32), counts


def contained_ngrams(longer: np.ndarray, n: int) -> set[tuple[int, ...]]:
    """Every n-token window inside the rows of ``longer`` ([k, m], m > n)."""
    inside = set()
    for offset in range(longer.shape[1] - n + 1):
        inside.update(map(tuple, longer[:, offset : offset + n].tolist()))
    return inside


def filter_contained(ngrams: dict[int, np.ndarray], counts: dict[int, np.ndarray]) -> None:
    """Pseudocode 1's last loop, in place: drop n-grams subsumed by a longer kept n-gram."""
    for n in sorted(ngrams, reverse=True):
        inside = set()
        for m in ngrams:
            if m > n:
                inside |= contained_ngrams(ngrams[m], n)
        keep = np.array([tuple(row) not in inside for row in ngrams[n].tolist()], dtype=bool)
        ngrams[n], counts[n] = ngrams[n][keep], counts[n][keep]


def mine_rules(
    documents: list[str],
    tokenizer,
    threshold: int = 5,
    max_n: int = 4,
    filter_overlaps: bool = True,
    progress: bool = True,
    source: str = "",
) -> tuple[RuleSet, MiningReport]:
    """Mine the merging set R of §3.1 from ``documents`` with ``tokenizer``."""
    if not 2 <= max_n <= 4:
        raise OptionError(f"max_n must be in 2..4 (paper App. A), got {max_n}")
    if threshold < 1:
        raise OptionError(f"threshold must be >= 1, got {threshold}")
    report = MiningReport(num_documents=len(documents))
    started = time.perf_counter()
    stream = tokenize_documents(documents, tokenizer, progress=progress)
    report.num_tokens = int((stream != SEPARATOR).sum())
    report.seconds["tokenize"] = time.perf_counter() - started

    started = time.perf_counter()
    ngrams, counts = {}, {}
    for n in tqdm(range(2, max_n + 1), desc="count n-grams", disable=not progress):
        grams, freq = count_ngrams(stream, n)
        frequent = freq >= threshold
        ngrams[n], counts[n] = grams[frequent], freq[frequent]
        report.frequent[n] = int(frequent.sum())
    report.seconds["count"] = time.perf_counter() - started

    started = time.perf_counter()
    if filter_overlaps:
        filter_contained(ngrams, counts)
    report.kept = {n: len(ngrams[n]) for n in ngrams}
    report.seconds["filter"] = time.perf_counter() - started

    rules = RuleSet(
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        vocab_size=len(tokenizer),
        threshold=threshold,
        ngrams=ngrams,
        counts={n: np.minimum(c, np.iinfo(np.uint32).max).astype(np.uint32) for n, c in counts.items()},
        meta={
            "source": source,
            "num_documents": report.num_documents,
            "num_tokens": report.num_tokens,
            "filter_overlaps": filter_overlaps,
            "tokenizer": getattr(tokenizer, "name_or_path", ""),
        },
    )
    return rules, report
