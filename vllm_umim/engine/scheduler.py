"""UmimScheduler: vLLM's Scheduler with prompt merging at admission and decode merging after sampling.

Selected through vLLM's ``scheduler_cls`` config. Four overrides, each small:

* ``add_request``: pick the request's merge policy (engine settings, or its own in
  ``extra_args["umim"]``) and compress the prompt (the policy's prefill segmentation,
  pseudocode 3) before vLLM sees its length;
* ``update_from_output``: keep the step's sampled-token probabilities the worker sends (only
  read by a confidence-gated policy);
* ``_update_request_with_output``: after a sampled token is appended and stop checks ran, merge
  the span completed at the policy's decode frontier (pseudocode 4), rolling back
  ``num_computed_tokens`` to the span's start;
* ``schedule``: hand the step's merge events to the worker on the ``SchedulerOutput``, and say
  whether any running request needs sampled-token probabilities.

Blocks that a rollback may still rewrite (the last ``rollback_depth`` computed positions) are kept out of
the prefix cache through the KV coordinator's ``num_reprefillable_tokens``, the knob vLLM has for
the same situation with multi-token prediction. Finished requests report their merge figures in
``RequestOutput.kv_transfer_params["umim"]`` (read them with ``vllm_umim.merge_stats``).
"""

from __future__ import annotations

from vllm.logger import init_logger
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request

from vllm_umim.engine.assets import load_checked_files
from vllm_umim.engine.config import UmimConfig, virtual_base
from vllm_umim.engine.sequence import MergeEvent, MergeState, compress_tokens, merge_newest
from vllm_umim.engine.stats import STATS_KEY
from vllm_umim.errors import UmimError
from vllm_umim.policies import MergePolicy, MergeSettings

logger = init_logger(__name__)


def requested_settings(request: Request, config: UmimConfig) -> MergeSettings | None:
    """The merge settings for a request, or None to serve it unmerged.

    ``extra_args={"umim": False}`` opts out; ``True``, a mode or a dict of settings chooses (read
    and checked in the API process, ``vllm_umim.engine.patches``). Requests merging cannot serve
    run unmerged: prompt embeddings, multi-modal or streaming input.

    Prompt logprobs: a request asking for them is served unmerged unless its ``extra_args`` name
    ``"umim"`` explicitly. Merged, its prompt logprobs follow the *compressed* prompt (one row per
    position, fewer rows than raw tokens): a row whose target is a merged span carries NaN
    (``UmimModelRunnerMixin._get_prompt_logprobs_dict``), a raw target its true logprob. With a raw
    window of at least the scored continuation's length, the last rows are exactly the
    continuation's tokens (what ``vllm_umim.evaluation.lm_eval`` reads). Callers that index rows by
    raw prompt position (stock lm-eval) would misalign, hence the explicit opt-in.
    """
    params = request.sampling_params
    if params is None or request.prompt_token_ids is None or request.prompt_embeds is not None:
        return None
    choice = (params.extra_args or {}).get("umim")
    if request.resumable or request.mm_features:
        return None
    if params.prompt_logprobs is not None and choice is None:
        logger.warning_once("requests asking for prompt logprobs without extra_args['umim'] are served unmerged: a "
                            "log-likelihood evaluation through them measures stock vLLM (see vllm_umim.evaluation.harness)")
        return None
    try:
        return config.request_settings(True if choice is None else choice)
    except UmimError as e:  # only reachable by a caller that bypassed the API process' check
        logger.warning("request %s served unmerged: %s", request.request_id, e)
        return None


