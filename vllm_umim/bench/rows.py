"""UMIM beside vLLM's own ways to go faster, in one run: ``vllm-umim bench --rows ...``.

    vllm-umim bench --rows stock+fp8 stock+ngram faithful balanced max max+fp8 --scenario natural decode-heavy

A row is an engine: ``stock`` or a UMIM operating point (a folder name under the shipped model's
``artifacts/`` folder, ``umim`` for the rules given with ``--umim-rules``, or a path), then
``+fp8`` (vLLM's fp8 KV cache, ``kv_cache_dtype="fp8"``) and/or ``+ngram`` (vLLM's n-gram
speculation, :data:`NGRAM`). Every row gets the same engine arguments and serves the same
requests; ``stock`` always runs and is what each ratio is against. Per scenario all engines stay up
and take turns (the order rotates every repetition), as in ``vllm_umim.bench.harness``.

Per row and scenario (``rows.json``):

* throughput ratio to stock, paired by repetition: median, range, mean with a 95 % t-interval;
* fidelity: greedy output of the timed run's requests against a stock engine in fp32 (the same
  requests, run once, untimed): mean first differing output token (``output_len`` = none differs)
  and the share of requests equal throughout;
* where the time goes: the same requests with one output token each (prefill-only, timed right
  after each full run) give prefill seconds; full minus prefill is decode, divided by the decode
  engine steps it took gives a decode step's cost;
* the limit of a UMIM row (:func:`limit`): its base row's (the same row without UMIM; for stock,
  stock's runs in the same pair) prefill time scaled by the prompt's position fraction and its
  decode time by the whole sequence's, i.e. the ratio UMIM would reach if merged positions cost
  nothing and everything else cost what it costs without UMIM. Decode steps do not get fewer when positions do (each still yields one token), so
  outside KV-bound scenarios the decode part of this limit is generous;
* the measured limit of a UMIM row (:func:`twin_prompts`): the same engine, right after each
  repetition's pair, serving twin requests unmerged: each raw prompt cut so the request ends with
  as many positions as the merged one did, the same output length. At every step such a request
  holds no more KV positions than its merged original, so its time is what the merged request
  would take if merging itself cost nothing; stock's run in the same repetition over it is the limit.

A KV-bound scenario caps the KV cache in blocks; an fp8 row gets as many blocks as fit in the same
bytes (twice as many as bf16's, four times fp32's), so it is compared at equal KV memory.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path

from vllm_umim.bench.summary import spread
from vllm_umim.errors import UmimError

POINTS_DIR = Path(__file__).resolve().parents[2] / "artifacts" / "smollm2-135m"  # in a checkout
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
MODIFIERS = ("fp8", "ngram")
STOCK = "stock"
REFERENCE = "stock-fp32"  # the fidelity baseline: stock vLLM in fp32, untimed


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    umim: str | None = None  # rules file or operating-point folder; None: stock vLLM
    fp8: bool = False
    ngram: bool = False

    @property
    def base(self) -> str:
        """The row without UMIM: what its limit is computed from."""
        return "+".join([STOCK, *(m for m in MODIFIERS if getattr(self, m))])


def parse_row(text: str, umim_rules: str | None = None, points_dir: Path = POINTS_DIR) -> Row:
    """``max+fp8`` -> Row (``max+ngram``: UMIM with vLLM's n-gram speculation, which compose).
    Raises UmimError naming an unknown point or modifier."""
    head, *modifiers = text.split("+")
    unknown = [m for m in modifiers if m not in MODIFIERS]
    if unknown or len(set(modifiers)) < len(modifiers):
        raise UmimError(f"row {text!r}: modifiers are {' and '.join(MODIFIERS)}, each at most once; got {modifiers}")
    if head == STOCK:
        umim = None
    elif head == "umim":
        if not umim_rules:
            raise UmimError(f"row {text!r} needs --umim-rules")
        umim = umim_rules
    elif (points_dir / head).is_dir():
        umim = str(points_dir / head)
    elif Path(head).exists():
        umim = head
    else:
        known = sorted(p.name for p in points_dir.glob("*/") if (p / "rules.bin").is_file()) if points_dir.is_dir() else []
        raise UmimError(f"row {text!r}: {head!r} is neither 'stock', 'umim', an operating point ({', '.join(known)}) nor a path")
    return Row(text, umim, "fp8" in modifiers, "ngram" in modifiers)


def kv_bytes_per_element(engine_kwargs: dict) -> int:
    """Bytes of one KV element in the model's dtype (vLLM's default on CPU: bf16)."""
    return 4 if engine_kwargs.get("dtype") in ("float32", "float") else 2


def row_engine_kwargs(row: Row, engine_kwargs: dict, kv_blocks: int | None = None) -> dict:
    """``engine_kwargs`` (without UMIM) with the row's additions; a KV cap given in blocks of the
    model dtype becomes the same bytes of fp8 blocks for an fp8 row."""
    additional = {k: v for k, v in (engine_kwargs.get("additional_config") or {}).items() if k != "umim"}
    kwargs = {k: v for k, v in engine_kwargs.items() if k != "additional_config"}
    if additional:
        kwargs["additional_config"] = additional
    if row.umim:
        kwargs["additional_config"] = {**additional, "umim": {"rules": row.umim}}
    if row.fp8:
        kwargs["kv_cache_dtype"] = "fp8"
    if row.ngram:
        kwargs["speculative_config"] = dict(NGRAM)
    if kv_blocks is not None:
        kwargs["num_gpu_blocks_override"] = kv_blocks * (kv_bytes_per_element(engine_kwargs) if row.fp8 else 1)
    return kwargs


# Figures ------------------------------------------------------------------------------------------

def first_differences(tokens: list[list[int]], reference: list[list[int]]) -> dict:
    """Per request, the first output index where ``tokens`` leaves ``reference`` (the shorter
    length if one is a prefix of the other: for equal outputs, their length)."""
    steps = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
             for a, b in zip(tokens, reference, strict=True)]
    equal = sum(a == b for a, b in zip(tokens, reference))
    return {"first_difference_mean": statistics.fmean(steps), "first_difference_median": statistics.median(steps),
            "equal_share": equal / len(tokens), "requests": len(tokens)}


def time_split(runs: list[dict], prefill_runs: list[dict]) -> dict:
    """Median seconds of prefill (one output token each) and decode (the rest), and a decode step's cost."""
    prefill = statistics.median(r["elapsed_s"] for r in prefill_runs)
    total = statistics.median(r["elapsed_s"] for r in runs)
    decode_steps = statistics.median(r["steps"] - p["steps"] for r, p in zip(runs, prefill_runs))
    decode = total - prefill
    return {"total_s": total, "prefill_s": prefill, "decode_s": decode, "prefill_share": prefill / total,
            "decode_steps": decode_steps, "decode_step_ms": 1000 * decode / decode_steps if decode_steps else None}


