"""``vllm-umim mine``: mine merge rules from a corpus (paper §3.1, App. A)."""

from __future__ import annotations

from pathlib import Path

from vllm_umim.cli.config_args import default_of
from vllm_umim.rules import mine_rules


def register(subparsers) -> None:
    p = subparsers.add_parser("mine", help="mine merge rules (paper §3.1, App. A)")
    p.add_argument("--model", required=True, help="model folder (its tokenizer is used)")
    p.add_argument("--corpus", required=True, type=Path, help="text file, one document per line")
    p.add_argument("--threshold", type=int, default=default_of(mine_rules, "threshold"),
                   help="keep n-grams seen at least this often (default: %(default)s)")
    p.add_argument("--max-n", type=int, default=default_of(mine_rules, "max_n"), help="longest rule, 2..4 (default: %(default)s)")
    p.add_argument("--no-filter", action="store_true", help="skip the hierarchical overlap filtering")
    p.add_argument("-o", "--output", required=True, type=Path)


def run(args) -> None:
    import time

    from vllm_umim.data.corpus import read_documents
    from vllm_umim.data.model import load_tokenizer
    from vllm_umim.rules import save_rules

    tokenizer = load_tokenizer(args.model)
    documents = read_documents(args.corpus)
    started = time.perf_counter()
    rules, report = mine_rules(documents, tokenizer, threshold=args.threshold, max_n=args.max_n,
                               filter_overlaps=not args.no_filter, source=str(args.corpus))
    save_rules(rules, args.output)
    print(f"mined {report.num_tokens} tokens from {report.num_documents} documents in {time.perf_counter() - started:.1f} s")
    for n in sorted(report.kept):
        print(f"  {n}-grams: {report.frequent[n]} with frequency >= {args.threshold}, {report.kept[n]} kept after overlap filtering")
    print("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in report.seconds.items()))
    print(f"wrote {args.output}: {rules.summary()}")
