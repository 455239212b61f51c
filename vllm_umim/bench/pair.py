"""vLLM's own ``vllm bench throughput`` with ``--umim-rules`` against the same command without it.

    vllm-umim bench-pair [--rounds 2] [--num-prompts 128] [--input-words 120] [--output-len 64]
        [--output-dir bench-results/vllm-bench] [-- extra vllm bench throughput args]

Writes a ShareGPT-format file of natural text (held-out Wikipedia openings and GSM8K problems:
random-token datasets never match a rule), then runs, ``rounds`` times and alternating which goes
first, ``vllm bench throughput --dataset-name sharegpt --dataset-path FILE`` in vLLM's defaults,
once plain and once with ``--umim-rules``. Each run is its own process, so start-up is included in
neither figure (vLLM's bench times only generation). Prints and writes the ratios of vLLM's own
``requests_per_second`` and ``tokens_per_second`` (raw tokens, as vLLM counts them).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from vllm_umim.bench.harness import DEFAULT_OUTPUT_DIR, default_rules
from vllm_umim.bench.workloads import natural_documents
from vllm_umim.errors import UmimError
from vllm_umim.files import write_json_atomic


def write_sharegpt_file(path: Path, num_prompts: int, input_words: int) -> None:
    """One conversation per document: the human turn is its first ``input_words`` words."""
    conversations = []
    for document in natural_documents():
        words = document.split()
        if len(words) >= input_words + 20:
            prompt, rest = " ".join(words[:input_words]), " ".join(words[input_words:])
            conversations.append({"id": str(len(conversations)),
                                  "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": rest}]})
        if len(conversations) == num_prompts:
            break
    if len(conversations) < num_prompts:  # vLLM's sampler would repeat prompts (prefix-cache hits)
        raise UmimError(f"only {len(conversations)} documents have >= {input_words + 20} words; ask for fewer prompts or words")
    path.write_text(json.dumps(conversations))


@dataclasses.dataclass
class PairConfig:
    """``vllm-umim bench-pair``'s settings (each field with a help is a flag)."""

    model: str | None = dataclasses.field(default=None, metadata={"help": "model folder (default: the offline SmolLM2-135M)"})
    umim_rules: str | None = dataclasses.field(default=None, metadata={"help": "rules file or operating-point folder (default: the shipped rules)"})
    rounds: int = dataclasses.field(default=2, metadata={"help": "rounds, alternating which engine goes first"})
    num_prompts: int = dataclasses.field(default=128, metadata={"help": "conversations in the ShareGPT file"})
    input_words: int = dataclasses.field(default=120, metadata={"help": "words of each prompt"})
    output_len: int = dataclasses.field(default=64, metadata={"help": "output tokens per request"})
    output_dir: Path = dataclasses.field(default=DEFAULT_OUTPUT_DIR / "vllm-bench", metadata={"help": "where the results go"})
    extra: list[str] = dataclasses.field(default_factory=list)  # more `vllm bench throughput` arguments, for both runs


def run_bench(model: str, dataset: Path, args: PairConfig, umim_rules: str | None, out: Path) -> dict:
    command = [str(Path(sys.executable).with_name("vllm")), "bench", "throughput", "--model", model,
               "--dataset-name", "sharegpt", "--dataset-path", str(dataset), "--num-prompts", str(args.num_prompts),
               "--output-len", str(args.output_len), "--max-model-len", "1024", "--seed", "0",
               "--output-json", str(out), *args.extra]
    if umim_rules:
        command += ["--umim-rules", umim_rules]
    log = out.with_suffix(".log")
    started = time.perf_counter()
    with log.open("w") as f:
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}); log {log}")
    result = json.loads(out.read_text())
    result["process_s"] = time.perf_counter() - started
    return result


def run(args: PairConfig, command: str) -> dict:
    """``vllm bench throughput`` with and without ``--umim-rules``, ``args.rounds`` times; writes and
    returns the report."""
    if args.model is None:
        from vllm_umim.data.model import fetch_model

        args.model = str(fetch_model("smollm2-135m"))
    args.umim_rules = args.umim_rules or default_rules()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    dataset = args.output_dir / "natural-text.sharegpt.json"
    write_sharegpt_file(dataset, args.num_prompts, args.input_words)
    runs = {"stock": [], "umim": []}
    for round_index in range(args.rounds):
        order = ("stock", "umim") if round_index % 2 == 0 else ("umim", "stock")
        for label in order:
            result = run_bench(args.model, dataset, args, args.umim_rules if label == "umim" else None,
                               args.output_dir / f"{label}-{round_index}.json")
            runs[label].append(result)
            print(f"round {round_index} {label:5s}: {result['tokens_per_second']:.1f} tok/s, "
                  f"{result['requests_per_second']:.3f} req/s (process {result['process_s']:.0f} s)", flush=True)
    ratios = {key: [u[key] / s[key] for s, u in zip(runs["stock"], runs["umim"])] for key in ("tokens_per_second", "requests_per_second")}
    report = {
        "command": command,
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "runs": runs,
        "ratios": ratios,
        "median_tokens_per_second_ratio": statistics.median(ratios["tokens_per_second"]),
    }
    write_json_atomic(report, args.output_dir / "summary.json", indent=1)
    print(f"UMIM / stock, vllm bench throughput tokens/s per round: {[round(r, 3) for r in ratios['tokens_per_second']]}")
    return report

