"""One shard of the teacher cache: the frozen teacher's top-k logits for a run of windows.

``compute_shard`` is the one function both paths run: ``teacher_cache.build_cache`` in this
process and each ``ray_teacher`` actor on a cluster, so the two write the same files.
"""

from __future__ import annotations

import torch

from vllm_umim.module.batches import collate, segment


def teacher_topk(model, batch, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k logits/ids and logsumexp of the teacher at ``batch.teacher_mask`` rows (row-major)."""
    with torch.no_grad():
        hidden = model.model(input_ids=batch.raw_ids).last_hidden_state
        rows = hidden[batch.teacher_mask]
        logits = model.lm_head(rows).float()
        lse = torch.logsumexp(logits, dim=-1)
        values, ids = torch.topk(logits, k, dim=-1)
    return values, ids.to(torch.int32), lse


def compute_shard(model, rules, windows: list[list[int]], k: int, batch_size: int) -> tuple[dict, int]:
    """One shard's tensors (``row_offsets``, ``topk_ids``, ``topk_logits``, ``lse``) for these
    windows, and the raw tokens they hold. The same function serves the local and the Ray path."""
    offsets, all_ids, all_vals, all_lse, raw_tokens = [0], [], [], [], 0
    for b in range(0, len(windows), batch_size):
        batch = collate(segment(windows[b : b + batch_size], rules))
        vals, ids, lse = teacher_topk(model, batch, k)
        for c in batch.teacher_mask.sum(1).tolist():
            offsets.append(offsets[-1] + c)
        all_ids.append(ids)
        all_vals.append(vals)
        all_lse.append(lse)
        raw_tokens += batch.num_raw_tokens
    tensors = {
        "row_offsets": torch.tensor(offsets, dtype=torch.int64),
        "topk_ids": torch.cat(all_ids).contiguous(),
        "topk_logits": torch.cat(all_vals).contiguous(),
        "lse": torch.cat(all_lse).contiguous(),
    }
    return tensors, raw_tokens
