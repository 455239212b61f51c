"""UMIM model runner: mirrors the scheduler's compressed sequences in vLLM's persistent batch.

vLLM's runner keeps each request's token row (``input_batch.token_ids_cpu``) itself: it writes the
prompt when a request is added and appends every sampled token. With UMIM the row must hold the
*compressed* sequence, so the runner mixin does three things:

* ``load_model``: wraps the model's token embedding with ``SurrogateEmbedding`` (virtual ids →
  merge-module surrogates) — prefill merging needs nothing else, the prompt ids are compressed;
* ``_update_states``: applies the decode merges the scheduler sends on the ``SchedulerOutput``
  (row[position] = virtual id, row length = position + 1), and re-writes the rows of requests
  vLLM re-adds from their raw outputs (after preemption or a step without them);
* request states report their compressed length as ``num_tokens`` (``UmimRequestState``), which
  vLLM uses to decide whether a step samples.

The raw sampled tokens stay in ``req_state.output_token_ids``: penalties, ``min_tokens`` and bad
words read them exactly as in stock vLLM.
"""

from __future__ import annotations

from functools import partial

import torch
from vllm.logger import init_logger
from vllm.v1.worker.gpu_input_batch import CachedRequestState

from vllm_umim.engine.assets import load_engine_module, load_engine_rules
from vllm_umim.engine.config import UmimConfig, virtual_base
from vllm_umim.engine.embedding import install_surrogate_embedding

logger = init_logger(__name__)


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

    def apply_merge(self, position: int, virtual_id: int, span_length: int) -> None:
        if self.first_merge is None:
            self.first_merge = position
            self.sequence_tail = [self.get_token_id(i) for i in range(position, self.num_tokens)]
        tail = self.compressed_tail()
        del tail[position - self.first_merge :]
        tail.append(virtual_id)
        self.tokens_merged_away += span_length - 1


class UmimModelRunnerMixin:
    """Mix into a vLLM GPUModelRunner subclass (CPU or GPU) ahead of it."""

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        config = UmimConfig.from_vllm_config(self.vllm_config)
        rules = load_engine_rules(config.rules)
        hf_config = self.model_config.hf_config
        module = load_engine_module(config, hf_config, rules)
        self.umim_virtual_base = virtual_base(self.vllm_config)
        self.umim_rule_table = rules.padded.long()
        wrapper = install_surrogate_embedding(self.model, module, rules.padded, self.umim_virtual_base, config.table_budget_mib)
        logger.info(
            "UMIM: merge module with %d parameters installed; surrogates: %s", module.num_parameters(),
            type(wrapper.surrogates).__name__,
        )

    def _update_states(self, scheduler_output):
        if not getattr(self.input_batch, "umim_raw_prompts", False):
            self.input_batch._make_prompt_token_ids_cpu_tensor = partial(raw_prompt_token_ids, self.input_batch, self.umim_rule_table)
            self.input_batch.umim_raw_prompts = True
        # rows vLLM (re-)writes from prompt + raw outputs this step: new to the batch, or resumed
        kept_rows = set(self.input_batch.req_id_to_index) - set(scheduler_output.scheduled_cached_reqs.resumed_req_ids)
        result = super()._update_states(scheduler_output)
        for new_request in scheduler_output.scheduled_new_reqs:
            self.requests[new_request.req_id].__class__ = UmimRequestState
        rewritten = set()
        for event in getattr(scheduler_output, "umim_merges", ()):
            req_state = self.requests.get(event.request_id)
            if req_state is None:  # finished or aborted meanwhile
                continue
            req_state.apply_merge(event.position, event.virtual_id, event.span_length)
            rewritten.add(event.request_id)
        for req_id, row in self.input_batch.req_id_to_index.items():
            req_state = self.requests[req_id]
            if req_state.first_merge is not None and (req_id in rewritten or req_id not in kept_rows):
                self._write_row(row, req_state)
        return result

    def _write_row(self, row: int, req_state: UmimRequestState) -> None:
        tail = req_state.compressed_tail()
        start, end = req_state.first_merge, req_state.first_merge + len(tail)
        self.input_batch.token_ids_cpu[row, start:end] = tail
        self.input_batch.num_tokens_no_spec[row] = end


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
    slots[..., 0] = torch.where(valid, ids, pad)
    spans = rule_table[(ids[is_virtual & valid] - pad)]
    slots[is_virtual & valid] = torch.where(spans >= 0, spans, pad)
    return slots.view(num_reqs, max_len * 4)
