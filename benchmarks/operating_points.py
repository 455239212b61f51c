"""The operating points shipped for a model, each measured: ``operating-points.json``, which
``python -m benchmarks.report`` turns into the results page's operating-points tables.

    python -m benchmarks.operating_points artifacts/smollm2-135m \\
        --fidelity artifacts/smollm2-135m/fidelity.json artifacts/smollm2-135m/fidelity/*.json \\
        --bench benchmarks/results/*/throughput.json --json artifacts/smollm2-135m/operating-points.json

Every sub-folder with a ``merge.json`` is a point (``vllm_umim.engine.operating_point``). For each:
its settings; TR on held-out Wikipedia (each document merged as a prompt by the point's policy, so
a raw window costs what it costs there); and the measurements made with the same rules file, module
file (both matched by content hash) and merge settings: the ``vllm-umim fidelity`` row, the
two-stage PPL of ``vllm-umim eval`` (``ppl-*.json`` beside the fidelity files; PPL merges held-out
windows prompt-side with no window), QA from ``eval.json``, and the throughput ratios of
``vllm-umim bench``. A figure nobody measured for a point is shown as "–", never filled in.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

from benchmarks.report import best_runs, operating_points_table
from vllm_umim.files import file_sha256, write_json_atomic

ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=None)
def content_hash(path: str) -> str | None:
    """sha256 of a file given relative to the working directory or the repository (None if absent).
    A path recorded in another checkout (``/tmp/x/artifacts/...``) is looked up in this one's artifacts."""
    in_artifacts = path[path.find("artifacts/"):] if "artifacts/" in path else path
    for candidate in (Path(path), ROOT / path, ROOT / in_artifacts):
        if candidate.is_file():
            return file_sha256(candidate)
    return None


def module_hash(rules: str, module: str | None) -> str | None:
    """The module a measurement used: "mean", or the hash of the file named or beside the rules."""
    if module == "mean":
        return "mean"
    if module:
        return content_hash(module)
    from vllm_umim.engine.config import DEFAULT_MODULE_NAMES

    for name in DEFAULT_MODULE_NAMES:
        found = content_hash(str(Path(rules).with_name(name)))
        if found:
            return found
    return "mean"


def settings_of(*options) -> tuple:
    """Merge settings (mode, window, min_confidence) from option dicts applied in order."""
    from vllm_umim.policies.settings import MergeSettings

    settings = MergeSettings()
    for option in options:
        option = {"mode": option} if isinstance(option, str) else option
        settings = settings.with_options({k: v for k, v in option.items() if k in MergeSettings.FIELDS})
    return settings


def recorded_hashes(result: dict) -> tuple[str | None, str | None]:
    """(rules hash, module hash) a fidelity run used: recorded in its ``files`` (runs since the
    per-rule refinement), else those of the files now at the paths it names."""
    files = result.get("files")
    if files:
        return files["rules_sha256"], files["module_sha256"]
    return content_hash(result["rules"]), module_hash(result["rules"], result.get("module"))


def fidelity_row(point: dict, fidelity_files: list[Path]) -> tuple[dict, dict] | None:
    """(figures per kind, bf16 line) of the fidelity run with this point's rules, module and settings."""
    for path in fidelity_files:
        result = json.loads(path.read_text())
        if "figures" not in result or recorded_hashes(result) != (point["rules_hash"], point["module_hash"]):
            continue
        for name, variant in result["variants"].items():
            if settings_of(result.get("engine_options", {}), variant) == point["settings"]:
                return {"file": str(path), "variant": name, **result["figures"][name]}, result.get("bf16")
    return None


def ppl_row(point: dict, ppl_files: list[Path]) -> dict | None:
    for path in ppl_files:
        result = json.loads(path.read_text())
        trained = result.get("heldout", {}).get("modules", {}).get("trained")
        if trained and content_hash(result["rules"]["path"]) == point["rules_hash"] \
                and module_hash(result["rules"]["path"], result["modules"]["trained"]["path"]) == point["module_hash"]:
            return {"file": str(path), "ppl": trained["ppl"], "base_ppl": result["heldout"]["base_ppl"]}
    return None


