"""The ceiling of one frozen input position: how much of a merged span's meaning the frozen model
can read from a single input vector, and how much of that a module could reach.

Same data and alignment as the alignment metrics (paper §4.2, App. C): held-out windows merged by
the rules (greedy longest match, §3.1), the teacher is the frozen LM on raw tokens, the student the
same LM on the merged sequence, student row ``j`` (from the first merged element on) against
teacher row ``last[j]``. Only the vectors that stand in for merged spans change between variants:

* ``module``: the shipped merge module's surrogate (§3.2) — context-free and amortised.
* ``oracle``: a free vector per *occurrence*, initialised from the module's surrogate and optimised
  through the frozen model against the unmerged teacher (the §3.3 loss, as KL) on the held-out
  windows themselves. In sample, so a loose upper bound on what one position can carry.
* ``rule``: one free vector per *rule*, fitted on training windows (the same loss) and applied to
  held-out windows — the best context-free code the training text supports. Rules never seen in
  training fall back to the module (reported as coverage).
* ``context<k>``: one free vector per (k preceding raw tokens, rule), fitted on training windows
  starting from the per-rule vectors and applied held-out where that context was seen; elsewhere
  the per-rule vector (or the module). On the spans it covers it differs from ``rule`` only by
  context, so ``rule`` vs ``context<k>`` on that subset measures what context adds.

So the gap module -> oracle splits into "a better context-free code would do" (module -> rule) and
"context is needed" (rule -> context<k>, and what stays between them and the oracle).

:func:`run_ceiling` loads the model, rules, module and windows named by a :class:`CeilingConfig`;
:func:`measure_ceiling` does the work on given objects. Results go to a JSON file rewritten after
every finished variant; a rerun with the same settings skips the finished ones (per-row metrics,
fitted tables and oracle batches are kept in ``scratch_dir`` for that). The per-row metrics are the
App. C ones of :mod:`~vllm_umim.evaluation.alignment` plus KL(teacher || student).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from vllm_umim.errors import CeilingError
from vllm_umim.evaluation.alignment import reciprocal_ranks, top1_matches, topk_overlaps, topp_overlaps
from vllm_umim.files import write_bytes_atomic
from vllm_umim.module.batches import Batch, collate, segment, student_embeddings
from vllm_umim.policies import Segmentation

ROW_METRICS = ("kl", "top1", "top3", "top10", "topp", "mrr")
FIXED_VARIANTS = ("module", "rule", "oracle")


@dataclass(frozen=True)
class CeilingConfig:
    """What :func:`run_ceiling` measures and where it writes.

    Paths: the model folder, rules and module files, held-out and training corpora (one document per
    line), the JSON result and a scratch folder (per-row metrics, fitted vectors: not results to
    commit). ``variants`` run in the order given; ``context<k>`` needs ``rule`` (it starts from the
    per-rule vectors).
    """

    model: str = field(metadata={"help": "model folder (frozen teacher and student)"})
    rules: str = field(metadata={"help": "rules file"})
    module: str = field(metadata={"help": "merge module file: variant (a) and the starting point of the others"})
    heldout_corpus: str = field(metadata={"help": "held-out text, one document per line (the windows scored)"})
    train_corpus: str = field(metadata={"help": "training text, one document per line (the windows the per-rule and per-context vectors are fitted on)"})
    out: str = field(metadata={"help": "result JSON (rewritten after each variant; a rerun skips finished variants)"})
    scratch_dir: str = field(metadata={"help": "per-row metrics, fitted vectors and oracle checkpoints (not results to commit)"})
    variants: tuple[str, ...] = field(default=("module", "rule", "context1", "oracle"), metadata={
        "help": "variants in order, comma-separated: module, rule, context<k>, oracle", "type": lambda s: tuple(s.split(","))})
    seq_len: int = field(default=64, metadata={"help": "tokens per window"})
    heldout_windows: int = field(default=96, metadata={"help": "held-out windows scored"})
    train_windows: int = field(default=512, metadata={"help": "training windows the tables are fitted on"})
    val_windows: int = field(default=32, metadata={"help": "training-corpus windows, disjoint from the fitted ones, that pick the epoch"})
    batch_windows: int = field(default=8, metadata={"help": "windows per optimisation batch"})
    seed: int = field(default=0, metadata={"help": "window choice and order"})
    oracle_lr: float = field(default=3e-3, metadata={"help": "Adam learning rate of the per-occurrence oracle"})
    oracle_max_steps: int = field(default=100, metadata={"help": "oracle steps per batch at most"})
    oracle_patience: int = field(default=10, metadata={"help": "stop the oracle once its best loss fell less than --oracle-tol (relative) in this many steps"})
    oracle_tol: float = field(default=0.01, metadata={"help": "relative improvement the oracle's patience asks for"})
    fit_lr: float = field(default=3e-3, metadata={"help": "learning rate of the per-rule and per-context tables"})
    rule_epochs: int = field(default=4, metadata={"help": "epochs of the per-rule table"})
    context_epochs: int = field(default=3, metadata={"help": "epochs of the per-context tables"})
    min_train_count: int = field(default=1, metadata={"help": "a rule or context gets a vector when seen this often in training"})
    train_selection: str = field(default="cover", metadata={
        "help": "cover: training windows that hold the held-out keys (select_training_windows); random", "choices": ("cover", "random")})
    threads: int | None = field(default=1, metadata={"help": "torch threads"})

    def __post_init__(self):
        for name in self.variants:
            if name not in FIXED_VARIANTS and context_size(name) is None:
                raise CeilingError(f"unknown ceiling variant {name!r}; expected module, rule, oracle or context<k> (k >= 1)")
        if len(set(self.variants)) != len(self.variants):
            raise CeilingError(f"variants repeat: {self.variants}")
        if any(context_size(v) for v in self.variants) and "rule" not in self.variants:
            raise CeilingError("context<k> variants start from the per-rule vectors: include 'rule' in variants")
        for name in ("seq_len", "heldout_windows", "train_windows", "batch_windows", "oracle_max_steps",
                     "oracle_patience", "min_train_count"):
            if getattr(self, name) < 1:
                raise CeilingError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("rule_epochs", "context_epochs", "val_windows"):
            if getattr(self, name) < 0:
                raise CeilingError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.train_selection not in ("cover", "random"):
            raise CeilingError(f"train_selection must be 'cover' or 'random', got {self.train_selection!r}")
        for name in ("oracle_lr", "fit_lr", "oracle_tol"):
            if not getattr(self, name) > 0:
                raise CeilingError(f"{name} must be > 0, got {getattr(self, name)}")


def context_size(variant: str) -> int | None:
    """k of a ``context<k>`` variant name, else None."""
    if variant.startswith("context") and variant[7:].isdigit() and int(variant[7:]) >= 1:
        return int(variant[7:])
    return None


# ---------------------------------------------------------------- data: windows, batches, occurrences


@dataclass
class Split:
    """Windows merged and cut into batches; per batch, its merged occurrences (row-major over
    [window, element], the order of ``Batch.merged_mask``) and its aligned rows (the order of
    ``Batch.loss_mask``)."""

    segs: list[Segmentation]
    batches: list[Batch]
    occ_rule: list[torch.Tensor]  # per batch [S] rule id of each merged occurrence
    occ_start: list[torch.Tensor]  # per batch [S] raw start of the span in its window
    occ_window: list[torch.Tensor]  # per batch [S] window index (into segs)
    row_merged: list[torch.Tensor]  # per batch [R] the row sits at a merged element
    row_occ: list[torch.Tensor]  # per batch [R] index of that occurrence in the batch (-1: plain)

    @classmethod
    def build(cls, windows: list[list[int]], rules, batch_windows: int) -> "Split":
        segs = segment(windows, rules)
        out = cls(segs, [], [], [], [], [], [])
        for first in range(0, len(segs), batch_windows):
            chunk = segs[first : first + batch_windows]
            batch = collate(chunk)
            rule_ids = torch.full(batch.element_lengths.shape, -1, dtype=torch.long)
            starts = torch.zeros(batch.element_lengths.shape, dtype=torch.long)
            for b, s in enumerate(chunk):
                rule_ids[b, : s.num_elements] = torch.tensor(s.rule_ids)
                starts[b, : s.num_elements] = torch.tensor(s.starts)
            merged = batch.merged_mask
            occ_index = torch.full(merged.shape, -1, dtype=torch.long)
            occ_index[merged] = torch.arange(int(merged.sum()))
            out.batches.append(batch)
            out.occ_rule.append(rule_ids[merged])
            out.occ_start.append(starts[merged])
            out.occ_window.append(merged.nonzero()[:, 0] + first)
            out.row_merged.append(merged[batch.loss_mask])
            out.row_occ.append(occ_index[batch.loss_mask])
        return out

    def occurrence_keys(self, i: int, k: int) -> list:
        """Key of each merged occurrence of batch ``i``: its rule id (k = 0) or (the k raw tokens
        before the span, rule id); None when the span starts fewer than k tokens into its window."""
        windows = sorted(set(self.occ_window[i].tolist()))
        return [key for w in windows for key in span_keys(self.segs[w], k)]

    def counts(self) -> dict:
        raw = sum(len(s.tokens) for s in self.segs)
        elements = sum(s.num_elements for s in self.segs)
        return {
            "windows": len(self.segs),
            "tokens": raw,
            "elements": elements,
            "tr": 1.0 - elements / raw if raw else 0.0,
            "merged_spans": sum(s.num_merged for s in self.segs),
            "distinct_rules": len({r for s in self.segs for r in s.rule_ids if r >= 0}),
            "rows": int(sum(len(r) for r in self.row_merged)),
            "rows_at_merged": int(sum(int(r.sum()) for r in self.row_merged)),
        }


def span_keys(seg: Segmentation, k: int) -> list:
    """Keys of a window's merged spans, in order (see :meth:`Split.occurrence_keys`)."""
    out = []
    for rule, start in zip(seg.rule_ids, seg.starts):
        if rule >= 0:
            out.append(rule if k == 0 else ((tuple(seg.tokens[start - k : start]), rule) if start >= k else None))
    return out


