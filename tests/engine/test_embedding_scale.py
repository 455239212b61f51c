"""Surrogates live in the decoder's input space whatever the model does to its token embeddings.

vLLM's Gemma models multiply ``embed_tokens``' output by sqrt(hidden_size) in ``embed_input_ids``,
after the module UMIM wraps; HF scales inside the embedding module, where training and the
reference runtime read it. The wrapper must give, after the model's own scaling, exactly the
surrogate the reference feeds: ``module(scale * e(span))``. Tiny stand-ins of both model shapes,
no engine needed.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vllm_umim.engine.embedding import input_scale, install_surrogate_embedding
from vllm_umim.module import MergeModule, MergeModuleConfig

VOCAB, HIDDEN, BASE = 50, 16, 1000
RULES = torch.tensor([[3, 4, -1, -1], [5, 6, 7, -1], [8, 9, 10, 11]])


class Decoder(nn.Module):
    def __init__(self, scale: float | None):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.scale = scale

    def embed_input_ids(self, ids):  # vLLM's Gemma3Model: embed_tokens(ids) * normalizer
        out = self.embed_tokens(ids)
        if self.scale == "shift":
            return out + 1.0
        return out * self.scale if self.scale is not None else out


class CausalLM(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.model = Decoder(scale)

    def embed_input_ids(self, ids):
        return self.model.embed_input_ids(ids)


def trained_like_module() -> MergeModule:
    torch.manual_seed(0)
    module = MergeModule(MergeModuleConfig(HIDDEN, num_heads=2))
    with torch.no_grad():
        for p in module.parameters():  # not scale-equivariant: a mean-pooling init would hide the bug
            p.add_(0.3 * torch.randn_like(p))
    return module.eval()


@pytest.mark.parametrize("scale", [None, math.sqrt(640.0)])
@pytest.mark.parametrize("table_budget_mib", [1024, 0])  # precomputed table, and on the fly
def test_surrogate_after_model_scaling_equals_reference(scale, table_budget_mib):
    model, module = CausalLM(scale), trained_like_module()
    s = scale or 1.0
    plain = model.embed_input_ids(torch.tensor([1, 2]))
    wrapper = install_surrogate_embedding(model, module, RULES, BASE, table_budget_mib)
    assert wrapper.input_scale == pytest.approx(s, rel=1e-6)
    ids = torch.tensor([1, BASE + 0, 2, BASE + 1, BASE + 2])
    got = model.embed_input_ids(ids)  # goes through the wrapper, then the model's own scaling
    with torch.no_grad():
        spans = RULES.clamp(min=0)
        expected = module(model.model.embed_tokens.embedding(spans) * s, (RULES >= 0).sum(1))  # the reference's space
    torch.testing.assert_close(got[[1, 3, 4]], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[[0, 2]], plain)


def test_llama_shaped_model_is_unscaled():
    model = CausalLM(None)
    assert input_scale(model, model.model.embed_tokens) == 1.0
    bare = nn.Module()  # a model without embed_input_ids at all
    bare.model = Decoder(None)
    assert input_scale(bare, bare.model.embed_tokens) == 1.0


def test_a_model_that_does_more_than_scale_is_refused():
    model = CausalLM("shift")
    with pytest.raises(NotImplementedError, match="not embed_tokens times a constant"):
        input_scale(model, model.model.embed_tokens)
