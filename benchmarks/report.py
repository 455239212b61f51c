"""``docs/results.md`` from the committed JSON: operating points, throughput, fidelity and the
frontier, per-model alignment, training time.

    python -m benchmarks.report            # rewrite docs/results.md, its two plots, README's block
    python -m benchmarks.report --check    # exit 1 if any of those texts is not what the JSON gives

Reads ``artifacts/<model>/`` (``operating-points.json``, ``fidelity.json``, ``fidelity/*.json``,
``eval.json``) and ``benchmarks/results/`` (``*/throughput.json``, ``vllm-bench/summary.json``,
``compose/rows.json``, ``training-profile.json``, ``soak.json``); nothing is measured here. Every table goes
through ``vllm_umim.bench.tables.markdown_table``. Where README.md holds the markers
``<!-- operating-points:start -->`` and ``<!-- operating-points:end -->``, the three-row
operating-points table (:func:`operating_points_summary`) is written between them; between
``<!-- which-to-turn-on:start -->`` and ``<!-- which-to-turn-on:end -->``, the "which to turn on"
table of ``compose/rows.json`` (:func:`which_to_turn_on`); in docs/ceiling.md, the trained readers'
table (:func:`readers_table`, from ``artifacts/<model>/readers/readers.json``) between
``<!-- readers:start -->`` and ``<!-- readers:end -->``, and their task accuracy (lm-eval's table of
``artifacts/<model>/readers/lm-eval/results.json``) between ``<!-- reader-lm-eval:start -->`` and
``<!-- reader-lm-eval:end -->``; its greedy fidelity against the base model
(:func:`reader_fidelity_table`, from ``readers/fidelity-<reader>.json``) between ``<!-- reader-fidelity:start -->`` and ``<!-- reader-fidelity:end -->``;
the first divergence with the best vector per merged span (``benchmarks.oracle_divergence.divergence_table``,
from ``artifacts/<model>/ceiling/divergence-<point>.json``) between ``<!-- oracle-divergence:start -->`` and
``<!-- oracle-divergence:end -->``; the modules that read the model's state (``benchmarks.state_reader.state_reader_table``,
from ``artifacts/<model>/ceiling/state-reader-*.json``) between ``<!-- state-reader:start -->`` and
``<!-- state-reader:end -->``.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

from benchmarks import frontier
from vllm_umim.bench.rows import ROWS_HEADER, row_cells
from vllm_umim.bench.summary import THROUGHPUT_HEADER, engine_arguments, plot as plot_throughput, throughput_row
from vllm_umim.bench.tables import kinds_of, markdown_table, per_kind, percent, ratio_cell
from vllm_umim.bench.workloads import SCENARIOS

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "results.md"
README = ROOT / "README.md"
POINTS_MODEL = "smollm2-135m"  # the model whose operating points ship
COMMAND = "python -m benchmarks.report"
MARKERS = ("<!-- operating-points:start -->", "<!-- operating-points:end -->")
WHICH_MARKERS = ("<!-- which-to-turn-on:start -->", "<!-- which-to-turn-on:end -->")
COMPOSE = RESULTS / "compose" / "rows.json"
CEILING_PAGE = ROOT / "docs" / "ceiling.md"
READERS = ARTIFACTS / POINTS_MODEL / "readers" / "readers.json"
READERS_MARKERS = ("<!-- readers:start -->", "<!-- readers:end -->")
LM_EVAL = ARTIFACTS / POINTS_MODEL / "lm-eval" / "results.json"
READERS_LM_EVAL = ARTIFACTS / POINTS_MODEL / "readers" / "lm-eval" / "results.json"
READERS_LM_EVAL_MARKERS = ("<!-- reader-lm-eval:start -->", "<!-- reader-lm-eval:end -->")
READER_FIDELITY = ARTIFACTS / POINTS_MODEL / "readers"  # fidelity-<reader>.json
READER_FIDELITY_MARKERS = ("<!-- reader-fidelity:start -->", "<!-- reader-fidelity:end -->")
READER_KL_MARKERS = ("<!-- reader-fidelity-kl:start -->", "<!-- reader-fidelity-kl:end -->")
DIVERGENCE = ARTIFACTS / POINTS_MODEL / "ceiling"  # divergence-<point>.json: benchmarks/oracle_divergence.py
DIVERGENCE_MARKERS = ("<!-- oracle-divergence:start -->", "<!-- oracle-divergence:end -->")
STATE_READER_MARKERS = ("<!-- state-reader:start -->", "<!-- state-reader:end -->")  # state-reader-*.json: benchmarks/state_reader.py


def load(path: Path) -> dict | list:
    return json.loads(path.read_text())


def relative(path: str | Path) -> str:
    """A recorded path from its ``artifacts/`` or ``benchmarks/`` folder on (runs record absolute paths
    of the checkout they ran in)."""
    if Path(path).is_relative_to(ROOT):
        return str(Path(path).relative_to(ROOT))
    text = str(path)
    for folder in ("artifacts/", "benchmarks/"):
        if folder in text:
            return text[text.index(folder):]
    return text


FIDELITY_FORMATS = {"overall_tr": percent, "first_divergence_mean": "{:.1f}".format, "first_divergence_median": "{:g}".format,
                    "equal_share": percent, "kl_mean": "{:.4f}".format}


def fidelity_cells(figures: dict, keys: tuple[str, ...]) -> list[str]:
    """``vllm-umim fidelity`` figures, one "wiki / chat / gsm8k" cell per key."""
    return [per_kind(figures, key, FIDELITY_FORMATS[key]) for key in keys]


# Operating points ---------------------------------------------------------------------------------

def settings_text(settings: dict) -> str:
    """``prompt, window 48`` from an operating point's merge settings."""
    return (settings.get("mode", "dynamic") + (f", window {settings['window']}" if settings.get("window") else "")
            + (f", confidence ≥ {settings['min_confidence']:g}" if settings.get("min_confidence") else ""))


