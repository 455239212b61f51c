"""UmimScheduler: vLLM's Scheduler with prompt merging at admission and decode merging after sampling.

Selected through vLLM's ``scheduler_cls`` config. Five overrides, each small:

* ``add_request``: pick the request's merge policy (engine settings, or its own in
  ``extra_args["umim"]``) and compress the prompt (the policy's prefill segmentation,
  pseudocode 3) before vLLM sees its length;
* ``update_from_output``: keep the step's sampled-token probabilities the worker sends (only
  read by a confidence-gated policy);
* ``_update_request_with_output``: after a sampled token is appended and stop checks ran, merge
  the span completed at the policy's decode frontier (pseudocode 4), rolling back
  ``num_computed_tokens`` to the span's start; a step's tokens one at a time, so that with vLLM's
  n-gram speculation a merge at an inner accepted token ends the step there (docs/design.md,
  "With n-gram speculation");
* ``update_draft_token_ids``: n-gram drafts are raw tokens (a virtual id left in one becomes its
  rule's tokens), none after a step a merge ended early;
* ``schedule``: hand the step's merge events to the worker on the ``SchedulerOutput``, and say
  whether any running request needs sampled-token probabilities.

Blocks that a rollback may still rewrite (the last ``rollback_depth`` computed positions) are kept out of
the prefix cache through the KV coordinator's ``num_reprefillable_tokens``, the knob vLLM has for
the same situation with multi-token prediction. Finished requests report their merge figures in
``RequestOutput.kv_transfer_params["umim"]`` (read them with ``vllm_umim.merge_stats``).

Every hook is guarded per request (``vllm_umim.engine.faults``): an exception in one ends, or
unmerges, that request only, never the engine. Policies are cached per settings in a small LRU
(``POLICY_CACHE_SIZE``), so clients choosing many distinct settings cannot grow the engine.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from vllm.logger import init_logger
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
from vllm.v1.outputs import DraftTokenIds
from vllm.v1.request import Request, RequestStatus

from vllm_umim.engine.assets import load_checked_files
from vllm_umim.engine.config import UmimConfig, virtual_base
from vllm_umim.engine.faults import FAULT_KEY, FaultSwitch, describe
from vllm_umim.engine.sequence import MergeEvent, MergeState, compress_tokens, merge_newest
from vllm_umim.engine.stats import STATS_KEY
from vllm_umim.errors import UmimError
from vllm_umim.policies import MergePolicy, MergeSettings
from vllm_umim.rules import spell_raw

logger = init_logger(__name__)
POLICY_CACHE_SIZE = 64  # merge policies kept per engine (least recently used evicted; each is a few small objects)


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


def token_confidence(confidence: float | list[float], index: int) -> float:
    """The probability of a step's ``index``-th sampled token, from what the worker sent: one
    number (a step without drafts) or one per sampled token (with n-gram speculation)."""
    if isinstance(confidence, list):
        return confidence[index] if index < len(confidence) else float("nan")
    return confidence if index == 0 else float("nan")


def raw_draft(draft: list[int], rules, virtual_base: int) -> list[int]:
    """``draft`` with each virtual id replaced by its rule's raw tokens, at most ``len(draft)`` long."""
    if all(token < virtual_base for token in draft):
        return draft
    ends = [i for i, token in enumerate(draft) if token - virtual_base >= len(rules)]  # past the table: the draft ends
    known = draft[: ends[0]] if ends else draft
    return spell_raw(np.array(known), virtual_base, rules.padded.numpy())[: len(draft)].tolist()


