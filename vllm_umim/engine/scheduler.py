"""UmimScheduler: vLLM's Scheduler with prompt merging at admission and decode merging after sampling.

Selected through vLLM's ``scheduler_cls`` config. Three overrides, each small:

* ``add_request``: compress the prompt (the merge policy's prefill segmentation, pseudocode 3)
  before vLLM sees its length;
* ``_update_request_with_output``: after a sampled token is appended and stop checks ran, merge
  the newest tokens if the policy merges the rule they complete (pseudocode 4), rolling back
  ``num_computed_tokens``;
* ``schedule``: hand the step's merge events to the worker on the ``SchedulerOutput``.

Blocks that a rollback may still rewrite (the last ``rollback_depth`` computed positions) are kept out of
the prefix cache through the KV coordinator's ``num_reprefillable_tokens``, the knob vLLM has for
the same situation with multi-token prediction. Finished requests report their merge figures in
``RequestOutput.kv_transfer_params["umim"]`` (read them with ``vllm_umim.merge_stats``).
"""

from __future__ import annotations

from vllm.logger import init_logger
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request

from vllm_umim.engine.assets import load_engine_rules
from vllm_umim.engine.config import MODES, UmimConfig, virtual_base
from vllm_umim.engine.stats import STATS_KEY
from vllm_umim.engine.sequence import MergeEvent, MergeState, compress_tokens, merge_newest
from vllm_umim.policies import GreedyLongestMatch

logger = init_logger(__name__)


def requested_mode(request: Request, default_mode: str) -> str | None:
    """The merge mode for a request, or None to serve it unmerged.

    ``extra_args={"umim": False}`` opts out; ``"prompt"`` / ``"dynamic"`` override the engine's
    mode. Requests merging cannot serve run unmerged: prompt embeddings, multi-modal or streaming
    input, and prompt logprobs (which are per raw prompt token).
    """
    params = request.sampling_params
    if params is None or request.prompt_token_ids is None or request.prompt_embeds is not None:
        return None
    if request.resumable or request.mm_features or params.prompt_logprobs is not None:
        return None
    choice = (params.extra_args or {}).get("umim", True)
    if choice in MODES:
        return choice
    if choice is False or (choice == 0 and not isinstance(choice, str)):  # JSON false may arrive as 0
        return None
    return default_mode  # true; anything else was refused as a request error in the API process


class UmimScheduler(Scheduler):
    def __init__(self, vllm_config, *args, **kwargs):
        super().__init__(vllm_config, *args, **kwargs)
        self.umim_config = UmimConfig.from_vllm_config(vllm_config)
        self.umim_rules = load_engine_rules(self.umim_config.rules)
        self.umim_policy = GreedyLongestMatch(self.umim_rules)
        self.virtual_base = virtual_base(vllm_config)
        self.pending_merges: list[MergeEvent] = []
        if self.rollback_depth > 0:
            coordinator = self.kv_cache_manager.coordinator
            coordinator.num_reprefillable_tokens = max(coordinator.num_reprefillable_tokens, self.rollback_depth)
        logger.info("UMIM scheduler: %s; mode %s", self.umim_rules.summary(), self.umim_config.mode)

    @property
    def rollback_depth(self) -> int:
        """How many computed positions a decode merge can roll back: ``max_span - 1`` (the span's
        older tokens). Blocks holding them are kept out of the prefix cache; a policy that rolls
        back further (a raw recent window) raises this one figure."""
        return max(self.umim_policy.max_span - 1, 0)

    # ---- admission: prompt merging -------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id not in self.requests:
            mode = requested_mode(request, self.umim_config.mode)
            if mode is not None:
                self._compress_prompt(request, dynamic=mode == "dynamic")
        super().add_request(request)

    def _compress_prompt(self, request: Request, dynamic: bool) -> None:
        raw_prompt = request.prompt_token_ids
        compressed, merges = compress_tokens(raw_prompt, self.umim_policy, self.virtual_base)
        request.umim = MergeState(dynamic, len(raw_prompt), prompt_positions=len(compressed), prefill_merges=merges)
        request.prompt_token_ids = compressed
        request.num_prompt_tokens = len(compressed)
        request._all_token_ids[:] = compressed  # in place: request.all_token_ids is a view of it
        request.block_hashes.clear()
        request.update_block_hashes()

    # ---- after sampling: decode merging --------------------------------------------------------
    def _update_request_with_output(self, request: Request, new_token_ids: list[int], is_stale: bool = False):
        new_token_ids, stopped = super()._update_request_with_output(request, new_token_ids, is_stale)
        state: MergeState | None = getattr(request, "umim", None)
        if state is not None and state.dynamic and not stopped and new_token_ids:
            event = merge_newest(request, self.umim_policy, self.virtual_base, self.hash_block_size)
            if event is not None:
                self.pending_merges.append(event)
        return new_token_ids, stopped

    # ---- the worker mirrors the merges ---------------------------------------------------------
    def schedule(self, *args, **kwargs):
        scheduler_output = super().schedule(*args, **kwargs)
        scheduler_output.umim_merges, self.pending_merges = self.pending_merges, []
        return scheduler_output

    # ---- per-request figures on the final output -----------------------------------------------
    def _free_request(self, request: Request, *args, **kwargs):
        kv_params, ec_params = super()._free_request(request, *args, **kwargs)
        state: MergeState | None = getattr(request, "umim", None)
        if state is not None and kv_params is None:
            kv_params = {STATS_KEY: state.stats(request.num_output_tokens, request.num_tokens, self.block_size)}
        return kv_params, ec_params