def bench_cell(point: dict, scenario: str, goal: bool = False) -> str:
    run = point["bench"].get(scenario)
    if run is None:
        return "–"
    cell = f"{ratio_cell(run['ratio'])}, TR {percent(run['tr'])} %"
    return cell + (f" (goal {0.95 / (1 - run['tr']):.2f})" if goal else "")


def task_accuracy(results: dict | None, system: str) -> dict | None:
    """A system's lm-eval accuracy against stock fp32 over the tasks it ran (``vllm-umim lm-eval``'s
    results.json): the mean of the per-task paired differences, the worst task's difference with
    its interval, the tasks whose interval lies wholly below zero, the items."""
    rows = [(row["task"], row["systems"][system]["paired_vs_reference"]) for row in (results or {}).get("tasks", [])
            if "paired_vs_reference" in row["systems"].get(system, {})]
    if not rows:
        return None
    worst_task, worst = min(rows, key=lambda r: r[1]["estimate"])
    return {"tasks": len(rows), "items": sum(d["n"] for _, d in rows), "mean": sum(d["estimate"] for _, d in rows) / len(rows),
            "worst_task": worst_task, "worst": worst, "below": [t for t, d in rows if d["high"] < 0]}


def accuracy_cell(figures: dict | None) -> str:
    if figures is None:
        return "–"
    w = figures["worst"]
    below = f"; below stock: {', '.join(figures['below'])}" if figures["below"] else ""
    return (f"{100 * figures['mean']:+.1f} ({figures['tasks']} tasks, {figures['items']:,} items; worst {figures['worst_task']} "
            f"{100 * w['estimate']:+.1f} [{100 * w['low']:+.1f}, {100 * w['high']:+.1f}]{below})")


def operating_points_summary(path: Path = ARTIFACTS / POINTS_MODEL / "operating-points.json") -> str:
    """The three shipped operating points in one small table (README and the top of the results
    page): held-out TR, greedy agreement with unmerged output, throughput against stock vLLM."""
    data = load(path)
    accuracy = load(LM_EVAL) if LM_EVAL.is_file() else None
    rows = [[f"**{p['name']}**", settings_text(p["settings"]), f"{percent(p['heldout_tr']['tr'], 1)} %",
             per_kind(p["fidelity"], "first_divergence_mean", "{:.1f}".format) if p["fidelity"] else "–",
             accuracy_cell(task_accuracy(accuracy, p["name"])),
             bench_cell(p, "prefill-heavy"), bench_cell(p, "decode-heavy")] for p in data["points"]]
    table = markdown_table(["point", "merging", "token reduction (held-out wiki)", "first divergence (wiki / chat / gsm8k)",
                            "task accuracy − stock fp32, points", "UMIM / stock tok/s, prefill-heavy",
                            "UMIM / stock tok/s, decode-heavy"], rows)
    bf16 = data.get("bf16")
    bf16_accuracy = task_accuracy(accuracy, "stock-bf16")
    caption = ("First divergence: mean index of the first of 32 greedy tokens that differs from unmerged output"
               + (f" (stock vLLM in bf16 against fp32: {per_kind(bf16, 'first_divergence_mean', '{:.1f}'.format)})" if bf16 else "")
               + ". Task accuracy: `vllm-umim lm-eval`, mean over tasks of the paired difference to stock vLLM in fp32 on "
               "the same items, and the worst task with its 95 % interval"
               + (f" (stock vLLM in bf16: {accuracy_cell(bf16_accuracy)})" if bf16_accuracy else "")
               + ". Throughput: raw tokens/s against stock vLLM, median [min–max] (repetitions), and the run's token reduction.")
    return table + "\n\n" + caption


def operating_points_table(data: dict) -> str:
    """Every figure measured for each operating point (the JSON of ``python -m benchmarks.operating_points``)."""
    measured = ("first_divergence_mean", "equal_share", "kl_mean")
    rows = []
    for p in data["points"]:
        ppl, qa = p["ppl"], p["qa"]
        rows.append([f"**{p['name']}**", settings_text(p["settings"]), f"{p['rules_count']:,}", f"{percent(p['heldout_tr']['tr'], 1)} %",
                     *(fidelity_cells(p["fidelity"], ("overall_tr", *measured)) if p["fidelity"] else ["–"] * 4),
                     f"{ppl['ppl']:.1f} (+{percent(ppl['ppl'] / ppl['base_ppl'] - 1)} %)" if ppl else "–",
                     f"{percent(qa['merged'], 1)} vs {percent(qa['base'], 1)} ({qa['items_per_task']}/task)" if qa else "–",
                     bench_cell(p, "prefill-heavy", goal=True), bench_cell(p, "decode-heavy")])
    if data.get("bf16"):
        f = data["bf16"]
        rows.append(["stock bf16 vs fp32", "(no merging)", "–", "–", "–", *fidelity_cells(f, measured), "–", "–", "–", "–"])
    return markdown_table(["point", "settings", "rules", "TR held-out wiki", "TR % prompt+output (wiki / chat / gsm8k)",
                           "1st divergence mean", "equal-32 %", "KL", "two-stage PPL", "QA mean, merged vs base",
                           "prefill-heavy UMIM / stock (goal 0.95/(1−TR))", "decode-heavy UMIM / stock"], rows)


