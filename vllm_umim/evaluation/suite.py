"""One pass over held-out windows: alignment metrics, TR and two-stage PPL for several modules.

Per window the teacher (base LM on raw tokens) runs once; each merge module then runs the merged
sequence once (step 1 of pseudocode 5, whose logits also give the aligned student rows) plus the
skipped-token passes (step 2). The aligned rows are the App. C loss mask (student row ``j`` from
the first merge on vs teacher row ``last[j]``).
"""

from __future__ import annotations

import time

import torch

from vllm_umim.evaluation.alignment import AlignmentMeter
from vllm_umim.evaluation.perplexity import base_token_nll, perplexity, two_stage_token_nll
from vllm_umim.module.batches import check_alignment, collate, segment


@torch.no_grad()
def evaluate_windows(model, modules: dict, rules, windows: list[list[int]], ppl: bool = True, p: float = 0.7,
                     progress: bool = True) -> dict:
    """{"base": {...}, name: {alignment..., ppl, tr}} over ``windows``."""
    model.eval()
    meters = {name: AlignmentMeter(p) for name in modules}
    nll = {name: 0.0 for name in modules}
    base_nll, count, raw, merged = 0.0, 0, 0, 0
    started = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(windows), unit="win", desc="eval")
    for seg in segment(windows, rules):
        batch = collate([seg])
        check_alignment(batch)
        b_nll, t_logits = base_token_nll(model, seg.tokens)
        base_nll += float(b_nll.sum())
        count += len(b_nll)
        raw += len(seg.tokens)
        merged += seg.num_elements
        t_rows = torch.softmax(t_logits[batch.teacher_mask[0]], -1)
        for name, module in modules.items():
            if ppl:
                m_nll, s_logits = two_stage_token_nll(model, module, seg, return_logits=True)
                nll[name] += float(m_nll.sum())
            else:
                from vllm_umim.evaluation.perplexity import merged_embeddings

                s_logits = model(inputs_embeds=merged_embeddings(model, module, seg)[None]).logits[0].float()
            s_rows = torch.softmax(s_logits[batch.loss_mask[0]], -1)
            meters[name].update(t_rows, s_rows)
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    out = {
        "windows": len(windows),
        "raw_tokens": raw,
        "positions": merged,
        "tr": 1.0 - merged / raw if raw else 0.0,
        "base_ppl": perplexity(base_nll, count) if ppl else None,
        "scored_tokens": count,
        "seconds": round(time.perf_counter() - started, 1),
        "modules": {},
    }
    for name in modules:
        out["modules"][name] = {**meters[name].result(), "ppl": perplexity(nll[name], count) if ppl else None}
    return out
