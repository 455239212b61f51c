"""The README's fidelity table from ``vllm-umim fidelity`` JSON files (issue 13).

    python benchmarks/fidelity_report.py artifacts/smollm2-135m/fidelity/*.json [--ppl-dir DIR]

One row per (rules file, variant): TR over prompt + output, first divergence mean / median, the
share of continuations equal for all 32 tokens and the mean next-token KL, each as
wiki / chat / gsm8k; then the stock bf16 line. ``--ppl-dir`` adds the two-stage PPL of
``vllm-umim eval`` JSON files named ``ppl-<rules file stem>.json`` (rule-set rows only: PPL
scores prompt-side merging of held-out windows, not a decode policy).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

KINDS = ("wiki", "chat", "gsm8k")


def cells(figures: dict) -> list[str]:
    per_kind = [figures[kind] for kind in KINDS]
    join = lambda values: " / ".join(values)  # noqa: E731
    return [
        join(f"{100 * f['overall_tr']:.0f}" for f in per_kind) if per_kind[0].get("overall_tr") is not None else "–",
        join(f"{f['first_divergence_mean']:.1f}" for f in per_kind),
        join(f"{f['first_divergence_median']:g}" for f in per_kind),
        join(f"{100 * f['equal_share']:.0f}" for f in per_kind),
        join(f"{f['kl_mean']:.4f}" for f in per_kind),
    ]


def ppl_cell(rules: str, ppl_dir: Path | None, module: str = "trained") -> str:
    path = ppl_dir / f"ppl-{Path(rules).stem}.json" if ppl_dir else None
    if path is None or not path.is_file():
        return "–"
    heldout = json.loads(path.read_text())["heldout"]
    trained = heldout["modules"][module]["ppl"]
    return f"{trained:.1f} (+{100 * (trained / heldout['base_ppl'] - 1):.0f} %)"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--ppl-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    print("| rules | variant | TR % (prompt + output) | 1st divergence mean | median | equal-32 % | KL | two-stage PPL |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    bf16 = None
    for path in args.files:
        result = json.loads(path.read_text())
        if "figures" not in result:
            continue  # a ppl-*.json of `vllm-umim eval` beside the fidelity files
        bf16 = bf16 or result.get("bf16")
        for variant, figures in result["figures"].items():
            module = "mean" if result.get("module") == "mean" else "trained"
            ppl = ppl_cell(result["rules"], args.ppl_dir, module) if variant == "prompt" else "–"
            rules = Path(result["rules"]).stem + (" (mean pooling)" if result.get("module") == "mean" else "")
            print(f"| {rules} | {variant} | " + " | ".join(cells(figures)) + f" | {ppl} |")
    if bf16:
        print("| stock bf16 vs fp32 | (no merging) | – | " + " | ".join(cells(bf16)[1:]) + " | – |")


if __name__ == "__main__":
    main()
