"""Sequential computation distillation loss (paper §3.3, App. C Algorithm 1) on a cached teacher.

The paper's loss is the cross-entropy ``-sum_v p_teacher(v) log p_student(v)`` averaged over the
loss-masked (aligned) rows; it equals ``KL(teacher || student)`` up to the teacher entropy, a
constant for the module. Rows are aligned as in :mod:`vllm_umim.module.batches`: student row
``j`` (compressed) against teacher row ``last[j]`` (raw).

Approximation. The teacher is run once and only its top-k logits (k = 64 by default) and full
logsumexp are kept (:mod:`vllm_umim.training.teacher_cache`), not the full 49k-way
distribution. Two targets are available:

* ``"renorm"`` (default): the teacher's top-k distribution renormalised to sum to 1,
  ``q_i = softmax(topk_logits)_i``, against the student's full log-softmax at those ids:
  ``L = -sum_i q_i log p_student(id_i)``. This drops the teacher's tail (the mass outside its
  top-k, typically a few to ~50 % on open text) and slightly sharpens the target; the top of
  the distribution — what the Top-1/Top-k/MRR metrics score — is kept exactly in ratio.
* ``"bucket"``: the exact cross-entropy on the (k+1)-bin coarsening {top-k ids, everything
  else}: teacher probabilities ``exp(logit - lse)`` are exact, the tail bin gets the remaining
  teacher mass and the student's log-mass outside those ids. This is ``KL`` on the coarsened
  distributions (a lower bound on the full KL) plus a constant.

The returned value is normalised by the number of supervised rows (``sum(loss_mask)``).

Top-1 term (issue 20, "training for what users see"). Greedy decoding reads only the argmax, and
the KL weighs a flipped argmax no more than any other mismatch of the same size. The optional
:func:`top1_margin_loss` asks the student to rank the teacher's top-1 first by the teacher's own
margin over its runner-up (capped): zero where the student already does, a hinge elsewhere. It
never asks for more confidence than the teacher has, so it does not sharpen rows where the teacher
itself hesitates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_umim.errors import AlignmentError, OptionError
from vllm_umim.module.batches import Batch, check_alignment, student_embeddings

TARGETS = ("renorm", "bucket")


def student_logits(model, module, batch: Batch) -> torch.Tensor:
    """The merged model's logits at the loss-masked rows [R, V] (row-major), with gradients
    flowing through the frozen LM into the merge module's surrogate embeddings."""
    embeds = student_embeddings(batch, model.get_input_embeddings(), module)
    B, M, _ = embeds.shape
    positions = torch.arange(M)[None].expand(B, M)
    hidden = model.model(
        inputs_embeds=embeds, attention_mask=batch.attention_mask, position_ids=positions, use_cache=False
    ).last_hidden_state
    logits = model.lm_head(hidden[batch.loss_mask]).float()
    cap = getattr(model.config, "final_logit_softcapping", None)  # Gemma 2 (HF applies it after lm_head)
    return torch.tanh(logits / cap) * cap if cap else logits


def distillation_loss(
    logits: torch.Tensor,
    topk_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    lse: torch.Tensor | None = None,
    target: str = "renorm",
) -> torch.Tensor:
    """Mean cross-entropy of the (cached top-k) teacher against the student's log-softmax.

    logits [R, V] student; topk_logits/topk_ids [R, k] teacher; lse [R] teacher logsumexp
    (needed for ``target="bucket"``).
    """
    if logits.shape[0] != topk_logits.shape[0]:
        raise AlignmentError(f"{logits.shape[0]} student rows vs {topk_logits.shape[0]} teacher rows: misaligned")
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    logp = F.log_softmax(logits.float(), dim=-1)
    logp_k = logp.gather(1, topk_ids.long())
    if target == "renorm":
        q = F.softmax(topk_logits.float(), dim=-1)
        return -(q * logp_k).sum(-1).mean()
    if target == "bucket":
        if lse is None:
            raise OptionError("target='bucket' needs the teacher logsumexp")
        p = (topk_logits.float() - lse[:, None].float()).exp()
        tail_p = (1.0 - p.sum(-1)).clamp(min=0.0)
        tail_p = torch.where(tail_p > 1e-6, tail_p, torch.zeros_like(tail_p))  # rounding noise when k = V
        masked = logp.scatter(1, topk_ids.long(), float("-inf"))
        tail_logq = torch.logsumexp(masked, dim=-1).clamp(min=-1e4)  # -inf when k = V
        return -((p * logp_k).sum(-1) + tail_p * tail_logq).mean()
    raise OptionError(f"unknown distillation target {target!r}; expected one of {TARGETS}")


def top1_margin_loss(logits: torch.Tensor, topk_logits: torch.Tensor, topk_ids: torch.Tensor, cap: float = 1.0) -> torch.Tensor:
    """Mean hinge ``relu(min(teacher margin, cap) - student margin)`` over the rows, where a margin
    is the logit of the teacher's top-1 token minus the best other logit (the teacher's is
    ``topk_logits[:, 0] - topk_logits[:, 1]``: the cache keeps them sorted). 0 where the student
    ranks the teacher's top-1 first by at least that much."""
    if logits.shape[0] != topk_logits.shape[0]:
        raise AlignmentError(f"{logits.shape[0]} student rows vs {topk_logits.shape[0]} teacher rows: misaligned")
    if logits.shape[0] == 0 or topk_logits.shape[1] < 2:
        return logits.sum() * 0.0
    logits = logits.float()
    top = topk_ids[:, :1].long()
    student_top = logits.gather(1, top).squeeze(1)
    student_other = logits.scatter(1, top, float("-inf")).max(-1).values
    wanted = (topk_logits[:, 0] - topk_logits[:, 1]).float().clamp(min=0.0, max=cap)
    return F.relu(wanted - (student_top - student_other)).mean()


def batch_loss(model, module, batch: Batch, teacher_rows, target: str = "renorm", top1_weight: float = 0.0,
               top1_cap: float = 1.0) -> torch.Tensor:
    """Algorithm 1 for one batch: check alignment, run the student, compare with cached rows
    (plus ``top1_weight`` times the top-1 margin term)."""
    return batch_terms(model, module, batch, teacher_rows, target, top1_weight, top1_cap)[0]


def batch_terms(model, module, batch: Batch, teacher_rows, target: str = "renorm", top1_weight: float = 0.0,
                top1_cap: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, top-1 agreements)``: the loss of :func:`batch_loss` and, per supervised row,
    whether the student's argmax is the teacher's (what greedy decoding sees)."""
    check_alignment(batch)
    topk_logits, topk_ids, lse = teacher_rows
    logits = student_logits(model, module, batch)
    loss = distillation_loss(logits, topk_logits, topk_ids, lse, target)
    if top1_weight:
        loss = loss + top1_weight * top1_margin_loss(logits, topk_logits, topk_ids, top1_cap)
    agree = logits.detach().argmax(-1) == topk_ids[:, 0].long()
    return loss, agree
