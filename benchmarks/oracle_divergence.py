"""The ceiling of one frozen input position in the goals' own terms: greedy first divergence (issue 20 §1).

docs/ceiling.md measures the ceiling as KL and top-1 on fully merged windows. The goals are stated
as greedy first divergence from the unmerged fp32 path, so this script asks the question there: with
the fidelity suite's prompts merged as an operating point merges them (default: balanced, prompt-only
with a 16-token raw window), how far does the greedy path go when each merged span is fed

* ``module``: the merge module's surrogate (what the engine feeds, paper §3.2);
* ``oracle-prompt``: a free vector per occurrence, started from the module's and fitted (Adam)
  against the unmerged model on the prompt's own aligned rows (App. C) — the ceiling's variant (b)
  on this prompt: in sample for the prompt, out of sample for the continuation;
* ``oracle-path``: the same, fitted also on the 32 rows of the unmerged greedy continuation — in
  sample for exactly what is measured, so the loosest bound any frozen-model surrogate has.

All in HF fp32 on the frozen model, both paths decoded the same way (input embeddings, a KV
cache), so a divergence comes from the surrogates only. Per variant: mean first divergence over
32 tokens, the share equal for all 32, and the mean KL(unmerged || merged) along the unmerged path
(teacher forcing). Prompts without a merged span count as equal in every variant. Surrogates go in
as input embeddings unscaled, as in ``vllm_umim.evaluation.ceiling`` (SmolLM2; a model that scales
its embeddings, like Gemma, is not handled here).

    python -m benchmarks.oracle_divergence --rules artifacts/smollm2-135m/balanced/rules.bin \
        --module artifacts/smollm2-135m/balanced/module.safetensors --settings '{"mode": "prompt", "window": 16}' \
        --prompts 20 --max-steps 60 --json artifacts/smollm2-135m/ceiling/divergence-balanced.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vllm_umim.bench.tables import markdown_table
from vllm_umim.errors import OptionError
from vllm_umim.evaluation.ceiling import mean_kl, module_surrogates, oracle_batch, student_inputs, student_logprobs, teacher_logprobs
from vllm_umim.evaluation.fidelity import equal_share, first_divergence
from vllm_umim.evaluation.fidelity_prompts import build_prompts, prompts_digest
from vllm_umim.evaluation.paired import paired_difference
from vllm_umim.module.batches import Segmentation, collate
from vllm_umim.policies import MergeSettings

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts" / "smollm2-135m"
VARIANTS = ("module", "oracle-prompt", "oracle-path")
LABELS = {
    "module": "the merge module (the point's)",
    "oracle-prompt": "oracle, fitted on the prompt's rows",
    "oracle-path": "oracle, fitted on the prompt and the measured path (in sample)",
}


@dataclass(frozen=True)
class DivergenceSettings:
    """Tokens compared, and the oracle's fit (as the ceiling's: Adam from the module's surrogates,
    stopped after ``max_steps`` or when ``patience`` steps gain less than ``tol`` relative)."""

    max_tokens: int = 32
    lr: float = 3e-3
    max_steps: int = 60
    patience: int = 10
    tol: float = 0.01


def greedy(model, inputs_embeds: torch.Tensor, max_tokens: int) -> list[int]:
    """Greedy tokens after a prompt given as input embeddings [T, d] (no EOS stop: 32 tokens are compared)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        logits = model(inputs_embeds=inputs_embeds[None], past_key_values=cache, use_cache=True).logits[0, -1]
        tokens = [int(logits.argmax())]
        while len(tokens) < max_tokens:
            logits = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True).logits[0, -1]
            tokens.append(int(logits.argmax()))
    return tokens


def with_continuation(seg: Segmentation, continuation: list[int]) -> Segmentation:
    """The prompt's segmentation followed by ``continuation`` as plain tokens."""
    n = len(seg.tokens)
    return Segmentation(seg.tokens + continuation, seg.rule_ids + [-1] * len(continuation),
                        seg.starts + [n + i for i in range(len(continuation))], seg.ends + [n + i + 1 for i in range(len(continuation))])


def measure_prompt(model, module, policy, prompt: list[int], settings: DivergenceSettings) -> dict:
    """First divergence and path KL of each variant on one prompt."""
    n = settings.max_tokens
    raw = greedy(model, model.get_input_embeddings()(torch.tensor(prompt)).detach(), n)
    seg = policy.segment([prompt])[0]
    result = {"tokens": len(prompt), "elements": seg.num_elements, "merged": seg.num_merged}
    if seg.num_merged == 0:
        return {**result, **{v: {"first_divergence": n, "path_kl": 0.0} for v in VARIANTS}}
    prompt_batch = collate([seg])
    path_batch = collate([with_continuation(seg, raw[:-1])])  # its last rows predict raw[0] ... raw[-1]
    path_teacher = teacher_logprobs(model, path_batch)
    start = module_surrogates(model, prompt_batch, module)
    fit = dict(lr=settings.lr, max_steps=settings.max_steps, patience=settings.patience, tol=settings.tol)
    surrogates = {
        "module": start,
        "oracle-prompt": oracle_batch(model, prompt_batch, start, **fit)[0],
        "oracle-path": oracle_batch(model, path_batch, start, teacher=path_teacher, **fit)[0],
    }
    for variant, vectors in surrogates.items():
        with torch.no_grad():
            merged = greedy(model, student_inputs(model, prompt_batch, vectors)[0], n)
            kl = float(mean_kl(path_teacher[-n:], student_logprobs(model, path_batch, vectors)[-n:]))
        result[variant] = {"first_divergence": first_divergence(raw, merged), "path_kl": kl}
    return result


