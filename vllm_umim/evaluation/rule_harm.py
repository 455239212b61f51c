"""Rule harm: what each merge rule's surrogate costs the frozen LM (issue 13, "rules that earn
their place").

Definition. On training-text windows the teacher (the frozen LM on raw tokens) and the merged
student (the same LM on the merged embeddings, surrogates from the merge module for spans) run
once per window. Rows are aligned as in App. C: student row ``j`` (the next-token distribution
after element ``j``) against teacher row ``last[j]`` (after the same text, unmerged). The harm of
one *merged element* ``j`` is

    KL(teacher[last[j]] || student[j])                                 (horizon 0, the default)

the divergence at the row that predicts the first token after the span — exactly the row App. C
supervises for that span, so it is what the module was trained to get right. With ``horizon=H``
it is the mean KL over student rows ``j .. j+H`` (the span's own row and the next H aligned rows,
cut at the window's end), which also charges a surrogate for what later positions read from it.
Horizon 0 is the default because attribution stays clean: with the shipped rules (held-out TR
37 %) more than every third element is itself a merge, so rows after ``j`` mostly carry their
own merges' errors and a horizon smears harm across neighbouring rules.

KL rather than the paper's cross-entropy (App. C, "Cross-Entropy and KL Divergence"): the two
differ by the teacher's entropy, constant for training but not across rows, and a perfect
surrogate should score 0 wherever it sits.

A rule's harm is the mean over its scored occurrences; its harm count the number of those
occurrences. Rules that never occur in the windows stay unscored (NaN, count 0).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from vllm_umim.errors import OptionError
from vllm_umim.module.batches import check_alignment, collate, segment, student_embeddings
from vllm_umim.policies import Segmentation
from vllm_umim.rules import RuleSet

DEFAULT_HORIZON = 0


@dataclass
class HarmTotals:
    """Running per-rule sums of merge harm and occurrence counts (by rule id)."""

    sums: np.ndarray  # float64 [R]
    counts: np.ndarray  # int64 [R]
    aligned_rows: int = 0
    kl_sum: float = 0.0  # over every aligned row (merged or not): the window-level divergence
    raw_tokens: int = 0
    elements: int = 0

    @classmethod
    def empty(cls, num_rules: int) -> "HarmTotals":
        return cls(np.zeros(num_rules, np.float64), np.zeros(num_rules, np.int64))

    def add(self, rule_ids: np.ndarray, harm: np.ndarray) -> None:
        np.add.at(self.sums, rule_ids, harm)
        np.add.at(self.counts, rule_ids, 1)

    def scores(self) -> tuple[np.ndarray, np.ndarray]:
        """(harm float32 [R], NaN where never seen; harm_count uint32 [R])."""
        with np.errstate(invalid="ignore", divide="ignore"):
            harm = np.where(self.counts > 0, self.sums / np.maximum(self.counts, 1), np.nan)
        return harm.astype(np.float32), self.counts.astype(np.uint32)


def aligned_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per row of two aligned [K, V] logit matrices (nats, >= 0)."""
    teacher = F.log_softmax(teacher_logits.float(), dim=-1)
    student = F.log_softmax(student_logits.float(), dim=-1)
    return (teacher.exp() * (teacher - student)).sum(-1).clamp(min=0)


@torch.no_grad()
def window_merge_harm(model, module, seg: Segmentation, horizon: int = DEFAULT_HORIZON):
    """(rule ids, harm per merged element, KL per aligned row) of one window (module docstring)."""
    batch = collate([seg])
    check_alignment(batch)
    teacher_logits = model(input_ids=batch.raw_ids).logits[0]
    embeds = student_embeddings(batch, model.get_input_embeddings(), module)
    student_logits = model(inputs_embeds=embeds).logits[0]
    _, student_rows = batch.student_rows()
    _, teacher_rows = batch.teacher_rows()
    kl = aligned_kl(teacher_logits[teacher_rows], student_logits[student_rows]).double()
    first = seg.first_merge  # aligned row k is element first + k
    rule_ids = np.asarray(seg.rule_ids)
    merged = np.flatnonzero(rule_ids >= 0)
    if horizon == 0:
        harm = kl[merged - first].numpy()
    else:
        cumulative = torch.cat([torch.zeros(1, dtype=kl.dtype), kl.cumsum(0)]).numpy()
        start = merged - first
        stop = np.minimum(start + horizon + 1, len(kl))
        harm = (cumulative[stop] - cumulative[start]) / (stop - start)
    return rule_ids[merged], harm, kl


