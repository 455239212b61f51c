"""UMIM model runner: mirrors the scheduler's compressed sequences in vLLM's persistent batch.

vLLM's runner keeps each request's token row (``input_batch.token_ids_cpu``) itself: it writes the
prompt when a request is added and appends every sampled token. With UMIM the row must hold the
*compressed* sequence, so the runner mixin does three things:

* ``load_model``: wraps the model's token embedding with ``SurrogateEmbedding`` (virtual ids →
  merge-module surrogates) — prefill merging needs nothing else, the prompt ids are compressed;
* ``_update_states``: applies the decode merges the scheduler sends on the ``SchedulerOutput``
  (the row from the span's start on = its virtual id and the raw window after it), and re-writes
  the rows of requests vLLM re-adds from their raw outputs (after preemption or a step without
  them); a re-written row's n-gram drafts go after its new end;
* ``_sample`` / ``sample_tokens``: for the confidence-gated requests the scheduler names, send back
  the probability of each one's sampled token under the model's own distribution, on the
  ``ModelRunnerOutput`` as ``umim_confidences`` (computed ``CONFIDENCE_CHUNK_ROWS`` rows at a time,
  see ``sampled_token_probabilities``; with n-gram drafts, a list: one per sampled token);
* ``_dummy_sampler_run``: with fp32 logits, vLLM's profiling run also holds the logits rows that
  ``_sample`` keeps through the sampler;
* ``_get_prompt_logprobs_dict``: prompt logprobs of a merged prompt, a merged span's row marked
  NaN (never a number for a token that was not scored);
* request states report their compressed length as ``num_tokens`` (``UmimRequestState``), which
  vLLM uses to decide whether a step samples.

The raw sampled tokens stay in ``req_state.output_token_ids``: penalties, ``min_tokens`` and bad
words read them exactly as in stock vLLM.

Per-request work here is guarded (``vllm_umim.engine.faults``): a request whose merge cannot be
mirrored, or whose row holds a virtual id outside the rule table, is reported to the scheduler on
the ``ModelRunnerOutput`` as ``umim_faults`` ({request id: fault}); the scheduler finishes it with an
error and drops the token it sampled this step. Its row still runs through the step's forward
(the surrogate gather clamps ids), and the other rows are computed as if it were not there.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from vllm.logger import init_logger
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT
from vllm.v1.worker.gpu_input_batch import CachedRequestState

from vllm_umim.engine.assets import load_checked_files
from vllm_umim.engine.config import UmimConfig, virtual_base
from vllm_umim.engine.embedding import install_surrogate_embedding
from vllm_umim.engine.faults import FaultSwitch, describe
from vllm_umim.errors import MergeStateError
from vllm_umim.rules import spell_raw

logger = init_logger(__name__)
CONFIDENCE_CHUNK_ROWS = 16  # rows per full-vocabulary fp32 softmax when computing sampled-token probabilities


class UmimRequestState(CachedRequestState):
    """A CachedRequestState whose ``num_tokens`` is the compressed length.

    ``tokens_merged_away`` counts the raw output tokens that decode merges removed; ``sequence``
    is the compressed sequence from ``first_merge`` on, kept only once a decode merge happened.
    """

    tokens_merged_away: int = 0
    first_merge: int | None = None
    sequence_tail: list[int] | None = None

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + len(self.output_token_ids) - self.tokens_merged_away

    def compressed_tail(self) -> list[int]:
        """Compressed ids from ``first_merge`` to the end (syncing newly sampled tokens first)."""
        missing = self.num_tokens - self.first_merge - len(self.sequence_tail)
        if missing > 0:
            self.sequence_tail.extend(self.output_token_ids[-missing:])
        return self.sequence_tail

    def apply_merge(self, start: int, ids: tuple[int, ...], span_length: int) -> None:
        """From compressed index ``start`` on, the sequence is now ``ids`` (``MergeEvent``)."""
        if self.first_merge is None:
            self.first_merge = start
            self.sequence_tail = [self.get_token_id(i) for i in range(start, self.num_tokens)]
        tail = self.compressed_tail()
        tail[start - self.first_merge :] = ids
        self.tokens_merged_away += span_length - 1


class UmimModelRunnerMixin:
    """Mix into a vLLM GPUModelRunner subclass (CPU or GPU) ahead of it."""

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        config = UmimConfig.from_vllm_config(self.vllm_config)
        self.umim_virtual_base = virtual_base(self.vllm_config)
        rules, module = load_checked_files(config, self.umim_virtual_base, "worker", hf_config=self.model_config.hf_config)
        self.umim_rule_table = rules.padded.long()
        self.umim_rule_table_np = rules.padded.cpu().numpy().astype(np.int64)  # the n-gram drafter's raw view
        self.umim_id_limit = self.umim_virtual_base + len(rules)  # ids at or above it index no rule
        self.umim_fault_switch = FaultSwitch.from_env()
        self.umim_faults: dict[str, dict] = {}  # found since the last output, sent on the next one
        wrapper = install_surrogate_embedding(self.model, module, rules.padded, self.umim_virtual_base, config.table_budget_mib)
        logger.info(
            "UMIM: merge module with %d parameters installed; surrogates: %s", module.num_parameters(),
            type(wrapper.surrogates).__name__,
        )

    def umim_input_embeddings(self, rule_ids: list[int]) -> list[list[float]]:
        """What the decoder receives for these rules' virtual ids (after the model's own embedding
        scaling), as plain lists: lets tests compare the engine's surrogates with the reference's."""
        ids = torch.tensor(rule_ids, dtype=torch.long, device=self.device) + self.umim_virtual_base
        with torch.inference_mode():
            return self.model.embed_input_ids(ids).float().cpu().tolist()

    def _update_states(self, scheduler_output):
        if not getattr(self.input_batch, "umim_raw_prompts", False):
            self.input_batch._make_prompt_token_ids_cpu_tensor = partial(raw_prompt_token_ids, self.input_batch, self.umim_rule_table)
            self.input_batch.umim_raw_prompts = True
        # rows vLLM (re-)writes from prompt + raw outputs this step: new to the batch, or resumed
        kept_rows = set(self.input_batch.req_id_to_index) - set(scheduler_output.scheduled_cached_reqs.resumed_req_ids)
        self.umim_confidence_req_ids = getattr(scheduler_output, "umim_confidence_req_ids", frozenset())
        result = super()._update_states(scheduler_output)
        for new_request in scheduler_output.scheduled_new_reqs:
            self.requests[new_request.req_id].__class__ = UmimRequestState
            self._guarded(new_request.req_id, self._check_new_request, new_request)
        rewritten = set()
        for event in getattr(scheduler_output, "umim_merges", ()):
            req_state = self.requests.get(event.request_id)
            if req_state is None or event.request_id in self.umim_faults:  # finished, aborted or failed meanwhile
                continue
            if self._guarded(event.request_id, self._apply_merge, req_state, event):
                rewritten.add(event.request_id)
        for req_id, row in self.input_batch.req_id_to_index.items():
            req_state = self.requests[req_id]
            if req_id in self.umim_faults:
                continue
            if req_state.first_merge is not None and (req_id in rewritten or req_id not in kept_rows):
                if self._guarded(req_id, self._write_row, row, req_state):  # the row's length changed: drafts after it
                    self.input_batch.update_req_spec_token_ids(req_state, scheduler_output.scheduled_spec_decode_tokens)
        return result

    def _guarded(self, req_id: str, hook, *args) -> bool:
        """Run one request's hook; an exception is kept as that request's fault (reported on the
        next ``ModelRunnerOutput``) instead of ending the step. Returns whether it succeeded."""
        try:
            hook(*args)
            return True
        except Exception as e:
            logger.error("UMIM gather hook failed for request %s: %s: %s", req_id, type(e).__name__, e)
            self.umim_faults.setdefault(req_id, describe("gather", e))
            return False

    def _check_virtual_ids(self, req_id: str, ids) -> None:
        """Every virtual id must index a rule: the step's gather clamps, so an id past the table
        would otherwise become another rule's surrogate without a sound."""
        self.umim_fault_switch.check("gather", req_id)
        highest = max(ids, default=0)
        if highest >= self.umim_id_limit:
            raise MergeStateError(f"request {req_id}: id {highest} is past the rule table "
                                  f"(virtual ids {self.umim_virtual_base} to {self.umim_id_limit - 1})")

    def _check_new_request(self, new_request) -> None:
        self._check_virtual_ids(new_request.req_id, new_request.prompt_token_ids or ())

    def _apply_merge(self, req_state: UmimRequestState, event) -> None:
        self._check_virtual_ids(event.request_id, event.ids)
        raw_outputs = getattr(event, "raw_outputs", None)
        if raw_outputs is not None:  # tokens sampled after the merging one (n-gram speculation) are dropped
            if len(req_state.output_token_ids) < raw_outputs:
                raise MergeStateError(f"request {event.request_id}: the runner holds {len(req_state.output_token_ids)} "
                                      f"output tokens, the merge was made after {raw_outputs}")
            del req_state.output_token_ids[raw_outputs:]
        req_state.apply_merge(event.start, event.ids, event.span_length)

    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, *args, **kwargs):
        """vLLM's n-gram drafter reads the token rows, where merged spans are virtual ids: it gets the
        rows spelled in raw tokens instead (``raw_token_rows``), so it matches and proposes raw text
        whether or not a span was merged (the newest tokens are raw until a merge, older ones merged)."""
        spec_config = self.speculative_config
        batch = self.input_batch
        raw = None
        if spec_config is not None and spec_config.method == "ngram" and getattr(self, "umim_rule_table", None) is not None:
            raw = raw_token_rows(batch.token_ids_cpu, batch.num_tokens_no_spec, batch.num_reqs, self.umim_virtual_base,
                                 self.umim_rule_table_np)
        if raw is None:
            return super().propose_draft_token_ids(scheduler_output, sampled_token_ids, *args, **kwargs)
        rows, counts = batch.token_ids_cpu, batch.num_tokens_no_spec
        batch.token_ids_cpu, batch.num_tokens_no_spec = raw
        try:
            return super().propose_draft_token_ids(scheduler_output, sampled_token_ids, *args, **kwargs)
        finally:
            batch.token_ids_cpu, batch.num_tokens_no_spec = rows, counts

    def _sample(self, logits, spec_decode_metadata):
        rows = None
        wanted = getattr(self, "umim_confidence_req_ids", None)
        if logits is not None and wanted:
            index = self.input_batch.req_id_to_index
            req_ids = [r for r in wanted if r in index]
            rows = torch.tensor([index[r] for r in req_ids], dtype=torch.long, device=logits.device)
        # The sampler edits fp32 logits in place (temperature, penalties); other dtypes it copies to fp32
        # first. Only the gated rows' logits are kept, and only where the sampler would change them.
        batch_rows = rows
        if rows is not None and spec_decode_metadata is not None:  # a request's logits: one row per sampled token
            rows, counts = spec_decode_logits_rows(spec_decode_metadata, batch_rows.tolist())
            rows = rows.to(logits.device)
        source = logits.index_select(0, rows) if rows is not None and logits.dtype == torch.float32 else logits
        sampler_output = super()._sample(logits, spec_decode_metadata)
        if rows is not None and spec_decode_metadata is not None:
            tokens = sampler_output.sampled_token_ids.long().index_select(0, batch_rows)
            sampled = torch.cat([tokens[i, :n] for i, n in enumerate(counts)]).clamp(min=0)  # -1: rejected, unread
            confidences = iter(sampled_token_probabilities(source, rows if source is logits else None, sampled).tolist())
            self.umim_step_confidences = {r: [next(confidences) for _ in range(n)] for r, n in zip(req_ids, counts)}
        elif rows is not None:
            sampled = sampler_output.sampled_token_ids[:, 0].long().index_select(0, rows)
            confidences = sampled_token_probabilities(source, rows if source is logits else None, sampled).tolist()
            self.umim_step_confidences = dict(zip(req_ids, confidences))
        return sampler_output

    def _dummy_sampler_run(self, hidden_states):
        """vLLM's profiling run (its peak sizes the KV cache on GPU). With fp32 logits, ``_sample``
        keeps the gated rows' logits (at most every row) through the sampler, which edits fp32
        logits in place: that many fp32 rows are held here while vLLM's dummy sampler runs, so the
        profiled peak includes them. Logits of other dtypes need nothing: the sampler works on its own
        fp32 copy, and the probabilities are computed after it, a chunk of rows at a time."""
        probe = self.model.compute_logits(hidden_states[:1])
        if probe is None or probe.dtype != torch.float32:
            return super()._dummy_sampler_run(hidden_states)
        self.umim_profile_reserve = torch.empty(hidden_states.shape[0], probe.shape[-1], dtype=torch.float32, device=probe.device)
        try:
            return super()._dummy_sampler_run(hidden_states)
        finally:
            del self.umim_profile_reserve

    def sample_tokens(self, *args, **kwargs):
        self.umim_step_confidences = None
        output = super().sample_tokens(*args, **kwargs)
        if output is None or output is EMPTY_MODEL_RUNNER_OUTPUT:
            return output
        if self.umim_step_confidences is not None:
            output.umim_confidences = self.umim_step_confidences
        if self.umim_faults:
            output.umim_faults, self.umim_faults = self.umim_faults, {}
        return output

    def _get_prompt_logprobs_dict(self, hidden_states, num_scheduled_tokens):
        """Prompt logprobs of merged prompts (one row per compressed position, see
        ``vllm_umim.engine.scheduler.requested_settings``): vLLM gathers each row's target from
        the prompt ids, and a merged span's virtual id lies past the vocabulary. Its rows are
        computed with a stand-in target and then marked: logprob NaN, rank -1, token id the
        stand-in (0). The top-k columns stay the model's distribution at that position; a raw
        target's row is exactly what vLLM computes."""
        base = getattr(self, "umim_virtual_base", None)
        swapped = {}
        for req_id in self.num_prompt_logprobs:
            request = self.requests.get(req_id)
            ids = None if request is None else request.prompt_token_ids
            if base is not None and ids is not None and max(ids, default=0) >= base:
                swapped[req_id] = ids
                request.prompt_token_ids = [0 if i >= base else i for i in ids]
        try:
            result = super()._get_prompt_logprobs_dict(hidden_states, num_scheduled_tokens)
        finally:
            for req_id, ids in swapped.items():
                self.requests[req_id].prompt_token_ids = ids
        for req_id, ids in swapped.items():
            tensors = result.get(req_id)
            if tensors is None:
                continue
            merged = torch.tensor([i >= base for i in ids[1:]], dtype=torch.bool)
            tensors.logprobs[merged, 0] = float("nan")
            tensors.selected_token_ranks[merged] = -1
        return result

    def _write_row(self, row: int, req_state: UmimRequestState) -> None:
        tail = req_state.compressed_tail()
        start, end = req_state.first_merge, req_state.first_merge + len(tail)
        self.input_batch.token_ids_cpu[row, start:end] = tail
        self.input_batch.num_tokens_no_spec[row] = end


