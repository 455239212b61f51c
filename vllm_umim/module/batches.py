"""What training and evaluation feed the merge module: windows, their merge segmentation, and the
App. C masks and index mapping.

A *window* is ``seq_len`` consecutive raw tokens of the tokenized corpus (documents joined with
the EOS token, paper App. E.1 "concatenate into a fixed-length dataset"). Merging it with the
rules (the paper's policy, ``vllm_umim.policies.GreedyLongestMatch``) gives ``M <= seq_len`` *elements* (a plain token
or a merged span). For element ``j`` let ``last[j]`` be the raw index of its last token.

Alignment (paper §3.3, App. C). The student's output at compressed position ``j`` is the
next-token distribution after the prefix ``elements[:j+1]``; the teacher's output at raw position
``last[j]`` is the distribution after the *same text* unmerged. So student row ``j`` is
aligned with teacher row ``last[j]``. Masks, per window:

* ``attention_mask`` [B, M_max]: 1 for real elements, 0 for padding (right padding);
* ``padding_mask``   [B, M_max]: True at padding positions (complement of the attention mask);
* ``loss_mask``      [B, M_max]: 1 for elements from the first merged one on (earlier positions
  are identical for teacher and student and give no signal), 0 for padding;
* ``teacher_mask``   [B, seq_len]: the same positions in raw indexing: 1 at ``last[j]`` for every
  loss-masked ``j`` — inside a merged span only its last raw token is 1;
* ``index_map``      [B, seq_len]: raw index -> compressed position of the element holding it.

App. C example: ``[x1, x2, x3, x4, x5, x6]`` with ``(x2,x3)`` and ``(x5,x6)`` merged gives
attention ``1 1 1 1``, loss ``0 1 1 1`` and teacher mask ``0 0 1 1 0 1``.
:func:`check_alignment` raises if teacher and student masks do not select the same number of
rows per sample, or if ``last`` does not map student rows onto teacher rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_umim.data.model import bos_prefix  # re-exported: windows and prompts start with it
from vllm_umim.errors import AlignmentError
from vllm_umim.module.context import context_windows
from vllm_umim.policies import GreedyLongestMatch, Segmentation
from vllm_umim.rules import RuleSet
from vllm_umim.rules.ruleset import MAX_SPAN

__all__ = ["AlignmentError", "Batch", "Segmentation", "check_alignment", "bos_prefix", "collate", "corpus_windows", "segment",
           "span_context", "student_embeddings"]


def segment(windows: list[list[int]], rules: RuleSet) -> list[Segmentation]:
    """Merge each window as the engine merges a prompt (pseudocode 3: the paper's policy)."""
    return GreedyLongestMatch(rules).segment(windows)


@dataclass
class Batch:
    """A collated batch; see the module docstring for the masks."""

    raw_ids: torch.Tensor  # [B, T] raw tokens (teacher input)
    element_tokens: torch.Tensor  # [B, M, 4] tokens of each element, -1 padded
    element_lengths: torch.Tensor  # [B, M] 1 for plain tokens, n for spans, 0 for padding
    attention_mask: torch.Tensor  # [B, M] long
    padding_mask: torch.Tensor  # [B, M] bool
    loss_mask: torch.Tensor  # [B, M] bool
    teacher_mask: torch.Tensor  # [B, T] bool
    index_map: torch.Tensor  # [B, T] long
    last_index: torch.Tensor  # [B, M] raw index of each element's last token (-1 padding)
    num_raw_tokens: int

    @property
    def merged_mask(self) -> torch.Tensor:
        return self.element_lengths > 1

    def student_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch index, compressed position) of every loss-masked row, in row-major order."""
        return self.loss_mask.nonzero(as_tuple=True)

    def teacher_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch index, raw position) of every teacher-masked row, in row-major order."""
        return self.teacher_mask.nonzero(as_tuple=True)


def collate(segs: list[Segmentation]) -> Batch:
    B = len(segs)
    T = max(len(s.tokens) for s in segs)
    M = max(s.num_elements for s in segs)
    raw = torch.zeros(B, T, dtype=torch.long)
    el_tok = torch.full((B, M, MAX_SPAN), -1, dtype=torch.long)
    el_len = torch.zeros(B, M, dtype=torch.long)
    loss = torch.zeros(B, M, dtype=torch.bool)
    tmask = torch.zeros(B, T, dtype=torch.bool)
    imap = torch.full((B, T), -1, dtype=torch.long)
    last = torch.full((B, M), -1, dtype=torch.long)
    for b, s in enumerate(segs):
        raw[b, : len(s.tokens)] = torch.tensor(s.tokens)
        first = s.first_merge
        for j, (start, end) in enumerate(zip(s.starts, s.ends)):
            el_tok[b, j, : end - start] = torch.tensor(s.tokens[start:end])
            el_len[b, j] = end - start
            imap[b, start:end] = j
            last[b, j] = end - 1
            if j >= first:
                loss[b, j] = True
                tmask[b, end - 1] = True
    attn = (el_len > 0).long()
    batch = Batch(raw, el_tok, el_len, attn, attn == 0, loss, tmask, imap, last, sum(len(s.tokens) for s in segs))
    check_alignment(batch)
    return batch


