"""``vllm-umim inspect``: show a rules file (header, counts, harm scores, most frequent n-grams)."""

from __future__ import annotations

import json
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="show a rules file")
    p.add_argument("rules", type=Path)
    p.add_argument("--model", help="decode examples with this model's tokenizer (and check it matches)")
    p.add_argument("--examples", type=int, default=5, help="most frequent n-grams shown per length")


def run(args) -> None:
    from vllm_umim.rules import load_rules
    from vllm_umim.rules.file_format import read_header

    header, _ = read_header(args.rules)
    rules = load_rules(args.rules)
    tokenizer = None
    if args.model:
        from vllm_umim.data.model import load_tokenizer

        tokenizer = load_tokenizer(args.model)
        rules.check_tokenizer(tokenizer)
    print(json.dumps({k: v for k, v in header.items() if k != "tables"}, indent=2))
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