def select_training_windows(pool: list[Segmentation], heldout: list[Segmentation], budget: int, k: int | None) -> tuple[list[int], dict]:
    """Indices of at most ``budget`` pool windows chosen so the held-out spans' keys occur in them.

    A compute shortcut for fitting: a full table would fit every rule (and context) on the whole
    training text, but only the keys that occur in the held-out windows are ever applied, so only
    windows that hold them are needed. Nothing of the held-out windows but their keys is used.
    Priority, each taking the first pool window (in pool order) that holds a key no chosen window
    holds yet: with ``k``, every held-out (k preceding tokens, rule) key, each followed by the same
    rule after *other* k tokens (so the per-rule vector also sees another context); then every
    held-out rule, most frequent in the held-out windows first.
    """
    rule_windows: dict = {}
    context_windows: dict = {}
    for w, seg in enumerate(pool):
        for rule in span_keys(seg, 0):
            rule_windows.setdefault(rule, []).append(w)
        if k:
            for key in span_keys(seg, k):
                if key is not None:
                    context_windows.setdefault(key, []).append(w)
    held_rules = [key for seg in heldout for key in span_keys(seg, 0)]
    wanted: list = []  # ("context", key) / ("other", key) / ("rule", rule)
    if k:
        for key in dict.fromkeys(key for seg in heldout for key in span_keys(seg, k) if key is not None):
            wanted += [("context", key), ("other", key)]
    frequency: dict = {}
    for rule in held_rules:
        frequency[rule] = frequency.get(rule, 0) + 1
    wanted += [("rule", rule) for rule in sorted(frequency, key=lambda r: -frequency[r])]
    chosen: list[int] = []
    chosen_set: set[int] = set()
    have_rules, have_contexts = set(), set()

    def take(w: int) -> None:
        chosen.append(w)
        chosen_set.add(w)
        have_rules.update(span_keys(pool[w], 0))
        if k:
            have_contexts.update(span_keys(pool[w], k))

    for kind, key in wanted:
        if len(chosen) >= budget:
            break
        if kind == "context" and key not in have_contexts and key in context_windows:
            take(context_windows[key][0])
        elif kind == "other":
            same = set(context_windows.get(key, ()))
            if not same:
                continue
            others = [w for w in rule_windows.get(key[1], ()) if w not in same]
            if others and not any(w in chosen_set for w in others):
                take(others[0])
        elif kind == "rule" and key not in have_rules and key in rule_windows:
            take(rule_windows[key][0])
    stats = {
        "selection": "cover",
        "pool_windows": len(pool),
        "selected_windows": len(chosen),
        "heldout_rules_in_pool": sum(1 for r in frequency if r in rule_windows),
        "heldout_rules": len(frequency),
    }
    if k:
        held_contexts = {key for seg in heldout for key in span_keys(seg, k) if key is not None}
        stats.update(k=k, heldout_contexts=len(held_contexts), heldout_contexts_in_pool=sum(1 for c in held_contexts if c in context_windows))
    return sorted(chosen), stats


