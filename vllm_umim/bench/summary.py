"""Turn the throughput benchmark's raw runs into ratios with their spread, a table, a plot and a
profile summary (``throughput.json``, ``throughput.md``, ``throughput.png``)."""

from __future__ import annotations

import statistics
from pathlib import Path

from vllm_umim.bench.tables import markdown_table, percent, ratio_cell
from vllm_umim.files import write_json_atomic

GOALS = {  # scenario -> (what, check(ratio, token reduction) -> (target, met))
    "prefill-heavy": ("ratio >= 0.9 / (1 - TR)", lambda ratio, tr: (0.9 / (1 - tr), ratio >= 0.9 / (1 - tr))),
    "decode-heavy": ("ratio >= 1.25", lambda ratio, tr: (1.25, ratio >= 1.25)),
    "decode-long": ("ratio >= 1.25", lambda ratio, tr: (1.25, ratio >= 1.25)),
    "no-merge": ("overhead <= 2 %", lambda ratio, tr: (0.98, ratio >= 0.98)),
}


def spread(values: list[float]) -> dict:
    """Median, range, mean, stdev, and ``ci95``: the half-width of the mean's 95 % t-interval
    (repetitions are paired runs, so the mean ratio's interval is what an overhead claim needs)."""
    from scipy.stats import t

    n = len(values)
    stdev = statistics.stdev(values) if n > 1 else 0.0
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "mean": statistics.fmean(values),
            "stdev": stdev, "ci95": float(t.ppf(0.975, n - 1) * stdev / n ** 0.5) if n > 1 else None, "n": n}


def summarize(result: dict) -> dict:
    """Per-scenario figures: umim/stock ratios paired by repetition, token reduction, KV, preemptions."""
    stock, umim = result["runs"]["stock"], result["runs"]["umim"]
    ratio = lambda key: spread([u[key] / s[key] for s, u in zip(stock, umim)])  # noqa: E731
    last = umim[-1]
    merged = last["merged_requests"] > 0
    token_reduction = last["tokens_merged_away"] / last["raw_tokens"] if merged else 0.0
    prompt_reduction = 1 - last["prompt_positions"] / last["raw_prompt_tokens"] if merged else 0.0
    stock_peak = statistics.median(r["peak_kv_blocks"] for r in stock) if stock[0]["peak_kv_blocks"] is not None else None
    umim_peak = statistics.median(r["peak_kv_blocks"] for r in umim) if umim[0]["peak_kv_blocks"] is not None else None
    name = result["scenario"]["name"]
    tokens_ratio = ratio("tokens_per_s")
    goal_text, check = GOALS.get(name, ("", lambda r, t: (None, None)))
    target, met = check(tokens_ratio["median"], token_reduction)
    return {
        **result["scenario"],
        "stock_tokens_per_s": spread([r["tokens_per_s"] for r in stock]),
        "umim_tokens_per_s": spread([r["tokens_per_s"] for r in umim]),
        "stock_requests_per_s": spread([r["requests_per_s"] for r in stock]),
        "umim_requests_per_s": spread([r["requests_per_s"] for r in umim]),
        "tokens_per_s_ratio": tokens_ratio,
        "requests_per_s_ratio": ratio("requests_per_s"),
        "token_reduction": token_reduction,
        "prompt_token_reduction": prompt_reduction,
        "prefill_merges": last["prefill_merges"],
        "decode_merges": last["decode_merges"],
        "num_kv_blocks": last["num_kv_blocks"],
        "peak_kv_blocks": {"stock": stock_peak, "umim": umim_peak},
        "peak_kv_saved": (1 - umim_peak / stock_peak) if stock_peak and umim_peak is not None else None,
        "preemptions": {"stock": [r["preemptions"] for r in stock], "umim": [r["preemptions"] for r in umim]},
        "goal": {"what": goal_text, "target_ratio": target, "met": met},
        "startup_s": result.get("startup_s"),
        "runs": result["runs"],
        "profile": result.get("profile"),
    }


THROUGHPUT_HEADER = ["scenario", "requests × in → out", "stock tok/s", "UMIM tok/s", "UMIM / stock, median [min–max] (n)", "goal",
                     "TR (prompt)", "peak KV blocks stock → UMIM", "preemptions stock → UMIM", "merges prefill / decode",
                     "start-up s stock / UMIM"]