def qa_row(point: dict, eval_file: Path | None) -> dict | None:
    if eval_file is None or not eval_file.is_file():
        return None
    result = json.loads(eval_file.read_text())
    if content_hash(result["rules"]["path"]) != point["rules_hash"] or "qa" not in result \
            or module_hash(result["rules"]["path"], result["modules"]["trained"]["path"]) != point["module_hash"]:
        return None
    tasks = result["qa"]
    mean = lambda key: sum(t["accuracy"][key] for t in tasks.values()) / len(tasks)  # noqa: E731
    return {"file": str(eval_file), "items_per_task": min(t["n"] for t in tasks.values()),
            "base": mean("base"), "merged": mean("trained")}


def bench_rows(point: dict, bench_files: list[Path]) -> dict:
    """Scenario name -> ratio figures of the bench run made with this point's files and settings
    (of several, the one with the most repetitions, then the latest)."""
    matching = []
    for path in bench_files:
        result = json.loads(path.read_text())
        umim = result.get("umim") or {}
        rules = umim.get("rules", "")
        if Path(rules).is_dir():
            from vllm_umim.engine.operating_point import resolve_operating_point

            umim = resolve_operating_point(umim)
            rules = umim["rules"]
        if content_hash(rules) == point["rules_hash"] and module_hash(rules, umim.get("module")) == point["module_hash"] \
                and settings_of(umim) == point["settings"]:
            matching.append((str(path), result))
    return {scenario["name"]: {"file": path, "when": result["when"], "load_average_1_5_15": result["load_average_1_5_15"],
                               "ratio": scenario["tokens_per_s_ratio"], "tr": scenario["token_reduction"]}
            for path, result, scenario in best_runs(matching) if not scenario["never_matching_rules"]}


def measure_point(folder: Path, tokenizer, corpus: Path, documents: int) -> dict:
    from vllm_umim.engine.config import UmimConfig
    from vllm_umim.evaluation.token_reduction import corpus_token_reduction
    from vllm_umim.rules import load_rules

    config = UmimConfig.from_dict({"rules": str(folder)})
    rules = load_rules(config.rules)
    module = config.module_path()
    return {
        "name": folder.name,
        "settings": config.merge,
        "rules_hash": content_hash(config.rules),
        "module_hash": content_hash(str(module)) if module else "mean",
        "rules_count": len(rules),
        "heldout_tr": corpus_token_reduction(rules, tokenizer, corpus, documents, policy=config.merge.build(rules)),
    }


def main(argv=None) -> list[dict]:
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the model's artifacts folder (points are its sub-folders with merge.json)")
    parser.add_argument("--model", default=None, help="model folder (default: vllm-umim fetch-model smollm2-135m)")
    parser.add_argument("--corpus", type=Path, default=None, help="held-out corpus (default: the wiki corpus's heldout.txt)")
    parser.add_argument("--documents", type=int, default=300)
    parser.add_argument("--fidelity", nargs="*", type=Path, default=[])
    parser.add_argument("--bench", nargs="*", type=Path, default=[])
    parser.add_argument("--eval", type=Path, default=None, help="eval.json with QA (default: FOLDER/eval.json)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.model is None:
        from vllm_umim.data.model import fetch_model

        args.model = fetch_model("smollm2-135m")
    if args.corpus is None:
        from vllm_umim.data.corpus import fetch_corpus

        args.corpus = fetch_corpus("wiki") / "heldout.txt"
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    fidelity_files = [p for p in args.fidelity if not p.name.startswith("ppl-")]
    ppl_files = sorted({q for p in args.fidelity for q in p.parent.glob("ppl-*.json")})
    bf16 = None
    points = []
    for folder in sorted(p.parent for p in args.folder.glob("*/merge.json")):
        point = measure_point(folder, tokenizer, args.corpus, args.documents)
        found = fidelity_row(point, fidelity_files)
        point["fidelity"], bf16 = (found[0], found[1] or bf16) if found else (None, bf16)
        point["ppl"] = ppl_row(point, ppl_files)
        point["qa"] = qa_row(point, args.eval or args.folder / "eval.json")
        point["bench"] = bench_rows(point, args.bench)
        points.append(point)
    order = {"faithful": 0, "balanced": 1, "max": 2}
    points.sort(key=lambda p: (order.get(p["name"], 9), p["name"]))
    data = {"points": [{**p, "settings": p["settings"].as_options()} for p in points], "bf16": bf16}
    print(operating_points_table(data))
    if args.json:
        write_json_atomic(data, args.json, indent=1)
    return points


if __name__ == "__main__":
    main()
