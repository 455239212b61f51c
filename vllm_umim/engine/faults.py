"""Fault isolation for UMIM's engine hooks, and the test-only switch that injects faults.

UMIM's hooks run inside vLLM's EngineCore loop, where an uncaught exception ends the engine for
every request. Each hook is guarded per request instead; what happens to the request whose hook
raised depends on whether its KV cache already follows a merge:

=============  =======================================================  ==============================
hook           where                                                    the faulty request
=============  =======================================================  ==============================
``admission``  ``UmimScheduler.add_request``: its settings and policy    served unmerged
``prefill``    prefill segmentation (``compress_tokens``)               served unmerged (raw prompt)
``decode``     decode merging after a sampled token (``merge_newest``)  finished with an error
``gather``     runner: its virtual ids checked against the rule table   finished with an error, the
               before the step's embedding gather; merges mirrored      step's sampled token dropped
``figures``    its merge figures on outputs                             finishes unchanged, no figures
=============  =======================================================  ==============================

Before admission ends nothing was computed, so serving the raw prompt is exactly stock vLLM. After
that, the request's sequence, KV slots and the worker's token row may be half-way through a merge;
the request is finished with vLLM's ``FINISHED_ERROR`` (``finish_reason == "error"`` on
``LLM.generate``, an error response on the OpenAI server) and its blocks freed, while the engine
goes on. Each fault is logged once (request id, hook, exception), and the finished output carries
``kv_transfer_params["umim_fault"] = {"hook": ..., "error": ...}``, which the server counts on
``/metrics`` as ``vllm_umim:request_faults_total{hook=...}``.

Faults in batched code cannot be pinned to a request: an exception inside the model's forward (the
surrogate gather runs there, for the whole batch) ends the step as in stock vLLM. The gather
cannot raise on an id (it clamps), so the per-request check before it is what keeps an
out-of-range virtual id from silently becoming another rule's surrogate.

Test switch: ``VLLM_UMIM_FAULT="<hook>:<substring>[,<hook>:<substring>...]"`` makes the named hook
raise ``InjectedFault`` for every request whose id contains the substring. Read once per process
when the engine starts (vLLM's EngineCore and worker processes inherit the environment); unset, it
costs one tuple check per hook call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from vllm_umim.errors import InjectedFault, OptionError

HOOKS = ("admission", "prefill", "decode", "gather", "figures")
FAULT_ENV = "VLLM_UMIM_FAULT"
FAULT_KEY = "umim_fault"  # key in RequestOutput.kv_transfer_params


@dataclass(frozen=True)
class FaultSwitch:
    """Which hooks raise for which request ids (``(hook, request id substring)`` pairs)."""

    plan: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, value: str | None) -> "FaultSwitch":
        """The switch a ``VLLM_UMIM_FAULT`` value describes (empty or None: no faults)."""
        plan = []
        for item in filter(None, (part.strip() for part in (value or "").split(","))):
            hook, sep, substring = item.partition(":")
            if not sep or hook not in HOOKS or not substring:
                raise OptionError(f"{FAULT_ENV}: {item!r} is not <hook>:<request id substring> with hook one of {', '.join(HOOKS)}")
            plan.append((hook, substring))
        return cls(tuple(plan))

    @classmethod
    def from_env(cls) -> "FaultSwitch":
        return cls.parse(os.environ.get(FAULT_ENV))

    def check(self, hook: str, request_id: str) -> None:
        """Raise ``InjectedFault`` if the switch names ``hook`` for this request."""
        if self.plan and any(h == hook and s in request_id for h, s in self.plan):
            raise InjectedFault(f"injected fault in the {hook} hook")


def describe(hook: str, error: BaseException) -> dict:
    """A fault as the request's output reports it."""
    return {"hook": hook, "error": f"{type(error).__name__}: {error}"}


def request_fault(request_output) -> dict | None:
    """``{"hook", "error"}`` if a UMIM hook failed for this finished ``RequestOutput``, else None."""
    params = getattr(request_output, "kv_transfer_params", None) or {}
    return params.get(FAULT_KEY)