def operating_points_section() -> list[str]:
    path = ARTIFACTS / POINTS_MODEL / "operating-points.json"
    return [
        f"## Operating points ({POINTS_MODEL})", "",
        "An operating point is a folder (`rules.bin`, `module.safetensors`, `merge.json`) passed where a rules "
        f"file goes: `--umim-rules artifacts/{POINTS_MODEL}/balanced`. All three share the shipped rules and "
        "module and differ in merge settings only.", "",
        operating_points_summary(path), "",
        "Every figure measured for each point:", "",
        operating_points_table(load(path)), "",
        "TR held-out wiki: held-out Wikipedia documents, each merged as a prompt with the point's settings. "
        "Fidelity columns: `vllm-umim fidelity` (fp32 engine, greedy, 32 tokens; each cell wiki / chat / gsm8k). "
        "Two-stage PPL and QA belong to the rules and module merged prompt-side without a window: an upper bound "
        "on the harm of the windowed points. Throughput: `vllm-umim bench --umim-rules "
        f"artifacts/{POINTS_MODEL}/POINT --scenario prefill-heavy decode-heavy`. Source: "
        f"`artifacts/{POINTS_MODEL}/operating-points.json`, written by `python -m benchmarks.operating_points` "
        "([benchmarks/README.md](../benchmarks/README.md)).",
    ]


# Throughput ---------------------------------------------------------------------------------------

def throughput_runs() -> list[tuple[str, dict]]:
    return [(relative(path.parent), load(path)) for path in sorted(RESULTS.glob("*/throughput.json"))]


def shipped_defaults(report: dict) -> bool:
    """A run of the shipped rules and module in the default merge settings (dynamic, no window)."""
    umim = report["umim"]
    return set(umim) == {"rules"} and relative(umim["rules"]) == f"artifacts/{POINTS_MODEL}/rules.bin"


def best_runs(runs: list[tuple[str, dict]]) -> list[tuple[str, dict, dict]]:
    """Of ``(label, throughput.json)`` runs, per scenario the one with the most repetitions, then the
    latest: ``(label, its report, the scenario's summary)`` in the order of ``SCENARIOS``."""
    best = {}
    for label, report in runs:
        for s in report["scenarios"]:
            key = (s["tokens_per_s_ratio"]["n"], report["when"])
            if s["name"] not in best or key > best[s["name"]][0]:
                best[s["name"]] = (key, (label, report, s))
    return [best[name][1] for name in SCENARIOS if name in best]


def options_text(umim: dict) -> str:
    shown = {k: v for k, v in umim.items() if k != "rules"}
    return ", ".join(f"{k}={v}" for k, v in shown.items()) or "defaults"


def load_text(report: dict) -> str:
    """1-minute load average at the start and end of a run (runs before it was recorded: end only)."""
    start = report.get("load_average_start")
    return (f"{start[0]:.1f} → " if start else "") + f"{report['load_average_1_5_15'][0]:.1f}"


def machine_text(reports: list[dict]) -> str:
    """The engine arguments and CPU count of the runs shown (each distinct value once)."""
    arguments = sorted({engine_arguments(r) for r in reports})
    cpus = sorted({r["cpu_count"] for r in reports})
    return f"Both engines: vLLM's defaults except {' / '.join(arguments)}; {' / '.join(map(str, cpus))} CPU cores."


def throughput_section(plot_to: Path | None) -> list[str]:
    runs = throughput_runs()
    best = best_runs([run for run in runs if shipped_defaults(run[1])])
    if plot_to:
        plot_throughput({"scenarios": [s for _, _, s in best]}, plot_to)
    every = [[folder, relative(report["umim"]["rules"]), options_text(report["umim"]), s["name"], ratio_cell(s["tokens_per_s_ratio"]),
              f"{percent(s['token_reduction'], 1)} %", load_text(report)] for folder, report in runs for s in report["scenarios"]]
    lines = [
        "## Throughput against stock vLLM", "",
        "`vllm-umim bench` works like `vllm bench throughput` (vLLM's engine arguments, `ignore_eos`, fixed output "
        "length, all requests at once, tokens/s of raw tokens delivered) on held-out Wikipedia and GSM8K text. Both "
        "engines run in vLLM's defaults, each in its own process with the same engine arguments, alternating which "
        "goes first; ratios are UMIM / stock per repetition, median [min–max] (repetitions). *decode-heavy* and "
        "*decode-long* cap the KV cache so stock vLLM is memory-bound; *no-merge* gives UMIM rules that never match "
        "(the cost of looking). Repetitions spread by several percent on a small CPU (each ratio's min–max): a "
        "median within that spread of 1 is not resolved, whatever the goal column says.", "",
        "Shipped rules and module, default merge settings (dynamic, no window); per scenario the run with the most "
        f"repetitions. {machine_text([report for _, report, _ in best])}", "",
        markdown_table([*THROUGHPUT_HEADER, "run"], [[*throughput_row(s), f"`{folder}`"] for folder, _, s in best]), "",
        "![throughput ratio and KV saved / preemptions avoided against token reduction](../benchmarks/results/throughput.png)", "",
        "Every committed run (the load average shows what else ran on the machine):", "",
        markdown_table(["run", "rules", "UMIM options", "scenario", "UMIM / stock tok/s", "TR", "load average, start → end"], every),
    ]
    pair = RESULTS / "vllm-bench" / "summary.json"
    if pair.is_file():
        lines += ["", *vllm_bench_section(load(pair))]
    return lines