def throughput_row(s: dict) -> list[str]:
    """One scenario of :func:`summarize` as a row under ``THROUGHPUT_HEADER``."""
    goal = s["goal"]
    goal_cell = f"{goal['what']}: {'met' if goal['met'] else 'NOT met'} (target {goal['target_ratio']:.2f})" if goal["target_ratio"] else ""
    peak = s["peak_kv_blocks"]
    blocks = f" ({s['kv_blocks']} blocks)" if s["kv_blocks"] else ""
    return [
        s["name"], f"{s['num_prompts']} × {s['input_len']} → {s['output_len']}{blocks}",
        f"{s['stock_tokens_per_s']['median']:.0f}", f"{s['umim_tokens_per_s']['median']:.0f}", ratio_cell(s["tokens_per_s_ratio"]),
        goal_cell, f"{percent(s['token_reduction'], 1)} % ({percent(s['prompt_token_reduction'], 1)} %)",
        f"{peak['stock']:.0f} → {peak['umim']:.0f}" if peak["stock"] is not None and peak["umim"] is not None else "–",
        f"{'/'.join(map(str, s['preemptions']['stock']))} → {'/'.join(map(str, s['preemptions']['umim']))}",
        f"{s['prefill_merges']} / {s['decode_merges']}", startup_cell(s.get("startup_s")),
    ]


def markdown_report(report: dict) -> str:
    """``throughput.md``: the table of every scenario, then the module, engine arguments, machine and command."""
    module = report["umim"].get("module", "module.safetensors beside the rules")
    return "\n".join([
        markdown_table(THROUGHPUT_HEADER, map(throughput_row, report["scenarios"])), "",
        f"Module: `{module}`; alignment on held-out text: {alignment(report)}.",
        f"Both engines: vLLM's defaults except {engine_arguments(report)}.",
        f"Measured {report['when']} on {report['cpu_count']} CPUs, load average (1/5/15 min) at start "
        f"{report.get('load_average_start')} and end {report['load_average_1_5_15']}.",
        f"Command: `{report['command']}`",
    ])


def engine_arguments(report: dict) -> str:
    changed = {k: v for k, v in report["engine_kwargs"].items()
               if k not in ("model", "additional_config") and v not in (None, "")}  # CLI-only defaults that change nothing
    return ", ".join(f"{k}={v}" for k, v in sorted(changed.items())) or "nothing"


def startup_cell(startup_s: dict | None) -> str:
    """Each engine's start-up seconds (both start side by side, so each is slowed by the other)."""
    if not startup_s:
        return ""
    return f"{startup_s['stock']:.0f} / {startup_s['umim']:.0f}"


