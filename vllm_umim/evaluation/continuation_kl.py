"""Per-token KL on the scored continuations of log-likelihood tasks: how far a system's next-token
distribution over the continuation moves from stock vLLM in fp32 (the KL the merge module is
trained to minimise, §3.3 and App. C, measured where lm-eval scores), beside the accuracy.

Each log-likelihood request asks vLLM for ``k`` prompt logprobs per position; the continuation's
rows (top-k token ids and logprobs) are kept per item in a sidecar file beside the item scores
(``items/<system>/<task>.topk.npz``; arrays only, read without pickle). Two systems' sidecars are
compared row by row on the items and continuation tokens they share.

KL(reference || system) is computed over the reference's top-k tokens plus one bucket for the rest
of the vocabulary ("bucket KL"). A reference top-k token missing from the system's own top-k has
a probability at most the system's smallest returned one; that bound is used for it (its share of
the reference's mass is reported as ``imputed_mass``), so with little imputed mass the figure is
close to the top-k KL and never silently drops tokens.
"""

from __future__ import annotations

import io
import math
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from vllm_umim.errors import UmimError
from vllm_umim.evaluation.paired import Z95
from vllm_umim.files import write_bytes_atomic

FLOOR = 1e-12  # probability floor for the rest bucket


@dataclass
class ContinuationRows:
    """Rows of the scored continuations: ``doc_ids[i]`` and ``tokens[i]`` (the continuation token
    row i predicts), ``top_ids[i]`` / ``top_logprobs[i]`` its top-k (padded with -1 / -inf)."""

    doc_ids: np.ndarray
    tokens: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray

    @classmethod
    def empty(cls, k: int) -> ContinuationRows:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, k), np.int64), np.zeros((0, k), np.float32))