@torch.no_grad()
def score_rules(model, module, rules: RuleSet, windows: list[list[int]], horizon: int = DEFAULT_HORIZON,
                progress: bool = True, meta: dict | None = None) -> tuple[RuleSet, HarmTotals]:
    """``rules`` with harm scores from ``windows`` attached (rule ids unchanged), and the totals."""
    if horizon < 0:
        raise OptionError(f"horizon must be >= 0, got {horizon}")
    model.eval()
    totals = HarmTotals.empty(len(rules))
    started = time.perf_counter()
    segs = segment(windows, rules)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(segs), unit="win", desc="score rules")
    for seg in segs:
        totals.raw_tokens += len(seg.tokens)
        totals.elements += seg.num_elements
        if seg.num_merged:
            rule_ids, harm, kl = window_merge_harm(model, module, seg, horizon)
            totals.add(rule_ids, harm)
            totals.aligned_rows += len(kl)
            totals.kl_sum += float(kl.sum())
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    harm, counts = totals.scores()
    record = {
        "definition": "mean KL(teacher || student) at the App. C aligned row of each merge",
        "horizon": horizon,
        "windows": len(windows),
        "raw_tokens": totals.raw_tokens,
        "merges": int(totals.counts.sum()),
        "seconds": round(time.perf_counter() - started, 1),
        **(meta or {}),
    }
    return rules.with_harm(harm, counts, {"harm": record}), totals


# ---------------------------------------------------------------- the summary


@dataclass
class HarmSummary:
    """What a scoring run found: how much it covers and which rules hurt most."""

    rules: int
    scored: int
    merges_scored: int
    heldout_merges: int | None = None
    heldout_coverage: float | None = None  # share of held-out merges whose rule is scored
    percentiles: dict[str, float] = field(default_factory=dict)  # over scored rules
    merge_weighted_percentiles: dict[str, float] = field(default_factory=dict)  # over scored merges
    most_harmful: list[tuple[int, float, int, str]] = field(default_factory=list)  # (rule id, harm, count, text)
    max_harm_for_share: dict[str, float] = field(default_factory=dict)  # held-out merge share kept -> max harm

    def lines(self) -> list[str]:
        out = [f"scored {self.scored} of {self.rules} rules on {self.merges_scored} merges"]
        if self.heldout_coverage is not None:
            out.append(f"held-out: {self.heldout_merges} merges, {100 * self.heldout_coverage:.1f} % by scored rules")
        out.append("harm percentiles (rules):  " + "  ".join(f"p{k} {v:.4f}" for k, v in self.percentiles.items()))
        out.append("harm percentiles (merges): " + "  ".join(f"p{k} {v:.4f}" for k, v in self.merge_weighted_percentiles.items()))
        if self.max_harm_for_share:
            out.append("max harm keeping a share of held-out merges (unscored kept): "
                       + "  ".join(f"{k}: {v:.4f}" for k, v in self.max_harm_for_share.items()))
        out.append("most harmful frequent rules (rule id, harm, occurrences, text):")
        out += [f"  {rid:>6d}  {harm:8.4f}  {count:>5d}  {text!r}" for rid, harm, count, text in self.most_harmful]
        return out


PERCENTILES = (10, 25, 50, 75, 90, 99)


def summarize_harm(rules: RuleSet, tokenizer=None, heldout: list[list[int]] | None = None, top: int = 10,
                   min_count: int = 5, shares=(0.9, 0.75, 0.5)) -> HarmSummary:
    """Coverage, percentiles, the ``top`` most harmful rules seen at least ``min_count`` times and,
    given held-out sequences, the max-harm thresholds keeping each share of held-out merges."""
    from vllm_umim.rules.selection import max_harm_for_merge_share, merge_counts

    harm, counts = rules.harm_scores(), rules.harm_count_by_rule()
    scored = ~np.isnan(harm)
    summary = HarmSummary(rules=len(rules), scored=int(scored.sum()), merges_scored=int(counts.sum()))
    if scored.any():
        summary.percentiles = {str(p): float(np.percentile(harm[scored], p)) for p in PERCENTILES}
        weighted = np.repeat(harm[scored], counts[scored].astype(np.int64))
        summary.merge_weighted_percentiles = {str(p): float(np.percentile(weighted, p)) for p in PERCENTILES}
    frequent = np.flatnonzero(scored & (counts >= min_count))
    for rid in frequent[np.argsort(-harm[frequent], kind="stable")][:top]:
        tokens = list(rules.tokens_of(int(rid)))
        text = tokenizer.decode(tokens) if tokenizer is not None else str(tokens)
        summary.most_harmful.append((int(rid), float(harm[rid]), int(counts[rid]), text))
    if heldout:
        per_rule = merge_counts(rules, heldout)
        summary.heldout_merges = int(per_rule.sum())
        summary.heldout_coverage = float(per_rule[scored].sum() / max(per_rule.sum(), 1))
        summary.max_harm_for_share = {f"{share:.0%}": max_harm_for_merge_share(rules, per_rule, share) for share in shares}
    return summary
