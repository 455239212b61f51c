"""Base vs merged log-likelihood: paper App. F.1 pseudocode 5 (two-stage PPL), plus the aligned
rows for the alignment metrics, from one pass per window.

Two-stage loss of a raw sequence ``x_1..x_N`` merged into elements ``e_1..e_M``:

1. *Merged-sequence loss*: one forward over the merged embeddings (surrogates for spans); the
   output after element ``j`` is scored on the **first** raw token of element ``j+1``.
2. *Skipped-token loss*: every raw token that is not the first of its element (the inner tokens
   of a span ``x_t..x_{t+n-1}``) is scored given the merged context ``e_1..e_{j-1}`` followed by
   the raw tokens ``x_t..`` up to it — the pseudocode's ``ctx + [current]`` record, generalised
   to 3- and 4-grams (one record per inner token). Implemented with the KV cache of step 1:
   cropped to the span's position, then the span's raw tokens are fed at positions ``j, j+1, ..``
   (spans processed right to left, so cropping never drops a needed prefix).

Every raw token after the first is scored exactly once, so
``PPL = exp((L1 + L2) / (N - 1))`` is directly comparable with the base model's PPL on the same
tokens (``token_nll`` returns the per-token values, index ``i`` = loss of ``x_{i+1}``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from vllm_umim.module.batches import Segmentation, collate


@torch.no_grad()
def base_token_nll(model, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(nll [N-1], logits [N, V]) of the unmerged model."""
    ids = torch.tensor([tokens])
    logits = model(input_ids=ids).logits[0].float()
    nll = F.cross_entropy(logits[:-1], ids[0, 1:], reduction="none")
    return nll, logits


def merged_embeddings(model, module, seg: Segmentation) -> torch.Tensor:
    from vllm_umim.module.batches import student_embeddings

    batch = collate([seg])
    return student_embeddings(batch, model.get_input_embeddings(), module)[0]


@torch.no_grad()
def two_stage_token_nll(model, module, seg: Segmentation, return_logits: bool = False):
    """Pseudocode 5 per raw target: nll [N-1] (and the merged logits [M, V] if asked)."""
    tokens = seg.tokens
    N, M = len(tokens), seg.num_elements
    nll = torch.full((N - 1,), float("nan"))
    embeds = merged_embeddings(model, module, seg)
    cache = DynamicCache()
    out = model(inputs_embeds=embeds[None], past_key_values=cache, use_cache=True)
    logits = out.logits[0].float()
    # step 1: after element j, predict the first token of element j+1
    if M > 1:
        targets = torch.tensor([tokens[s] for s in seg.starts[1:]])
        step1 = F.cross_entropy(logits[:-1], targets, reduction="none")
        nll[torch.tensor(seg.starts[1:]) - 1] = step1
    # step 2: inner tokens of each span, right to left on the cropped cache
    embedding = model.get_input_embeddings()
    length = M
    for j in reversed(range(M)):
        start, end = seg.starts[j], seg.ends[j]
        if end - start < 2:
            continue
        cache.crop(-(length - j)) if length > j else None
        raw = torch.tensor(tokens[start : end - 1])
        positions = torch.arange(j, j + len(raw))[None]
        if j == 0:
            cache = DynamicCache()
        o = model(inputs_embeds=embedding(raw)[None], position_ids=positions, past_key_values=cache, use_cache=True)
        length = j + len(raw)
        inner = F.cross_entropy(o.logits[0].float(), torch.tensor(tokens[start + 1 : end]), reduction="none")
        nll[start : end - 1] = inner
    if torch.isnan(nll).any():
        raise RuntimeError("two-stage PPL left raw tokens unscored")
    return (nll, logits) if return_logits else nll


def perplexity(nll_sum: float, count: int) -> float:
    return math.exp(nll_sum / max(count, 1))