class UmimScheduler(Scheduler):
    def __init__(self, vllm_config, *args, **kwargs):
        super().__init__(vllm_config, *args, **kwargs)
        self.umim_config = UmimConfig.from_vllm_config(vllm_config)
        self.virtual_base = virtual_base(vllm_config)
        self.umim_rules = load_checked_files(self.umim_config, self.virtual_base, "EngineCore")[0]
        self.umim_policies: dict[MergeSettings, MergePolicy] = {}
        self.pending_merges: list[MergeEvent] = []
        self.step_confidences: dict[str, float] = {}
        if self.rollback_depth > 0:
            coordinator = self.kv_cache_manager.coordinator
            coordinator.num_reprefillable_tokens = max(coordinator.num_reprefillable_tokens, self.rollback_depth)
        logger.info("UMIM scheduler: %s; %s, max_window %d", self.umim_rules.summary(), self.umim_config.merge,
                    self.umim_config.max_window)

    @property
    def rollback_depth(self) -> int:
        """How many computed positions a decode merge can roll back: the span's older tokens
        (``max_span - 1``) and the raw window after it (up to ``max_window``). Blocks holding them
        are kept out of the prefix cache."""
        return max(self.umim_rules.max_n - 1, 0) + self.umim_config.max_window

    def merge_policy(self, settings: MergeSettings) -> MergePolicy:
        """The policy for ``settings``, built once per engine."""
        if settings not in self.umim_policies:
            self.umim_policies[settings] = settings.build(self.umim_rules)
        return self.umim_policies[settings]

    # ---- admission: prompt merging -------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id not in self.requests:
            settings = requested_settings(request, self.umim_config)
            if settings is not None:
                self._compress_prompt(request, settings)
        super().add_request(request)

    def _compress_prompt(self, request: Request, settings: MergeSettings) -> None:
        raw_prompt = request.prompt_token_ids
        policy = self.merge_policy(settings)
        compressed, merges = compress_tokens(raw_prompt, policy, self.virtual_base)
        request.umim = MergeState(settings.dynamic, policy, len(raw_prompt), prompt_positions=len(compressed), prefill_merges=merges)
        request.prompt_token_ids = compressed
        request.num_prompt_tokens = len(compressed)
        request._all_token_ids[:] = compressed  # in place: request.all_token_ids is a view of it
        request.block_hashes.clear()
        request.update_block_hashes()

    # ---- after sampling: decode merging --------------------------------------------------------
    def update_from_output(self, scheduler_output, model_runner_output):
        self.step_confidences = getattr(model_runner_output, "umim_confidences", None) or {}
        engine_core_outputs = super().update_from_output(scheduler_output, model_runner_output)
        self._attach_figures_for_stop_strings(engine_core_outputs)
        return engine_core_outputs

    def _attach_figures_for_stop_strings(self, engine_core_outputs) -> None:
        """A stop string is found by the frontend's detokenizer, which then finishes the request
        itself: the engine's final figures (on the finished output, ``_free_request``) never reach
        it. Requests with stop strings therefore carry their figures so far on every output."""
        for outputs in engine_core_outputs.values():
            for output in outputs.outputs:
                if output.kv_transfer_params is not None or output.finish_reason is not None:
                    continue
                request = self.requests.get(output.request_id)
                state: MergeState | None = getattr(request, "umim", None)
                if state is not None and request.sampling_params.stop:
                    stats = state.stats(request.num_output_tokens, request.num_tokens, self.block_size)
                    output.kv_transfer_params = {STATS_KEY: stats}

    def _update_request_with_output(self, request: Request, new_token_ids: list[int], is_stale: bool = False):
        new_token_ids, stopped = super()._update_request_with_output(request, new_token_ids, is_stale)
        state: MergeState | None = getattr(request, "umim", None)
        if state is None or not new_token_ids:
            return new_token_ids, stopped
        if state.policy.needs_confidence:  # missing (e.g. a worker that did not send it): unknown
            state.output_confidences += [self.step_confidences.get(request.request_id, float("nan"))] * len(new_token_ids)
        if state.dynamic and not stopped:
            event = merge_newest(request, self.virtual_base, self.hash_block_size)
            if event is not None:
                self.pending_merges.append(event)
        return new_token_ids, stopped

    # ---- the worker mirrors the merges ---------------------------------------------------------
    def schedule(self, *args, **kwargs):
        scheduler_output = super().schedule(*args, **kwargs)
        scheduler_output.umim_merges, self.pending_merges = self.pending_merges, []
        gated = any(policy.needs_confidence for policy in self.umim_policies.values())  # no per-request scan without one
        scheduler_output.umim_wants_confidences = gated and any(
            getattr(request, "umim", None) is not None and request.umim.policy.needs_confidence for request in self.running
        )
        return scheduler_output

    # ---- per-request figures on the final output -----------------------------------------------
    def _free_request(self, request: Request, *args, **kwargs):
        kv_params, ec_params = super()._free_request(request, *args, **kwargs)
        state: MergeState | None = getattr(request, "umim", None)
        if state is not None and kv_params is None:
            kv_params = {STATS_KEY: state.stats(request.num_output_tokens, request.num_tokens, self.block_size)}
        return kv_params, ec_params