def position_fractions(run: dict) -> dict:
    """Positions per raw token, of the prompt and of the whole sequence (1, 1 without merging)."""
    if not run.get("merged_requests"):
        return {"prompt": 1.0, "all": 1.0}
    return {"prompt": run["prompt_positions"] / run["raw_prompt_tokens"], "all": run["positions"] / run["raw_tokens"]}


def limit(base_ratio: float, base_split: dict, fractions: dict) -> float:
    """The throughput ratio to stock if merged positions cost nothing (see the module docstring):
    the base row's ratio to stock over the share of its time that would remain."""
    share = base_split["prefill_share"]
    return base_ratio / (share * fractions["prompt"] + (1 - share) * fractions["all"])


def twin_prompts(prompts: list[list[int]], positions: list[int], output_len: int) -> list[list[int]]:
    """The measured limit's requests: each raw prompt cut to the positions its merged request held
    at its end less the output length (at least one token). Served unmerged with that output
    length, a twin prefills no more positions than its original and, at every decode step, holds no
    more (the original's decode merges are all counted from the start)."""
    return [prompt[:max(1, n - output_len)] for prompt, n in zip(prompts, positions, strict=True)]


def elapsed_ratios(stock: list[dict], mine: list[dict]) -> list[float]:
    """Stock's seconds in the same pair and repetition over each of ``mine``'s."""
    by_turn = {(r.get("beside"), r["repetition"]): r["elapsed_s"] for r in stock}
    return [by_turn[(m.get("beside"), m["repetition"])] / m["elapsed_s"] for m in mine]