def vllm_bench_section(summary: dict) -> list[str]:
    runs = summary["runs"]
    rows = [[i, f"{stock['tokens_per_second']:.0f}", f"{umim['tokens_per_second']:.0f}", f"{ratio:.3f}"]
            for i, (stock, umim, ratio) in enumerate(zip(runs["stock"], runs["umim"], summary["ratios"]["tokens_per_second"]))]
    return [
        "### vLLM's own `vllm bench throughput`", "",
        f"The same command with and without `--umim-rules` (shipped rules), {runs['stock'][0]['num_requests']} requests of "
        "held-out Wikipedia and GSM8K text in a ShareGPT-format file, vLLM's defaults, alternating which goes first "
        f"(`vllm-umim bench-pair --rounds {len(rows)}`; `benchmarks/results/vllm-bench/`):", "",
        markdown_table(["round", "stock tok/s", "UMIM tok/s", "UMIM / stock"], rows),
    ]


# Beside vLLM's own ways to go faster --------------------------------------------------------------

def rows_by_name(report: dict) -> dict[str, dict[str, dict]]:
    """``{row: {scenario: its summary}}`` of a ``vllm-umim bench --rows`` report, rows in run order."""
    table: dict[str, dict[str, dict]] = {}
    for sc in report["scenarios"]:
        for s in sc["rows"]:
            table.setdefault(s["row"], {})[sc["scenario"]["name"]] = s
    return table


def load_note(report: dict) -> str:
    """", the <scenario> run on a machine shared with other work (...)" naming each scenario whose
    1-minute load average was above the CPU count at its start (before its engines ran) or above
    twice it at its end (its own engines, stock and the row side by side, load it by up to the CPU
    count), else nothing."""
    cpus = report["cpu_count"]
    loaded = []
    for sc in report["scenarios"]:
        start, end = (sc.get(key) or [0.0] for key in ("load_average_start", "load_average_1_5_15"))
        if start[0] > cpus or end[0] > 2 * cpus:
            loaded.append((sc["scenario"]["name"], max(start[0], end[0])))
    if not loaded:
        return ""
    names = " and ".join(f"*{name}*" for name, _ in loaded)
    return (f", the {names} run{'s' if len(loaded) > 1 else ''} on a machine shared with other work (1-minute load average "
            f"up to {max(load for _, load in loaded):.1f}: the ranges are wide)")


def which_to_turn_on(path: Path = COMPOSE) -> str:
    """README's short table: each row's speed against stock per scenario, and its fidelity."""
    report = load(path)
    names = [sc["scenario"]["name"] for sc in report["scenarios"]]
    cells = lambda s: f"{s['ratio']['median']:.2f} [{s['ratio']['min']:.2f}–{s['ratio']['max']:.2f}]" if s else "–"  # noqa: E731
    out_len = report["scenarios"][0]["scenario"]["output_len"]
    fidelity = lambda s: f"{s['fidelity']['first_difference_mean']:.1f} of {out_len}" if s and s.get("fidelity") else "–"  # noqa: E731
    rows = [[f"`{row}`", *(cells(per.get(name)) for name in names), fidelity(per.get(names[0]))]
            for row, per in rows_by_name(report).items()]
    table = markdown_table(["engine", *(f"tok/s vs stock, {name}" for name in names), f"first differing token, {names[0]}"], rows)
    return (table + "\n\n" + f"Each engine against stock vLLM running beside it, same engine arguments ({engine_arguments(report)}, {report['cpu_count']} CPU cores), "
            f"median [min–max] over {report['repetitions']} alternating repetitions{load_note(report)}; first differing token: mean index "
            "of the first greedy output token that differs from stock vLLM in fp32 (the output length = none). "
            f"{ngram_note(report)}Every figure, the prefill / decode split and each point's limit: "
            "[docs/results.md](docs/results.md#beside-vllms-own-ways-to-go-faster).")


