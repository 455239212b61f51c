"""Context-aware surrogates: the merge module also reads the k raw tokens before a span.

The paper's surrogate (§3.2) is context-free: ``M(e(x_{t:t+n}))`` is the same vector wherever the
n-gram occurs. The ceiling measurement (docs/ceiling.md) splits the gap to an oracle: the best
context-free vector per rule is barely better than the module, while a vector fitted per
occurrence takes the KL from 0.77 to 0.10. The missing information is in the context. This
branch adds it from the cheapest source every consumer of a surrogate has: the static input
embeddings of the ``k`` raw tokens before the span (training and the reference runtime hold them;
the engine recovers them from the compressed sequence by expanding virtual ids).

    s   = M(e(span))                                 the paper's pooling (module/merge_module.py)
    c_i = e(x_{t-k+i}) + p_i                         k context slots with learned slot embeddings p
    a   = MHA(query = W_q s; keys, values = W_k c, W_v c)   over the valid slots and a learned null slot
    out = s + W_2 GELU(W_1 [s; W_o a])               W_2 starts at zero: step 0 is the context-free module

Context slots are left-padded: slot ``k - 1`` is the token right before the span; a span near the
start of a sequence has fewer valid slots (``context_lengths``), and the null slot keeps the
attention defined when it has none.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class SpanContext(nn.Module):
    """The context branch: ``(surrogates [S, d], context embeds [S, k, d], lengths [S]) -> [S, d]``."""

    def __init__(self, hidden_size: int, context_tokens: int, num_heads: int):
        super().__init__()
        d, k = hidden_size, context_tokens
        self.context_tokens, self.num_heads, self.head_dim = k, num_heads, d // num_heads
        self.slot = nn.Parameter(torch.zeros(k, d))
        self.null = nn.Parameter(torch.zeros(1, d))
        self.query_proj = nn.Linear(d, d, bias=False)
        self.key_proj = nn.Linear(d, d, bias=False)
        self.value_proj = nn.Linear(d, d, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.mix_in = nn.Linear(2 * d, d)
        self.mix_out = nn.Linear(d, d)
        for layer in (self.query_proj, self.key_proj, self.value_proj, self.attn_out):
            nn.init.normal_(layer.weight, std=1.0 / math.sqrt(d))
        nn.init.zeros_(self.mix_out.weight)
        nn.init.zeros_(self.mix_out.bias)

    def forward(self, surrogates: torch.Tensor, context_embeds: torch.Tensor, context_lengths: torch.Tensor) -> torch.Tensor:
        S, k, d = context_embeds.shape
        h, dh = self.num_heads, self.head_dim
        slots = torch.cat([self.null.to(context_embeds.dtype).expand(S, 1, d), context_embeds + self.slot.to(context_embeds.dtype)], 1)
        valid = torch.arange(k + 1, device=slots.device)[None, :] >= (k + 1 - context_lengths[:, None])
        valid[:, 0] = True  # the null slot
        query = self.query_proj(surrogates).view(S, h, dh)
        keys = self.key_proj(slots).view(S, k + 1, h, dh)
        values = self.value_proj(slots).view(S, k + 1, h, dh)
        scores = torch.einsum("shd,slhd->shl", query, keys) / math.sqrt(dh)
        weights = scores.masked_fill(~valid[:, None, :], float("-inf")).softmax(-1)
        attended = self.attn_out(torch.einsum("shl,slhd->shd", weights, values).reshape(S, d))
        mixed = self.mix_out(nn.functional.gelu(self.mix_in(torch.cat([surrogates, attended], -1))))
        return surrogates + mixed


def context_windows(raw_ids: torch.Tensor, starts: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` raw tokens before each span, left-padded with -1, and how many are real.

    raw_ids [B, T]; ``rows`` [S] and ``starts`` [S]: the sequence and raw start of each span.
    Returns (tokens [S, k], lengths [S]).
    """
    offsets = torch.arange(-k, 0, device=raw_ids.device)
    positions = starts[:, None] + offsets[None, :]  # [S, k]
    valid = positions >= 0
    tokens = raw_ids[rows[:, None], positions.clamp(min=0)].masked_fill(~valid, -1)
    return tokens, valid.sum(1)