def paired_ratios(stock: list[dict], mine: list[dict]) -> list[float]:
    """Each run's tokens/s over stock's in the same pair and repetition (stock's own row: 1s)."""
    by_turn = {(r.get("beside"), r["repetition"]): r["tokens_per_s"] for r in stock}
    return [m["tokens_per_s"] / by_turn[(m.get("beside"), m["repetition"])] for m in mine]


def beside(runs: list[dict], name: str) -> list[dict]:
    return [r for r in runs if r.get("beside") == name]


def summarize_rows(rows: list[Row], runs: dict, prefill_runs: dict, fidelity: dict, twin_runs: dict | None = None) -> list[dict]:
    """One summary per row of a scenario's raw runs (``runs[row][repetition]``). A UMIM row's
    limit and step cost are against its base row: stock's runs beside it in the same pair (the
    machine's load drifts between pairs), or the base row's own runs and its ratio to stock; its
    measured limit is stock's time over its twin runs' (``twin_runs[row]``) in the same repetition."""
    stock = runs[STOCK]
    splits = {name: time_split(runs[name], prefill_runs[name]) for name in runs} if prefill_runs else {}
    ratios = {row.name: spread(paired_ratios(stock, runs[row.name])) for row in rows}
    out = []
    for row in rows:
        mine = runs[row.name]
        fractions = position_fractions(mine[-1])
        summary = {
            "row": row.name, "umim": row.umim, "fp8": row.fp8, "ngram": row.ngram,
            "tokens_per_s": spread([r["tokens_per_s"] for r in mine]),
            "ratio": ratios[row.name],
            "token_reduction": 1 - fractions["all"], "prompt_token_reduction": 1 - fractions["prompt"],
            "prefill_merges": mine[-1]["prefill_merges"], "decode_merges": mine[-1]["decode_merges"],
            "peak_kv_blocks": statistics.median(r["peak_kv_blocks"] for r in mine) if mine[0]["peak_kv_blocks"] is not None else None,
            "num_kv_blocks": mine[-1]["num_kv_blocks"],
            "preemptions": [r["preemptions"] for r in mine],
            "draft_acceptance": (mine[-1]["accepted_tokens"] / mine[-1]["draft_tokens"]) if mine[-1].get("draft_tokens") else None,
            "fidelity": fidelity.get(row.name),
        }
        if splits:
            summary["time"] = splits[row.name]
            if row.name != STOCK:  # each phase against stock's runs in the same pair
                pair = time_split(beside(stock, row.name), beside(prefill_runs[STOCK], row.name))
                summary["phase_speedup"] = {"prefill": pair["prefill_s"] / splits[row.name]["prefill_s"],
                                            "decode": pair["decode_s"] / splits[row.name]["decode_s"]}
            if row.umim and row.base in splits:
                if row.base == STOCK:
                    base_split, base_ratio = time_split(beside(stock, row.name), beside(prefill_runs[STOCK], row.name)), 1.0
                else:
                    base_split, base_ratio = splits[row.base], ratios[row.base]["median"]
                summary["base"] = {"row": row.base, "ratio": base_ratio, "time": base_split}
                summary["limit"] = limit(base_ratio, base_split, fractions)
                summary["ratio_to_limit"] = summary["ratio"]["median"] / summary["limit"]
                mine_step, base_step = splits[row.name]["decode_step_ms"], base_split["decode_step_ms"]
                summary["decode_step_ms_above_base"] = mine_step - base_step if mine_step is not None and base_step is not None else None
        if (twin_runs or {}).get(row.name):
            summary["measured_limit"] = spread(elapsed_ratios(stock, twin_runs[row.name]))
            summary["ratio_to_measured_limit"] = summary["ratio"]["median"] / summary["measured_limit"]["median"]
        out.append(summary)
    return out