def summarize(per_prompt: list[dict], max_tokens: int) -> dict:
    out = {}
    for variant in VARIANTS:
        fd = [p[variant]["first_divergence"] for p in per_prompt]
        kl = [p[variant]["path_kl"] for p in per_prompt]
        out[variant] = {"first_divergence_mean": sum(fd) / len(fd), "equal_share": equal_share(fd, max_tokens),
                        "path_kl_mean": sum(kl) / len(kl), "first_divergence": fd}
    return out


def divergence_table(results: dict[str, dict]) -> str:
    """Markdown: one row per (operating point, variant) of ``results`` (point name -> this script's
    JSON); per prompt kind the prompts' TR, the mean first divergence, the first divergence paired
    against the module's on the same prompts (difference [95 % interval], normal approximation), the
    share equal for all tokens and the mean KL along the unmerged path."""
    first = next(iter(results.values()))
    kinds, n = list(first["kinds"]), first["max_tokens"]
    if any(list(r["kinds"]) != kinds or r["max_tokens"] != n for r in results.values()):
        raise ValueError("divergence results differ in prompt kinds or tokens compared")
    what = " / ".join(kinds)
    header = ["point (settings)", f"prompts ({what})", f"prompt TR % ({what})", "surrogate for each merged span",
              f"1st divergence ({what})", f"− module's, paired [95 %] ({what})", f"equal-{n} % ({what})",
              f"KL along the unmerged path ({what})"]
    rows = []
    for point, result in results.items():
        summaries = [result["kinds"][kind]["summary"] for kind in kinds]
        settings = ", ".join(f"{k} {v}" for k, v in result["settings"].items() if v)
        lead = [f"{point} ({settings})", " / ".join(str(result["kinds"][k]["prompts"]) for k in kinds),
                " / ".join(f"{100 * result['kinds'][k]['prompt_tr']:.1f}" for k in kinds)]  # on the point's first row
        for variant in VARIANTS:
            paired = "—" if variant == "module" else " / ".join(
                "{0.estimate:+.1f} [{0.low:+.1f}, {0.high:+.1f}]".format(
                    paired_difference(s[variant]["first_divergence"], s["module"]["first_divergence"])) for s in summaries)
            rows.append([*(lead if variant == VARIANTS[0] else [""] * len(lead)), LABELS[variant],
                         " / ".join(f"{s[variant]['first_divergence_mean']:.1f}" for s in summaries), paired,
                         " / ".join(f"{100 * s[variant]['equal_share']:.0f}" for s in summaries),
                         " / ".join(f"{s[variant]['path_kl_mean']:.3f}" for s in summaries)])
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="model name (vllm-umim fetch-model)")
    parser.add_argument("--rules", default=str(ARTIFACTS / "rules.bin"))
    parser.add_argument("--module", default=str(ARTIFACTS / "module.safetensors"))
    parser.add_argument("--settings", default='{"mode": "prompt", "window": 16}', help="merge settings (JSON object), as a request's extra_args umim")
    parser.add_argument("--kinds", default="wiki,gsm8k")
    parser.add_argument("--prompts", type=int, default=24, help="prompts per kind (the fidelity suite's first ones)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3, help="oracle Adam learning rate (as the ceiling's)")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--tol", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", required=True, help="result file (rewritten after each kind)")
    args = parser.parse_args(argv)
    try:
        settings = MergeSettings(**json.loads(args.settings))
    except (json.JSONDecodeError, TypeError, OptionError) as error:
        parser.error(f"--settings: {error}")
    torch.set_num_threads(args.threads)
    fit = DivergenceSettings(args.max_tokens, args.lr, args.max_steps, args.patience, args.tol)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_umim.data.model import fetch_model
    from vllm_umim.module import model_identity, resolve_module
    from vllm_umim.rules import load_rules

    model_dir = fetch_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().requires_grad_(False)
    rules = load_rules(args.rules)
    module, _ = resolve_module(args.module, model.config.hidden_size, model_identity(model.config), rules.tokenizer_fingerprint)
    policy = settings.build(rules)
    result = {"model": args.model, "rules": args.rules, "module": args.module, "settings": settings.as_options(),
              "max_tokens": fit.max_tokens, "oracle": {k: v for k, v in asdict(fit).items() if k != "max_tokens"},
              "kinds": {}}
    for kind in args.kinds.split(","):
        prompts = build_prompts(kind, tokenizer, args.prompts)
        began, per_prompt = time.time(), []
        for i, prompt in enumerate(prompts):
            per_prompt.append(measure_prompt(model, module, policy, prompt.token_ids, fit))
            print(kind, i, {v: per_prompt[-1][v]["first_divergence"] for v in VARIANTS}, flush=True)
        tokens = sum(p["tokens"] for p in per_prompt)
        result["kinds"][kind] = {"prompts": len(prompts), "prompts_digest": prompts_digest(prompts),
                                 "prompt_tr": 1 - sum(p["elements"] for p in per_prompt) / tokens,
                                 "seconds": round(time.time() - began, 1), "summary": summarize(per_prompt, fit.max_tokens),
                                 "per_prompt": per_prompt}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(divergence_table({Path(args.json).stem: result}))


if __name__ == "__main__":
    main()