def compose_section() -> list[str]:
    if not COMPOSE.is_file():
        return []
    report = load(COMPOSE)
    rows = [row_cells(sc["scenario"]["name"], s) for sc in report["scenarios"] for s in sc["rows"]]
    method = report["method"]
    scenarios = "; ".join(f"*{sc['scenario']['name']}*: {sc['scenario']['num_prompts']} × {sc['scenario']['input_len']} → "
                          f"{sc['scenario']['output_len']}" + (f", KV capped at {sc['scenario']['kv_blocks']} blocks" if sc["scenario"]["kv_blocks"] else "")
                          for sc in report["scenarios"])
    return [
        "## Beside vLLM's own ways to go faster", "",
        "`vllm-umim bench --rows ...` (`vllm_umim.bench.rows`): stock vLLM, vLLM's fp8 KV cache (`+fp8`), vLLM's n-gram "
        f"speculation (`+ngram`: `{json.dumps(report['ngram'])}`) and the UMIM operating points, every engine with the same "
        f"engine arguments ({engine_arguments(report)}) on the same requests ({scenarios}). Stock stays up and each other "
        "engine runs beside it in turn, alternating which goes first.", "",
        markdown_table(ROWS_HEADER, rows), "",
        f"Ratio: {method['ratio']}. Limit: {method['limit']}. "
        + (f"Measured limit: {method['measured_limit']}. " if "measured_limit" in method else "")
        + f"Time: {method['time']}. Fidelity: {method['fidelity']}. "
        f"KV cap: {method['kv_cap']}.", "",
        *speculation_text(report), "",
        f"{report['cpu_count']} CPU cores; `{relative(COMPOSE)}`. Per scenario, its command, when it ran and the load "
        "average (1/5/15 min) at its start and end:", "",
        *(f"- *{sc['scenario']['name']}*: `{sc['command']}`, {sc['when']}, {sc['load_average_start']} → "
          f"{sc['load_average_1_5_15']}" for sc in report["scenarios"]),
    ]


def measured_pair(report: dict) -> bool:
    """Whether the run has a UMIM row with n-gram speculation (``max+ngram``)."""
    return any(name.split("+")[0] != "stock" and "ngram" in name.split("+")[1:] for name in rows_by_name(report))


def ngram_note(report: dict) -> str:
    return "" if measured_pair(report) else "UMIM points with `+ngram` compose but are not among these rows. "


def speculation_text(report: dict) -> list[str]:
    """What the pair UMIM + n-gram speculation could give where the run has no such row: at best the
    product of the two speed-ups (speculation shortens decode, merging shrinks positions)."""
    lines = []
    for row_name, per in rows_by_name(report).items():
        if row_name != "stock+ngram":
            continue
        for scenario, s in per.items():
            umim = [(name, p[scenario]) for name, p in rows_by_name(report).items() if p.get(scenario, {}).get("umim") and scenario in p]
            best_name, best = max(umim, key=lambda item: item[1]["ratio"]["median"]) if umim else (None, None)
            acceptance = f", {100 * s['draft_acceptance']:.0f} % of draft tokens accepted" if s.get("draft_acceptance") is not None else ""
            text = (f"*{scenario}*: n-gram speculation alone {s['ratio']['median']:.3f} × stock "
                    f"[{s['ratio']['min']:.3f}–{s['ratio']['max']:.3f}]{acceptance}")
            if best:
                product = s["ratio"]["median"] * best["ratio"]["median"]
                better_alone = max(best["ratio"]["median"], s["ratio"]["median"])
                verdict = "above" if product > better_alone else "not above"
                text += (f"; the best UMIM row, `{best_name}`, {best['ratio']['median']:.3f}; the pair, if their gains "
                         f"multiplied, {product:.3f}: {verdict} the better of the two alone")
            lines.append(text + ".")
    if not lines:
        return []
    lead = ("UMIM composes with n-gram speculation (docs/design.md, \"With n-gram speculation\"); this run has no row "
            "with both. What the pair could give, from the rows above:")
    if measured_pair(report):
        lead = "UMIM with n-gram speculation is measured in its own rows above; beside them, the product of the two alone:"
    return [lead, "", *(f"- {line}" for line in lines)]


# Fidelity, frontier, alignment --------------------------------------------------------------------

def fidelity_files(model: str) -> list[Path]:
    folder = ARTIFACTS / model
    return [p for p in [folder / "fidelity.json", *sorted((folder / "fidelity").glob("*.json"))] if p.is_file()]


def fidelity_table(rows: list[dict], bf16: dict | None) -> str:
    """One row per setting, the highest TR (on the first kind of text) first; then the bf16 line."""
    measured = ("first_divergence_mean", "first_divergence_median", "equal_share", "kl_mean")
    kinds = kinds_of(rows[0]["figures"])
    table = [[row["label"], *fidelity_cells(row["figures"], ("overall_tr", *measured))]
             for row in sorted(rows, key=lambda r: -r["figures"][kinds[0]]["overall_tr"])]
    if bf16:
        table.append(["stock bf16 vs fp32 (no merging)", "–", *fidelity_cells(bf16, measured)])
    return markdown_table(["setting (module · rules · variant)", f"TR % prompt+output ({' / '.join(kinds)})",
                           "1st divergence mean", "median", "equal-32 %", "KL"], table)


def ppl_table(ppl: list[dict]) -> str:
    rows = [[f"{row['rules']} · {row['module']}", f"{percent(row['tr'], 1)} %",
             f"{row['ppl']:.1f} (+{percent(row['ppl'] / row['base_ppl'] - 1)} %; base {row['base_ppl']:.2f})"]
            for row in sorted(ppl, key=lambda r: (r["module"], -r["tr"]))]
    return markdown_table(["rules · module", "TR held-out windows", "two-stage PPL (base)"], rows)


def alignment_table(evaluation: dict) -> str:
    heldout = evaluation["heldout"]
    trained_on = lambda module: evaluation["modules"].get(module, {}).get("training", {}).get("tokens_seen")  # noqa: E731
    rows = [[module, f"{trained_on(module):,}" if trained_on(module) else "–", percent(m["top1"], 1), percent(m["top3"], 1), percent(m["top10"], 1), percent(m["mrr"], 1),
             f"{m['kl']:.3f}", f"{m['ppl']:.1f} (+{percent(m['ppl'] / heldout['base_ppl'] - 1)} %)"]
            for module, m in heldout["modules"].items()]
    return markdown_table(["module", "trained on (raw tokens)", "top-1 %", "top-3 %", "top-10 %", "MRR %", "KL", "two-stage PPL"], rows)


