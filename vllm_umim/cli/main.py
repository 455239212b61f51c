"""``vllm-umim``: fetch the offline model and corpus, mine rules, inspect them, generate.

Each subcommand lives in a small function ``cmd_<name>(args)``; ``build_parser`` wires them.
Commands that start a vLLM engine keep their imports local, so ``vllm-umim inspect`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from vllm_umim.errors import UmimError


def cmd_fetch_model(args) -> None:
    from vllm_umim.data.model import fetch_model

    print(fetch_model(args.name, out=args.out))


def cmd_fetch_corpus(args) -> None:
    from vllm_umim.data.corpus import fetch_corpus

    print(fetch_corpus(args.name, out=args.out))


def cmd_training_mix(args) -> None:
    from vllm_umim.data.training_mix import build_training_mix, manifest_path

    manifest = build_training_mix(args.model, args.output, chat=args.chat, continuations=args.continuations, wiki=args.wiki,
                                  seed=args.seed, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p)
    print(f"wrote {args.output}: " + ", ".join(f"{n} {source} ({manifest['tokens'][source]} tokens)"
                                              for source, n in manifest["counts"].items()))
    print(f"manifest {manifest_path(args.output)}")


def cmd_mine(args) -> None:
    from transformers import AutoTokenizer

    from vllm_umim.data.corpus import read_documents
    from vllm_umim.rules import mine_rules, save_rules

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    documents = read_documents(args.corpus)
    started = time.perf_counter()
    rules, report = mine_rules(
        documents,
        tokenizer,
        threshold=args.threshold,
        max_n=args.max_n,
        filter_overlaps=not args.no_filter,
        source=str(args.corpus),
    )
    save_rules(rules, args.output)
    print(f"mined {report.num_tokens} tokens from {report.num_documents} documents in {time.perf_counter() - started:.1f} s")
    for n in sorted(report.kept):
        print(f"  {n}-grams: {report.frequent[n]} with frequency >= {args.threshold}, {report.kept[n]} kept after overlap filtering")
    print("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in report.seconds.items()))
    print(f"wrote {args.output}: {rules.summary()}")


def cmd_inspect(args) -> None:
    from vllm_umim.rules import load_rules
    from vllm_umim.rules.file_format import read_header

    header, _ = read_header(args.rules)
    rules = load_rules(args.rules)
    tokenizer = None
    if args.model:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        rules.check_tokenizer(tokenizer)
    shown = {k: v for k, v in header.items() if k not in ("tables",)}
    print(json.dumps(shown, indent=2))
    print(rules.summary())
    if rules.scored:
        import numpy as np

        harm = rules.harm_scores()
        scored = harm[~np.isnan(harm)]
        quartiles = np.percentile(scored, [25, 50, 75]).round(4).tolist() if len(scored) else []
        print(f"harm scores: {len(scored)} of {len(rules)} rules scored on {int(rules.harm_count_by_rule().sum())} merges; "
              f"quartiles {quartiles}")
    for n in rules.lengths:
        order = rules.counts[n].argsort()[::-1][: args.examples]
        print(f"most frequent {n}-grams:")
        for i in order:
            tokens = rules.ngrams[n][i].tolist()
            text = repr(tokenizer.decode(tokens)) if tokenizer else tokens
            print(f"  {int(rules.counts[n][i]):>8}  {text}")


def cmd_generate(args) -> None:
    from transformers import AutoTokenizer

    from vllm_umim.module.batches import bos_prefix
    from vllm_umim.reference import bracketed

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompt_ids = bos_prefix(tokenizer) + tokenizer(args.prompt, add_special_tokens=False)["input_ids"]
    if args.engine == "reference":
        from vllm_umim.cli.reference_generate import reference_generate

        result = reference_generate(args, tokenizer, prompt_ids)
    else:
        from vllm_umim.cli.engine_generate import engine_generate

        result = engine_generate(args, tokenizer, prompt_ids)
    print(bracketed(result.elements, tokenizer))
    raw, compressed = result.raw_length, len(result.elements)
    print(
        f"\n-- {args.engine}: {raw} raw tokens -> {compressed} positions "
        f"(token reduction {100 * (1 - compressed / raw):.1f} %; prefill merges {result.prefill_merges}, "
        f"decode merges {result.decode_merges})"
    )


def cmd_demo(args) -> None:
    from vllm_umim.cli.demo import run_demo

    run_demo(args.prompts, args.max_tokens)


def cmd_train(args) -> None:
    from vllm_umim.training.cli import run_train

    run_train(args)


def cmd_eval(args) -> None:
    from vllm_umim.evaluation.cli import run_eval

    run_eval(args)


def cmd_fidelity(args) -> None:
    from vllm_umim.evaluation.fidelity_cli import run_fidelity

    run_fidelity(args)


def cmd_score_rules(args) -> None:
    from vllm_umim.evaluation.rule_harm_cli import run_score_rules

    run_score_rules(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-umim", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch-model", help="write an offline HF folder for a known model")
    p.add_argument("name", nargs="?", default="smollm2-135m",
                   help="smollm2-135m (Llama, instruct; default) or gemma3-270m (Gemma 3, base model)")
    p.add_argument("--out", type=Path)
    p.set_defaults(func=cmd_fetch_model)

    p = sub.add_parser("fetch-corpus", help="write the offline corpus as train.txt / heldout.txt")
    p.add_argument("name", nargs="?", default="wiki")
    p.add_argument("--out", type=Path)
    p.set_defaults(func=cmd_fetch_corpus)

    p = sub.add_parser("training-mix", help="JSON Lines training text: train Wikipedia, chat and the model's own "
                                            "continuations from stock vLLM (issue 10)")
    p.add_argument("--model", required=True, type=Path, help="model folder (tokenizer, chat template, stock vLLM)")
    p.add_argument("-o", "--output", required=True, type=Path, help="*.jsonl; the manifest goes beside it")
    p.add_argument("--chat", type=int, default=0, help="chat records: instruction + the model's answer")
    p.add_argument("--continuations", type=int, default=0, help="records: article opening + the model's continuation")
    p.add_argument("--wiki", type=int, default=0, help="train Wikipedia articles as they are")
    p.add_argument("--seed", type=int, default=0, help="article choice, record order and sampling")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.set_defaults(func=cmd_training_mix)

    p = sub.add_parser("mine", help="mine merge rules (paper §3.1, App. A)")
    p.add_argument("--model", required=True, help="model folder (its tokenizer is used)")
    p.add_argument("--corpus", required=True, type=Path, help="text file, one document per line")
    p.add_argument("--threshold", type=int, default=5)
    p.add_argument("--max-n", type=int, default=4)
    p.add_argument("--no-filter", action="store_true", help="skip the hierarchical overlap filtering")
    p.add_argument("-o", "--output", required=True, type=Path)
    p.set_defaults(func=cmd_mine)

    p = sub.add_parser("inspect", help="show a rules file")
    p.add_argument("rules", type=Path)
    p.add_argument("--model", help="decode examples with this model's tokenizer (and check it matches)")
    p.add_argument("--examples", type=int, default=5)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("generate", help="generate with merging, merged spans [bracketed]")
    p.add_argument("--model", required=True)
    p.add_argument("--rules", required=True, type=Path)
    p.add_argument("--module", default=None, help="merge module file, or 'mean' (default: beside the rules)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--dynamic", action="store_true", help="also merge during decoding (pseudocode 4)")
    p.add_argument("--engine", choices=("reference", "vllm"), default="reference")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="shipped SmolLM2 rules + module: vLLM engine vs reference")
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=40)
    p.set_defaults(func=cmd_demo)

    from vllm_umim.evaluation.cli import add_eval_arguments
    from vllm_umim.training.cli import add_train_arguments

    p = sub.add_parser("train", help="train a merge module by sequential computation distillation (paper §3.3)")
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="alignment metrics, token reduction, two-stage PPL and QA of a merge module")
    add_eval_arguments(p)
    p.set_defaults(func=cmd_eval)

    from vllm_umim.evaluation.fidelity_cli import add_fidelity_arguments

    p = sub.add_parser("fidelity", help="greedy continuations through vLLM: UMIM on vs off, beside stock bf16 vs fp32")
    add_fidelity_arguments(p)
    p.set_defaults(func=cmd_fidelity)

    from vllm_umim.cli.select_rules import add_select_rules_parser
    from vllm_umim.evaluation.rule_harm_cli import add_score_rules_arguments

    p = sub.add_parser("score-rules", help="score each rule by the harm (KL at its App. C row) of its merge (issue 13)")
    add_score_rules_arguments(p)
    p.set_defaults(func=cmd_score_rules)
    add_select_rules_parser(sub)
    __import__("vllm_umim.cli.bench", fromlist=["add_bench_parser"]).add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # results on stdout, logs on stderr: vLLM logs to stdout unless told (read when vLLM is imported)
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UmimError as exc:
        print(f"vllm-umim: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
