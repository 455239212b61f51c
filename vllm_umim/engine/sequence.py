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

from dataclasses import dataclass, field

from vllm_umim.errors import MergeStateError
from vllm_umim.policies import MergePolicy


@dataclass
class MergeState:
    """Per-request UMIM bookkeeping, attached to the vLLM ``Request`` as ``request.umim``."""

    dynamic: bool
    policy: MergePolicy
    raw_prompt_tokens: int
    prompt_positions: int
    prefill_merges: int = 0  # spans merged in the prompt
    decode_merges: int = 0  # spans merged while decoding
    decode_tokens_merged_away: int = 0
    output_confidences: list[float] = field(default_factory=list)  # kept only for a confidence-gated policy

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
    """A decode-time merge the worker must mirror: from compressed index ``start`` on, the
    request's sequence is now ``ids`` (the span's virtual id, then the raw window after it);
    ``span_length`` raw tokens became one position. ``raw_outputs``: the request's raw output
    tokens at the merge; the worker's copy may hold more (tokens a step sampled after the merging
    one, dropped with n-gram speculation), which it drops too."""

    request_id: str
    start: int
    ids: tuple[int, ...]
    span_length: int
    raw_outputs: int | None = None


def compress_tokens(token_ids: list[int], policy: MergePolicy, virtual_base: int) -> tuple[list[int], int]:
    """Prefill merging: the compressed id sequence of ``token_ids`` and its number of merges."""
    if len(token_ids) < 2:
        return list(token_ids), 0
    segmentation = policy.segment([list(token_ids)])[0]
    return segmentation.compressed_ids(virtual_base), segmentation.num_merged


def merge_newest(request, virtual_base: int, hash_block_size: int) -> MergeEvent | None:
    """Decode merging (pseudocode 4) on a vLLM request whose newest token was just appended.

    If the request's policy merges the span completed at its decode frontier, replace the span by
    one virtual id (the raw window after it, if any, moves left) and roll ``num_computed_tokens``
    back to the span's start: the surrogate and the window are computed at their new positions
    in the next step (with no window: just the surrogate, fed instead of the newest token). The
    rolled-back KV slots stay allocated and are overwritten as the sequence regrows, like
    rejected speculative tokens. Block hashes from the span's block on are dropped and recomputed.
    Raises ``MergeStateError`` (before changing anything) if the merge is inconsistent.
    """
    state: MergeState = request.umim
    token_ids = request._all_token_ids
    merge = state.policy.decode_merge(token_ids, virtual_base, state.output_confidences)
    if merge is None:
        return None
    check_decode_merge(request, merge, virtual_base)
    ids = (virtual_base + merge.rule_id, *token_ids[merge.start + merge.length :])
    token_ids[merge.start :] = ids
    request.num_computed_tokens = merge.start
    del request.block_hashes[merge.start // hash_block_size :]
    request.update_block_hashes()
    state.decode_merges += 1
    state.decode_tokens_merged_away += merge.length - 1
    return MergeEvent(request.request_id, merge.start, ids, merge.length, request.num_output_tokens)


def check_decode_merge(request, merge, virtual_base: int) -> None:
    """Raise ``MergeStateError`` unless ``merge`` can be applied to ``request`` as it stands: the
    newest token was just appended after a full step, and the span is plain tokens spelling an
    existing rule (so its virtual id indexes the worker's rule table)."""
    token_ids = request._all_token_ids
    rules = request.umim.policy.rules
    if request.num_computed_tokens != len(token_ids) - 1:
        raise MergeStateError(f"request {request.request_id}: a decode merge must follow a full step "
                              f"({request.num_computed_tokens} of {len(token_ids)} positions computed)")
    if not 0 <= merge.rule_id < len(rules):
        raise MergeStateError(f"request {request.request_id}: rule {merge.rule_id} is not in the rule set ({len(rules)} rules)")
    span = tuple(token_ids[merge.start : merge.start + merge.length])
    if merge.start < 0 or span != rules.tokens_of(merge.rule_id) or any(t >= virtual_base for t in span):
        raise MergeStateError(f"request {request.request_id}: tokens {list(span)} at {merge.start} are not rule "
                              f"{merge.rule_id} {list(rules.tokens_of(merge.rule_id))}")