def resummarize(report: dict) -> dict:
    """``report`` (a ``rows.json``) with every scenario's summaries computed again from its raw runs
    by this module's code (fidelity, measured once per row, is kept)."""
    scenarios = []
    for sc in report["scenarios"]:
        rows = [Row(s["row"], s["umim"], s["fp8"], s["ngram"]) for s in sc["rows"]]
        fidelity = {s["row"]: s["fidelity"] for s in sc["rows"] if s.get("fidelity")}
        scenarios.append({**sc, "rows": summarize_rows(rows, sc["runs"], sc["prefill_runs"], fidelity, sc.get("twin_runs"))})
    return {**report, "method": METHOD, "scenarios": scenarios}


# The run ------------------------------------------------------------------------------------------

def run_scenario(spec, rows: list[Row], engine_kwargs: dict, prompts_path: Path, config, work_dir: Path) -> dict:
    """The fp32 reference alone (untimed), then stock beside each other row in turn: each pair takes
    ``repetitions`` turns, alternating which goes first (a vLLM engine holds a few GB: a small
    machine cannot keep every row up at once); with the split and greedy decoding, a UMIM row's
    twin requests (:func:`twin_prompts`) after each turn."""
    from vllm_umim.bench.harness import EngineProcess
    from vllm_umim.bench.workloads import kv_block_size

    capped = {}
    if spec.kv_blocks is not None:
        capped = dict(block_size=kv_block_size(), max_model_len=spec.input_len + spec.output_len)
    env = {"VLLM_CPU_KVCACHE_SPACE": str(config.kv_space_gib)}
    start = lambda row: EngineProcess(f"{spec.name}-{row.name}", {**row_engine_kwargs(row, engine_kwargs, spec.kv_blocks), **capped},  # noqa: E731
                                      work_dir, env=env)
    command = dict(prompts=str(prompts_path), output_len=spec.output_len, temperature=config.temperature)
    greedy = config.temperature == 0
    reference = None
    if greedy:  # fidelity's baseline: stock in fp32, no KV cap (it is not timed)
        engine = EngineProcess(f"{spec.name}-{REFERENCE}", {**engine_kwargs, "dtype": "float32"}, work_dir, env=env)
        try:
            engine.receive()
            reference = engine.run(**command, return_tokens=True)["token_ids"]
        finally:
            engine.close()
    runs = {row.name: [] for row in rows}
    prefill_runs = {row.name: [] for row in rows} if config.split else {}
    twin_runs = {row.name: [] for row in rows if row.umim} if config.split and greedy else {}
    prompts = json.loads(prompts_path.read_text())
    tokens, startup_s = {}, {}
    stock = start(rows[0])
    try:
        startup_s[STOCK] = stock.receive()["startup_s"]
        stock.run(**{**command, "output_len": min(4, spec.output_len)})  # warm-up, not measured
        for row in rows[1:]:
            other = start(row)
            try:
                startup_s[row.name] = other.receive()["startup_s"]
                other.run(**{**command, "output_len": min(4, spec.output_len)})
                engines = {STOCK: stock, row.name: other}
                for repetition in range(config.repetitions):
                    order = (STOCK, row.name) if repetition % 2 == 0 else (row.name, STOCK)
                    for name in order:
                        first = greedy and not runs[name]
                        result = engines[name].run(**command, return_tokens=first)
                        if first:
                            tokens[name] = result.pop("token_ids")
                            positions = result.pop("request_positions")
                            if name in twin_runs:
                                twin_path = work_dir / f"{spec.name}.{name}.twin.json"
                                twin_path.write_text(json.dumps(twin_prompts(prompts, positions, spec.output_len)))
                        result.update(repetition=repetition, position=order.index(name), beside=row.name)
                        runs[name].append(result)
                        line = f"  {spec.name} {row.name} rep {repetition} {name:14s}: {result['tokens_per_s']:8.1f} tok/s, {result['steps']} steps"
                        if config.split:
                            prefill = engines[name].run(**{**command, "output_len": 1})
                            prefill.update(repetition=repetition, beside=row.name)
                            prefill_runs[name].append(prefill)
                            line += f", prefill-only {prefill['elapsed_s']:.2f} s"
                        print(line, flush=True)
                    if row.name in twin_runs:  # the measured limit: this engine on the twin requests, unmerged
                        twin = other.run(**{**command, "prompts": str(twin_path)}, unmerged=True)
                        twin.update(repetition=repetition, beside=row.name)
                        twin_runs[row.name].append(twin)
                        print(f"  {spec.name} {row.name} rep {repetition} {'twin':14s}: {twin['elapsed_s']:.2f} s", flush=True)
            finally:
                other.close()
    finally:
        stock.close()
    fidelity = {name: first_differences(t, reference) for name, t in tokens.items()} if reference else {}
    return {"scenario": dataclasses.asdict(spec), "startup_s": startup_s,
            "rows": summarize_rows(rows, runs, prefill_runs, fidelity, twin_runs), "runs": runs, "prefill_runs": prefill_runs,
            "twin_runs": twin_runs}


