"""The compressed sequence of a vLLM request (scheduler side; paper §3.4, App. D).

vLLM indexes a request by its token list: sequence index = RoPE position = KV slot. UMIM keeps
that invariant by making the request's ``_all_token_ids`` the *compressed* sequence: a plain
token keeps its id, a merged span becomes the virtual id ``virtual_base + rule_id`` (past the
model's vocabulary). The worker embeds virtual ids with the merge module. Everything that is
about real tokens stays on the raw lists: ``_output_token_ids`` (stop checks, ``max_tokens``,
what the user receives) and the frontend's own prompt.

Because virtual ids are ids, vLLM's own machinery follows the compressed sequence for free:
chunked prefill never splits a span (it is one position), preemption re-prefills the same
compressed sequence, and prefix-cache block hashes include the merge structure.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_umim.policies import MergePolicy
from vllm_umim.policies.base import NO_MERGE


@dataclass
class MergeState:
    """Per-request UMIM bookkeeping, attached to the vLLM ``Request`` as ``request.umim``."""

    dynamic: bool
    raw_prompt_tokens: int
    prompt_positions: int
    prefill_merges: int = 0  # spans merged in the prompt
    decode_merges: int = 0  # spans merged while decoding
    decode_tokens_merged_away: int = 0

    def stats(self, num_output_tokens: int, positions: int, block_size: int) -> dict:
        """The request's figures (vocabulary in ``vllm_umim.engine.stats``)."""
        raw = self.raw_prompt_tokens + num_output_tokens
        blocks = lambda n: -(-n // block_size)  # noqa: E731
        return {
            "raw_tokens": raw,
            "positions": positions,
            "raw_prompt_tokens": self.raw_prompt_tokens,
            "prompt_positions": self.prompt_positions,
            "prefill_merges": self.prefill_merges,
            "decode_merges": self.decode_merges,
            "tokens_merged_away": raw - positions,
            "kv_blocks_saved": blocks(raw) - blocks(positions),
        }


@dataclass(frozen=True)
class MergeEvent:
    """A decode-time merge the worker must mirror: position ``position`` now holds ``virtual_id``."""

    request_id: str
    position: int
    virtual_id: int
    span_length: int


def compress_tokens(token_ids: list[int], policy: MergePolicy, virtual_base: int) -> tuple[list[int], int]:
    """Prefill merging: the compressed id sequence of ``token_ids`` and its number of merges."""
    if len(token_ids) < 2:
        return list(token_ids), 0
    segmentation = policy.segment([list(token_ids)])[0]
    return segmentation.compressed_ids(virtual_base), segmentation.num_merged


def newest_plain_tokens(token_ids: list[int], virtual_base: int, max_n: int) -> list[int]:
    """The trailing plain tokens (at most ``max_n``): only these can complete a rule."""
    tail = []
    for token in reversed(token_ids[-max_n:]):
        if token >= virtual_base:
            break
        tail.append(token)
    return tail[::-1]


def merge_newest(request, policy: MergePolicy, virtual_base: int, hash_block_size: int) -> MergeEvent | None:
    """Decode merging (pseudocode 4) on a vLLM request whose newest token was just appended.

    If the policy merges the rule n-gram the newest plain tokens complete, replace them by one virtual id and roll
    ``num_computed_tokens`` back by n-1 (the older n-1 had KV; the newest had none yet). The
    rolled-back KV slots stay allocated and are overwritten as the sequence regrows, like
    rejected speculative tokens. Block hashes past the new end are dropped and recomputed.
    """
    token_ids = request._all_token_ids
    rule_id = policy.decode_rule(newest_plain_tokens(token_ids, virtual_base, policy.max_span))
    if rule_id == NO_MERGE:
        return None
    n = int(policy.rules.span_lengths[rule_id])
    assert request.num_computed_tokens == len(token_ids) - 1, "merge check must follow a full step"
    del token_ids[-n:]
    token_ids.append(virtual_base + rule_id)
    request.num_computed_tokens -= n - 1
    del request.block_hashes[len(token_ids) // hash_block_size :]
    request.update_block_hashes()
    state: MergeState = request.umim
    state.decode_merges += 1
    state.decode_tokens_merged_away += n - 1
    return MergeEvent(request.request_id, len(token_ids) - 1, virtual_base + rule_id, n)
