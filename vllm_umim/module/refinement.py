"""Per-rule refinement: a learned residual on top of the merge module for the most frequent rules.

The merge module (paper §3.2) must serve every rule with one set of d + 3d² weights. A few
hundred rules make up most merges (Zipf), so those get their own correction (issue 10):

    surrogate(r) = M(e(r)) + Δ_r    for the K refined n-grams,   M(e(r)) for every other rule.

Δ starts at zero, so a freshly refined module is exactly the module it refines; training then
moves only Δ (``vllm-umim train --init-module FILE --refine-rules K``) with the same distillation
loss (§3.3). Entries are keyed by the n-gram's tokens, not by a rule's index, so a refined module
serves any rule set mined with the same tokenizer (harm-selected subsets included): an n-gram
that is not a rule there is simply never looked up.

Stored in the module file beside the module's weights (``refinement.ngrams`` int64 [K, max_span],
-1 padded; ``refinement.residuals`` [K, d]); ``MergeModuleConfig.refined_rules`` = K.
"""

from __future__ import annotations

import torch
from torch import nn

from vllm_umim.errors import ModuleFileError

LOOKUP_CHUNK = 2048  # spans compared against the K n-grams at once (bounds the [S, K, L] mask)


class RuleRefinement(nn.Module):
    """K n-grams ([K, max_span], -1 padded) and their residuals ([K, d], zero at creation)."""

    def __init__(self, ngrams: torch.Tensor, hidden_size: int):
        super().__init__()
        self.register_buffer("ngrams", ngrams.long().clone())
        self.residuals = nn.Parameter(torch.zeros(len(ngrams), hidden_size))

    def lookup(self, span_tokens: torch.Tensor) -> torch.Tensor:
        """[S] index of each span's n-gram among the refined ones, -1 where it has none.
        ``span_tokens``: [S, L] token ids, -1 padded (L <= max_span)."""
        ngrams = self.ngrams
        width = ngrams.shape[1]
        span_tokens = span_tokens.to(ngrams.device).long()
        if span_tokens.shape[1] < width:
            span_tokens = nn.functional.pad(span_tokens, (0, width - span_tokens.shape[1]), value=-1)
        parts = []
        for start in range(0, len(span_tokens), LOOKUP_CHUNK):
            match = (span_tokens[start : start + LOOKUP_CHUNK, None, :] == ngrams[None]).all(-1)  # [s, K]
            found = match.any(-1)
            parts.append(torch.where(found, match.int().argmax(-1), -1))
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=ngrams.device)

    def forward(self, surrogates: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``surrogates`` [S, d] plus the residual of each span's entry (nothing where index is -1)."""
        residual = self.residuals[index.clamp(min=0)] * (index >= 0).unsqueeze(-1).to(self.residuals.dtype)
        return surrogates + residual.to(surrogates.dtype)

    def check(self, vocab_size: int | None = None) -> None:
        """Raise ValueError unless every row is a 2..max_span-gram of valid ids, -1 padded, unique."""
        ngrams = self.ngrams
        lengths = (ngrams >= 0).sum(-1)
        prefix = torch.arange(ngrams.shape[1])[None] < lengths[:, None]
        if not bool(((ngrams >= 0) == prefix).all()):
            raise ModuleFileError("refinement n-grams must be token ids followed by -1 padding")
        if bool((lengths < 2).any()):
            raise ModuleFileError("refinement n-grams must hold 2 or more tokens")
        if vocab_size is not None and bool((ngrams >= vocab_size).any()):
            raise ModuleFileError(f"refinement n-grams hold token ids >= the vocabulary size {vocab_size}")
        if len(torch.unique(ngrams, dim=0)) != len(ngrams):
            raise ModuleFileError("refinement n-grams are not unique")


def most_frequent_spans(span_token_rows, k: int, max_span: int) -> torch.Tensor:
    """The ``k`` most frequent merged spans among ``span_token_rows`` (iterables of token ids), as a
    [<=k, max_span] -1 padded tensor; ties broken by the tokens, so the choice is deterministic."""
    from collections import Counter

    counts = Counter(tuple(int(t) for t in row if t >= 0) for row in span_token_rows)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:k]
    table = torch.full((len(ranked), max_span), -1, dtype=torch.long)
    for i, (ngram, _) in enumerate(ranked):
        table[i, : len(ngram)] = torch.tensor(ngram)
    return table
