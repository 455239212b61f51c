"""Predictive distribution alignment metrics (paper §4.2, App. C Algorithms 2-5).

All metrics compare the teacher (original LM on raw tokens) with the student (LM on the merged
sequence) at *aligned* rows only — the App. C loss mask: student row ``j`` from the first merged
element on, against teacher row ``last[j]`` (see :mod:`vllm_umim.module.batches`).

Inputs are probabilities (or logits where noted) of shape [N, V], already aligned row by row;
:func:`align_rows` does Algorithm 2's select/pad/stack from [B, S, V] tensors and masks.

* Top-1 accuracy: argmax agrees.
* Top-k overlap (k = 3, 10): ``|topk_T ∩ topk_S| / k``.
* Top-p overlap (p = 0.7): minimal prefixes of the sorted distributions reaching mass >= p;
  ``|P_T ∩ P_S| / min(|P_T|, |P_S|)``.
* MRR: ``1 / (rank + 1)`` of the teacher's argmax in the student's ranking (rank 0 = first;
  ties with the target are counted in the target's favour).

All are returned as fractions in [0, 1] (the paper's tables show percentages).
"""

from __future__ import annotations

import torch

from vllm_umim.module.batches import AlignmentError

METRICS = ("top1", "top3", "top10", "topp", "mrr")


def align_rows(teacher: torch.Tensor, student: torch.Tensor, teacher_mask: torch.Tensor, student_mask: torch.Tensor):
    """Algorithm 2 steps 1-8: select masked rows per sample, pad to a common length, check that the
    validity masks agree (raise AlignmentError otherwise), and return the flattened valid rows
    ``(T [N, V], S [N, V])``."""
    B = teacher.shape[0]
    t_rows = [teacher[b][teacher_mask[b].bool()] for b in range(B)]
    s_rows = [student[b][student_mask[b].bool()] for b in range(B)]
    L = max([len(r) for r in t_rows + s_rows] + [0])
    V = teacher.shape[-1]
    T = torch.zeros(B, L, V, dtype=teacher.dtype)
    S = torch.zeros(B, L, V, dtype=student.dtype)
    FT = torch.zeros(B, L, dtype=torch.bool)
    FS = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        T[b, : len(t_rows[b])], FT[b, : len(t_rows[b])] = t_rows[b], True
        S[b, : len(s_rows[b])], FS[b, : len(s_rows[b])] = s_rows[b], True
    if not torch.equal(FT, FS):
        raise AlignmentError("teacher and student masks select different numbers of rows")
    F = FT & FS
    return T[F], S[F]


def top1_matches(T: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    return (T.argmax(-1) == S.argmax(-1)).float()


def topk_overlaps(T: torch.Tensor, S: torch.Tensor, k: int) -> torch.Tensor:
    ti = T.topk(k, dim=-1).indices
    si = S.topk(k, dim=-1).indices
    return (ti[:, :, None] == si[:, None, :]).any(-1).sum(-1).float() / k


def _nucleus(P: torch.Tensor, p: float) -> torch.Tensor:
    """Boolean [N, V]: the minimal top set whose cumulative probability reaches ``p``."""
    values, order = P.sort(dim=-1, descending=True)
    cum = values.cumsum(-1)
    size = ((cum < p).sum(-1) + 1).clamp(max=P.shape[-1])  # minimal k_T with C[k_T] >= p, inclusive
    keep_sorted = torch.arange(P.shape[-1])[None, :] < size[:, None]
    return torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)


def topp_overlaps(T: torch.Tensor, S: torch.Tensor, p: float = 0.7) -> torch.Tensor:
    """Algorithm 4 on probabilities."""
    a, b = _nucleus(T, p), _nucleus(S, p)
    inter = (a & b).sum(-1).float()
    return inter / torch.minimum(a.sum(-1), b.sum(-1)).float()


def reciprocal_ranks(T: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """Algorithm 5: 1/(r+1) for the rank r of argmax T in S's descending order."""
    target = T.argmax(-1)
    score = S.gather(1, target[:, None])
    rank = (S > score).sum(-1)
    return 1.0 / (rank.float() + 1.0)


def alignment_metrics(T: torch.Tensor, S: torch.Tensor, p: float = 0.7) -> dict[str, float]:
    """All five metrics on aligned probability rows (means; ``n`` rows)."""
    m = AlignmentMeter(p)
    m.update(T, S)
    return m.result()


class AlignmentMeter:
    """Accumulates per-row metric sums over batches of aligned probability rows."""

    def __init__(self, p: float = 0.7, chunk: int = 256):
        self.p, self.chunk = p, chunk
        self.sums = {name: 0.0 for name in METRICS}
        self.sums["kl"] = 0.0
        self.n = 0

    def update(self, T: torch.Tensor, S: torch.Tensor) -> None:
        if T.shape != S.shape:
            raise AlignmentError(f"teacher rows {tuple(T.shape)} vs student rows {tuple(S.shape)}")
        for i in range(0, len(T), self.chunk):
            t, s = T[i : i + self.chunk].float(), S[i : i + self.chunk].float()
            self.sums["top1"] += float(top1_matches(t, s).sum())
            self.sums["top3"] += float(topk_overlaps(t, s, 3).sum())
            self.sums["top10"] += float(topk_overlaps(t, s, 10).sum())
            self.sums["topp"] += float(topp_overlaps(t, s, self.p).sum())
            self.sums["mrr"] += float(reciprocal_ranks(t, s).sum())
            self.sums["kl"] += float((t * (t.clamp_min(1e-30).log() - s.clamp_min(1e-30).log())).sum())
        self.n += len(T)

    def result(self) -> dict[str, float]:
        out = {name: (self.sums[name] / self.n if self.n else 0.0) for name in self.sums}
        out["n"] = self.n
        return out
