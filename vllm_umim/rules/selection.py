"""Selecting rules: keep the merges that earn their place (issue 13).

A selection is a new rule set (its own, renumbered rule ids) holding a subset of a rule set's
rules, their counts and harm scores. The merge module pools token embeddings, so it serves any
rule set mined for its tokenizer: a selected file is used with the same module.

* :func:`select_by_harm` keeps rules whose harm (``vllm_umim.evaluation.rule_harm``) is at most
  a threshold;
* :func:`select_for_target_tr` drops the most harmful rules first until the token reduction
  (TR, paper §4.1) on given text falls to a target.

The paper's own selection is mining's frequency threshold plus its hierarchical overlap filter
(§3.1, pseudocode 1; ``vllm_umim.rules.mining``). TR here is measured with the greedy-longest
segmentation the engine uses (pseudocode 3, ``RuleSet.find_spans``), so dropping a rule can let
a shorter or overlapping rule merge in its place: TR is measured, never estimated from counts.

``min_count`` treats a rule scored on fewer occurrences as unscored: one occurrence's KL depends
on its context as much as on the rule (on the shipped rules most scored rules were seen once).
"""

from __future__ import annotations

import numpy as np

from vllm_umim.errors import SelectionError
from vllm_umim.rules.ruleset import RuleSet

UNSCORED_CHOICES = ("keep", "drop")


def merge_counts(rules: RuleSet, sequences: list[list[int]]) -> np.ndarray:
    """int64 [len(rules)]: how often each rule merges in ``sequences`` (greedy-longest)."""
    counts = np.zeros(len(rules), np.int64)
    for spans in rules.find_spans(sequences) if sequences and len(rules) else []:
        spans = np.asarray(spans)
        np.add.at(counts, spans[spans >= 0], 1)
    return counts


def tokens_merged_away(rules: RuleSet, sequences: list[list[int]]) -> int:
    """Raw tokens minus positions over ``sequences`` (greedy-longest prompt merging)."""
    return int(merge_counts(rules, sequences) @ (rules.span_lengths.numpy().astype(np.int64) - 1))


def token_reduction(rules: RuleSet, sequences: list[list[int]]) -> float:
    """TR = 1 - positions / raw tokens over ``sequences`` (paper §4.1)."""
    raw = sum(len(s) for s in sequences)
    return tokens_merged_away(rules, sequences) / raw if raw else 0.0


def _check(rules: RuleSet, unscored: str) -> None:
    if unscored not in UNSCORED_CHOICES:
        raise SelectionError(f"unscored must be one of {UNSCORED_CHOICES}, got {unscored!r}")
    if not rules.scored:
        raise SelectionError("the rule set has no harm scores: score it first (vllm-umim score-rules)")


def _selection_meta(rules: RuleSet, keep: np.ndarray, **criterion) -> dict:
    return {"selection": {"parent_rules": rules.fingerprint, "parent_count": len(rules),
                          "kept": int(keep.sum()), **criterion}}


def trusted_harm(rules: RuleSet, min_count: int = 1) -> np.ndarray:
    """float32 [len(rules)]: harm scores, NaN where unscored or scored on fewer than ``min_count`` merges."""
    harm = rules.harm_scores()
    harm[rules.harm_count_by_rule() < max(min_count, 1)] = np.nan
    return harm


def harm_keep_mask(rules: RuleSet, max_harm: float, unscored: str = "keep", min_count: int = 1) -> np.ndarray:
    """bool [len(rules)]: harm <= ``max_harm``, unscored rules kept or dropped as asked."""
    _check(rules, unscored)
    harm = trusted_harm(rules, min_count)
    scored = ~np.isnan(harm)
    keep = np.zeros(len(rules), bool)
    keep[scored] = harm[scored] <= max_harm
    keep[~scored] = unscored == "keep"
    return keep


def select_by_harm(rules: RuleSet, max_harm: float, unscored: str = "keep", min_count: int = 1) -> RuleSet:
    """The rules whose harm is at most ``max_harm``; unscored rules are kept or dropped."""
    keep = harm_keep_mask(rules, max_harm, unscored, min_count)
    return rules.subset(keep, _selection_meta(rules, keep, max_harm=float(max_harm), unscored=unscored,
                                              min_count=min_count))


def harm_order(rules: RuleSet, min_count: int = 1) -> np.ndarray:
    """Scored rule ids, most harmful first (ties: lower rule id first)."""
    harm = trusted_harm(rules, min_count)
    scored = np.flatnonzero(~np.isnan(harm))
    return scored[np.lexsort((scored, -harm[scored]))]


def select_for_target_tr(rules: RuleSet, target_tr: float, sequences: list[list[int]], unscored: str = "keep",
                         min_count: int = 1) -> RuleSet:
    """Drop the most harmful scored rules until TR on ``sequences`` is at most ``target_tr``.

    Finds the fewest drops ``k`` (bisection over the harm order) with TR <= target; TR is
    re-measured for each candidate subset, so the result is within one rule's effect of the
    target. Unscored rules are never dropped by the search (``unscored="drop"`` removes them all
    first). Raises SelectionError if even dropping every scored rule leaves TR above target.
    """
    _check(rules, unscored)
    base = ~np.isnan(trusted_harm(rules, min_count)) | (unscored == "keep")
    order = harm_order(rules, min_count)

    def keep_after(k: int) -> np.ndarray:
        keep = base.copy()
        keep[order[:k]] = False
        return keep

    def tr_after(k: int) -> float:
        return token_reduction(rules.subset(keep_after(k)), sequences)

    lo, hi = 0, len(order)
    if tr_after(hi) > target_tr:
        raise SelectionError(
            f"target TR {target_tr:.4f} is out of reach: with all {len(order)} scored rules dropped TR is "
            f"{tr_after(hi):.4f} (unscored={unscored!r}, min_count={min_count})"
        )
    if tr_after(lo) <= target_tr:
        hi = lo
    while hi - lo > 1:  # invariant: tr_after(lo) > target >= tr_after(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if tr_after(mid) > target_tr else (lo, mid)
    keep = keep_after(hi)
    return rules.subset(keep, _selection_meta(rules, keep, target_tr=float(target_tr), dropped_by_harm=hi,
                                              unscored=unscored, min_count=min_count))


def max_harm_for_merge_share(rules: RuleSet, per_rule_merges: np.ndarray, share: float) -> float:
    """The smallest harm threshold whose selection (unscored kept) keeps at least ``share`` of the
    merges counted in ``per_rule_merges`` (e.g. :func:`merge_counts` on held-out text).

    Counted on the full rule set's segmentation: after the selection, rules that were shadowed by
    a dropped longer rule may merge instead, so the kept share of *positions saved* is measured
    afterwards (TR), not promised here.
    """
    harm = rules.harm_scores()
    per_rule_merges = np.asarray(per_rule_merges, np.int64)
    total = per_rule_merges.sum()
    scored = np.flatnonzero(~np.isnan(harm))
    needed = share * total - per_rule_merges[np.isnan(harm)].sum()
    if needed <= 0 or not len(scored):
        return 0.0
    ascending = scored[np.argsort(harm[scored], kind="stable")]
    kept = np.cumsum(per_rule_merges[ascending])
    at = min(int(np.searchsorted(kept, needed)), len(ascending) - 1)
    return float(harm[ascending[at]])
