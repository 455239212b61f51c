"""``vllm-umim fidelity``: UMIM on vs off in one vLLM engine, beside stock bf16 vs fp32 (issue 13).

One fp32 engine with the rules serves every variant (``--variant NAME=JSON``, each sent as
``extra_args={"umim": JSON}``) and the unmerged reference; then, unless ``--no-bf16-line``, a
stock bf16 engine runs the same prompts and is compared with the fp32 unmerged continuations: the
perturbation users already accept. Engines run one after the other. Example::

    vllm-umim fidelity --rules artifacts/smollm2-135m/rules.bin \\
        --module artifacts/smollm2-135m/module.safetensors --json fidelity.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

from vllm_umim.errors import UmimError

DEFAULT_VARIANTS = ('prompt="prompt"', 'dynamic="dynamic"')
EXAMPLES_PER_KIND = 3
MAX_MODEL_LEN = 1024


class FidelityArgumentError(UmimError):
    """A ``--variant`` / ``--engine-option`` that is not ``NAME=JSON``, or an unusable cached bf16 line."""


def add_fidelity_arguments(p: argparse.ArgumentParser) -> None:
    from vllm_umim.evaluation.fidelity import MAX_TOKENS
    from vllm_umim.evaluation.fidelity_prompts import DEFAULT_PROMPTS_PER_KIND, KINDS

    p.add_argument("--model", default=str(Path("~/.cache/vllm_umim/models/smollm2-135m").expanduser()))
    p.add_argument("--rules", required=True, type=Path)
    p.add_argument("--module", default=None, help="merge module file, or 'mean' (default: beside the rules)")
    p.add_argument("--variant", action="append", default=None, metavar="NAME=JSON",
                   help='per-request UMIM setting sent as extra_args={"umim": JSON} (repeatable; default: '
                        + " ".join(DEFAULT_VARIANTS) + "); a value that is not JSON is taken as a string")
    p.add_argument("--engine-option", action="append", default=[], metavar="KEY=JSON",
                   help='merged into additional_config["umim"] of the fp32 engine (repeatable)')
    p.add_argument("--kinds", default=None,
                   help=f"comma-separated prompt kinds (default: {','.join(KINDS)}; 'chat' left out for a model without a chat template)")
    p.add_argument("--limit", type=int, default=DEFAULT_PROMPTS_PER_KIND, help="prompts per kind")
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    p.add_argument("--compile", action="store_true", help="fp32 engine: keep vLLM's default torch.compile (default: eager)")
    p.add_argument("--no-bf16-line", action="store_true", help="skip the stock bf16 engine")
    p.add_argument("--bf16-line-from", type=Path, default=None, help="reuse the bf16 line of an earlier --json output")
    p.add_argument("--eager", action="store_true", help="bf16 engine: enforce_eager (default: vLLM's defaults)")
    p.add_argument("--json", type=Path, default=None, help="write all figures, per-prompt divergences and examples here")


def parse_assignment(spec: str) -> tuple[str, object]:
    """``NAME=JSON`` -> (NAME, value); a value that is not valid JSON is kept as a string."""
    name, sep, raw = spec.partition("=")
    if not sep or not name.strip():
        raise FidelityArgumentError(f"expected NAME=JSON, got {spec!r}")
    try:
        return name.strip(), json.loads(raw)
    except json.JSONDecodeError:
        return name.strip(), raw


def run_fidelity(args) -> dict:
    """Prompts, the fp32 UMIM engine (all variants), the bf16 line; table on stdout, JSON if asked."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    from transformers import AutoTokenizer

    from vllm_umim.evaluation.fidelity_prompts import build_prompts, default_kinds, prompts_digest

    variants = dict(parse_assignment(s) for s in (args.variant or DEFAULT_VARIANTS))
    engine_options = dict(parse_assignment(s) for s in args.engine_option)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    kinds = args.kinds.split(",") if args.kinds else default_kinds(tokenizer)
    prompts = {kind: build_prompts(kind, tokenizer, args.limit) for kind in kinds}
    seconds["prompts"] = time.perf_counter() - clock
    result = {
        "model": str(args.model), "rules": str(args.rules), "module": args.module, "max_tokens": args.max_tokens,
        "variants": variants, "engine_options": engine_options, "compile": args.compile,
        "prompts": {kind: {"count": len(ps), "digest": prompts_digest(ps), "sources": _count_sources(ps)} for kind, ps in prompts.items()},
    }
    token_prompts = {kind: [p.token_ids for p in ps] for kind, ps in prompts.items()}

    from vllm_umim.engine.config import files_used

    result["files"] = files_used(umim_options(args, engine_options))
    figures, continuations = _umim_stage(args, variants, engine_options, token_prompts, seconds)
    result["figures"] = figures
    bf16_continuations = None
    if args.bf16_line_from:
        result["bf16"], result["bf16_from"] = _cached_bf16_line(args.bf16_line_from, result), str(args.bf16_line_from)
    elif not args.no_bf16_line:
        result["bf16"], bf16_continuations = _bf16_stage(args, token_prompts, continuations["unmerged"], seconds)
    result["examples"] = _examples(tokenizer, prompts, continuations, bf16_continuations)
    result["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


def umim_options(args, engine_options: dict) -> dict:
    """additional_config["umim"] of the fp32 engine."""
    return {"rules": str(args.rules), **({"module": args.module} if args.module else {}), **engine_options}


def _umim_stage(args, variants, engine_options, token_prompts, seconds):
    from vllm import LLM

    from vllm_umim.evaluation.fidelity import run_variants

    options = umim_options(args, engine_options)
    clock = time.perf_counter()
    llm = LLM(model=str(args.model), dtype="float32", enforce_eager=not args.compile, max_model_len=MAX_MODEL_LEN,
              seed=0, additional_config={"umim": options})
    seconds["fp32_engine_start"] = time.perf_counter() - clock
    try:
        clock = time.perf_counter()
        figures, continuations = run_variants(llm, token_prompts, variants, args.max_tokens)
        seconds["fp32_generate"] = time.perf_counter() - clock
    finally:
        _shutdown(llm)
    return figures, continuations


def _bf16_stage(args, token_prompts, fp32_unmerged, seconds):
    from vllm import LLM

    from vllm_umim.evaluation.fidelity import compare, generate_continuations

    clock = time.perf_counter()
    llm = LLM(model=str(args.model), dtype="bfloat16", max_model_len=MAX_MODEL_LEN, seed=0, enforce_eager=args.eager)
    seconds["bf16_engine_start"] = time.perf_counter() - clock
    try:
        clock = time.perf_counter()
        continuations = {kind: generate_continuations(llm, prompts, None, args.max_tokens) for kind, prompts in token_prompts.items()}
        seconds["bf16_generate"] = time.perf_counter() - clock
    finally:
        _shutdown(llm)
    figures = {kind: compare(fp32_unmerged[kind], continuations[kind], args.max_tokens) for kind in token_prompts}
    return figures, continuations


def _cached_bf16_line(path: Path, result: dict) -> dict:
    """The bf16 figures of an earlier run, if it used the same model, length and prompts (the bf16
    line does not depend on the rules)."""
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FidelityArgumentError(f"{path}: not a readable fidelity JSON ({e})") from e
    if "bf16" not in cached:
        raise FidelityArgumentError(f"{path}: has no bf16 line")
    for key in ("model", "max_tokens"):
        if cached.get(key) != result[key]:
            raise FidelityArgumentError(f"{path}: {key} {cached.get(key)!r} differs from this run's {result[key]!r}")
    for kind, info in result["prompts"].items():
        if cached.get("prompts", {}).get(kind, {}).get("digest") != info["digest"] or kind not in cached["bf16"]:
            raise FidelityArgumentError(f"{path}: its {kind!r} prompts differ from this run's (other --limit or data)")
    return {kind: cached["bf16"][kind] for kind in result["prompts"]}


def _shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def _count_sources(prompts) -> dict[str, int]:
    counts: dict[str, int] = {}
    for p in prompts:
        counts[p.source] = counts.get(p.source, 0) + 1
    return counts


def _examples(tokenizer, prompts, continuations, bf16_continuations) -> dict:
    examples = {}
    for kind, ps in prompts.items():
        examples[kind] = []
        for i, p in enumerate(ps[:EXAMPLES_PER_KIND]):
            texts = {name: tokenizer.decode(c[kind][i].token_ids) for name, c in continuations.items()}
            if bf16_continuations is not None:
                texts["bf16 (stock)"] = tokenizer.decode(bf16_continuations[kind][i].token_ids)
            examples[kind].append({"prompt": p.text, "continuations": texts})
    return examples


def print_table(result: dict) -> None:
    """Rows: variant x kind, then the bf16 line; TR in %, first divergence in tokens, KL in nats."""
    n = result["max_tokens"]
    header = f"{'variant':14s} {'kind':6s} {'n':>4s} {'TR prompt':>9s} {'TR all':>7s} {'dec.merges':>10s} " \
             f"{'1st div mean':>12s} {'median':>6s} {f'equal-{n}':>8s} {'KL':>8s}"
    print(header)
    print("-" * len(header))
    rows = [(name, kinds) for name, kinds in result["figures"].items()]
    if "bf16" in result:
        rows.append(("bf16 (stock)", result["bf16"]))
    for name, kinds in rows:
        for kind, f in kinds.items():
            tr_prompt = "-" if f["prompt_tr"] is None else f"{100 * f['prompt_tr']:.1f} %"
            tr_all = "-" if f["overall_tr"] is None else f"{100 * f['overall_tr']:.1f} %"
            merges = "-" if f["decode_merges"] is None else str(f["decode_merges"])
            kl = "-" if f["kl_mean"] is None else f"{f['kl_mean']:.4f}"
            print(f"{name:14s} {kind:6s} {f['prompts']:4d} {tr_prompt:>9s} {tr_all:>7s} {merges:>10s} "
                  f"{f['first_divergence_mean']:12.1f} {f['first_divergence_median']:6.1f} {100 * f['equal_share']:7.0f}% {kl:>8s}")
    if result.get("seconds"):
        print("seconds: " + ", ".join(f"{k} {v}" for k, v in result["seconds"].items()))
