"""Alignment metrics, TR, two-stage PPL (and QA) of merge modules next to the untrained
mean-pooling baseline and the base model, on a held-out corpus (``vllm-umim eval``).

Example::

    OMP_NUM_THREADS=1 vllm-umim eval --model DIR --rules rules.bin --module module.safetensors \\
        --corpus heldout.txt --windows 64 --qa --limit 50 --json eval.json --threads 1
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

PAPER_TABLE1 = {  # paper Table 1, Llama-3.2-1.5B (the brief's "Llama-3.2-1B"), percentages
    "model": "Llama-3.2-1.5B (paper Table 1)", "tr": 37.8, "top1": 74.10, "top3": 74.14, "top10": 75.28,
    "topp": 91.55, "mrr": 83.30,
}
QA_TASKS = ("piqa", "arc_easy", "arc_challenge", "copa", "openbookqa")


def _tasks(text: str) -> tuple[str, ...]:
    return tuple(t for t in text.split(",") if t)


@dataclass
class EvalConfig:
    """What ``run_eval`` measures. Fields with a ``help`` are ``vllm-umim eval`` flags."""

    model: str = field(metadata={"help": "HF model folder"})
    rules: Path = field(metadata={"help": "rules file"})
    corpus: Path = field(metadata={"help": "held-out text, one document per line"})
    modules: list[str] = field(default_factory=list, metadata={
        "flags": ("--module",), "action": "append", "metavar": "PATH",
        "help": "merge module file (repeatable; NAME=PATH to name it); the 'mean' baseline is always added"})
    json: Path | None = field(default=None, metadata={"help": "write the results here"})
    windows: int = field(default=64, metadata={"help": "held-out windows for alignment/PPL"})
    seq_len: int = field(default=256, metadata={"help": "raw tokens per window"})
    seed: int = field(default=0, metadata={"help": "window shuffle seed"})
    ppl: bool = field(default=True, metadata={"help": "alignment only (skip pseudocode 5's skipped-token pass)"})
    tr_documents: int | None = field(default=None, metadata={"help": "documents for the corpus TR (default: all)"})
    qa: bool = field(default=False, metadata={"help": "also run multiple-choice QA (App. F.2)"})
    limit: int = field(default=50, metadata={"help": "QA items per task"})
    tasks: tuple[str, ...] = field(default=QA_TASKS, metadata={
        "type": _tasks, "help": f"comma-separated QA tasks (default: {','.join(QA_TASKS)})"})
    compare_rules: list[Path] = field(default_factory=list, metadata={
        "action": "append", "help": "extra rule sets for a threshold trade-off (TR + alignment with the mean baseline)"})
    compare_windows: int = field(default=32, metadata={"help": "windows for the --compare-rules trade-off"})
    threads: int = field(default=0, metadata={"help": "torch threads (0: torch default)"})
    progress: bool = field(default=True, metadata={"help": "no progress bars"})


def _load_modules(config: EvalConfig, hidden, identity, tok_fp):
    from vllm_umim.module.file_format import resolve_module

    modules, meta = {}, {}
    for spec in config.modules:
        name, _, path = spec.rpartition("=") if "=" in spec else ("trained" if spec != "mean" else "mean", "", spec)
        name = name or "trained"
        module, m = resolve_module(path, hidden, identity, tok_fp)
        modules[name], meta[name] = module.float().eval(), {"path": path, "training": m.get("training", {})}
    if "mean" not in modules:
        module, m = resolve_module("mean", hidden)
        modules["mean"], meta["mean"] = module.eval(), {"path": "mean", "training": m.get("training", {})}
    return modules, meta


def run_eval(config: EvalConfig) -> dict:
    """``vllm-umim eval``: held-out alignment metrics and two-stage PPL (App. C, pseudocode 5),
    then, when asked, the rule-set trade-off and QA (App. F.2). The JSON is rewritten after each
    stage, so a long run that is stopped keeps what it measured."""
    import time

    import torch

    from vllm_umim.module.frozen_model import load_frozen_model

    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    frozen = load_frozen_model(config.model, config.rules)
    modules, windows, result = heldout_stage(config, frozen)
    if config.compare_rules:
        rules_tradeoff_stage(config, frozen, modules, windows[: config.compare_windows], result)
    if config.qa:
        qa_stage(config, frozen, modules, result)
    result["seconds"] = round(time.perf_counter() - started, 1)
    _dump(config, result)
    return result


def heldout_stage(config: EvalConfig, frozen) -> tuple[dict, list, dict]:
    """Modules, corpus TR and the held-out window metrics: (modules, windows, result so far)."""
    from vllm_umim.evaluation.suite import evaluate_windows
    from vllm_umim.evaluation.token_reduction import corpus_token_reduction
    from vllm_umim.module.batches import corpus_windows
    from vllm_umim.module.file_format import model_identity
    from vllm_umim.rules.ruleset import tokenizer_fingerprint

    model, tok, rules = frozen.model, frozen.tokenizer, frozen.rules
    identity = model_identity(model.config)
    modules, module_meta = _load_modules(config, model.config.hidden_size, identity, tokenizer_fingerprint(tok))
    windows, _ = corpus_windows(config.corpus, tok, config.seq_len, config.windows * config.seq_len, 0, config.seed)
    result = {
        "model": identity,
        "rules": {"path": str(config.rules), "fingerprint": rules.fingerprint, "count": len(rules), "threshold": rules.threshold},
        "corpus": str(config.corpus),
        "modules": module_meta,
        "corpus_tr": corpus_token_reduction(rules, tok, config.corpus, config.tr_documents),
        "paper_table1": PAPER_TABLE1,
    }
    print(f"corpus TR {100 * result['corpus_tr']['tr']:.2f} % over {result['corpus_tr']['documents']} documents", flush=True)
    result["heldout"] = evaluate_windows(model, modules, rules, windows, ppl=config.ppl, progress=config.progress)
    _dump(config, result)
    print_table(result)
    return modules, windows, result


def rules_tradeoff_stage(config: EvalConfig, frozen, modules, windows, result) -> None:
    """Top-1 / MRR / TR of the same modules under other rule sets (``--compare-rules``)."""
    import json

    from vllm_umim.evaluation.suite import evaluate_windows
    from vllm_umim.evaluation.token_reduction import corpus_token_reduction
    from vllm_umim.rules import load_rules

    model, tok = frozen.model, frozen.tokenizer
    result["tradeoff"] = []
    for path in [config.rules, *config.compare_rules]:
        r = load_rules(path)
        r.check_tokenizer(tok)
        mods = {"mean": modules["mean"]}
        if path == config.rules:
            mods.update({k: v for k, v in modules.items() if k != "mean"})
        ev = evaluate_windows(model, mods, r, windows, ppl=False, progress=config.progress)
        row = {"rules": str(path), "count": len(r), "threshold": r.threshold,
               "filtered": bool(r.meta.get("filter_overlaps", r.meta.get("filtered", None))),
               "tr_windows": ev["tr"], "corpus_tr": corpus_token_reduction(r, tok, config.corpus, config.tr_documents)["tr"],
               "top1": {k: v["top1"] for k, v in ev["modules"].items()}, "mrr": {k: v["mrr"] for k, v in ev["modules"].items()},
               "meta": {k: v for k, v in r.meta.items() if isinstance(v, (int, float, str, bool))}}
        result["tradeoff"].append(row)
        print(json.dumps(row), flush=True)
        _dump(config, result)


def qa_stage(config: EvalConfig, frozen, modules, result) -> None:
    """Downstream QA accuracy (App. F.2), base model beside each module."""
    from vllm_umim.evaluation.qa import evaluate_qa

    result["qa_limit_per_task"] = config.limit
    result["qa"] = evaluate_qa(frozen.model, frozen.tokenizer, frozen.rules, modules, list(config.tasks), config.limit,
                               config.progress, on_task=lambda partial: (result.update(qa=partial), _dump(config, result)))
    for task, r in result["qa"].items():
        accs = "  ".join(f"{k} {100 * v:.1f} ± {100 * r['stderr'][k]:.1f}" for k, v in r["accuracy"].items())
        print(f"{task:14s} n={r['n']:4d}  TR {100 * r['tr']:.1f} %  {accs}", flush=True)


def _dump(config: EvalConfig, result) -> None:
    from vllm_umim.files import write_json_atomic

    if config.json:
        config.json.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(result, config.json)


def print_table(result: dict) -> None:
    h = result["heldout"]
    print(f"\nheld-out: {h['windows']} windows, {h['raw_tokens']} tokens, TR {100 * h['tr']:.2f} %; "
          f"base PPL {h['base_ppl'] if h['base_ppl'] is None else round(h['base_ppl'], 3)}")
    print(f"{'module':34s} {'TR':>6s} {'Top-1':>6s} {'Top-3':>6s} {'Top-10':>6s} {'Top-p':>6s} {'MRR':>6s} {'PPL':>8s}")
    for name, m in h["modules"].items():
        ppl = "-" if m["ppl"] is None else f"{m['ppl']:.3f}"
        print(f"{name:34s} {100 * h['tr']:6.1f} {100 * m['top1']:6.2f} {100 * m['top3']:6.2f} {100 * m['top10']:6.2f} "
              f"{100 * m['topp']:6.2f} {100 * m['mrr']:6.2f} {ppl:>8s}")
    p = result["paper_table1"]
    print(f"{p['model']:34s} {p['tr']:6.1f} {p['top1']:6.2f} {p['top3']:6.2f} {p['top10']:6.2f} {p['topp']:6.2f} {p['mrr']:6.2f} {'-':>8s}")
