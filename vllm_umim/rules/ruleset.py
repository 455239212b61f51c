"""A set of merge rules: the frequent 2..4-grams of paper §3.1, with global rule ids.

Rule ids are dense: all 2-grams (sorted lexicographically), then all 3-grams, then all 4-grams.
The engine represents a merged span in a compressed sequence as the virtual token id
``vocab_size + rule_id``, so a rule id is part of the engine's token space.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from vllm_umim.errors import MismatchError

MAX_SPAN = 4  # the paper caps n at 4 (App. A, "Reasons for 2- to 4-grams")


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the tokenizer's (token, id) vocabulary, sorted by id: 16 hex digits."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    digest = hashlib.sha256()
    for token, token_id in vocab:
        digest.update(f"{token_id}\t{token}\n".encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:16]


@dataclass
class RuleSet:
    """Merge rules mined for one tokenizer.

    ``ngrams[n]`` is an int32 array [count_n, n], unique rows sorted lexicographically;
    ``counts[n]`` their corpus frequencies. ``meta`` carries how they were mined.
    """

    tokenizer_fingerprint: str
    vocab_size: int
    threshold: int
    ngrams: dict[int, np.ndarray]
    counts: dict[int, np.ndarray]
    meta: dict = field(default_factory=dict)

    # ---- sizes and ids -------------------------------------------------------------------------
    @property
    def lengths(self) -> list[int]:
        return sorted(self.ngrams)

    @property
    def max_n(self) -> int:
        return max(self.lengths, default=0)

    def count(self, n: int) -> int:
        return len(self.ngrams.get(n, ()))

    def __len__(self) -> int:
        return sum(self.count(n) for n in self.lengths)

    @cached_property
    def padded(self) -> torch.Tensor:
        """int32 [R, 4]: row = rule id, tokens padded with -1 (the matcher ops' rule table)."""
        rows = [np.pad(self.ngrams[n], ((0, 0), (0, MAX_SPAN - n)), constant_values=-1) for n in self.lengths]
        table = np.concatenate(rows) if rows else np.zeros((0, MAX_SPAN), np.int32)
        return torch.from_numpy(np.ascontiguousarray(table, dtype=np.int32))

    @cached_property
    def span_lengths(self) -> torch.Tensor:
        """int64 [R]: n of each rule."""
        return (self.padded >= 0).sum(dim=1)

    @cached_property
    def index(self) -> torch.Tensor:
        """Open-addressing hash index over ``padded`` (built once by the native op)."""
        from vllm_umim.ops import build_rule_index

        return build_rule_index(self.padded)

    @cached_property
    def rule_ids(self) -> dict[tuple[int, ...], int]:
        """{n-gram tuple: rule id}: the plain lookup the Python references use."""
        return {tuple(int(t) for t in row[row >= 0]): rid for rid, row in enumerate(self.padded.numpy())}

    def tokens_of(self, rule_id: int) -> tuple[int, ...]:
        row = self.padded[rule_id]
        return tuple(int(t) for t in row[row >= 0])

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the rule tables: identifies this exact rule set (16 hex digits)."""
        digest = hashlib.sha256(self.tokenizer_fingerprint.encode())
        digest.update(self.padded.numpy().tobytes())
        return digest.hexdigest()[:16]

    # ---- checks --------------------------------------------------------------------------------
    def check_tokenizer(self, tokenizer, what: str = "tokenizer") -> None:
        """Raise MismatchError unless these rules were mined with this tokenizer's vocabulary."""
        actual = tokenizer_fingerprint(tokenizer)
        if actual != self.tokenizer_fingerprint:
            raise MismatchError(
                f"rules were mined for tokenizer {self.tokenizer_fingerprint}, but the {what} has "
                f"fingerprint {actual}: mine rules with this model's tokenizer (vllm-umim mine)"
            )

    # ---- matching (native ops; Python references live in vllm_umim.ops) ------------------------
    def find_spans(self, sequences: list[list[int]]) -> list[list[int]]:
        """Prefill segmentation of each sequence (pseudocode 3): per position, the rule id where a
        span starts, SINGLE (-1) or COVERED (-2) (``vllm_umim.ops.matcher``)."""
        from vllm_umim.ops import find_spans
        from vllm_umim.ops.matcher import SINGLE

        lengths = [len(s) for s in sequences]
        flat = torch.tensor([t for s in sequences for t in s], dtype=torch.int64)
        cu = torch.tensor([0] + list(np.cumsum(lengths)), dtype=torch.int64)
        if len(self) == 0:
            out = torch.full_like(flat, SINGLE, dtype=torch.int32)
        else:
            out = find_spans(flat, cu, self.padded, self.index, max_n=self.max_n)
        return [out[cu[b] : cu[b + 1]].tolist() for b in range(len(sequences))]

    def match_suffix(self, tail: list[int]) -> int:
        """Decode check (pseudocode 4): rule id of the longest rule ending ``tail`` (raw tokens), or
        NO_MATCH (-1)."""
        from vllm_umim.ops import match_suffix
        from vllm_umim.ops.matcher import NO_MATCH

        if len(self) == 0 or len(tail) < 2:
            return NO_MATCH
        tail = tail[-MAX_SPAN:]
        row = [0] * (MAX_SPAN - len(tail)) + list(tail)
        result = match_suffix(
            torch.tensor([row], dtype=torch.int64),
            torch.tensor([len(tail)], dtype=torch.int32),
            self.padded,
            self.index,
            max_n=self.max_n,
        )
        return int(result[0])

    def summary(self) -> str:
        per_n = ", ".join(f"{n}-grams: {self.count(n)}" for n in self.lengths)
        return (
            f"{len(self)} rules ({per_n}); threshold {self.threshold}; vocab {self.vocab_size}; "
            f"tokenizer {self.tokenizer_fingerprint}; rules {self.fingerprint}"
        )