def key_counts(split: Split, k: int) -> dict:
    counts: dict = {}
    for i in range(len(split.batches)):
        for key in split.occurrence_keys(i, k):
            if key is not None:
                counts[key] = counts.get(key, 0) + 1
    return counts


# ---------------------------------------------------------------- the frozen model, teacher and student


def teacher_logprobs(model, batch: Batch) -> torch.Tensor:
    """Teacher log-probabilities at the aligned rows [R, V] (App. C teacher mask)."""
    with torch.no_grad():
        logits = model(input_ids=batch.raw_ids).logits
        return logits[batch.teacher_mask].float().log_softmax(-1)


def student_inputs(model, batch: Batch, surrogates: torch.Tensor) -> torch.Tensor:
    """The batch's compressed input embeddings [B, M, d]: token embeddings, ``surrogates`` [S, d] at
    the merged elements (row-major order), zeros at padding; differentiable in ``surrogates``."""
    embedding = model.get_input_embeddings()
    inputs = embedding(batch.element_tokens[:, :, 0].clamp(min=0))
    inputs = inputs.masked_scatter(batch.merged_mask[..., None], surrogates.to(inputs.dtype))
    return inputs * batch.attention_mask[..., None].to(inputs.dtype)


def student_logprobs(model, batch: Batch, surrogates: torch.Tensor) -> torch.Tensor:
    """Student log-probabilities at the aligned rows [R, V] with ``surrogates`` [S, d] standing in
    for the batch's merged elements (row-major order); differentiable in ``surrogates``."""
    inputs = student_inputs(model, batch, surrogates)
    logits = model(inputs_embeds=inputs, attention_mask=batch.attention_mask).logits
    return logits[batch.loss_mask].float().log_softmax(-1)


def module_surrogates(model, batch: Batch, module) -> torch.Tensor:
    """The module's surrogates [S, d] for the batch's merged elements (no gradient)."""
    with torch.no_grad():
        return student_embeddings(batch, model.get_input_embeddings(), module)[batch.merged_mask].float()


