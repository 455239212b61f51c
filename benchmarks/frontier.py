"""The TR–fidelity frontier: every measured setting of one model, as rows and as one plot
(``python -m benchmarks.report`` draws it into ``benchmarks/results/frontier.png``).

One row per ``vllm-umim fidelity`` variant (module x rules file x merge settings): TR over prompt +
output against greedy first divergence and the share of continuations equal for all 32 tokens,
per text kind, with the stock bf16-vs-fp32 line drawn in; the two-stage PPL of each rule set and
module (``ppl-*.json`` of ``vllm-umim eval`` beside the files) in a panel of its own; the shipped
operating points (``operating-points.json``) marked; and the points' task accuracy through the
engine (``vllm-umim lm-eval``'s results.json): each task's paired difference to stock fp32 with its
interval, stock bf16 beside them.
"""

from __future__ import annotations

import json
from pathlib import Path

from vllm_umim.bench.tables import TEXT_KINDS as KINDS


def module_name(result: dict) -> str:
    """"mean pooling", "trained", or "refined (K)" for a module with a per-rule refinement of K n-grams."""
    if result.get("module") == "mean":
        return "mean pooling"
    refined = (result.get("files") or {}).get("module_refined_rules", 0)
    return f"refined ({refined})" if refined else "trained"


def label(result: dict, variant: str) -> str:
    module = module_name(result)
    rules = Path(result["rules"]).stem
    return f"{module} · {rules} · {variant}"


def group(result: dict, variant: str) -> str:
    """Colour of a row in the plot: which idea it tries."""
    if result.get("module") == "mean":
        return "mean pooling"
    if Path(result["rules"]).stem != "rules":
        return "harm-selected rules"
    if module_name(result).startswith("refined"):
        return "per-rule refinement"
    if "window" in variant or "confidence" in variant:
        return "policies (window / confidence)"
    return "shipped rules, paper modes"


def rows_of(files: list[Path]) -> tuple[list[dict], dict | None]:
    rows, bf16 = [], None
    for path in files:
        result = json.loads(path.read_text())
        if "figures" not in result:
            continue
        bf16 = bf16 or result.get("bf16")
        for variant, figures in result["figures"].items():
            if any(row["label"] == label(result, variant) for row in rows):
                continue  # the same setting measured again (fidelity.json's modes recur in policies.json)
            rows.append({"label": label(result, variant), "group": group(result, variant), "figures": figures})
    return rows, bf16


def ppl_rows(files: list[Path]) -> list[dict]:
    """(rules, module) -> held-out TR and two-stage PPL, from ``vllm-umim eval`` JSON files."""
    rows = []
    for path in sorted({q for p in files for q in p.parent.glob("ppl-*.json")}):
        result = json.loads(path.read_text())
        heldout = result["heldout"]
        for module, figures in heldout["modules"].items():
            rows.append({"rules": Path(result["rules"]["path"]).stem, "module": module, "tr": heldout["tr"],
                         "ppl": figures["ppl"], "base_ppl": heldout["base_ppl"]})
    return rows


def accuracy_panel(axis, results: dict, systems: list[str]) -> None:
    """Per system (x), each task's accuracy difference to stock fp32 on the same items with its 95 %
    interval (one colour per task), and the ±1-point band the quality goals name."""
    import matplotlib.pyplot as plt

    tasks = [row["task"] for row in results["tasks"]]
    colors = dict(zip(tasks, plt.get_cmap("tab20").colors * 2))  # 20 distinct colours: one per task
    for x, system in enumerate(systems):
        for offset, row in enumerate(results["tasks"]):
            d = row["systems"].get(system, {}).get("paired_vs_reference")
            if d is None:
                continue
            at = x + 0.6 * (offset / max(len(tasks) - 1, 1) - 0.5)
            axis.errorbar([at], [100 * d["estimate"]], yerr=[[100 * (d["estimate"] - d["low"])], [100 * (d["high"] - d["estimate"])]],
                          fmt="o", ms=4, color=colors[row["task"]], label=row["task"] if x == 0 else None)
    axis.axhspan(-1, 1, color="green", alpha=0.08, label="within 1 point")
    axis.axhline(0, color="grey", linewidth=0.8)
    axis.set_xticks(range(len(systems)), systems)
    axis.set_ylabel("accuracy − stock fp32 (points, 95 % interval)")
    axis.set_title("task accuracy through the engine (lm-eval)")
    axis.legend(fontsize=6, ncol=3, loc="lower left")
    axis.grid(alpha=0.3)


def plot(rows: list[dict], bf16: dict | None, ppl: list[dict], points: list[dict], png: Path,
         accuracy: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({r["group"] for r in rows})
    colors = dict(zip(groups, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, axes = plt.subplots(2, 4, figsize=(18, 8.5))
    for column, kind in enumerate(KINDS):
        for axis, key, scale, title in ((axes[0, column], "first_divergence_mean", 1, "mean first divergence (tokens)"),
                                        (axes[1, column], "equal_share", 100, "equal for all 32 tokens (%)")):
            for name in groups:
                mine = [r["figures"][kind] for r in rows if r["group"] == name]
                axis.scatter([100 * f["overall_tr"] for f in mine], [scale * f[key] for f in mine], s=22,
                             color=colors[name], label=name)
            for p in points:
                f = p.get("fidelity")
                if f:
                    axis.scatter([100 * f[kind]["overall_tr"]], [scale * f[kind][key]], marker="*", s=220,
                                 facecolors="none", edgecolors="black")
                    axis.annotate(p["name"], (100 * f[kind]["overall_tr"], scale * f[kind][key]), fontsize=8,
                                  xytext=(4, 4), textcoords="offset points")
            if bf16:
                axis.axhline(scale * bf16[kind][key], color="grey", linestyle="--", label="stock bf16 vs fp32")
            axis.set_xlabel(f"TR over prompt + output, {kind} (%)")
            axis.set_ylabel(title)
            axis.set_title(kind)
            axis.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7, loc="upper right")
    ppl_axis = axes[0, 3]
    for module, marker in (("trained", "o"), ("mean", "x")):
        mine = [r for r in ppl if r["module"] == module]
        ppl_axis.scatter([100 * r["tr"] for r in mine], [100 * (r["ppl"] / r["base_ppl"] - 1) for r in mine],
                         marker=marker, label=f"{module} module")
        for r in mine:
            ppl_axis.annotate(r["rules"], (100 * r["tr"], 100 * (r["ppl"] / r["base_ppl"] - 1)), fontsize=7,
                              xytext=(3, 3), textcoords="offset points")
    ppl_axis.set_yscale("log")
    ppl_axis.axhline(5, color="green", linestyle=":", label="faithful goal +5 %")
    ppl_axis.axhline(15, color="orange", linestyle=":", label="balanced goal +15 %")
    ppl_axis.set_xlabel("TR on held-out windows (%)")
    ppl_axis.set_ylabel("two-stage PPL above base (%)")
    ppl_axis.set_title("perplexity (prompt-side merging)")
    ppl_axis.legend(fontsize=7)
    ppl_axis.grid(alpha=0.3)
    if accuracy:
        accuracy_panel(axes[1, 3], accuracy, ["stock-bf16", *(p["name"] for p in points)])
    else:
        axes[1, 3].axis("off")
    fig.suptitle("UMIM on SmolLM2-135M: token reduction against agreement with the unmerged model (greedy, fp32 engine)")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
