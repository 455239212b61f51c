"""UMIM on vs off in one vLLM engine, beside stock bf16 vs fp32 (``vllm-umim fidelity``).

One fp32 engine with the rules serves every variant (``--variant NAME=JSON``, each sent as
``extra_args={"umim": JSON}``) and the unmerged reference; then, unless ``--no-bf16-line``, a
stock bf16 engine runs the same prompts and is compared with the fp32 unmerged continuations: the
perturbation users already accept. Engines run one after the other. Example::

    vllm-umim fidelity --rules artifacts/smollm2-135m/rules.bin \\
        --module artifacts/smollm2-135m/module.safetensors --json fidelity.json
"""

from __future__ import annotations

import gc
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from vllm_umim.errors import FidelityArgumentError
from vllm_umim.evaluation.fidelity import MAX_TOKENS
from vllm_umim.evaluation.fidelity_prompts import DEFAULT_PROMPTS_PER_KIND, KINDS
from vllm_umim.files import write_json_atomic

DEFAULT_VARIANTS = ('prompt="prompt"', 'dynamic="dynamic"')
EXAMPLES_PER_KIND = 3
MAX_MODEL_LEN = 1024


DEFAULT_MODEL = Path("~/.cache/vllm_umim/models/smollm2-135m").expanduser()


def _kinds(text: str) -> tuple[str, ...]:
    return tuple(k for k in text.split(",") if k)


@dataclass
class FidelityConfig:
    """What ``run_fidelity`` compares. Fields with a ``help`` are ``vllm-umim fidelity`` flags;
    ``variants`` and ``engine_options`` come from ``--variant`` / ``--engine-option NAME=JSON``."""

    rules: Path = field(metadata={"help": "rules file (or operating-point folder)"})
    model: str = field(default=str(DEFAULT_MODEL), metadata={"help": "HF model folder"})
    reference_model: str | None = field(default=None, metadata={
        "help": "the unmerged reference (and the bf16 line) from this model instead of --model: for an adapted reader "
                "merged into the weights (vllm-umim merge-reader), the base model it was trained against; adds the "
                "row 'raw (this model)': --model unmerged against the reference"})
    module: str | None = field(default=None, metadata={"help": "merge module file, or 'mean' (default: beside the rules)"})
    variants: dict = field(default_factory=lambda: dict(map(parse_assignment, DEFAULT_VARIANTS)))
    engine_options: dict = field(default_factory=dict)
    kinds: tuple[str, ...] | None = field(default=None, metadata={
        "type": _kinds, "help": f"comma-separated prompt kinds (default: {','.join(KINDS)}; 'chat' left out for a model "
                                "without a chat template)"})
    limit: int = field(default=DEFAULT_PROMPTS_PER_KIND, metadata={"help": "prompts per kind"})
    max_tokens: int = field(default=MAX_TOKENS, metadata={"help": "greedy tokens per continuation"})
    compile: bool = field(default=False, metadata={"help": "fp32 engine: keep vLLM's default torch.compile (default: eager)"})
    bf16_line: bool = field(default=True, metadata={"help": "skip the stock bf16 engine"})
    bf16_line_from: Path | None = field(default=None, metadata={"help": "reuse the bf16 line of an earlier --json output"})
    eager: bool = field(default=False, metadata={"help": "bf16 engine: enforce_eager (default: vLLM's defaults)"})
    json: Path | None = field(default=None, metadata={"help": "write all figures, per-prompt divergences and examples here"})


def parse_assignment(spec: str) -> tuple[str, object]:
    """``NAME=JSON`` -> (NAME, value); a value that is not valid JSON is kept as a string."""
    name, sep, raw = spec.partition("=")
    if not sep or not name.strip():
        raise FidelityArgumentError(f"expected NAME=JSON, got {spec!r}")
    try:
        return name.strip(), json.loads(raw)
    except json.JSONDecodeError:
        return name.strip(), raw


