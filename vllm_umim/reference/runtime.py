"""Reference UMIM runtime on HF transformers: paper App. D, pseudocode 3 and 4, batch 1.

This is the correctness oracle for the vLLM engine, so it is written to be obviously right, not
fast. A compressed sequence is a list of ``Element``s: a plain token, or a merged span whose input
embedding is the merge module's surrogate. Positions are the compacted indices 0..len-1.

* prompt-only merging (pseudocode 3): merge the prompt once, then decode normally;
* dynamic merging (pseudocode 4): additionally, after each sampled token, if the plain elements
  at the policy's decode frontier form a rule n-gram it merges, drop the span (and the raw window
  after it, if the policy keeps one) from the KV cache and feed one surrogate at the span's first
  position, then the window's tokens again, instead of the new token alone.

The policy (``vllm_umim.policies``) is the same object type the engine's scheduler uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from vllm_umim.errors import MergeStateError
from vllm_umim.ops.matcher import SINGLE
from vllm_umim.policies import DecodeMerge, GreedyLongestMatch, MergePolicy
from vllm_umim.rules import RuleSet
from vllm_umim.rules.ruleset import MAX_SPAN

VIRTUAL_BASE = 1 << 40  # merged elements as ids for the policy: any base above every token id


@dataclass(frozen=True)
class Element:
    """One position of a compressed sequence."""

    tokens: tuple[int, ...]
    rule_id: int = SINGLE

    @property
    def merged(self) -> bool:
        return self.rule_id != SINGLE


@dataclass
class Generation:
    """What a reference generation produced; every raw token is kept."""

    prompt_token_ids: list[int]
    output_token_ids: list[int]
    elements: list[Element]  # the final compressed sequence: prompt and output
    prompt_elements: int  # compressed prompt length
    prefill_merges: int = 0
    decode_merges: int = 0
    finish_reason: str = "length"
    elements_history: list[int] = field(default_factory=list)  # compressed length after each step
    margins: list[float] = field(default_factory=list)  # top-1 minus top-2 logit at each step
    confidences: list[float] = field(default_factory=list)  # probability of each sampled token

    @property
    def raw_length(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def token_reduction(self) -> float:
        return 1.0 - len(self.elements) / max(self.raw_length, 1)


def merge_prompt(token_ids: list[int], policy: MergePolicy) -> list[Element]:
    """Prefill merging (pseudocode 3 for the paper's policy): the prompt as elements."""
    if not token_ids:
        return []
    segmentation = policy.segment([list(token_ids)])[0]
    return [
        Element(tuple(token_ids[start:end]), rule_id)
        for rule_id, start, end in zip(segmentation.rule_ids, segmentation.starts, segmentation.ends)
    ]


def merge_after_token(elements: list[Element], policy: MergePolicy, output_confidences: list[float] = ()) -> DecodeMerge | None:
    """Decode merging after a token was appended to ``elements``: where the policy merges the span
    at its decode frontier, replace the span's plain elements by one merged element in place
    (elements after it, a raw window, stay as they are). Returns the merge, or None."""
    ids = [VIRTUAL_BASE + e.rule_id if e.merged else e.tokens[0] for e in elements]
    merge = policy.decode_merge(ids, VIRTUAL_BASE, output_confidences)
    if merge is None:
        return None
    tokens = tuple(ids[merge.start : merge.start + merge.length])
    if not 0 <= merge.rule_id < len(policy.rules) or merge.start < 0 or tokens != policy.rules.tokens_of(merge.rule_id):
        raise MergeStateError(f"the policy merged tokens {list(tokens)} at {merge.start} that are not rule {merge.rule_id}")
    elements[merge.start : merge.start + merge.length] = [Element(tokens, merge.rule_id)]
    return merge


class ReferenceRuntime:
    """Runs a frozen HF causal LM with UMIM merging. ``dynamic=False`` is prompt-only merging;
    ``policy`` decides what merges (default: the paper's, ``GreedyLongestMatch``), the same policy
    object the engine's scheduler uses."""

    def __init__(self, model, rules: RuleSet, merge_module, dynamic: bool = True, policy: MergePolicy | None = None):
        self.model = model.eval()
        self.rules = rules
        self.policy = policy or GreedyLongestMatch(rules)
        self.merge_module = merge_module.eval() if merge_module is not None else None
        self.dynamic = dynamic
        self.embedding = model.get_input_embeddings()

    @torch.no_grad()
    def embed(self, elements: list[Element], before: list[Element] = ()) -> torch.Tensor:
        """Input embeddings [len, d]: a token's embedding, or the surrogate of a merged span.
        ``before``: the elements preceding ``elements`` in the sequence (a context-aware module
        reads the raw tokens before each span, :mod:`~vllm_umim.module.context`)."""
        rows = []
        raw = [t for e in before for t in e.tokens]
        for element in elements:
            token_embeds = self.embedding(torch.tensor(element.tokens))
            if element.merged:  # padded to the module's max span, as the engine batches spans
                padded = torch.zeros(MAX_SPAN, token_embeds.shape[1], dtype=token_embeds.dtype)
                padded[: len(element.tokens)] = token_embeds
                length = torch.tensor([len(element.tokens)])
                tokens = torch.tensor([list(element.tokens) + [-1] * (MAX_SPAN - len(element.tokens))])
                context = self._context(raw)
                rows.append(self.merge_module(padded[None].to(self._module_dtype), length, tokens, context=context)[0]
                            .to(token_embeds.dtype))
            else:
                rows.append(token_embeds[0])
            raw.extend(element.tokens)
        return torch.stack(rows)

    def _context(self, raw: list[int]):
        """(embeds [1, k, d], lengths [1]) of the last k raw tokens, for a context-aware module."""
        k = self.merge_module.config.context_tokens
        if not k:
            return None
        last = raw[-k:] if raw else []
        tokens = torch.tensor([[-1] * (k - len(last)) + last])
        return self.embedding(tokens.clamp(min=0)).to(self._module_dtype), torch.tensor([len(last)])

    @property
    def _module_dtype(self):
        return next(self.merge_module.parameters()).dtype

    @torch.no_grad()
    def forward(self, embeds: torch.Tensor, start: int, cache: DynamicCache) -> torch.Tensor:
        """Run ``embeds`` at positions start.. on top of ``cache``; logits of the last position."""
        positions = torch.arange(start, start + len(embeds))[None]
        out = self.model(inputs_embeds=embeds[None], position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1].float()

    @torch.no_grad()
    def generate(
        self,
        prompt_token_ids: list[int],
        max_new_tokens: int = 32,
        eos_token_ids: tuple[int, ...] = (),
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        merge_prompt_tokens: bool = True,
    ) -> Generation:
        elements = merge_prompt(prompt_token_ids, self.policy) if merge_prompt_tokens else [Element((t,)) for t in prompt_token_ids]
        result = Generation(list(prompt_token_ids), [], elements, len(elements))
        result.prefill_merges = sum(e.merged for e in elements)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        cache = DynamicCache()
        logits = self.forward(self.embed(elements), 0, cache)
        while len(result.output_token_ids) < max_new_tokens:
            top2 = torch.topk(logits, 2).values
            result.margins.append(float(top2[0] - top2[1]))
            token = sample(logits, temperature, top_p, top_k, generator)
            result.confidences.append(float(torch.softmax(logits, -1)[token]))
            result.output_token_ids.append(token)
            elements.append(Element((token,)))
            if token in eos_token_ids:
                result.finish_reason = "stop"
                break
            if len(result.output_token_ids) == max_new_tokens:
                break
            merge = merge_after_token(elements, self.policy, result.confidences) if self.dynamic else None
            start = len(elements) - 1  # the newest element is not cached yet
            if merge is not None:  # roll back to the span's start: surrogate (and window) are fed again
                start = merge.start
                cache.crop(start - cache.get_seq_length())  # negative: drop that many newest entries
                result.decode_merges += 1
            result.elements_history.append(len(elements))
            logits = self.forward(self.embed(elements[start:], elements[:start]), start, cache)
        return result


def sample(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, generator) -> int:
    """Greedy when temperature == 0, else temperature / top-k / top-p sampling."""
    if temperature == 0.0:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def bracketed(elements: list[Element], tokenizer) -> str:
    """Text with each merged span in brackets, like the paper's Table 3."""
    parts = []
    for element in elements:
        text = tokenizer.decode(list(element.tokens))
        parts.append(f"[{text}]" if element.merged else text)
    return "".join(parts)


def replay_merges(prompt_token_ids: list[int], output_token_ids: list[int], policy: MergePolicy, dynamic: bool,
                  output_confidences: list[float] = ()) -> Generation:
    """The compressed sequence that merging produces for these raw tokens, without running a model.

    Merges depend only on the raw tokens (and, for a confidence-gated policy, on the sampled
    tokens' probabilities: without ``output_confidences`` such a policy merges nothing at decode),
    so this rebuilds what an engine did from its output (for ``vllm-umim generate --engine vllm``
    and for checking engine figures).
    """
    elements = merge_prompt(prompt_token_ids, policy)
    result = Generation(list(prompt_token_ids), list(output_token_ids), elements, len(elements))
    result.prefill_merges = sum(e.merged for e in elements)
    for i, token in enumerate(output_token_ids[:-1]):  # the last token is never fed back
        elements.append(Element((token,)))
        if dynamic and merge_after_token(elements, policy, output_confidences[: i + 1]):
            result.decode_merges += 1
    if output_token_ids:
        elements.append(Element((output_token_ids[-1],)))
    return result
