"""Rule selection by harm (issue 13): thresholds keep/drop the expected rules, the TR target is
hit within one rule's effect, selected files renumber their rules and load with their scores."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import make_ruleset
from vllm_umim.errors import SelectionError
from vllm_umim.rules import load_rules, save_rules
from vllm_umim.rules.selection import (
    harm_order,
    max_harm_for_merge_share,
    merge_counts,
    select_by_harm,
    select_for_target_tr,
    token_reduction,
)

# rule ids (sorted by n, then tokens): 0 (1,2)  1 (3,4)  2 (5,6)  3 (7,8)  4 (1,2,3)  5 (9,10,11,12)
RULES = [(1, 2), (3, 4), (5, 6), (7, 8), (1, 2, 3), (9, 10, 11, 12)]
HARM = np.array([0.1, 2.0, 0.5, np.nan, 3.0, 1.0], np.float32)
TEXT = [[1, 2, 3, 4, 20, 5, 6, 21, 7, 8, 9, 10, 11, 12, 22, 1, 2, 30, 3, 4, 40]] * 3


def scored():
    rules = make_ruleset(RULES)
    return rules.with_harm(HARM, np.where(np.isnan(HARM), 0, 5).astype(np.uint32))


def kept_tokens(rules) -> set:
    return {rules.tokens_of(r) for r in range(len(rules))}


def test_select_by_harm_keeps_rules_at_or_below_the_threshold():
    rules = scored()
    kept = select_by_harm(rules, 1.0)
    assert kept_tokens(kept) == {(1, 2), (5, 6), (7, 8), (9, 10, 11, 12)}  # (7, 8) unscored, kept
    assert kept.rule_ids == {(1, 2): 0, (5, 6): 1, (7, 8): 2, (9, 10, 11, 12): 3}  # renumbered
    np.testing.assert_array_equal(kept.harm_scores(), np.array([0.1, 0.5, np.nan, 1.0], np.float32))
    assert kept.meta["selection"]["max_harm"] == 1.0 and kept.meta["selection"]["parent_rules"] == rules.fingerprint
    assert kept_tokens(select_by_harm(rules, 1.0, unscored="drop")) == {(1, 2), (5, 6), (9, 10, 11, 12)}
    assert len(select_by_harm(rules, -1.0, unscored="drop")) == 0


def test_selected_file_round_trips(tmp_path):
    kept = select_by_harm(scored(), 0.5)
    save_rules(kept, tmp_path / "kept.bin")
    loaded = load_rules(tmp_path / "kept.bin")
    assert loaded.rule_ids == kept.rule_ids and loaded.meta["selection"]["kept"] == len(kept)
    np.testing.assert_array_equal(loaded.harm_scores(), kept.harm_scores())


def test_unscored_rules_cannot_be_selected_by_harm():
    with pytest.raises(SelectionError, match="no harm scores"):
        select_by_harm(make_ruleset(RULES), 1.0)
    with pytest.raises(SelectionError, match="unscored must be one of"):
        select_by_harm(scored(), 1.0, unscored="maybe")


def test_harm_order_is_most_harmful_first():
    assert harm_order(scored()).tolist() == [4, 1, 5, 2, 0]


def test_merge_counts_and_tr_follow_the_greedy_longest_segmentation():
    rules = scored()
    counts = merge_counts(rules, TEXT)
    # per copy: (1,2,3) at 0, (5,6), (7,8), (9..12), (1,2) at 15, (3,4) at 18; (3,4) at 2 is shadowed
    assert counts.tolist() == [3, 3, 3, 3, 3, 3]
    raw = 3 * len(TEXT[0])
    assert token_reduction(rules, TEXT) == pytest.approx(3 * (2 + 1 + 1 + 3 + 1 + 1) / raw)


@pytest.mark.parametrize("target", [0.4, 0.3, 0.25, 0.2, 0.1])
def test_target_tr_drops_the_most_harmful_first_and_hits_the_target(target):
    rules = scored()
    selected = select_for_target_tr(rules, target, TEXT)
    dropped = selected.meta["selection"]["dropped_by_harm"]
    assert kept_tokens(selected) == kept_tokens(rules) - {rules.tokens_of(r) for r in harm_order(rules)[:dropped]}
    assert token_reduction(selected, TEXT) <= target
    if dropped:  # one rule fewer dropped would miss the target: within one rule's effect
        keep = np.ones(len(rules), bool)
        keep[harm_order(rules)[: dropped - 1]] = False
        assert token_reduction(rules.subset(keep), TEXT) > target


def test_dropping_a_long_rule_lets_a_shadowed_rule_merge():
    rules = scored()
    selected = select_by_harm(rules, 2.5)  # drops (1, 2, 3) only
    assert merge_counts(selected, TEXT)[selected.rule_ids[(3, 4)]] == 6  # (3, 4) at 2 now merges
    # (1,2)+(3,4) save as many positions as (1,2,3): TR is measured, not summed from counts
    assert token_reduction(selected, TEXT) == token_reduction(rules, TEXT)
    assert select_for_target_tr(rules, 0.42, TEXT).meta["selection"]["dropped_by_harm"] == 2


def test_unreachable_target_tr_is_refused():
    with pytest.raises(SelectionError, match="out of reach"):
        select_for_target_tr(scored(), 0.0, TEXT)  # (7, 8) is unscored and kept
    assert token_reduction(select_for_target_tr(scored(), 0.0, TEXT, unscored="drop"), TEXT) == 0.0


def test_max_harm_for_merge_share():
    rules = scored()
    counts = np.array([10, 10, 10, 50, 10, 10])  # (7, 8) unscored: 50 of 100 merges kept anyway
    assert max_harm_for_merge_share(rules, counts, 0.5) == 0.0
    assert max_harm_for_merge_share(rules, counts, 0.6) == pytest.approx(0.1)
    assert max_harm_for_merge_share(rules, counts, 0.75) == pytest.approx(1.0)
    assert max_harm_for_merge_share(rules, counts, 1.0) == pytest.approx(3.0)
    keep = select_by_harm(rules, max_harm_for_merge_share(rules, counts, 0.75))
    assert sum(counts[rules.rule_ids[t]] for t in kept_tokens(keep)) >= 75


def test_min_count_treats_rarely_scored_rules_as_unscored():
    rules = make_ruleset(RULES).with_harm(HARM, np.array([9, 1, 9, 0, 2, 9], np.uint32))
    # (3, 4) harm 2.0 on 1 merge and (1, 2, 3) harm 3.0 on 2 merges are not trusted with min_count 3
    assert kept_tokens(select_by_harm(rules, 0.2, min_count=3)) == {(1, 2), (3, 4), (7, 8), (1, 2, 3)}
    assert kept_tokens(select_by_harm(rules, 0.2, unscored="drop", min_count=3)) == {(1, 2)}
    assert harm_order(rules, min_count=3).tolist() == [5, 2, 0]
    selected = select_for_target_tr(rules, 0.3, TEXT, min_count=3)
    assert (1, 2, 3) in kept_tokens(selected) and selected.meta["selection"]["min_count"] == 3