def model_section(model: str, plot_to: Path | None) -> list[str]:
    lines = [f"## Fidelity and alignment: {model}"]
    files = fidelity_files(model)
    rows, bf16 = frontier.rows_of(files)
    if rows:
        kinds = " / ".join(kinds_of(rows[0]["figures"]))
        lines += ["", f"Greedy 32-token continuations with merging against the same engine without it (`vllm-umim fidelity`, "
                  f"fp32 engine; each cell {kinds}): TR over prompt + output, first divergence (index of the first "
                  "differing output token; 32 = none), share equal for all 32 tokens, mean next-token KL. "
                  + ("The last row compares stock vLLM in bf16 with fp32: the perturbation users already accept. " if bf16 else "")
                  + "Source: " + ", ".join(f"`{relative(p)}`" for p in files if "figures" in load(p)) + ".", "",
                  fidelity_table(rows, bf16)]
    ppl = frontier.ppl_rows(files)
    if ppl:
        lines += ["", "Two-stage perplexity on held-out windows (`vllm-umim eval`, prompt-side merging):", "", ppl_table(ppl)]
    points = ARTIFACTS / model / "operating-points.json"
    if rows and model == POINTS_MODEL and points.is_file():
        if plot_to:
            frontier.plot(rows, bf16, ppl, load(points)["points"], plot_to, load(LM_EVAL) if LM_EVAL.is_file() else None)
        lines += ["", "The frontier: every setting above, TR against agreement per text kind, operating points starred; "
                  "the last panel is the points' task accuracy (`vllm-umim lm-eval`, paired to stock fp32):", "",
                  f"![TR against first divergence and equal-32 share, per text kind](../{relative(RESULTS / 'frontier.png')})"]
    evaluation = ARTIFACTS / model / "eval.json"
    if evaluation.is_file():
        data = load(evaluation)
        heldout = data["heldout"]
        lines += ["", f"Merge-module alignment on {heldout['windows']} held-out windows ({heldout['raw_tokens']:,} tokens, "
                  f"TR {percent(heldout['tr'], 1)} %, unmerged PPL {heldout['base_ppl']:.2f}; `vllm-umim eval`, "
                  f"`{relative(evaluation)}`): the surrogate's next-token agreement with the unmerged model.", "",
                  alignment_table(data)]
    return lines


# Training -----------------------------------------------------------------------------------------

def training_section() -> list[str]:
    path = RESULTS / "training-profile.json"
    if not path.is_file():
        return []
    rows = [[r["seq_len"], r["batch_size"], r["precision"], r["threads"], f"{r['teacher_tok_per_s']:.0f}", f"{r['student_tok_per_s']:.0f}",
             " / ".join(f"{100 * r['share'][k]:.0f}" for k in ("forward", "backward", "optimizer")), f"{r['mean_loss']:.4f}"]
            for r in load(path)]
    return ["## Where a training step's time goes", "",
            "`python -m benchmarks.training_profile` (`benchmarks/results/training-profile.json`): the frozen teacher's "
            "forward and top-k (cached once by `vllm-umim train`) and the student step, in raw tokens per second.", "",
            markdown_table(["seq_len", "batch", "precision", "threads", "teacher tok/s", "student tok/s",
                            "forward / backward / optimizer %", "mean loss"], rows)]


def late_growth(soak: dict, name: str) -> float | None:
    """RSS growth of one process over the run's last two windows (the trend the verdict's figure hides)."""
    from benchmarks.soak import rss_growth

    samples, window = soak["samples"], soak["verdict"]["window_s"]
    end = max((s["t"] for s in samples), default=0.0)
    return rss_growth(samples, f"{name}_rss", end - 2 * window, window)["growth"]