METHOD = {
    "ratio": "tokens/s (raw prompt + output tokens) of the row / of stock in the same repetition; median [min-max], "
             "mean with its 95 % t-interval",
    "fidelity": "greedy output of every request against stock vLLM in fp32 on the same requests: mean index of the "
                "first differing output token (output_len if none) and the share of requests equal throughout",
    "time": "prefill_s: the same requests with max_tokens=1, timed after each full run; decode_s: full run minus "
            "prefill; decode_step_ms: decode_s / (engine steps of the full run - of the prefill run); medians",
    "limit": "base ratio / (base prefill share x prompt positions per raw prompt token + base decode share x positions "
             "per raw token), the base being stock's runs beside the row in the same pair (ratio 1) or the row without "
             "UMIM (e.g. stock+fp8 for max+fp8, with its ratio to stock): the ratio if merged positions cost nothing and "
             "all else cost what it costs without UMIM (decode steps do not get fewer, so outside KV-bound scenarios this "
             "is generous)",
    "measured_limit": "stock's seconds in the same repetition / the row's engine's on twin requests served unmerged "
                      "(each raw prompt cut so that the request ends with the positions the merged one ended with, same "
                      "output length: at no step more KV positions than the merged request, one token a step as it): "
                      "the ratio if merging itself cost nothing; median [min-max]",
    "phase_speedup": "stock's prefill_s (decode_s) in the same pair / the row's",
    "kv_cap": "KV-bound scenarios cap the cache in blocks of the model dtype; fp8 rows get the same bytes",
}


def run(engine_kwargs: dict, config, command: str) -> dict:
    """Every scenario of ``config`` with every row of ``config.rows`` (stock first, added if
    missing); writes ``rows.json`` (and ``rows.md``) to ``config.output_dir`` after each scenario.
    Scenarios already in that ``rows.json`` from the same engine arguments and not run now are
    kept; each scenario records its own command, time and load average."""
    import os
    import tempfile

    from transformers import AutoTokenizer

    from vllm_umim.bench.workloads import natural_documents, natural_prompts, scenario
    from vllm_umim.files import write_json_atomic

    umim_rules = (engine_kwargs.get("additional_config") or {}).get("umim", {}).get("rules")
    rows = [parse_row(text, umim_rules) for text in dict.fromkeys([STOCK, *config.rows])]
    pure_overhead = [name for name in config.scenario if scenario(name).never_matching_rules]
    if pure_overhead:
        raise UmimError(f"--rows does not run {', '.join(pure_overhead)}: measure it with vllm-umim bench --scenario no-merge")
    config.output_dir.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix="umim-rows-"))
    print(f"engine logs and prompts in {work_dir}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(engine_kwargs.get("tokenizer") or engine_kwargs["model"])
    documents = natural_documents()
    base_kwargs = {k: v for k, v in engine_kwargs.items() if k != "additional_config"}
    path = config.output_dir / "rows.json"
    results = kept_scenarios(path, base_kwargs, config.scenario)
    for name in config.scenario:
        spec = scenario(name, num_prompts=config.num_prompts, input_len=config.input_len, output_len=config.output_len,
                        **({"kv_blocks": config.kv_blocks} if config.kv_blocks is not None and scenario(name).kv_blocks is not None else {}))
        print(f"{spec.name}: {spec.num_prompts} prompts x {spec.input_len} tokens in, {spec.output_len} out; {spec.about}", flush=True)
        prompts_path = work_dir / f"{spec.name}.prompts.json"
        prompts_path.write_text(json.dumps(natural_prompts(tokenizer, documents, spec.num_prompts, spec.input_len)))
        load_at_start = [round(x, 2) for x in os.getloadavg()]
        result = run_scenario(spec, rows, base_kwargs, prompts_path, config, work_dir)
        results.append({**result, "command": command, "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                        "repetitions": config.repetitions, "load_average_start": load_at_start,
                        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()]})
        report = {"cpu_count": os.cpu_count(), "engine_kwargs": base_kwargs, "ngram": NGRAM,
                  "repetitions": min(r["repetitions"] for r in results), "method": METHOD, "scenarios": results}
        write_json_atomic(report, path)
        (config.output_dir / "rows.md").write_text(markdown(report) + "\n")
    print(markdown(report))
    return report