def mean_kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(teacher || student), both as log-probabilities."""
    return (teacher.exp() * (teacher - student)).sum(-1).mean()


def row_metrics(teacher: torch.Tensor, student: torch.Tensor) -> dict[str, np.ndarray]:
    """Per aligned row: KL(teacher || student) and the App. C metrics (top-1, top-3/10 overlap,
    top-p overlap at 0.7, MRR), from log-probabilities."""
    with torch.no_grad():
        T, S = teacher.exp(), student.exp()
        rows = {
            "kl": (T * (teacher - student)).sum(-1),
            "top1": top1_matches(T, S),
            "top3": topk_overlaps(T, S, 3),
            "top10": topk_overlaps(T, S, 10),
            "topp": topp_overlaps(T, S, 0.7),
            "mrr": reciprocal_ranks(T, S),
        }
    return {name: value.double().numpy() for name, value in rows.items()}


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([p[name] for p in parts]) for name in ROW_METRICS}


def evaluate(model, split: Split, surrogates_of, teacher_cache: dict | None = None, student_model=None) -> dict[str, np.ndarray]:
    """Per-row metrics over every aligned row of ``split``; ``surrogates_of(i)`` gives batch i's
    surrogate vectors; ``teacher_cache`` (batch index -> teacher log-probabilities) is filled and reused.
    ``student_model``: the model that reads the merged input (an adapted reader); default ``model``."""
    parts = []
    teacher_cache = {} if teacher_cache is None else teacher_cache
    for i, batch in enumerate(split.batches):
        if i not in teacher_cache:
            teacher_cache[i] = teacher_logprobs(model, batch)
        teacher = teacher_cache[i]
        with torch.no_grad():
            student = student_logprobs(student_model or model, batch, surrogates_of(i))
        parts.append(row_metrics(teacher, student))
    return _concat(parts)


def summarize(rows: dict[str, np.ndarray], mask: np.ndarray | None = None) -> dict:
    """Means of the per-row metrics over ``mask`` (all rows if None) and the row count."""
    mask = np.ones(len(rows["kl"]), bool) if mask is None else mask
    n = int(mask.sum())
    out = {name: (float(rows[name][mask].mean()) if n else None) for name in ROW_METRICS}
    out["rows"] = n
    return out


# ---------------------------------------------------------------- fitted tables (rule, context<k>)


@dataclass
class Table:
    """Free vectors by key (a rule id, or (context tokens, rule id)): ``index[key]`` is a row of
    ``vectors``; ``train_counts[key]`` how often the key occurred in the fitted windows."""

    index: dict
    vectors: torch.Tensor  # [K, d]
    train_counts: dict

    def lookup(self, keys: list) -> torch.Tensor:
        """Row of each key, -1 where the table has none (the caller's fallback applies)."""
        return torch.tensor([self.index.get(key, -1) if key is not None else -1 for key in keys], dtype=torch.long)

    def apply(self, keys: list, base: torch.Tensor) -> torch.Tensor:
        """``base`` [S, d] with the table's vector wherever a key has one."""
        rows = self.lookup(keys)
        out = base.clone()
        hit = rows >= 0
        if hit.any():
            out[hit] = self.vectors[rows[hit]].to(out.dtype)
        return out

    def state(self) -> dict:
        keys = sorted(self.index, key=self.index.get)
        return {"keys": [_key_to_json(k) for k in keys], "vectors": self.vectors, "train_counts": [self.train_counts[k] for k in keys]}

    @classmethod
    def from_state(cls, state: dict) -> "Table":
        keys = [_key_from_json(k) for k in state["keys"]]
        return cls({k: i for i, k in enumerate(keys)}, state["vectors"], dict(zip(keys, state["train_counts"])))


def _key_to_json(key):
    return key if isinstance(key, int) else [list(key[0]), key[1]]


def _key_from_json(key):
    return key if isinstance(key, int) else (tuple(key[0]), key[1])


def fit_table(model, train: Split, val: Split | None, k: int, table: Table, base_of, epochs: int, lr: float,
              seed: int, teacher_cache: dict, log=print) -> tuple[Table, dict]:
    """Fit ``table``'s vectors on ``train`` (the §3.3 loss as KL, aligned rows, Adam on the rows a
    batch uses) for ``epochs`` passes; keys without a row use ``base_of(split, i)``. Keeps the epoch
    (0 = the initial vectors) with the lowest KL on ``val`` when given, else the last.

    ``teacher_cache`` maps batch index -> teacher log-probabilities (fp16), filled on first use.
    """
    if not table.index:
        return table, {"epochs": [], "kept_epoch": 0}
    weights = torch.nn.Embedding.from_pretrained(table.vectors.clone().float(), freeze=False, sparse=True)
    optimizer = torch.optim.SparseAdam(list(weights.parameters()), lr=lr)
    train_rows = [table.lookup(train.occurrence_keys(i, k)) for i in range(len(train.batches))]

    def val_kl() -> float | None:
        if val is None:
            return None
        current = Table(table.index, weights.weight.detach(), table.train_counts)
        total, n = 0.0, 0
        for i, batch in enumerate(val.batches):
            teacher = teacher_logprobs(model, batch)
            with torch.no_grad():
                student = student_logprobs(model, batch, current.apply(val.occurrence_keys(i, k), base_of(val, i)))
            total += float((teacher.exp() * (teacher - student)).sum())
            n += len(teacher)
        return total / n

    history = [{"epoch": 0, "train_kl": None, "val_kl": val_kl()}]
    best = (history[0]["val_kl"], 0, weights.weight.detach().clone())
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        started, total, n = time.perf_counter(), 0.0, 0
        for i in torch.randperm(len(train.batches), generator=generator).tolist():
            rows = train_rows[i]
            hit = rows >= 0
            if not hit.any():
                continue
            batch = train.batches[i]
            if i not in teacher_cache:
                teacher_cache[i] = teacher_logprobs(model, batch).half()
            teacher = teacher_cache[i].float()
            surrogates = base_of(train, i).clone()
            surrogates[hit] = weights(rows[hit])
            loss = mean_kl(teacher, student_logprobs(model, batch, surrogates))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(teacher)
            n += len(teacher)
        entry = {"epoch": epoch, "train_kl": total / n if n else None, "val_kl": val_kl(),
                 "seconds": round(time.perf_counter() - started, 1)}
        history.append(entry)
        log(f"  epoch {epoch}: train KL {entry['train_kl']}, val KL {entry['val_kl']} ({entry['seconds']} s)")
        if val is None or entry["val_kl"] < best[0]:
            best = (entry["val_kl"], epoch, weights.weight.detach().clone())
    fitted = Table(table.index, best[2], table.train_counts)
    return fitted, {"epochs": history, "kept_epoch": best[1]}


# ---------------------------------------------------------------- the oracle


def oracle_batch(model, batch: Batch, init: torch.Tensor, lr: float, max_steps: int, patience: int,
                 tol: float, teacher: torch.Tensor | None = None) -> tuple[torch.Tensor, list[float], str]:
    """Free vectors for one batch's occurrences, fitted in sample (Adam). Returns the vectors with the
    lowest loss seen, the loss curve (loss at step s is before update s) and why it stopped
    (``"plateau"``: the best loss fell less than ``tol`` relative in ``patience`` steps;
    ``"max_steps"``)."""
    teacher = teacher_logprobs(model, batch) if teacher is None else teacher
    vectors = init.clone().float().requires_grad_(True)
    optimizer = torch.optim.Adam([vectors], lr=lr)
    curve: list[float] = []
    best_loss, best = math.inf, init.clone().float()
    anchor, anchor_step = math.inf, 0
    reason = "max_steps"
    for step in range(max_steps + 1):
        loss = mean_kl(teacher, student_logprobs(model, batch, vectors))
        value = float(loss.detach())
        curve.append(value)
        if value < best_loss:
            best_loss, best = value, vectors.detach().clone()
        if best_loss < anchor * (1 - tol):
            anchor, anchor_step = best_loss, step
        elif step - anchor_step >= patience:
            reason = "plateau"
            break
        if step == max_steps:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return best, curve, reason


# ---------------------------------------------------------------- the run


@dataclass
class CeilingData:
    """What :func:`measure_ceiling` measures on: the frozen model and merge module, the rules, and
    the windows (held-out; training and validation from the training text)."""

    model: object
    rules: object
    module: object
    heldout: list[list[int]]
    train: list[list[int]]
    val: list[list[int]] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


def run_ceiling(config: CeilingConfig, log=print) -> dict:
    """Load what ``config`` names and run :func:`measure_ceiling`; returns the result dict."""
    from vllm_umim.files import file_sha256
    from vllm_umim.module.batches import corpus_windows
    from vllm_umim.module.file_format import load_module, model_identity
    from vllm_umim.module.frozen_model import load_frozen_model

    if config.threads:
        torch.set_num_threads(config.threads)
    frozen = load_frozen_model(config.model, config.rules)
    module, _ = load_module(config.module, model_identity(frozen.model.config), frozen.rules.tokenizer_fingerprint)
    module = module.float().eval()
    heldout, _ = corpus_windows(config.heldout_corpus, frozen.tokenizer, config.seq_len, config.heldout_windows * config.seq_len,
                                0, config.seed)
    if len(heldout) < config.heldout_windows:
        raise CeilingError(f"{config.heldout_corpus} gives {len(heldout)} windows of {config.seq_len} tokens, fewer than heldout_windows={config.heldout_windows}")
    if config.train_selection == "random":
        train, val = corpus_windows(config.train_corpus, frozen.tokenizer, config.seq_len, config.train_windows * config.seq_len,
                                    config.val_windows, config.seed)
        selection = {"selection": "random", "selected_windows": len(train)}
    else:
        pool, val = corpus_windows(config.train_corpus, frozen.tokenizer, config.seq_len, 1 << 40, config.val_windows, config.seed)
        ks = [context_size(v) for v in config.variants if context_size(v)]
        chosen, selection = select_training_windows(segment(pool, frozen.rules), segment(heldout, frozen.rules), config.train_windows,
                                                    min(ks) if ks else None)
        train = [pool[i] for i in chosen]
    log(f"training windows: {selection}")
    meta = {"train_selection": selection, "rules_sha256": file_sha256(config.rules), "module_sha256": file_sha256(config.module),
            "model": getattr(frozen.model.config, "_name_or_path", str(config.model))}
    return measure_ceiling(config, CeilingData(frozen.model, frozen.rules, module, heldout, train, val, meta), log=log)


def _settings(config: CeilingConfig) -> dict:
    """The settings a result depends on (a rerun must match them to reuse finished variants)."""
    settings = asdict(config)
    for name in ("out", "scratch_dir", "variants", "threads"):
        settings.pop(name)
    return settings


_COMMON = ("seq_len", "heldout_windows", "batch_windows", "seed")
_FITTED = _COMMON + ("train_windows", "val_windows", "fit_lr", "rule_epochs", "min_train_count", "train_selection")


def variant_settings(config: CeilingConfig, name: str) -> dict:
    """The settings one variant's numbers depend on: a rerun reuses a finished variant only when
    these match (so e.g. a longer oracle does not invalidate the fitted variants)."""
    if name == "module":
        fields_ = _COMMON
    elif name == "oracle":
        fields_ = _COMMON + ("oracle_lr", "oracle_max_steps", "oracle_patience", "oracle_tol")
    elif name == "rule":
        fields_ = _FITTED
    else:
        fields_ = _FITTED + ("context_epochs",)
    settings = _settings(config)
    return {k: settings[k] for k in fields_}


def measure_ceiling(config: CeilingConfig, data: CeilingData, log=print) -> dict:
    """Run every variant of ``config`` not already in ``config.out``, writing the JSON after each."""
    out, scratch = Path(config.out), Path(config.scratch_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    model, module = data.model, data.module
    model.eval()

    heldout = Split.build(data.heldout, data.rules, config.batch_windows)
    needs_train = any(v == "rule" or context_size(v) for v in config.variants)
    train = Split.build(data.train, data.rules, config.batch_windows) if needs_train else None
    val = Split.build(data.val, data.rules, config.batch_windows) if needs_train and data.val else None
    data_section = {"heldout": heldout.counts(), **data.meta}
    if train is not None:
        data_section["train"] = train.counts()
        data_section["val"] = val.counts() if val else None

    result = {"settings": _settings(config), "data": data_section, "variants": {}}
    if out.exists():
        previous = json.loads(out.read_text())
        if previous.get("data", {}).get("heldout") != data_section["heldout"]:
            raise CeilingError(f"{out} was measured on other held-out windows; write to another file or remove it")
        for name, entry in previous.get("variants", {}).items():
            wanted = variant_settings(config, name)
            had = entry.get("settings") or {k: previous.get("settings", {}).get(k) for k in wanted}
            differ = sorted(k for k in wanted if had.get(k) != wanted[k])
            if differ:
                raise CeilingError(f"{out} holds variant {name!r} measured with other settings ({', '.join(differ)}); "
                                   "write to another file or remove it")
        result["variants"] = previous.get("variants", {})
        result["data"] = {**previous.get("data", {}), **data_section}
    rows_path = scratch / "rows.npz"
    rows: dict[str, dict[str, np.ndarray]] = {}
    if rows_path.exists():
        with np.load(rows_path) as f:
            for name in f.files:
                variant, metric = name.split("/")
                rows.setdefault(variant, {})[metric] = f[name]
    row_merged = torch.cat(heldout.row_merged).numpy()
    module_of = [module_surrogates(model, b, module) for b in heldout.batches]
    teacher_cache: dict = {}  # training batches (fp16)
    held_teacher: dict = {}  # held-out batches (fp32)
    train_module = [module_surrogates(model, b, module) for b in train.batches] if train else []
    val_module = [module_surrogates(model, b, module) for b in val.batches] if val else []

    def module_base(split: Split, i: int) -> torch.Tensor:
        return {id(heldout): module_of, id(train): train_module, id(val): val_module}[id(split)][i]

    def save(name: str, entry: dict, per_row: dict[str, np.ndarray]) -> None:
        rows[name] = per_row
        np.savez(rows_path, **{f"{v}/{m}": a for v, r in rows.items() for m, a in r.items()})
        result["variants"][name] = entry
        result["comparison"] = compare(result, rows, heldout)
        write_bytes_atomic((json.dumps(result, indent=1) + "\n").encode(), out)

    rule_table: Table | None = None
    for name in config.variants:
        if name in result["variants"] and name in rows:
            log(f"{name}: done already, skipped")
            if name == "rule":
                rule_table = Table.from_state(torch.load(scratch / "table-rule.pt"))
            continue
        started = time.perf_counter()
        log(f"{name}: running")
        entry: dict = {}
        if name == "module":
            per_row = evaluate(model, heldout, lambda i: module_of[i], held_teacher)
        elif name == "oracle":
            per_row, entry = _run_oracle(config, model, heldout, module_of, scratch, held_teacher, log)
        elif name == "rule":
            counts = key_counts(train, 0)
            table = _initial_table(counts, config.min_train_count, lambda key: _rule_surrogate(model, module, data.rules, key))
            log(f"  {len(table.index)} rules with a vector, fitting on {len(train.segs)} windows")
            rule_table, fit = fit_table(model, train, val, 0, table, module_base, config.rule_epochs, config.fit_lr, config.seed,
                                        teacher_cache, log)
            torch.save(rule_table.state(), scratch / "table-rule.pt")
            per_row = evaluate(model, heldout, lambda i: rule_table.apply(heldout.occurrence_keys(i, 0), module_of[i]), held_teacher)
            per_row.update(covered_rows(heldout, 0, rule_table))
            entry = {"fit": fit, **_coverage(heldout, 0, rule_table)}
        else:
            k = context_size(name)
            if rule_table is None:
                raise CeilingError(f"{name} needs the per-rule vectors: run 'rule' before it")

            def rule_base(split: Split, i: int, table=rule_table) -> torch.Tensor:
                return table.apply(split.occurrence_keys(i, 0), module_base(split, i))

            counts = key_counts(train, k)

            def init(key, table=rule_table):
                row = table.index.get(key[1])
                return table.vectors[row] if row is not None else _rule_surrogate(model, module, data.rules, key[1])

            table = _initial_table(counts, config.min_train_count, init)
            log(f"  {len(table.index)} (context, rule) keys with a vector, fitting on {len(train.segs)} windows")
            fitted, fit = fit_table(model, train, val, k, table, rule_base, config.context_epochs, config.fit_lr, config.seed + k,
                                    teacher_cache, log)
            torch.save(fitted.state(), scratch / f"table-{name}.pt")
            per_row = evaluate(model, heldout, lambda i: fitted.apply(heldout.occurrence_keys(i, k), rule_base(heldout, i)), held_teacher)
            per_row.update(covered_rows(heldout, k, fitted))
            entry = {"k": k, "fit": fit, **_coverage(heldout, k, fitted)}
        entry["settings"] = variant_settings(config, name)
        entry["all"] = summarize(per_row)
        entry["merged"] = summarize(per_row, row_merged)
        entry["seconds"] = round(time.perf_counter() - started, 1)
        log(f"{name}: KL {entry['all']['kl']:.4f}, top-1 {100 * entry['all']['top1']:.1f} % (merged: KL {entry['merged']['kl']:.4f}, "
            f"top-1 {100 * entry['merged']['top1']:.1f} %), {entry['seconds']} s")
        save(name, entry, per_row)
    result["comparison"] = compare(result, rows, heldout)
    write_bytes_atomic((json.dumps(result, indent=1) + "\n").encode(), out)
    return result


def _rule_surrogate(model, module, rules, rule_id: int) -> torch.Tensor:
    """The module's (context-free) surrogate of one rule."""
    n = int(rules.span_lengths[rule_id])
    tokens = rules.padded[rule_id, :n].long()
    embeds = model.get_input_embeddings()(tokens)[None]
    padded = torch.full((1, embeds.shape[1]), -1, dtype=torch.long)
    padded[0, :n] = tokens
    with torch.no_grad():
        return module(embeds.to(next(module.parameters()).dtype), torch.tensor([n]), padded)[0].float()


def _initial_table(counts: dict, min_count: int, init) -> Table:
    keys = sorted((key for key, c in counts.items() if c >= min_count), key=repr)
    vectors = torch.stack([init(key) for key in keys]) if keys else torch.zeros(0, 0)
    return Table({key: i for i, key in enumerate(keys)}, vectors, {key: counts[key] for key in keys})


def _coverage(heldout: Split, k: int, table: Table) -> dict:
    """How many held-out merged spans (and distinct keys) the table has a vector for."""
    keys = [key for i in range(len(heldout.batches)) for key in heldout.occurrence_keys(i, k)]
    covered = [key is not None and key in table.index for key in keys]
    distinct = {key for key in keys if key is not None}
    return {
        "table_size": len(table.index),
        "heldout_spans": len(keys),
        "covered_spans": int(sum(covered)),
        "coverage": sum(covered) / len(keys) if keys else 0.0,
        "heldout_distinct_keys": len(distinct),
        "covered_distinct_keys": len(distinct & set(table.index)),
    }


def _run_oracle(config: CeilingConfig, model, heldout: Split, module_of, scratch: Path, held_teacher: dict, log) -> tuple[dict, dict]:
    """Per-occurrence free vectors, batch by batch (each batch's occurrences are independent of the
    others'), each batch checkpointed in ``scratch`` so an interrupted run resumes."""
    parts, curves, reasons = [], [], []
    for i, batch in enumerate(heldout.batches):
        path = scratch / f"oracle-batch{i}.pt"
        if path.exists():
            saved = torch.load(path, weights_only=False)  # this run's own checkpoint (numpy rows)
            if saved["settings"] == variant_settings(config, "oracle"):
                parts.append(saved["rows"]), curves.append(saved["curve"]), reasons.append(saved["reason"])
                continue
        started = time.perf_counter()
        if i not in held_teacher:
            held_teacher[i] = teacher_logprobs(model, batch)
        vectors, curve, reason = oracle_batch(model, batch, module_of[i], config.oracle_lr, config.oracle_max_steps,
                                              config.oracle_patience, config.oracle_tol, held_teacher[i])
        with torch.no_grad():
            per_row = row_metrics(held_teacher[i], student_logprobs(model, batch, vectors))
        torch.save({"settings": variant_settings(config, "oracle"), "rows": per_row, "curve": curve, "reason": reason}, path)
        parts.append(per_row), curves.append(curve), reasons.append(reason)
        log(f"  oracle batch {i + 1}/{len(heldout.batches)}: KL {curve[0]:.4f} -> {min(curve):.4f} in {len(curve) - 1} steps "
            f"({reason}, {time.perf_counter() - started:.0f} s)")
    weights = [len(r) for r in heldout.row_merged]
    longest = max(len(c) for c in curves)
    mean_curve = [sum(w * (c[s] if s < len(c) else min(c)) for w, c in zip(weights, curves)) / sum(weights) for s in range(longest)]
    steps = [len(c) - 1 for c in curves]
    entry = {
        "lr": config.oracle_lr,
        "steps_per_batch": steps,
        "stopped": {r: reasons.count(r) for r in sorted(set(reasons))},
        "curve_every_5": [round(v, 5) for v in mean_curve[::5]],
        "curve_last": round(mean_curve[-1], 5),
        "in_sample": True,
    }
    return _concat(parts), entry


BUCKETS = ((1, 4), (5, 19), (20, 99), (100, None))  # training occurrences of a span's key


ORDER = ("module", "rule", "context1", "context2", "context3", "oracle")


def compare(result: dict, rows: dict, heldout: Split, draws: int = 2000, seed: int = 0) -> dict:
    """KL and top-1 of every finished variant on the same subsets of held-out rows: all rows, rows at
    merged elements, the merged rows whose span each fitted table covers (and does not), and the
    covered rows by how often their key occurred in training. Each subset also gets paired
    differences between variants (``b`` minus ``a``) with a 95 % interval from resampling whole
    windows (rows of one window are not independent)."""
    row_merged = torch.cat(heldout.row_merged).numpy()
    row_window = np.repeat(np.arange(len(heldout.segs)), [s.num_elements - s.first_merge for s in heldout.segs])
    if len(row_window) != len(row_merged):
        raise CeilingError("held-out rows do not add up per window")
    subsets = {"all": np.ones(len(row_merged), bool), "merged": row_merged}
    for name in result["variants"]:
        if name in rows and "covered" in rows[name]:
            covered = rows[name]["covered"].astype(bool)
            subsets[f"covered_by_{name}"] = covered
            subsets[f"uncovered_by_{name}"] = row_merged & ~covered
            counts = rows[name]["train_count"]
            for low, high in BUCKETS:
                inside = covered & (counts >= low) & (counts <= (high if high is not None else np.inf))
                subsets[f"covered_by_{name}_train_count_{low}-{high if high is not None else ''}"] = inside
    names = [n for n in sorted(result["variants"], key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER)) if n in rows]
    pairs = list(zip(names, names[1:])) + [("module", n) for n in names[2:] if "module" in names]
    resample = np.random.default_rng(seed).multinomial(len(heldout.segs), np.full(len(heldout.segs), 1 / len(heldout.segs)), size=draws)
    out = {}
    for subset, mask in subsets.items():
        out[subset] = {"rows": int(mask.sum()), "windows": int(len(np.unique(row_window[mask])))}
        for name in names:
            s = summarize(rows[name], mask)
            out[subset][name] = {"kl": s["kl"], "top1": s["top1"]}
        if mask.sum() and len(names) > 1:
            out[subset]["differences"] = [
                {"a": a, "b": b, **{m: paired_difference(rows[b][m] - rows[a][m], mask, row_window, resample) for m in ("kl", "top1")}}
                for a, b in pairs
            ]
    return out


def paired_difference(diff: np.ndarray, mask: np.ndarray, row_window: np.ndarray, resample: np.ndarray) -> dict:
    """Mean of ``diff`` over ``mask`` and its 95 % window-bootstrap interval (``resample``: [draws,
    windows] multiplicities)."""
    windows = resample.shape[1]
    sums = np.bincount(row_window[mask], weights=diff[mask], minlength=windows)
    counts = np.bincount(row_window[mask], minlength=windows).astype(np.float64)
    totals = resample @ counts
    means = (resample @ sums)[totals > 0] / totals[totals > 0]
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(sums.sum() / counts.sum()), "ci95": [float(low), float(high)]}