def sampled_token_probabilities(logits: torch.Tensor, rows: torch.Tensor | None, sampled: torch.Tensor,
                                chunk_rows: int = CONFIDENCE_CHUNK_ROWS) -> torch.Tensor:
    """``softmax(logits[rows[i]].float())[sampled[i]]`` for each i (``rows`` None: every row in
    order), ``chunk_rows`` rows at a time: the full-vocabulary fp32 softmax never holds more than
    ``chunk_rows`` rows (extra memory at most 2 x chunk_rows x vocab x 4 bytes, whatever the
    batch), and each row's value is the one the whole-batch softmax gives (the softmax is per row)."""
    count = len(logits) if rows is None else len(rows)
    out = torch.empty(count, dtype=torch.float32, device=logits.device)
    for start in range(0, count, chunk_rows):
        end = min(start + chunk_rows, count)
        block = logits[start:end] if rows is None else logits.index_select(0, rows[start:end])
        probs = torch.softmax(block.float(), dim=-1)
        out[start:end] = probs.gather(1, sampled[start:end, None])[:, 0]
        del block, probs
    return out


def raw_token_rows(token_ids: np.ndarray, num_tokens: np.ndarray, num_reqs: int, virtual_base: int,
                   rule_table: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The first ``num_reqs`` token rows with every virtual id spelled as its rule's tokens (-1
    padded ``rule_table`` [R, 4]), as new arrays of the same dtypes (rows, lengths); None if no row
    holds a virtual id. An id past the table (a row the runner reported failed) becomes nothing."""
    lengths = num_tokens[:num_reqs]
    virtual_rows = [i for i in range(num_reqs) if (token_ids[i, : lengths[i]] >= virtual_base).any()]
    if not virtual_rows:
        return None
    spelled = {i: spell_raw(token_ids[i, : lengths[i]], virtual_base, rule_table) for i in virtual_rows}
    width = max([int(lengths.max(initial=0)), *(len(raw) for raw in spelled.values())])
    rows = np.zeros((num_reqs, width), dtype=token_ids.dtype)
    new_lengths = np.array(lengths, dtype=num_tokens.dtype)
    for i in range(num_reqs):
        raw = spelled.get(i)
        if raw is None:
            rows[i, : lengths[i]] = token_ids[i, : lengths[i]]
        else:
            rows[i, : len(raw)] = raw
            new_lengths[i] = len(raw)
    return rows, new_lengths


def spec_decode_logits_rows(metadata, batch_rows: list[int]) -> tuple[torch.Tensor, list[int]]:
    """With drafts, the step's logits hold, per request in batch order, one row per draft and one
    for the token after them (vLLM's ``SpecDecodeMetadata``). For the requests at ``batch_rows``:
    their logits rows, concatenated, and how many each has (its column count in the sampled ids)."""
    ends = metadata.cu_num_sampled_tokens.tolist()
    counts = [metadata.num_draft_tokens[b] + 1 for b in batch_rows]
    rows = [row for b, n in zip(batch_rows, counts) for row in range(ends[b] - n, ends[b])]
    return torch.tensor(rows, dtype=torch.long), counts


def raw_prompt_token_ids(input_batch, rule_table: torch.Tensor) -> torch.Tensor:
    """Replaces ``InputBatch._make_prompt_token_ids_cpu_tensor`` (penalties' prompt tokens).

    Each compressed prompt element becomes 4 slots: a plain token and 3 pads, or a rule's tokens
    padded. Penalties only use which tokens occur in the prompt (a bincount mask), so this keeps
    stock vLLM's behaviour exactly: the raw prompt's tokens, pad = vocab_size.
    """
    num_reqs = input_batch.num_reqs
    pad = input_batch.vocab_size
    max_len = int(input_batch.num_prompt_tokens[:num_reqs].max())
    ids = torch.from_numpy(input_batch.token_ids_cpu[:num_reqs, :max_len]).long()
    valid = torch.arange(max_len)[None, :] < torch.from_numpy(input_batch.num_prompt_tokens[:num_reqs])[:, None]
    is_virtual = ids >= pad
    slots = torch.full((num_reqs, max_len, 4), pad, dtype=torch.long)
    slots[..., 0] = torch.where(valid & ~is_virtual, ids, pad)
    # an id past the table only sits in a row the runner reported as failed: pads, not an IndexError
    known = is_virtual & valid & (ids < pad + len(rule_table))
    spans = rule_table[(ids[known] - pad)]
    slots[known] = torch.where(spans >= 0, spans, pad)
    return slots.view(num_reqs, max_len * 4)