def run_fidelity(config: FidelityConfig) -> dict:
    """Prompts, the fp32 UMIM engine (all variants), the bf16 line; table on stdout, JSON if asked."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    from vllm_umim.data.model import load_tokenizer
    from vllm_umim.evaluation.fidelity_prompts import build_prompts, default_kinds, prompts_digest

    variants, engine_options = config.variants, config.engine_options
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    tokenizer = load_tokenizer(config.model)
    kinds = list(config.kinds) if config.kinds else default_kinds(tokenizer)
    prompts = {kind: build_prompts(kind, tokenizer, config.limit) for kind in kinds}
    seconds["prompts"] = time.perf_counter() - clock
    result = {
        "model": str(config.model), "rules": str(config.rules), "module": config.module, "max_tokens": config.max_tokens,
        "variants": variants, "engine_options": engine_options, "compile": config.compile,
        "prompts": {kind: {"count": len(ps), "digest": prompts_digest(ps), "sources": _count_sources(ps)} for kind, ps in prompts.items()},
    }
    token_prompts = {kind: [p.token_ids for p in ps] for kind, ps in prompts.items()}

    from vllm_umim.engine.config import files_used

    result["files"] = files_used(umim_options(config, engine_options))
    figures, continuations = _umim_stage(config, variants, engine_options, token_prompts, seconds)
    if config.reference_model:
        figures, continuations = _against_reference_model(config, token_prompts, continuations, seconds)
        result["reference_model"] = str(config.reference_model)
    result["figures"] = figures
    bf16_continuations = None
    if config.bf16_line_from:
        result["bf16"], result["bf16_from"] = _cached_bf16_line(config.bf16_line_from, result), str(config.bf16_line_from)
    elif config.bf16_line:
        result["bf16"], bf16_continuations = _bf16_stage(config, token_prompts, continuations["unmerged"], seconds)
    result["examples"] = _examples(tokenizer, prompts, continuations, bf16_continuations)
    result["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    print_table(result)
    if config.json:
        config.json.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(result, config.json, indent=1)
    return result


def umim_options(config: FidelityConfig, engine_options: dict) -> dict:
    """additional_config["umim"] of the fp32 engine."""
    return {"rules": str(config.rules), **({"module": config.module} if config.module else {}), **engine_options}


def _umim_stage(config: FidelityConfig, variants, engine_options, token_prompts, seconds):
    from vllm import LLM

    from vllm_umim.evaluation.fidelity import run_variants

    options = umim_options(config, engine_options)
    clock = time.perf_counter()
    llm = LLM(model=str(config.model), dtype="float32", enforce_eager=not config.compile, max_model_len=MAX_MODEL_LEN,
              seed=0, additional_config={"umim": options})
    seconds["fp32_engine_start"] = time.perf_counter() - clock
    try:
        clock = time.perf_counter()
        figures, continuations = run_variants(llm, token_prompts, variants, config.max_tokens)
        seconds["fp32_generate"] = time.perf_counter() - clock
    finally:
        _shutdown(llm)
    return figures, continuations


RAW_ROW = "raw (this model)"


def _stock_continuations(model, dtype: str, eager: bool, token_prompts, max_tokens: int, seconds, label: str) -> dict:
    """Unmerged greedy continuations of every kind from a stock engine (no UMIM) on ``model``;
    its start and generate seconds go to ``seconds`` under ``label``."""
    from vllm import LLM

    from vllm_umim.evaluation.fidelity import generate_continuations

    clock = time.perf_counter()
    llm = LLM(model=str(model), dtype=dtype, max_model_len=MAX_MODEL_LEN, seed=0, enforce_eager=eager)
    seconds[f"{label}_engine_start"] = time.perf_counter() - clock
    try:
        clock = time.perf_counter()
        continuations = {kind: generate_continuations(llm, prompts, None, max_tokens) for kind, prompts in token_prompts.items()}
        seconds[f"{label}_generate"] = time.perf_counter() - clock
    finally:
        _shutdown(llm)
    return continuations


def _against_reference_model(config: FidelityConfig, token_prompts, continuations, seconds):
    """Every continuation of the UMIM engine's model compared with the reference model's unmerged
    fp32 ones (which become ``continuations["unmerged"]``); ``RAW_ROW`` is the model's own unmerged
    continuations against them (an adapted reader's drift on text it does not merge)."""
    from vllm_umim.evaluation.fidelity import compare

    reference = _stock_continuations(config.reference_model, "float32", not config.compile, token_prompts, config.max_tokens,
                                     seconds, "reference")
    mine = {RAW_ROW: continuations["unmerged"], **{name: c for name, c in continuations.items() if name != "unmerged"}}
    figures = {name: {kind: compare(reference[kind], c[kind], config.max_tokens) for kind in token_prompts} for name, c in mine.items()}
    return figures, {**mine, "unmerged": reference}


def _bf16_stage(config: FidelityConfig, token_prompts, fp32_unmerged, seconds):
    from vllm_umim.evaluation.fidelity import compare

    continuations = _stock_continuations(config.reference_model or config.model, "bfloat16", config.eager, token_prompts,
                                         config.max_tokens, seconds, "bf16")
    figures = {kind: compare(fp32_unmerged[kind], continuations[kind], config.max_tokens) for kind in token_prompts}
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
    line_model = lambda r: r.get("reference_model") or r.get("model")  # noqa: E731 - the bf16 line's model
    if line_model(cached) != line_model(result):
        raise FidelityArgumentError(f"{path}: its bf16 line is of {line_model(cached)!r}, this run's of {line_model(result)!r}")
    if cached.get("max_tokens") != result["max_tokens"]:
        raise FidelityArgumentError(f"{path}: max_tokens {cached.get('max_tokens')!r} differs from this run's {result['max_tokens']!r}")
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
