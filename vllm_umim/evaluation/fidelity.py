"""Fidelity as a user sees it (issue 13): greedy continuations through the vLLM engine, merged vs
unmerged in the same engine.

Every variant's continuation of a prompt (greedy, ``MAX_TOKENS`` tokens, ``ignore_eos`` so all
have the same length) is compared with the unmerged continuation (``extra_args={"umim": False}``)
of the same engine and prompt:

* first divergence: index of the first differing raw output token (``MAX_TOKENS`` if none);
* equal share: the fraction of prompts whose tokens are all equal;
* next-token KL(unmerged || variant) at the steps whose raw context is still identical (steps
  0..first divergence inclusive), from vLLM's top-k logprobs (see :func:`topk_kl`);
* token reduction from :func:`vllm_umim.merge_stats` (paper §4: TR = tokens merged away / raw
  tokens), for the prompt alone and for prompt + output, and the decode merges (pseudocode 4).

The same comparison of a stock bf16 engine with the fp32 unmerged continuations gives the line of
"the perturbation users already accept" (``vllm_umim.evaluation.fidelity_run``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

MAX_TOKENS = 32
TOP_LOGPROBS = 20  # vLLM's maximum for ``SamplingParams.logprobs``
UNMERGED = False  # ``extra_args={"umim": UNMERGED}`` serves a request without merging


@dataclass(frozen=True)
class Continuation:
    """One greedy continuation: raw output tokens, top-k logprobs per step, merge figures (None
    when the request ran unmerged)."""

    token_ids: list[int]
    logprobs: list[dict[int, float]]
    stats: dict | None = None


def first_divergence(reference: Sequence[int], candidate: Sequence[int]) -> int:
    """Index of the first differing token; the common length if one is a prefix of the other."""
    for index, (a, b) in enumerate(zip(reference, candidate)):
        if a != b:
            return index
    return min(len(reference), len(candidate))


def equal_share(divergences: Sequence[int], length: int) -> float:
    """Fraction of continuations that never diverge (first divergence == length)."""
    return sum(d >= length for d in divergences) / len(divergences) if divergences else float("nan")


def topk_kl(reference: dict[int, float], candidate: dict[int, float]) -> float:
    """KL(reference || candidate) from two top-k logprob dicts (token id -> logprob).

    An approximation: the sum runs over the reference's top-k tokens only (their probabilities
    are not renormalised, the tail's mass is left out), and a token missing from the candidate's
    top-k gets the candidate's smallest top-k logprob (an upper bound on its true logprob, so that
    term is underestimated). Exactly 0 for equal dicts.
    """
    if not reference:
        return 0.0
    floor = min(candidate.values()) if candidate else -math.inf
    return sum(math.exp(lp) * (lp - candidate.get(token, floor)) for token, lp in reference.items())


def shared_context_kl(reference: Continuation, candidate: Continuation) -> list[float]:
    """Per-step KL at steps 0..first divergence (inclusive; all steps if none): the steps where
    both continuations were conditioned on the same raw tokens."""
    steps = min(first_divergence(reference.token_ids, candidate.token_ids) + 1, len(reference.logprobs), len(candidate.logprobs))
    return [topk_kl(reference.logprobs[i], candidate.logprobs[i]) for i in range(steps)]


@dataclass
class Comparison:
    """The figures of one variant on one kind of text, against the unmerged continuations."""

    divergences: list[int] = field(default_factory=list)
    kl_steps: list[float] = field(default_factory=list)
    stats: list[dict] = field(default_factory=list)
    length: int = MAX_TOKENS

    def add(self, reference: Continuation, candidate: Continuation) -> None:
        self.divergences.append(first_divergence(reference.token_ids, candidate.token_ids))
        self.kl_steps.extend(shared_context_kl(reference, candidate))
        if candidate.stats is not None:
            self.stats.append(candidate.stats)

    def summary(self) -> dict:
        def total(key: str) -> int:
            return sum(s[key] for s in self.stats)

        merged = bool(self.stats)
        return {
            "prompts": len(self.divergences),
            "first_divergence_mean": statistics.fmean(self.divergences) if self.divergences else None,
            "first_divergence_median": statistics.median(self.divergences) if self.divergences else None,
            "equal_share": equal_share(self.divergences, self.length),
            "kl_mean": statistics.fmean(self.kl_steps) if self.kl_steps else None,
            "kl_steps": len(self.kl_steps),
            "prompt_tr": 1 - total("prompt_positions") / total("raw_prompt_tokens") if merged else None,
            "overall_tr": 1 - total("positions") / total("raw_tokens") if merged else None,
            "prefill_merges": total("prefill_merges") if merged else None,
            "decode_merges": total("decode_merges") if merged else None,
            "first_divergences": list(self.divergences),
        }


def compare(references: Sequence[Continuation], candidates: Sequence[Continuation], length: int = MAX_TOKENS) -> dict:
    """:meth:`Comparison.summary` of candidates against references, prompt by prompt."""
    comparison = Comparison(length=length)
    for reference, candidate in zip(references, candidates, strict=True):
        comparison.add(reference, candidate)
    return comparison.summary()


# ---- through an engine ---------------------------------------------------------------------------


def sampling_params(umim_choice=None, max_tokens: int = MAX_TOKENS):
    """Greedy, fixed length, top-k logprobs; ``umim_choice`` becomes ``extra_args["umim"]``
    (None: no extra_args, for a stock engine)."""
    from vllm import SamplingParams

    extra = None if umim_choice is None else {"umim": umim_choice}
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=TOP_LOGPROBS,
                          detokenize=False, extra_args=extra)


def generate_continuations(llm, prompt_token_ids: Sequence[Sequence[int]], umim_choice=None,
                           max_tokens: int = MAX_TOKENS) -> list[Continuation]:
    """One batch of greedy continuations of the token prompts."""
    from vllm.inputs import TokensPrompt

    from vllm_umim import merge_stats  # the public per-request figures (users read them the same way)

    outputs = llm.generate([TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_token_ids],
                           sampling_params(umim_choice, max_tokens), use_tqdm=False)
    return [_continuation(output, merge_stats(output)) for output in outputs]


def _continuation(output, stats) -> Continuation:
    completion = output.outputs[0]
    steps = [{token: entry.logprob for token, entry in step.items() if entry.rank is None or entry.rank <= TOP_LOGPROBS}
             for step in completion.logprobs or []]
    return Continuation(list(completion.token_ids), steps, stats)


def run_variants(llm, prompts_by_kind: dict[str, Sequence[Sequence[int]]], variants: dict[str, object],
                 max_tokens: int = MAX_TOKENS) -> tuple[dict, dict]:
    """Unmerged and per-variant continuations of every kind in one UMIM engine, one batch each.

    Returns ``(figures[variant][kind], continuations[name][kind])``, ``name`` being ``"unmerged"``
    or a variant's. Each batch holds the same prompts in the same order, so an unmerged variant
    meets exactly the batch shapes of the reference (and must equal it)."""
    continuations: dict[str, dict[str, list[Continuation]]] = {"unmerged": {}}
    figures: dict[str, dict[str, dict]] = {name: {} for name in variants}
    for kind, prompts in prompts_by_kind.items():
        reference = continuations["unmerged"][kind] = generate_continuations(llm, prompts, UNMERGED, max_tokens)
        for name, choice in variants.items():
            candidates = continuations.setdefault(name, {})[kind] = generate_continuations(llm, prompts, choice, max_tokens)
            figures[name][kind] = compare(reference, candidates, max_tokens)
    return figures, continuations
