"""Multiple-choice QA with merging (paper §4.4, App. F.2).

Each option is scored by the LM's loss on ``context + choice`` (context and choice tokenized
separately and concatenated, as lm-eval-harness does); the option with the lowest loss wins. The
loss is the mean negative log-likelihood of the *choice* tokens (the context is shared between
options, so the paper's "loss of the overall context" differs between options only there).

* base: the unmerged LM.
* merged: prompt-only merging (pseudocode 3) of the whole ``context + choice`` sequence, scored
  with the two-stage loss of pseudocode 5 (tokens inside a merged span are scored by the
  skipped-token pass), so every choice token gets exactly one loss term.

TR is ``1 - merged positions / raw tokens`` over all scored sequences.
"""

from __future__ import annotations

import time

import torch

from vllm_umim.evaluation.perplexity import base_token_nll, two_stage_token_nll
from vllm_umim.module.batches import bos_prefix, segment

TASKS = ("piqa", "arc_easy", "arc_challenge", "copa", "openbookqa")


@torch.no_grad()
def evaluate_qa(model, tokenizer, rules, modules: dict, tasks=TASKS, limit: int | None = 50, progress: bool = True,
                on_task=None) -> dict:
    """{task: {n, accuracy: {base, <module>...}, tr, seconds}}; ``on_task(results)`` after each task."""
    from vllm_umim.data.qa import load_task

    results = {}
    bos = bos_prefix(tokenizer)  # the model's BOS first where its tokenizer adds one (Gemma)
    for task in tasks:
        items = load_task(task, "validation", limit)
        correct = {"base": 0, **{name: 0 for name in modules}}
        raw = merged = 0
        started = time.perf_counter()
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(items), desc=task, unit="q")
        for item in items:
            ctx = bos + tokenizer(item.context, add_special_tokens=False)["input_ids"]
            scores = {"base": [], **{name: [] for name in modules}}
            for choice in item.choices:
                cont = tokenizer(choice, add_special_tokens=False)["input_ids"]
                tokens = ctx + cont
                first = len(ctx) - 1  # nll index of the first choice token
                b_nll, _ = base_token_nll(model, tokens)
                scores["base"].append(float(b_nll[first:].mean()))
                seg = segment([tokens], rules)[0]
                raw += len(tokens)
                merged += seg.num_elements
                for name, module in modules.items():
                    scores[name].append(float(two_stage_token_nll(model, module, seg)[first:].mean()))
            for name, s in scores.items():
                correct[name] += int(min(range(len(s)), key=s.__getitem__) == item.label)
            if bar:
                bar.update(1)
        if bar:
            bar.close()
        results[task] = {
            "n": len(items),
            "accuracy": {name: c / max(len(items), 1) for name, c in correct.items()},
            "stderr": {name: standard_error(c, len(items)) for name, c in correct.items()},
            "tr": 1.0 - merged / raw if raw else 0.0,
            "seconds": round(time.perf_counter() - started, 1),
        }
        if on_task is not None:
            on_task(results)
    return results


def standard_error(correct: int, n: int) -> float:
    """Binomial standard error of an accuracy of ``correct`` out of ``n``."""
    if n == 0:
        return 0.0
    p = correct / n
    return (p * (1 - p) / n) ** 0.5