def kept_scenarios(path: Path, engine_kwargs: dict, running: list[str]) -> list[dict]:
    """The scenarios of an earlier ``rows.json`` at ``path`` that this run keeps (see :func:`run`)."""
    if not path.is_file():
        return []
    earlier = json.loads(path.read_text())
    if earlier.get("engine_kwargs") != engine_kwargs:
        return []
    return [sc for sc in earlier["scenarios"] if sc["scenario"]["name"] not in running]


# Tables -------------------------------------------------------------------------------------------

ROWS_HEADER = ["scenario", "row", "tok/s / stock, median [min–max] (n)", "limit", "of limit", "measured limit", "of it", "TR", "prefill share",
               "prefill / decode vs stock", "decode steps", "decode step ms", "fidelity: 1st difference mean, equal %", "preemptions"]


def ratio_text(ratio: dict) -> str:
    return f"{ratio['median']:.3f} [{ratio['min']:.3f}–{ratio['max']:.3f}] ({ratio['n']})"


def row_cells(scenario_name: str, s: dict) -> list[str]:
    time_ = s.get("time") or {}
    fidelity = s.get("fidelity")
    return [
        scenario_name, s["row"], ratio_text(s["ratio"]),
        f"{s['limit']:.2f}" if s.get("limit") else "–",
        f"{100 * s['ratio_to_limit']:.0f} %" if s.get("ratio_to_limit") else "–",
        f"{s['measured_limit']['median']:.2f} [{s['measured_limit']['min']:.2f}–{s['measured_limit']['max']:.2f}]" if s.get("measured_limit") else "–",
        f"{100 * s['ratio_to_measured_limit']:.0f} %" if s.get("ratio_to_measured_limit") else "–",
        f"{100 * s['token_reduction']:.1f} %" if s["umim"] else "–",
        f"{100 * time_['prefill_share']:.0f} %" if time_ else "–",
        f"{s['phase_speedup']['prefill']:.2f} / {s['phase_speedup']['decode']:.2f}" if s.get("phase_speedup") else "–",
        f"{time_['decode_steps']:.0f}" if time_ else "–",
        f"{time_['decode_step_ms']:.1f}" if time_.get("decode_step_ms") else "–",
        f"{fidelity['first_difference_mean']:.1f}, {100 * fidelity['equal_share']:.0f} %" if fidelity else "–",
        "/".join(map(str, s["preemptions"])),
    ]


def markdown(report: dict) -> str:
    from vllm_umim.bench.tables import markdown_table

    lines = [markdown_table(ROWS_HEADER, [row_cells(sc["scenario"]["name"], s) for sc in report["scenarios"] for s in sc["rows"]])]
    lines += [""] + [f"{sc['scenario']['name']}: `{sc['command']}` ({sc['when']}); load average at start "
                     f"{sc['load_average_start']} and end {sc['load_average_1_5_15']}; {report['cpu_count']} CPUs."
                     for sc in report["scenarios"]]
    return "\n".join(lines)