def alignment(report: dict) -> str:
    """The held-out alignment metrics of the module in use, from the ``eval.json`` of ``vllm-umim eval``."""
    ev = report.get("module_eval")
    if not ev:
        return "no eval.json found"
    module = report["umim"].get("module") or "module.safetensors"
    names = {k: v.get("path", "") for k, v in ev.get("modules", {}).items()}
    name = "mean" if module == "mean" else next((k for k, path in names.items() if k != "mean" and Path(path).name == Path(module).name), None)
    heldout = ev.get("heldout", {})
    metrics = heldout.get("modules", {}).get(name)
    if not metrics:
        return f"eval.json has no held-out metrics for this module ({module})"
    return (f"{name}: top-1 {metrics['top1']:.3f}, top-3 {metrics['top3']:.3f}, top-10 {metrics['top10']:.3f}, "
            f"top-p {metrics['topp']:.3f}, MRR {metrics['mrr']:.3f}, KL {metrics['kl']:.3f}, two-stage PPL {metrics['ppl']:.1f} "
            f"(unmerged {heldout.get('base_ppl', float('nan')):.1f}) at TR {100 * heldout.get('tr', 0):.1f} % ({ev.get('path', 'eval.json')})")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for i, s in enumerate(report["scenarios"]):
        tr, r = 100 * s["token_reduction"], s["tokens_per_s_ratio"]
        label_offset = (6, 6 if i % 2 == 0 else -14)  # neighbouring scenarios often share a TR
        left.errorbar(tr, r["median"], yerr=[[r["median"] - r["min"]], [r["max"] - r["median"]]], fmt="o", capsize=4, color=f"C{i}")
        left.annotate(s["name"], (tr, r["median"]), textcoords="offset points", xytext=label_offset)
        if s["kv_blocks"] is not None:  # KV capped: both fill it; what merging saves shows as fewer preemptions
            stock, umim = sum(s["preemptions"]["stock"]), sum(s["preemptions"]["umim"])
            if stock:
                right.plot(tr, 100 * (1 - umim / stock), "x", markersize=9, color=f"C{i}")
                right.annotate(f"{s['name']} (preemptions)", (tr, 100 * (1 - umim / stock)), textcoords="offset points", xytext=label_offset)
        elif s["peak_kv_saved"] is not None:
            right.plot(tr, 100 * s["peak_kv_saved"], "o", color=f"C{i}")
            right.annotate(s["name"], (tr, 100 * s["peak_kv_saved"]), textcoords="offset points", xytext=label_offset)
    xs = [x / 2 for x in range(0, 121)]
    left.plot(xs, [0.9 / (1 - x / 100) for x in xs], ":", color="gray", label="0.9 / (1 - TR)")
    left.axhline(1.0, color="black", linewidth=0.5)
    left.set(xlabel="token reduction TR (%)", ylabel="throughput UMIM / stock (raw tok/s)", title="throughput ratio (median, min–max)")
    left.legend(loc="upper left")
    right.plot(xs, xs, ":", color="gray", label="KV saved = TR")
    right.set(xlabel="token reduction TR (%)", ylabel="saved (%)", title="peak KV blocks saved (o); preemptions avoided (x)")
    right.legend(loc="upper left")
    for axis in (left, right):
        axis.set_xlim(-2, max(60, max(100 * s["token_reduction"] for s in report["scenarios"]) + 10))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(report: dict, output_dir: Path) -> dict:
    paths = {"json": output_dir / "throughput.json", "plot": output_dir / "throughput.png", "markdown": output_dir / "throughput.md"}
    write_json_atomic(report, paths["json"])
    plot(report, paths["plot"])
    paths["markdown"].write_text(markdown_report(report) + "\n")
    return paths


PROFILE_STAGES = {  # stage -> (file path part, function name; "" = any function of that file)
    "schedule": ("sched/scheduler.py", "schedule"),
    "update_from_output": ("sched/scheduler.py", "update_from_output"),
    "execute_model": ("gpu_model_runner.py", "execute_model"),
    "sample_tokens": ("gpu_model_runner.py", "sample_tokens"),
    "umim _update_request_with_output": ("vllm_umim/engine/scheduler.py", "_update_request_with_output"),
    "umim add_request (prompt compression)": ("vllm_umim/engine/scheduler.py", "add_request"),
    "umim model runner": ("vllm_umim/engine/model_runner.py", ""),
    "umim embedding": ("vllm_umim/engine/embedding.py", ""),
}


def short_path(path: str) -> str:
    """A profiled file's path from its package on: ``vllm/...`` or ``vllm_umim/...``."""
    if "site-packages/" in path:
        return path.split("site-packages/")[-1]
    return path[path.rfind("vllm_umim/"):] if "vllm_umim/" in path else path


def profile_summary(path: Path, top: int = 15) -> dict:
    """Where the time of a profiled UMIM run goes: the busiest functions, UMIM's own share, and the
    cumulative time of the main stages."""
    import pstats

    stats = pstats.Stats(str(path)).stats
    total = max(ct for (_, _, _), (_, _, _, ct, _) in stats.items())
    label = lambda key: f"{short_path(key[0])}:{key[1]}({key[2]})"  # noqa: E731
    by_self = sorted(stats.items(), key=lambda item: -item[1][2])[:top]
    umim_self = sum(tt for key, (_, _, tt, _, _) in stats.items() if "/vllm_umim/" in key[0])
    stages = {}
    for key, (_, _, tt, ct, _) in stats.items():
        for stage, (file_part, name) in PROFILE_STAGES.items():
            if file_part in key[0] and (not name or key[2] == name):
                stages[stage] = max(stages.get(stage, 0.0), ct)
    return {
        "total_s": total,
        "umim_self_s": umim_self,
        "umim_self_share": umim_self / total if total else None,
        "stages_cumulative_s": stages,
        "top_self_time": [{"function": label(key), "self_s": tt, "cumulative_s": ct, "calls": nc} for key, (_, nc, tt, ct, _) in by_self],
    }
