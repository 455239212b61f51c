"""Rule harm scoring (issue 13) on the tiny random Llama: finite, non-negative scores for rules
that occur, NaN for the rest, per-row KL checked against a direct computation, and attribution
checked on a module whose surrogate is bad for one rule only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import make_ruleset
from vllm_umim.evaluation.rule_harm import aligned_kl, score_rules, summarize_harm, window_merge_harm
from vllm_umim.module.batches import collate, segment, student_embeddings
from vllm_umim.module.merge_module import MergeModule, MergeModuleConfig

RULES = [(1, 2), (3, 4), (5, 6, 7), (8, 9, 10, 11), (60, 61)]  # (60, 61) never occurs below
PATTERN = [1, 2, 20, 3, 4, 21, 5, 6, 7, 22, 8, 9, 10, 11, 23]


def windows(count: int = 4, seed: int = 0) -> list[list[int]]:
    """Windows of the pattern with random filler tokens (12..59) between repetitions."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        w = [int(t) for t in rng.integers(12, 60, 3)]
        while len(w) < 48:
            w += PATTERN + [int(t) for t in rng.integers(12, 60, 2)]
        out.append(w[:48])
    return out


def bad_for_one_rule(tokens: tuple[int, ...], hidden: int = 32) -> MergeModule:
    """Mean pooling with a per-rule refinement that sends ``tokens``' surrogate far off."""
    ngram = torch.full((1, 4), -1)
    ngram[0, : len(tokens)] = torch.tensor(tokens)
    module = MergeModule(MergeModuleConfig(hidden)).refined(ngram)
    module.refinement.residuals.data[0] = torch.randn(hidden, generator=torch.Generator().manual_seed(1)) * 3
    return module


def mean_module():
    return MergeModule(MergeModuleConfig(32)).eval()


def test_scores_are_finite_for_rules_seen_and_nan_for_others(tiny_model):
    rules = make_ruleset(RULES)
    scored, totals = score_rules(tiny_model, mean_module(), rules, windows(), progress=False)
    harm, counts = scored.harm_scores(), scored.harm_count_by_rule()
    seen = [rules.rule_ids[r] for r in RULES[:4]]
    assert np.isfinite(harm[seen]).all() and (harm[seen] >= 0).all() and (counts[seen] > 0).all()
    assert np.isnan(harm[rules.rule_ids[(60, 61)]]) and counts[rules.rule_ids[(60, 61)]] == 0
    assert counts.sum() == totals.counts.sum() == sum(s.num_merged for s in segment(windows(), rules))
    assert scored.meta["harm"]["horizon"] == 0 and scored.rule_ids == rules.rule_ids


def test_window_harm_is_the_kl_at_the_aligned_row(tiny_model):
    rules = make_ruleset(RULES)
    module = mean_module()
    seg = segment(windows(1), rules)[0]
    rule_ids, harm, kl = window_merge_harm(tiny_model, module, seg)
    batch = collate([seg])
    with torch.no_grad():
        teacher = torch.log_softmax(tiny_model(input_ids=batch.raw_ids).logits[0], -1)
        student = torch.log_softmax(tiny_model(inputs_embeds=student_embeddings(batch, tiny_model.get_input_embeddings(), module)).logits[0], -1)
    merged = [j for j, r in enumerate(seg.rule_ids) if r >= 0]
    assert rule_ids.tolist() == [seg.rule_ids[j] for j in merged]
    for j, h in zip(merged, harm):
        t = teacher[seg.ends[j] - 1]  # the teacher row of the span's last token (App. C)
        expected = float((t.exp() * (t - student[j])).sum())
        assert h == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert len(kl) == seg.num_elements - seg.first_merge


def test_horizon_averages_the_following_rows(tiny_model):
    rules = make_ruleset(RULES)
    seg = segment(windows(1), rules)[0]
    _, harm0, kl = window_merge_harm(tiny_model, mean_module(), seg, horizon=0)
    _, harm2, _ = window_merge_harm(tiny_model, mean_module(), seg, horizon=2)
    rows = [j - seg.first_merge for j, r in enumerate(seg.rule_ids) if r >= 0]
    np.testing.assert_allclose(harm0, kl[rows].numpy(), rtol=1e-6)
    np.testing.assert_allclose(harm2, [kl[k : k + 3].mean().item() for k in rows], rtol=1e-6)


def test_a_bad_surrogate_is_attributed_to_its_rule(tiny_model):
    rules = make_ruleset(RULES)
    bad = (5, 6, 7)
    module = bad_for_one_rule(bad).eval()
    scored, _ = score_rules(tiny_model, module, rules, windows(6), progress=False)
    harm = scored.harm_scores()
    assert int(np.nanargmax(harm)) == rules.rule_ids[bad]
    others = np.delete(harm, [rules.rule_ids[bad], rules.rule_ids[(60, 61)]])
    assert harm[rules.rule_ids[bad]] > 3 * others.max()


def test_aligned_kl_is_zero_for_equal_rows_and_positive_otherwise():
    logits = torch.randn(3, 10)
    assert torch.allclose(aligned_kl(logits, logits), torch.zeros(3), atol=1e-6)
    assert (aligned_kl(logits, logits.flip(-1)) > 0).all()


def test_summary_reports_coverage_and_most_harmful(tiny_model, word_tokenizer):
    rules = make_ruleset(RULES)
    module = bad_for_one_rule((5, 6, 7)).eval()
    scored, _ = score_rules(tiny_model, module, rules, windows(6), progress=False)
    heldout = [[60, 61, 1, 2, 5, 6, 7]]  # 3 merges, (60, 61) unscored
    summary = summarize_harm(scored, None, heldout, min_count=1)
    assert summary.scored == 4 and summary.heldout_merges == 3
    assert summary.heldout_coverage == pytest.approx(2 / 3)
    assert summary.most_harmful[0][0] == rules.rule_ids[(5, 6, 7)] and summary.most_harmful[0][3] == "[5, 6, 7]"
    assert set(summary.percentiles) == {"10", "25", "50", "75", "90", "99"}
    assert "most harmful" in "\n".join(summary.lines())
