"""SurrogateEmbedding: plain ids as before, virtual ids become the merge module's surrogates, from a
precomputed table or on the fly, and the whole forward compiles as one graph (vLLM's defaults)."""

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import make_ruleset
from vllm_umim.engine.embedding import SurrogateOnTheFly, SurrogateTable, build_surrogates, SurrogateEmbedding
from vllm_umim.module import MergeModule, MergeModuleConfig
from vllm_umim.rules import RuleSet

V = 50
TABLE, ON_THE_FLY = 1024.0, 0.0  # table budgets (MiB) that pick each source


def build(budget_mib: float, dtype=torch.float32, refined: bool = False):
    """Embedding, module and wrapper; ``refined``: the module has a residual for rule (3, 4, 5, 6)."""
    torch.manual_seed(0)
    embedding = nn.Embedding(V, 16).to(dtype)
    module = MergeModule(MergeModuleConfig(16, num_heads=4))
    for p in module.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    if refined:
        module = module.refined(torch.tensor([[3, 4, 5, 6], [8, 9, -1, -1]]))
        module.refinement.residuals.data.normal_()
    rules = make_ruleset([(1, 2), (3, 4, 5, 6)], vocab_size=V)
    surrogates = build_surrogates(embedding, module, rules.padded, budget_mib)
    return embedding, module, SurrogateEmbedding(embedding, surrogates, V, len(rules))


def surrogate_of(embedding, module, tokens):
    embeds = embedding(torch.tensor([tokens])).float()
    return module(embeds, torch.tensor([len(tokens)]), torch.tensor([tokens]))[0]


@pytest.mark.parametrize("budget, source", [(TABLE, SurrogateTable), (ON_THE_FLY, SurrogateOnTheFly)])
def test_budget_picks_the_source(budget, source):
    assert isinstance(build(budget)[2].surrogates, source)


@pytest.mark.parametrize("budget", [TABLE, ON_THE_FLY])
def test_plain_ids_unchanged(budget):
    embedding, _, wrapped = build(budget)
    ids = torch.tensor([0, 7, 49])
    torch.testing.assert_close(wrapped(ids), embedding(ids))


@pytest.mark.parametrize("refined", [False, True])
@pytest.mark.parametrize("budget", [TABLE, ON_THE_FLY])
def test_virtual_ids_become_surrogates(budget, refined):
    embedding, module, wrapped = build(budget, refined=refined)
    ids = torch.tensor([7, V + 1, 9, V + 0])
    out = wrapped(ids)
    torch.testing.assert_close(out[0], embedding.weight[7])
    torch.testing.assert_close(out[1], surrogate_of(embedding, module, [3, 4, 5, 6]))
    torch.testing.assert_close(out[3], surrogate_of(embedding, module, [1, 2]))
    if refined:  # the refined rule moved by its residual, the other did not
        pooled = module.pool(embedding(torch.tensor([[3, 4, 5, 6]])).float(), torch.tensor([4]))[0]
        torch.testing.assert_close(out[1] - pooled, module.refinement.residuals[0].detach())
        assert torch.allclose(out[3], module.pool(embedding(torch.tensor([[1, 2]])).float(), torch.tensor([2]))[0])


@pytest.mark.parametrize("budget", [TABLE, ON_THE_FLY])
def test_bf16_model_gets_fp32_surrogates_rounded_once(budget):
    embedding, module, wrapped = build(budget, dtype=torch.bfloat16)
    out = wrapped(torch.tensor([V + 1]))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out[0], surrogate_of(embedding, module, [3, 4, 5, 6]).to(torch.bfloat16))


@pytest.mark.parametrize("refined", [False, True])
@pytest.mark.parametrize("budget", [TABLE, ON_THE_FLY])
def test_compiles_without_graph_breaks(budget, refined):
    """fullgraph=True fails on any host sync or data-dependent branch (the bug vLLM's compile hit)."""
    _, _, wrapped = build(budget, refined=refined)
    compiled = torch.compile(wrapped, fullgraph=True, dynamic=True, backend="eager")
    for ids in (torch.tensor([7, V + 1, 9]), torch.tensor([V + 0, 3, 4, 5, 6, V + 1, 2])):
        torch.testing.assert_close(compiled(ids), wrapped(ids))


def test_empty_rule_set_is_plain_embedding():
    embedding = nn.Embedding(V, 16)
    empty = RuleSet("test", V, 1, {2: np.zeros((0, 2), np.int32)}, {2: np.zeros(0, np.uint32)})
    module = MergeModule(MergeModuleConfig(16, num_heads=4))
    wrapped = SurrogateEmbedding(embedding, build_surrogates(embedding, module, empty.padded, TABLE), V, 0)
    ids = torch.tensor([0, 7, 49])
    torch.testing.assert_close(wrapped(ids), embedding(ids))