def covered_rows(heldout: Split, k: int, table: Table) -> dict[str, np.ndarray]:
    """Per held-out row: whether it sits at a merged span whose key the table has a vector for, and
    that key's training count (0 elsewhere)."""
    covered, counts = [], []
    for i in range(len(heldout.batches)):
        keys = heldout.occurrence_keys(i, k)
        hit = table.lookup(keys) >= 0
        occ = heldout.row_occ[i]
        at_span = occ >= 0
        row_hit = torch.zeros(len(occ), dtype=torch.bool)
        row_hit[at_span] = hit[occ[at_span]]
        row_count = torch.zeros(len(occ), dtype=torch.long)
        span_counts = torch.tensor([table.train_counts.get(key, 0) if key is not None else 0 for key in keys], dtype=torch.long)
        row_count[at_span] = span_counts[occ[at_span]]
        covered.append(row_hit.numpy())
        counts.append(row_count.numpy())
    return {"covered": np.concatenate(covered).astype(np.float64), "train_count": np.concatenate(counts).astype(np.float64)}


LABELS = {"module": "(a) module", "oracle": "(b) oracle", "rule": "(c) per rule", }


def _label(name: str) -> str:
    k = context_size(name)
    return LABELS.get(name) or (f"(d) per ({k} preceding token{'s' if k > 1 else ''}, rule)" if k else name)


