"""Evaluation pieces: metrics on hand-made distributions, two-stage PPL against a naive
recomputation, TR, and the window suite on the tiny Llama."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import make_ruleset
from vllm_umim.evaluation.alignment import align_rows, alignment_metrics, topp_overlaps
from vllm_umim.evaluation.perplexity import base_token_nll, merged_embeddings, two_stage_token_nll
from vllm_umim.evaluation.suite import evaluate_windows
from vllm_umim.rules.selection import token_reduction
from vllm_umim.module.merge_module import MergeModule, MergeModuleConfig
from vllm_umim.module.batches import AlignmentError, segment


def _p(values):
    v = torch.tensor(values, dtype=torch.float64)
    return v / v.sum()


T1 = _p([12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1])
S1 = _p([11, 12, 10, 7, 8, 9, 6, 5, 4, 3, 2, 1])
T2 = _p([100, 5, 4, 3, 2, 1.5, 1.4, 1.3, 1.2, 1.1, 0.9, 0.8])
S2 = _p([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 50])


def test_metrics_by_hand():
    # row 1: argmax differs; top-3/top-10/top-p sets equal; teacher's argmax is 2nd for the student
    # row 2: disjoint top-3, top-10 overlap {2..9} = 8, top-p {0} vs {11,10,9,8,7}, argmax last (rank 12)
    # row 3: identical
    T = torch.stack([T1, T2, T1])
    S = torch.stack([S1, S2, T1])
    m = alignment_metrics(T, S)
    assert m["n"] == 3
    assert m["top1"] == pytest.approx(1 / 3)
    assert m["top3"] == pytest.approx((1 + 0 + 1) / 3)
    assert m["top10"] == pytest.approx((1 + 0.8 + 1) / 3)
    assert m["topp"] == pytest.approx((1 + 0 + 1) / 3)
    assert m["mrr"] == pytest.approx((1 / 2 + 1 / 12 + 1) / 3)
    assert m["kl"] > 0


def test_topp_set_sizes():
    # teacher needs 6 tokens to reach 0.7 (cum 0.744), a peaked student 1: overlap = 1/min(6,1)
    T = T1[None]
    S = _p([100, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])[None]
    assert float(topp_overlaps(T, S, 0.7)[0]) == pytest.approx(1.0)
    S = _p([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 100])[None]
    assert float(topp_overlaps(T, S, 0.7)[0]) == pytest.approx(0.0)


def test_align_rows_algorithm2():
    teacher = torch.arange(2 * 5 * 3, dtype=torch.float).view(2, 5, 3)
    student = torch.arange(2 * 4 * 3, dtype=torch.float).view(2, 4, 3) + 100
    tm = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 0]])
    sm = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 0]])
    T, S = align_rows(teacher, student, tm, sm)
    assert torch.equal(T, teacher[torch.tensor([0, 0, 1, 1, 1]), torch.tensor([2, 3, 1, 2, 3])])
    assert torch.equal(S, student[torch.tensor([0, 0, 1, 1, 1]), torch.tensor([1, 2, 0, 1, 2])])
    sm[1, 2] = 0
    with pytest.raises(AlignmentError):
        align_rows(teacher, student, tm, sm)


RULES = [(2, 3), (5, 6), (7, 8, 9), (10, 11, 12, 13)]


def _naive_two_stage(model, module, seg):
    """Pseudocode 5 literally: one forward per scored token, no cache."""
    emb_table = model.get_input_embeddings()
    merged = merged_embeddings(model, module, seg)
    out = []
    for i in range(len(seg.tokens) - 1):
        target = seg.tokens[i + 1]
        j = next(k for k, (s, e) in enumerate(zip(seg.starts, seg.ends)) if s <= i + 1 < e)
        if seg.starts[j] == i + 1:  # first token of an element: merged context
            ctx = merged[:j]
        else:  # inner token: merged context + raw tokens of the span up to i
            ctx = torch.cat([merged[:j], emb_table(torch.tensor(seg.tokens[seg.starts[j] : i + 1]))])
        with torch.no_grad():
            logits = model(inputs_embeds=ctx[None]).logits[0, -1]
        out.append(float(-torch.log_softmax(logits, -1)[target]))
    return torch.tensor(out)


@pytest.mark.parametrize("tokens", [
    [20, 2, 3, 21, 7, 8, 9, 22, 10, 11, 12, 13, 5, 6],
    [2, 3, 40, 41, 10, 11, 12, 13],  # span at position 0
    [30, 31, 32],  # nothing merged
])
def test_two_stage_matches_naive(tiny_model, tokens):
    torch.manual_seed(0)
    module = MergeModule(MergeModuleConfig(32))
    with torch.no_grad():
        module.query.normal_()
    seg = segment([tokens], make_ruleset(RULES))[0]
    fast = two_stage_token_nll(tiny_model, module, seg)
    assert torch.allclose(fast, _naive_two_stage(tiny_model, module, seg), atol=1e-4)
    if seg.num_elements == len(tokens):  # no merges: identical to the base model
        assert torch.allclose(fast, base_token_nll(tiny_model, tokens)[0], atol=1e-5)


def test_token_reduction():
    rules = make_ruleset(RULES)
    # 14 tokens -> 1 + 1 + 1 + 1 + 1 + 1 + 1 = 7 elements
    assert token_reduction(rules, [[20, 2, 3, 21, 7, 8, 9, 22, 10, 11, 12, 13, 5, 6]]) == pytest.approx(0.5)
    assert token_reduction(rules, [[30, 31]]) == 0.0


def test_suite_mean_and_identity(tiny_model):
    rules = make_ruleset(RULES)
    g = torch.Generator().manual_seed(3)
    windows = [torch.randint(14, 64, (24,), generator=g).tolist() for _ in range(3)]
    for w in windows:
        w[5:7], w[12:15] = [2, 3], [7, 8, 9]
    res = evaluate_windows(tiny_model, {"mean": MergeModule(MergeModuleConfig(32))}, rules, windows, progress=False)
    assert res["tr"] == pytest.approx(1 - (72 - 9) / 72)
    m = res["modules"]["mean"]
    assert 0 <= m["top1"] <= 1 and 0 < m["mrr"] <= 1 and m["n"] == 3 * (24 - 5 - 3)
    assert math.isfinite(m["ppl"]) and math.isfinite(res["base_ppl"])
