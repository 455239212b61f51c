"""The UMIM merge module: attention pooling of a span's static input embeddings (paper §3.2, App. B).

A span of n token embeddings ``e(x_{t:t+n}) ∈ R^{n×d}`` becomes ONE surrogate embedding

    M(e) = W^o [o_1; …; o_h],   o_i = softmax(q_i^T W_i^k e / sqrt(d_h)) (W_i^v e)

with a learnable query ``Q = [q_1; …; q_h] ∈ R^d`` split over h heads — d + 3d² parameters
(``variant="paper"``). ``variant="token_processor"`` is the App. B pseudocode 2 form: the span first
goes through an MLP + GELU + LayerNorm "token processor", whose output serves as both keys and
values of the pooling, followed by the output projection.

The module sees only static embeddings, never the LM's hidden states, so the paper's surrogate does
not depend on its context: it can be computed for any batch of spans in one call.

A module may read the k raw tokens before its span (``context_tokens`` = k > 0; the paper's module
is k = 0): :mod:`~vllm_umim.module.context` adds that branch, and callers pass ``context``.

A module may carry a per-rule refinement (:mod:`~vllm_umim.module.refinement`): a learned residual
for its K most frequent n-grams, looked up by the span's tokens, so callers pass ``span_tokens``
whenever ``config.refined_rules`` > 0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from vllm_umim.errors import OptionError
from vllm_umim.module.context import SpanContext
from vllm_umim.module.refinement import RuleRefinement

VARIANTS = ("paper", "token_processor")
MAX_CONTEXT = 64  # raw tokens before a span a context-aware module may read


@dataclass(frozen=True)
class MergeModuleConfig:
    """Architecture of a merge module; stored in the module file's metadata."""

    hidden_size: int
    num_heads: int = 4
    variant: str = "paper"
    max_span: int = 4
    refined_rules: int = 0  # K n-grams with a learned residual (module/refinement.py); 0: none
    context_tokens: int = 0  # k raw tokens before the span the module reads (module/context.py); 0: the paper's module

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise OptionError(f"unknown merge module variant {self.variant!r}; expected one of {VARIANTS}")
        if self.hidden_size % self.num_heads:
            raise OptionError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if not 0 <= self.context_tokens <= MAX_CONTEXT:
            raise OptionError(f"context_tokens must be in 0..{MAX_CONTEXT}, got {self.context_tokens}")

    def to_dict(self) -> dict:
        return asdict(self)


class MergeModule(nn.Module):
    """Maps padded spans ``[S, max_span, d]`` with lengths ``[S]`` to surrogates ``[S, d]``.

    Initialised as the *mean-pooling baseline*: zero query (uniform attention), identity value and
    output projections, so an untrained module returns the mean of the span's embeddings and
    training starts from that baseline (paper §4 compares against no learning).
    """

    def __init__(self, config: MergeModuleConfig):
        super().__init__()
        self.config = config
        d, h = config.hidden_size, config.num_heads
        self.num_heads, self.head_dim = h, d // h
        self.query = nn.Parameter(torch.zeros(h, self.head_dim))
        if config.variant == "paper":
            self.key_proj = nn.Linear(d, d, bias=False)
            self.value_proj = nn.Linear(d, d, bias=False)
            nn.init.normal_(self.key_proj.weight, std=1.0 / math.sqrt(d))
            nn.init.eye_(self.value_proj.weight)
        else:
            self.token_processor = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d))
        self.output_proj = nn.Linear(d, d, bias=False)
        nn.init.eye_(self.output_proj.weight)
        self.context = SpanContext(d, config.context_tokens, h) if config.context_tokens else None
        self.refinement = None
        if config.refined_rules:
            self.refinement = RuleRefinement(torch.full((config.refined_rules, config.max_span), -1), d)

    def forward(self, span_embeds: torch.Tensor, span_lengths: torch.Tensor, span_tokens: torch.Tensor | None = None,
                context: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """span_embeds: [S, L, d] (rows past each length are ignored); span_lengths: [S] in 1..L;
        span_tokens: [S, L] the spans' token ids, -1 padded (required when the module is refined);
        context: (embeds [S, k, d], lengths [S]) of the k raw tokens before each span, left-padded
        (:func:`~vllm_umim.module.context.context_windows`; required when ``context_tokens`` > 0)."""
        surrogates = self.pool(span_embeds, span_lengths)
        if self.context is not None:
            if context is None:
                raise OptionError(f"this merge module reads the {self.config.context_tokens} tokens before a span: pass context")
            surrogates = self.context(surrogates, *context)
        if self.refinement is None:
            return surrogates
        if span_tokens is None:
            raise OptionError("this merge module has a per-rule refinement: pass the spans' tokens (span_tokens)")
        return self.refinement(surrogates, self.refinement.lookup(span_tokens))

    def pool(self, span_embeds: torch.Tensor, span_lengths: torch.Tensor) -> torch.Tensor:
        """The attention pooling M(e) of §3.2, without any per-rule refinement."""
        num_spans, max_len, d = span_embeds.shape
        if self.config.variant == "paper":
            keys, values = self.key_proj(span_embeds), self.value_proj(span_embeds)
        else:
            keys = values = self.token_processor(span_embeds)
        keys = keys.view(num_spans, max_len, self.num_heads, self.head_dim)
        values = values.view(num_spans, max_len, self.num_heads, self.head_dim)
        scores = torch.einsum("slhd,hd->shl", keys, self.query.to(keys.dtype)) / math.sqrt(self.head_dim)
        padding = torch.arange(max_len, device=span_embeds.device)[None, :] >= span_lengths[:, None]
        scores = scores.masked_fill(padding[:, None, :], float("-inf"))
        weights = scores.softmax(dim=-1)  # [S, h, L]
        pooled = torch.einsum("shl,slhd->shd", weights, values).reshape(num_spans, d)
        return self.output_proj(pooled)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def with_context(self, context_tokens: int) -> "MergeModule":
        """A copy of this (context-free) module with a context branch for ``context_tokens`` tokens
        whose output starts at zero: it computes exactly what this module computes until trained."""
        module = MergeModule(MergeModuleConfig(**{**self.config.to_dict(), "context_tokens": context_tokens}))
        module.load_state_dict(self.state_dict(), strict=False)
        return module

    def refined(self, ngrams: torch.Tensor) -> "MergeModule":
        """A copy of this module with a zero-residual refinement for ``ngrams`` ([K, max_span], -1
        padded): it computes exactly what this module computes until its residuals are trained."""
        module = MergeModule(MergeModuleConfig(**{**self.config.to_dict(), "refined_rules": len(ngrams)}))
        module.load_state_dict({k: v for k, v in self.state_dict().items() if not k.startswith("refinement.")}, strict=False)
        module.refinement.ngrams.copy_(ngrams)
        module.refinement.check()
        return module