def soak_section() -> list[str]:
    """``python -m benchmarks.soak`` (``benchmarks/results/soak.json``): memory, statuses, KV, probe;
    the stock control run (``soak-stock.json``, ``--stock``) beside it where committed."""
    path = RESULTS / "soak.json"
    if not path.is_file():
        return []
    soak = load(path)
    v, settings, loads = soak["verdict"], soak["settings"], soak["load_average"]["1m_during"]
    mib, pct = "{:.1f}".format, (lambda x: "–" if x is None else f"{100 * x:+.2f} %")
    runs = [("UMIM", soak)]
    if (RESULTS / "soak-stock.json").is_file():
        runs.append(("stock vLLM (control)", load(RESULTS / "soak-stock.json")))
    rss_rows = [[run, name, mib(g["baseline_bytes"] / 2**20), mib(g["final_bytes"] / 2**20), pct(g["growth"]),
                 pct(late_growth(data, name))] for run, data in runs for name, g in data["verdict"]["rss"].items()]
    outcomes = sorted({o for counts in soak["requests"].values() for o in counts})
    request_rows = [[kind, *(counts.get(o, 0) for o in outcomes), sum(counts.values())] for kind, counts in soak["requests"].items()]
    verdict_text = "**pass**" if v["pass"] else "**fail**: " + "; ".join(v["failures"])
    text = ["## Soak run of the server", "",
            f"`{soak['command']}` (`benchmarks/results/soak.json`): README's `vllm serve` with "
            f"`--umim-rules {settings['rules']} --umim-max-window {settings['max_window']}` under "
            f"{settings['clients']} clients for {settings['minutes']:g} minutes ({soak['requests_total']} requests; "
            f"load average {loads['min']:g}–{loads['max']:g}, median {loads['median']:g}, on {soak['cpu_count']} CPUs). "
            f"Verdict {verdict_text}. Warm-up {v['warmup_s'] / 60:g} min; RSS growth = median of the last "
            f"{v['window_s'] / 60:g} min against the {v['window_s'] / 60:g} min after warm-up, bound "
            f"{100 * v['max_growth']:g} %. 5xx: {v['server_errors_5xx']}; connection errors and timeouts: "
            f"{v['connection_errors']}; UMIM request faults: {v['umim_request_faults']:g}; KV cache drained after "
            f"the load: {'yes' if v['kv_drained'] else 'no'}; greedy probe after = before: {'yes' if v['probe_equal'] else 'no'}."]
    if len(runs) > 1:
        control = runs[1][1]
        text[-1] += (f" The control ran the same load on stock vLLM (`{control['command']}`, "
                     f"{control['settings']['minutes']:g} minutes, {control['requests_total']} requests, malformed ones only "
                     f"vLLM's own).")
    return [*text, "",
            markdown_table(["run", "process", "RSS after warm-up (MiB)", "RSS at the end (MiB)", "growth",
                            f"growth over the last {2 * v['window_s'] / 60:g} min"], rss_rows), "",
            markdown_table(["requests", *outcomes, "total"], request_rows), "",
            "`abort`: streams the client dropped after 1, 3 or 8 chunks (200: the stream had begun); `malformed`: "
            "bad `vllm_xargs` (negative, huge or too wide window, misspelt option, wrong type, unknown mode, "
            "confidence above 1), negative `max_tokens`, broken JSON."]


def readers_table(result: dict) -> str:
    """``vllm-umim readers``: trained designs against the unmerged model on the ceiling's windows."""
    designs = result["designs"]
    baseline = next(iter(designs))
    rows = []
    for name, d in designs.items():
        diff = d.get("vs_" + baseline, {}).get("all")
        ppl = d.get("two_stage_ppl")
        drift = d.get("drift")
        rows.append([
            name, d["context_tokens"], f"{d['module_parameters'] / 1e6:.2f} M"
            + (f" + LoRA {d['reader_parameters'] / 1e6:.2f} M" if d.get("reader") else ""),
            f"{d['all']['kl']:.3f} / {100 * d['all']['top1']:.1f} %", f"{d['merged']['kl']:.3f} / {100 * d['merged']['top1']:.1f} %",
            (f"{diff['kl']['mean']:+.3f} [{diff['kl']['ci95'][0]:+.3f}, {diff['kl']['ci95'][1]:+.3f}] / "
             f"{100 * diff['top1']['mean']:+.1f} [{100 * diff['top1']['ci95'][0]:+.1f}, {100 * diff['top1']['ci95'][1]:+.1f}]")
            if diff else "—",
            f"{ppl['merged']:.2f} vs {ppl['base']:.2f} ({100 * ppl['increase']:+.0f} %)" if ppl else "—",
            (f"{drift['raw_kl']:.4f} / {100 * drift['raw_top1']:.1f} % / {drift['first_divergence']:.1f}") if drift else "none (frozen)",
        ])
    data = result["data"]
    return "\n".join([
        f"{data['windows']} held-out windows of {result['settings']['seq_len']} tokens, {data['rows']} aligned rows "
        f"({data['rows_at_merged']} at merged elements), TR {100 * data['tr']:.1f} %; two-stage PPL on {result['settings']['ppl_windows']} windows of 256 tokens.", "",
        markdown_table(["design", "context k", "trained parameters", "KL / top-1 all rows", "KL / top-1 merged",
                        f"difference to {baseline}, all rows: KL / top-1 points [95 %]", "two-stage PPL",
                        "raw-input drift: KL / top-1 / first divergence"], rows)])


FIDELITY_FIGURES = {  # what a reader fidelity table shows: (heading, cell format)
    "first_divergence_mean": ("mean first divergence", "{:.1f}"),
    "kl_mean": ("mean KL per step", "{:.4f}"),
}


def reader_fidelity_table(readers: dict[str, dict], points: dict, figure: str = "first_divergence_mean") -> str:
    """``vllm-umim fidelity --reference-model``: each design's ``figure`` per kind against the base
    model (one column per design: an adapted reader, or a module for the frozen model), beside the
    shipped points' (``operating-points.json``) at the same settings, the readers' own unmerged
    drift and the stock bf16 line. A setting one design lacks is "—"."""
    from vllm_umim.evaluation.fidelity_run import RAW_ROW

    heading, fmt = FIDELITY_FIGURES[figure]
    first = next(iter(readers.values()))
    kinds = list(first["prompts"])
    settings = sorted(dict.fromkeys(name for r in readers.values() for name in r["figures"]),
                      key=lambda name: name != RAW_ROW)  # the drift row first, then in the files' order
    cells = lambda figures: " / ".join(fmt.format(figures[k][figure]) for k in kinds)  # noqa: E731
    by_variant = {p["fidelity"]["variant"]: p for p in points["points"]}
    rows = [[f"`{name}` ({by_variant[name]['name']})" if name in by_variant else f"`{name}`",
             *(cells(r["figures"][name]) if name in r["figures"] else "—" for r in readers.values()),
             cells(by_variant[name]["fidelity"]) if name in by_variant else "—"]
            for name in settings]
    rows.append(["stock bf16 against fp32", *(cells(r["bf16"]) for r in readers.values()), cells(points["bf16"])])
    return markdown_table(["setting", *(f"{name}: {heading} ({' / '.join(kinds)})" for name in readers),
                           "shipped point, frozen model"], rows)