def top_rows(continuation: list[int], prompt_logprobs: list, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k ids and logprobs of the last ``len(continuation)`` rows of a request's prompt logprobs
    (vLLM's ``{token: Logprob(logprob, rank)}`` per row; the scored token rides along when it is
    outside the top k and is left out here)."""
    rows = prompt_logprobs[len(prompt_logprobs) - len(continuation):]
    ids = np.full((len(rows), k), -1, np.int64)
    logprobs = np.full((len(rows), k), -np.inf, np.float32)
    for i, row in enumerate(rows):
        ranked = sorted(((entry.rank, token, entry.logprob) for token, entry in (row or {}).items()
                         if entry.rank is not None and entry.rank <= k), key=lambda t: t[0])
        for j, (_, token, value) in enumerate(ranked[:k]):
            ids[i, j], logprobs[i, j] = token, value
    return ids, logprobs


class RowCollector:
    """Collects :func:`top_rows` per scored request, tagged with its item (``doc_id``)."""

    def __init__(self, k: int):
        self.k = k
        self.parts: list[tuple[int, list[int], np.ndarray, np.ndarray]] = []

    def add(self, doc_id: int, continuation: list[int], prompt_logprobs: list) -> None:
        ids, logprobs = top_rows(continuation, prompt_logprobs, self.k)
        self.parts.append((doc_id, continuation, ids, logprobs))

    def rows(self) -> ContinuationRows:
        if not self.parts:
            return ContinuationRows.empty(self.k)
        return ContinuationRows(
            doc_ids=np.concatenate([np.full(len(c), d, np.int64) for d, c, _, _ in self.parts]),
            tokens=np.concatenate([np.asarray(c, np.int64) for _, c, _, _ in self.parts]),
            top_ids=np.concatenate([ids for _, _, ids, _ in self.parts]),
            top_logprobs=np.concatenate([lp for _, _, _, lp in self.parts]),
        )


def save_rows(rows: ContinuationRows, path: Path) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **asdict(rows))
    write_bytes_atomic(buffer.getvalue(), path)


def load_rows(path: Path) -> ContinuationRows:
    """The rows saved by :func:`save_rows`; a damaged file is one ``UmimError`` naming it."""
    try:
        with np.load(path, allow_pickle=False) as data:
            rows = ContinuationRows(**{name: data[name] for name in ("doc_ids", "tokens", "top_ids", "top_logprobs")})
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise UmimError(f"{path}: not a continuation top-k file ({type(e).__name__}: {e})") from None
    n = len(rows.doc_ids)
    if rows.tokens.shape != (n,) or rows.top_ids.shape != rows.top_logprobs.shape or rows.top_ids.shape[0] != n:
        raise UmimError(f"{path}: continuation top-k arrays of mismatched shapes")
    return rows


def bucket_kl(ref_ids: np.ndarray, ref_logprobs: np.ndarray, ids: np.ndarray, logprobs: np.ndarray) -> tuple[float, float]:
    """(KL(reference || system) over the reference's top-k + a rest bucket, the reference mass
    whose system probability was bounded by the system's smallest returned one) for one row."""
    keep = ref_ids >= 0
    p = np.exp(ref_logprobs[keep].astype(np.float64))
    known = dict(zip(ids[ids >= 0].tolist(), np.exp(logprobs[ids >= 0].astype(np.float64)).tolist()))
    smallest = min(known.values()) if known else FLOOR
    q = np.array([known.get(t, smallest) for t in ref_ids[keep].tolist()])
    imputed = float(p[[t not in known for t in ref_ids[keep].tolist()]].sum())
    p_rest, q_rest = max(1.0 - p.sum(), 0.0), max(1.0 - q.sum(), FLOOR)
    q = np.maximum(q, FLOOR)
    kl = float((p * (np.log(np.maximum(p, FLOOR)) - np.log(q))).sum())
    if p_rest > 0:
        kl += p_rest * (math.log(p_rest) - math.log(q_rest))
    return max(kl, 0.0), imputed


def compare(rows: ContinuationRows, reference: ContinuationRows) -> dict:
    """Per-token KL and top-1 agreement of ``rows`` against ``reference`` on the items both hold
    with the same continuation tokens: the mean over items of each item's mean per-token KL, with a
    95 % interval (normal approximation over items), top-1 agreement over tokens, the imputed
    reference mass. Items whose continuations differ between the two are counted, not compared."""
    def by_doc(r: ContinuationRows) -> dict[int, np.ndarray]:
        order = np.argsort(r.doc_ids, kind="stable")
        docs, starts = np.unique(r.doc_ids[order], return_index=True)
        return {int(d): idx for d, idx in zip(docs, np.split(order, starts[1:]))}

    mine, ref = by_doc(rows), by_doc(reference)
    item_kls, agree, tokens, imputed, mismatched = [], 0, 0, 0.0, 0
    for doc in sorted(set(mine) & set(ref)):
        a, b = mine[doc], ref[doc]
        if len(a) != len(b) or not np.array_equal(rows.tokens[a], reference.tokens[b]):
            mismatched += 1
            continue
        kls = []
        for i, j in zip(a, b):
            kl, miss = bucket_kl(reference.top_ids[j], reference.top_logprobs[j], rows.top_ids[i], rows.top_logprobs[i])
            kls.append(kl)
            imputed += miss
            agree += int(rows.top_ids[i, 0] == reference.top_ids[j, 0])
        tokens += len(a)
        item_kls.append(float(np.mean(kls)) if kls else 0.0)
    n = len(item_kls)
    mean = float(np.mean(item_kls)) if n else float("nan")
    half = Z95 * float(np.std(item_kls, ddof=1)) / math.sqrt(n) if n > 1 else float("nan")
    return {"items": n, "tokens": tokens, "kl_mean": mean, "kl_low": mean - half, "kl_high": mean + half,
            "top1_agreement": agree / tokens if tokens else float("nan"),
            "imputed_mass": imputed / tokens if tokens else float("nan"), "items_mismatched": mismatched}