def check_alignment(batch: Batch) -> None:
    """Raise AlignmentError unless student loss rows map one-to-one onto teacher rows."""
    n_student = batch.loss_mask.sum(1)
    n_teacher = batch.teacher_mask.sum(1)
    if not torch.equal(n_student, n_teacher):
        raise AlignmentError(f"student/teacher mask sizes differ per sample: {n_student.tolist()} vs {n_teacher.tolist()}")
    if (batch.loss_mask & (batch.attention_mask == 0)).any():
        raise AlignmentError("loss mask selects padding positions")
    b_s, j_s = batch.student_rows()
    b_t, t_t = batch.teacher_rows()
    if not torch.equal(b_s, b_t) or not torch.equal(batch.last_index[b_s, j_s], t_t):
        raise AlignmentError("student rows do not map onto teacher rows (last raw token of each element)")
    if not torch.equal(batch.index_map[b_t, t_t], j_s):
        raise AlignmentError("index mapping disagrees with the aligned rows")


def tokenize_corpus(documents: list[str], tokenizer, max_tokens: int | None = None) -> list[int]:
    """Documents tokenized (no special tokens) and joined with EOS, cut at ``max_tokens``."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    step = 256
    for i in range(0, len(documents), step):
        for ids in tokenizer(documents[i : i + step], add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            if eos is not None:
                stream.append(eos)
        if max_tokens is not None and len(stream) >= max_tokens:
            break
    return stream[:max_tokens] if max_tokens is not None else stream


def make_windows(stream: list[int], seq_len: int, max_windows: int | None = None, prefix: list[int] = ()) -> list[list[int]]:
    """Non-overlapping ``seq_len`` windows of the token stream (the tail is dropped); with a
    ``prefix`` (the BOS of :func:`bos_prefix`) each window is the prefix and ``seq_len - len(prefix)``
    stream tokens."""
    prefix = list(prefix)
    step = seq_len - len(prefix)
    n = len(stream) // step
    if max_windows is not None:
        n = min(n, max_windows)
    return [prefix + stream[i * step : (i + 1) * step] for i in range(n)]


def student_embeddings(batch: Batch, embedding: torch.nn.Embedding, module) -> torch.Tensor:
    """Input embeddings [B, M, d]: token embedding, or the module's surrogate for merged spans.

    Gradients flow into ``module``; the embedding table is frozen.
    """
    tokens = batch.element_tokens.clamp(min=0)
    embeds = embedding(tokens)  # [B, M, 4, d]
    out = embeds[:, :, 0, :].clone()
    merged = batch.merged_mask
    if merged.any():
        spans = embeds[merged]  # [S, 4, d]
        lengths = batch.element_lengths[merged]
        mod_dtype = next(module.parameters()).dtype
        context = span_context(batch, embedding, _context_tokens(module), mod_dtype)
        surrogate = module(spans.to(mod_dtype), lengths, batch.element_tokens[merged], context=context).to(out.dtype)
        out = out.masked_scatter(merged[..., None], surrogate)
    return out * batch.attention_mask[..., None].to(out.dtype)


def _context_tokens(module) -> int:
    module = getattr(module, "module", module)  # DDP
    return module.config.context_tokens


def span_context(batch: Batch, embedding: torch.nn.Embedding, k: int, dtype=None):
    """(embeds [S, k, d], lengths [S]) of the ``k`` raw tokens before each merged span of the batch
    (row-major, the order of ``merged_mask``), or None for ``k = 0``: what a context-aware module
    reads (:mod:`~vllm_umim.module.context`)."""
    if not k:
        return None
    merged = batch.merged_mask
    rows = merged.nonzero(as_tuple=True)[0]
    starts = batch.last_index[merged] - batch.element_lengths[merged] + 1
    tokens, lengths = context_windows(batch.raw_ids, starts, rows, k)
    embeds = embedding(tokens.clamp(min=0))
    return (embeds.to(dtype) if dtype is not None else embeds), lengths


def corpus_windows(
    corpus_path,
    tokenizer,
    seq_len: int,
    num_train_tokens: int,
    val_windows: int = 32,
    seed: int = 0,
) -> tuple[list[list[int]], list[list[int]]]:
    """(train windows, validation windows) from a corpus :func:`~vllm_umim.data.corpus.read_documents` reads (.txt or .jsonl).

    The whole corpus is tokenized and cut into ``seq_len`` windows, which are shuffled with a
    fixed seed (each starts with the model's BOS where its tokenizer adds one); the last ``val_windows`` of the permutation are the validation set (for early
    stopping) and the first ``num_train_tokens // seq_len`` the training set, so a larger
    budget extends a smaller one (the teacher cache resumes) and never overlaps validation.
    """
    from vllm_umim.data.corpus import read_documents

    windows = make_windows(tokenize_corpus(read_documents(corpus_path), tokenizer), seq_len, prefix=bos_prefix(tokenizer))
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed)).tolist()
    val = [windows[i] for i in order[len(order) - val_windows :]] if val_windows else []
    available = len(order) - val_windows
    n_train = min(num_train_tokens // seq_len, available)
    return [windows[i] for i in order[:n_train]], val
