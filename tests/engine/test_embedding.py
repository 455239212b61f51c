"""SurrogateEmbedding: plain ids as before, virtual ids through the merge module in one batch."""

import torch
from torch import nn

from tests.conftest import make_ruleset
from vllm_umim.engine.embedding import SurrogateEmbedding
from vllm_umim.module import MergeModule, MergeModuleConfig

V = 50


def build():
    torch.manual_seed(0)
    embedding = nn.Embedding(V, 16)
    module = MergeModule(MergeModuleConfig(16, num_heads=4))
    for p in module.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    rules = make_ruleset([(1, 2), (3, 4, 5, 6)], vocab_size=V)
    return embedding, module, SurrogateEmbedding(embedding, module, rules.padded, V)


def test_plain_ids_unchanged():
    embedding, _, wrapped = build()
    ids = torch.tensor([0, 7, 49])
    torch.testing.assert_close(wrapped(ids), embedding(ids))


def test_virtual_ids_become_surrogates():
    embedding, module, wrapped = build()
    ids = torch.tensor([7, V + 1, 9, V + 0])
    out = wrapped(ids)
    torch.testing.assert_close(out[0], embedding.weight[7])
    torch.testing.assert_close(out[1], module(embedding(torch.tensor([[3, 4, 5, 6]])), torch.tensor([4]))[0])
    torch.testing.assert_close(out[3], module(embedding(torch.tensor([[1, 2]])), torch.tensor([2]))[0])