# The page -----------------------------------------------------------------------------------------

def render_page(plots: bool = False) -> str:
    """The text of ``docs/results.md``; with ``plots``, also (re)draw its two PNGs."""
    models = [POINTS_MODEL] + sorted(p.name for p in ARTIFACTS.iterdir() if p.is_dir() and p.name != POINTS_MODEL)
    sections = [
        ["# Results", "",
         f"*Generated by `{COMMAND}` from the committed JSON under `artifacts/` and `benchmarks/results/`; "
         "edit those or `benchmarks/report.py`, not this page (a test fails when they disagree). "
         "How each figure is measured: [benchmarks/README.md](../benchmarks/README.md).*"],
        operating_points_section(),
        throughput_section(RESULTS / "throughput.png" if plots else None),
        compose_section(),
        *(model_section(model, RESULTS / "frontier.png" if plots else None) for model in models
          if fidelity_files(model) or (ARTIFACTS / model / "eval.json").is_file()),
        training_section(),
        soak_section(),
    ]
    return "\n\n".join("\n".join(section) for section in sections if section) + "\n"


def between(text: str, markers: tuple[str, str], block) -> str:
    """``text`` with ``block()`` between the two markers (unchanged without them)."""
    start, end = markers
    if start not in text or end not in text:
        return text
    head, rest = text.split(start, 1)
    return f"{head}{start}\n{block()}\n{end}{rest.split(end, 1)[1]}"


def readme_with_summary(text: str) -> str:
    """README text with the operating-points table, and the which-to-turn-on table when its JSON is
    committed, between their markers (unchanged without them)."""
    text = between(text, MARKERS, operating_points_summary)
    return between(text, WHICH_MARKERS, which_to_turn_on) if COMPOSE.is_file() else text


def ceiling_page_text(text: str) -> str:
    """docs/ceiling.md's text with each generated table between its markers, where its JSON is
    committed (unchanged otherwise)."""
    from benchmarks.oracle_divergence import divergence_table
    from benchmarks.state_reader import state_reader_table
    from vllm_umim.evaluation.harness import render_table

    fidelity = sorted(READER_FIDELITY.glob("fidelity-*.json"))
    divergence = {path.stem.removeprefix("divergence-"): load(path) for path in sorted(DIVERGENCE.glob("divergence-*.json"))}
    state_readers = {path.stem: load(path) for path in sorted(DIVERGENCE.glob("state-reader-*.json"))}

    @functools.cache
    def designs_and_points() -> tuple[dict, dict]:  # read once for both fidelity tables
        return ({path.stem.removeprefix("fidelity-"): load(path) for path in fidelity},
                load(ARTIFACTS / POINTS_MODEL / "operating-points.json"))

    blocks = [
        (READERS_MARKERS, READERS.is_file(), lambda: readers_table(load(READERS))),
        (READERS_LM_EVAL_MARKERS, READERS_LM_EVAL.is_file(), lambda: render_table(load(READERS_LM_EVAL)).rstrip("\n")),
        (READER_FIDELITY_MARKERS, bool(fidelity), lambda: reader_fidelity_table(*designs_and_points(), "first_divergence_mean")),
        (READER_KL_MARKERS, bool(fidelity), lambda: reader_fidelity_table(*designs_and_points(), "kl_mean")),
        (DIVERGENCE_MARKERS, bool(divergence), lambda: divergence_table(divergence)),
        (STATE_READER_MARKERS, bool(state_readers), lambda: state_reader_table(state_readers)),
    ]
    for markers, committed, block in blocks:
        if committed:
            text = between(text, markers, block)
    return text


def expected_texts(plots: bool = False) -> dict[Path, str]:
    texts = {PAGE: render_page(plots)}
    if README.is_file():
        texts[README] = readme_with_summary(README.read_text())
    if CEILING_PAGE.is_file():
        texts[CEILING_PAGE] = ceiling_page_text(CEILING_PAGE.read_text())
    return texts


def stale(texts: dict[Path, str]) -> list[Path]:
    """The files whose committed text differs from what the JSON gives."""
    return [path for path, text in texts.items() if not path.is_file() or path.read_text() != text]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a generated text is out of date")
    args = parser.parse_args(argv)
    if args.check:
        out_of_date = stale(expected_texts())
        if out_of_date:
            sys.exit(f"out of date (run {COMMAND}): " + ", ".join(relative(p) for p in out_of_date))
        print("docs/results.md is current")
        return
    PAGE.parent.mkdir(exist_ok=True)
    for path, text in expected_texts(plots=True).items():
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote {relative(path)}")
    print(f"drew {relative(RESULTS / 'throughput.png')}, {relative(RESULTS / 'frontier.png')}")


if __name__ == "__main__":
    main()