class UmimScheduler(Scheduler):
    def __init__(self, vllm_config, *args, **kwargs):
        super().__init__(vllm_config, *args, **kwargs)
        self.umim_config = UmimConfig.from_vllm_config(vllm_config)
        self.virtual_base = virtual_base(vllm_config)
        self.umim_rules = load_checked_files(self.umim_config, self.virtual_base, "EngineCore")[0]
        self.umim_policies: OrderedDict[MergeSettings, MergePolicy] = OrderedDict()
        self.umim_gated: set[str] = set()  # live requests whose policy reads sampled-token probabilities
        self.umim_fault_switch = FaultSwitch.from_env()
        self.pending_merges: list[MergeEvent] = []
        self.step_confidences: dict[str, float | list[float]] = {}
        self.umim_dropped_drafts: set[str] = set()  # requests whose drafts continue dropped tokens
        self.umim_dropped_tokens = 0  # sampled tokens dropped after merges at inner accepted drafts (a count for tests)
        if self.rollback_depth > 0:
            coordinator = self.kv_cache_manager.coordinator
            coordinator.num_reprefillable_tokens = max(coordinator.num_reprefillable_tokens, self.rollback_depth)
        logger.info("UMIM scheduler: %s; %s, max_window %d", self.umim_rules.summary(), self.umim_config.merge,
                    self.umim_config.max_window)
        if self.umim_fault_switch.plan:
            logger.warning("UMIM fault injection (a test switch) is on: %s", self.umim_fault_switch.plan)

    @property
    def rollback_depth(self) -> int:
        """How many computed positions a decode merge can roll back: the span's older tokens
        (``max_span - 1``) and the raw window after it (up to ``max_window``). Blocks holding them
        are kept out of the prefix cache."""
        return max(self.umim_rules.max_n - 1, 0) + self.umim_config.max_window

    def merge_policy(self, settings: MergeSettings) -> MergePolicy:
        """The policy for ``settings``: built once, kept while among the ``POLICY_CACHE_SIZE``
        most recently used (a request holds its own on its ``MergeState``)."""
        policy = self.umim_policies.pop(settings, None)
        if policy is None:
            policy = settings.build(self.umim_rules)
        self.umim_policies[settings] = policy
        while len(self.umim_policies) > POLICY_CACHE_SIZE:
            self.umim_policies.popitem(last=False)
        return policy

    def _record_fault(self, request: Request, hook: str, error: BaseException) -> None:
        """Log a hook's exception (one line) and keep it for the request's final output."""
        logger.error("UMIM %s hook failed for request %s: %s: %s", hook, request.request_id, type(error).__name__, error)
        if getattr(request, "umim_fault", None) is None:
            request.umim_fault = describe(hook, error)

    # ---- admission: prompt merging -------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id not in self.requests:
            self._admit(request)
        super().add_request(request)

    def _admit(self, request: Request) -> None:
        """Choose the request's policy and compress its prompt; on any exception, serve it unmerged
        (nothing was computed yet: the raw prompt is exactly stock vLLM)."""
        raw_prompt, hook = request.prompt_token_ids, "admission"
        try:
            self.umim_fault_switch.check(hook, request.request_id)
            settings = requested_settings(request, self.umim_config)
            if settings is None:
                return
            policy = self.merge_policy(settings)
            hook = "prefill"
            self.umim_fault_switch.check(hook, request.request_id)
            self._compress_prompt(request, settings, policy)
        except Exception as e:
            self._record_fault(request, hook, e)
            self._restore_raw_prompt(request, raw_prompt)

    def _compress_prompt(self, request: Request, settings: MergeSettings, policy: MergePolicy) -> None:
        raw_prompt = request.prompt_token_ids
        compressed, merges = compress_tokens(raw_prompt, policy, self.virtual_base)
        request.umim = MergeState(settings.dynamic, policy, len(raw_prompt), prompt_positions=len(compressed), prefill_merges=merges)
        request.prompt_token_ids = compressed
        request.num_prompt_tokens = len(compressed)
        request._all_token_ids[:] = compressed  # in place: request.all_token_ids is a view of it
        request.block_hashes.clear()
        request.update_block_hashes()
        if policy.needs_confidence:
            self.umim_gated.add(request.request_id)

    def _restore_raw_prompt(self, request: Request, raw_prompt: list[int]) -> None:
        request.umim = None
        self.umim_gated.discard(request.request_id)
        if request.prompt_token_ids is raw_prompt and len(request._all_token_ids) == len(raw_prompt):
            return  # untouched
        request.prompt_token_ids = raw_prompt
        request.num_prompt_tokens = len(raw_prompt)
        request._all_token_ids[:] = raw_prompt
        request.block_hashes.clear()
        request.update_block_hashes()

    # ---- after sampling: decode merging --------------------------------------------------------
    def update_from_output(self, scheduler_output, model_runner_output):
        self.step_confidences = getattr(model_runner_output, "umim_confidences", None) or {}
        failed = self._finish_runner_faults(getattr(model_runner_output, "umim_faults", None) or {})
        engine_core_outputs = super().update_from_output(scheduler_output, model_runner_output)
        for request, kv_params in failed:
            output = EngineCoreOutput(request_id=request.request_id, new_token_ids=[], finish_reason=request.get_finished_reason(),
                                      kv_transfer_params=kv_params, events=request.take_events(),
                                      trace_headers=request.trace_headers)
            engine_core_outputs.setdefault(request.client_index, EngineCoreOutputs()).outputs.append(output)
        self._attach_figures_for_stop_strings(engine_core_outputs)
        return engine_core_outputs

    def _finish_runner_faults(self, faults: dict[str, dict]) -> list[tuple[Request, dict | None]]:
        """Finish, with an error, the requests whose runner hook failed this step, before vLLM reads
        the step's output (their sampled tokens are dropped). Returns them with their final params."""
        if not faults:
            return []
        failed = []
        for request_id, fault in faults.items():
            request = self.requests.get(request_id)
            if request is None or request.is_finished():
                continue
            logger.error("UMIM %s hook failed for request %s: %s", fault["hook"], request_id, fault["error"])
            request.umim_fault = fault
            request.resumable = False
            failed.append(request)
        self.finish_requests([r.request_id for r in failed], RequestStatus.FINISHED_ERROR)
        return [(request, request.__dict__.pop("umim_final_params", None)) for request in failed]

    def _attach_figures_for_stop_strings(self, engine_core_outputs) -> None:
        """A stop string is found by the frontend's detokenizer, which then finishes the request
        itself: the engine's final figures (on the finished output, ``_free_request``) never reach
        it. Requests with stop strings therefore carry their figures (and fault, if any) so far on
        every output."""
        for outputs in engine_core_outputs.values():
            for output in outputs.outputs:
                if output.kv_transfer_params is not None or output.finish_reason is not None:
                    continue
                request = self.requests.get(output.request_id)
                if request is not None and request.sampling_params is not None and request.sampling_params.stop:
                    output.kv_transfer_params = self._final_params(request)

    def _update_request_with_output(self, request: Request, new_token_ids: list[int], is_stale: bool = False):
        state: MergeState | None = getattr(request, "umim", None)
        if state is None or not new_token_ids or not (state.dynamic or state.policy.needs_confidence):
            return super()._update_request_with_output(request, new_token_ids, is_stale)
        # One token at a time, as the reference decodes: with n-gram speculation a step brings the
        # accepted drafts and one more token, and a merge at an inner one ends the step there.
        kept, stopped = [], False
        confidence = self.step_confidences.get(request.request_id, float("nan"))
        for index, token in enumerate(new_token_ids):
            appended, stopped = super()._update_request_with_output(request, [token], is_stale)
            kept += appended
            try:
                if state.policy.needs_confidence:  # missing (e.g. a worker that did not send it): unknown
                    state.output_confidences.append(token_confidence(confidence, index))
                if state.dynamic and not stopped and self._merge_newest(request, len(new_token_ids) - 1 - index):
                    break
            except Exception as e:  # the sequence may be half-way through a merge: end this request only
                self._record_fault(request, "decode", e)
                request.status = RequestStatus.FINISHED_ERROR
                request.resumable = False
                stopped = True
            if stopped:
                break
        return kept, stopped

    def _merge_newest(self, request: Request, later_tokens: int) -> bool:
        """Merge the span completed by the request's newest token, if its policy does (pseudocode 4).

        ``later_tokens``: tokens this step sampled after the newest (accepted drafts and the one
        sampled after them). They were sampled without this merge, so on a merge they are dropped,
        as rejected drafts are: the step is taken back to this token (vLLM counted their positions
        computed) before the merge rolls back to the span's start, and the drafts the runner
        proposed after them are not scheduled. Returns whether a merge was made."""
        computed = request.num_computed_tokens
        request.num_computed_tokens = computed - later_tokens  # as if the step had ended at this token
        event = merge_newest(request, self.virtual_base, self.hash_block_size)
        if event is None:
            request.num_computed_tokens = computed
            return False
        if later_tokens:
            self.umim_dropped_drafts.add(request.request_id)
            self.umim_dropped_tokens += later_tokens
        # injected where it hurts most: the sequence is rewritten, the worker not yet told
        self.umim_fault_switch.check("decode", request.request_id)
        self.pending_merges.append(event)
        return True

    def update_draft_token_ids(self, draft_token_ids) -> None:
        """Drafts are raw tokens: the runner hands the n-gram drafter its rows spelled in raw tokens
        (``UmimModelRunnerMixin.propose_draft_token_ids``); should a draft still hold a virtual id,
        it gets the span's raw tokens instead (cut to the draft's length; an id past the rule table
        ends the draft). A request whose step a merge ended early (``_merge_newest``) gets no
        drafts: they continue tokens that were dropped."""
        dropped, self.umim_dropped_drafts = self.umim_dropped_drafts, set()
        drafts = [[] if req_id in dropped else raw_draft(ids, self.umim_rules, self.virtual_base)
                  for req_id, ids in zip(draft_token_ids.req_ids, draft_token_ids.draft_token_ids)]
        super().update_draft_token_ids(DraftTokenIds(draft_token_ids.req_ids, drafts))

    # ---- the worker mirrors the merges ---------------------------------------------------------
    def schedule(self, *args, **kwargs):
        self.umim_dropped_drafts.clear()  # read by update_draft_token_ids, which ran before this step (if at all)
        scheduler_output = super().schedule(*args, **kwargs)
        scheduler_output.umim_merges, self.pending_merges = self.pending_merges, []
        gated = self.umim_gated  # no per-request scan without one
        scheduler_output.umim_confidence_req_ids = (
            frozenset(r.request_id for r in self.running if r.request_id in gated) if gated else frozenset()
        )
        return scheduler_output

    # ---- per-request figures on the final output -----------------------------------------------
    def _free_request(self, request: Request, *args, **kwargs):
        kv_params, ec_params = super()._free_request(request, *args, **kwargs)
        self.umim_gated.discard(request.request_id)
        final = self._final_params(request)
        if final is not None and kv_params is None:
            kv_params = final
            request.umim_final_params = final  # for finish_requests callers, which drop the return value
        return kv_params, ec_params

    def _final_params(self, request: Request) -> dict | None:
        """The request's figures (merged) and fault (if a hook failed), for its last output."""
        params = {}
        state: MergeState | None = getattr(request, "umim", None)
        if state is not None and getattr(request, "umim_fault", None) is None:
            try:
                self.umim_fault_switch.check("figures", request.request_id)
                params[STATS_KEY] = state.stats(request.num_output_tokens, request.num_tokens, self.block_size)
            except Exception as e:
                self._record_fault(request, "figures", e)
        fault = getattr(request, "umim_fault", None)
        if fault is not None:
            params[FAULT_KEY] = fault
        return params or None