def _cell(entry: dict | None) -> str:
    if not entry or entry.get("kl") is None:
        return "–"
    return f"{entry['kl']:.3f} / {100 * entry['top1']:.1f} %"


def ceiling_tables(result: dict) -> str:
    """Markdown: the variants over all aligned rows and at merged elements, then every variant on the
    same subsets of rows (KL / top-1), then the share of the module -> oracle KL gap each fitted
    variant closes on the spans it covers."""
    variants = result["variants"]
    names = [n for n in ("module", "rule", *sorted(n for n in variants if context_size(n)), "oracle") if n in variants]
    lines = ["| variant | fitted on | KL all rows | top-1 all rows | KL merged | top-1 merged | coverage |",
             "|---|---|---|---|---|---|---|"]
    fitted_on = {"module": "training text (shipped)", "oracle": "the held-out windows (in sample)"}
    for name in names:
        e = variants[name]
        cov = f"{100 * e['coverage']:.1f} % of spans ({e['covered_spans']}/{e['heldout_spans']})" if "coverage" in e else "all spans"
        where = fitted_on.get(name, f"{result['data']['train']['windows']} training windows")
        lines.append(f"| {_label(name)} | {where} | {e['all']['kl']:.3f} | {100 * e['all']['top1']:.1f} % | {e['merged']['kl']:.3f} | "
                     f"{100 * e['merged']['top1']:.1f} % | {cov} |")
    comparison = result.get("comparison", {})
    lines += ["", "| rows (KL / top-1) | n | " + " | ".join(_label(n) for n in names) + " |", "|---|---|" + "---|" * len(names)]
    for subset, entry in comparison.items():
        if entry["rows"]:
            lines.append(f"| {subset.replace('_', ' ')} | {entry['rows']} | " + " | ".join(_cell(entry.get(n)) for n in names) + " |")
    if "oracle" in variants and "module" in variants:
        lines += ["", "| spans | n | share of the module → oracle KL gap closed by " + " | ".join(_label(n) for n in names if n not in ("module", "oracle")) + " |",
                  "|---|---|" + "---|" * len([n for n in names if n not in ("module", "oracle")])]
        for subset in [s for s in comparison if s.startswith("covered_by_") and "train_count" not in s] + ["merged"]:
            entry = comparison[subset]
            gap = entry["module"]["kl"] - entry["oracle"]["kl"] if entry.get("module") and entry.get("oracle") and entry["rows"] else None
            cells = []
            for n in names:
                if n in ("module", "oracle"):
                    continue
                cells.append(f"{100 * (entry['module']['kl'] - entry[n]['kl']) / gap:.0f} %" if gap and entry.get(n) else "–")
            lines.append(f"| {subset.replace('_', ' ')} | {entry['rows']} | " + " | ".join(cells) + " |")
    lines += ["", "| rows | n (windows) | b − a | KL difference [95 % interval] | top-1 difference [95 % interval] |", "|---|---|---|---|---|"]
    for subset, entry in comparison.items():
        if "train_count" in subset or subset.startswith("uncovered") or not entry["rows"]:
            continue
        for d in entry.get("differences", []):
            kl, top1 = d["kl"], d["top1"]
            lines.append(f"| {subset.replace('_', ' ')} | {entry['rows']} ({entry['windows']}) | {_label(d['b'])} − {_label(d['a'])} | "
                         f"{kl['mean']:+.3f} [{kl['ci95'][0]:+.3f}, {kl['ci95'][1]:+.3f}] | "
                         f"{100 * top1['mean']:+.1f} [{100 * top1['ci95'][0]:+.1f}, {100 * top1['ci95'][1]:+.1f}] points |")
    return "\n".join(lines) + "\n"
