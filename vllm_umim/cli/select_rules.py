"""``vllm-umim select-rules``: a new rules file holding the rules whose merges earn their place
(``vllm_umim.rules.selection``), with TR before and after on a corpus.

Examples::

    vllm-umim select-rules --rules scored.bin --max-harm 0.5 --model DIR --corpus heldout.txt -o kept.bin
    vllm-umim select-rules --rules scored.bin --target-tr 0.25 --model DIR --corpus heldout.txt -o tr25.bin
"""

from __future__ import annotations

from pathlib import Path

from vllm_umim.cli.config_args import default_of
from vllm_umim.rules.selection import UNSCORED_CHOICES, select_by_harm


def register(subparsers) -> None:
    p = subparsers.add_parser("select-rules", help="keep the rules whose merges do little harm")
    p.add_argument("--rules", required=True, type=Path, help="a scored rules file (vllm-umim score-rules)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--max-harm", type=float, help="keep rules with harm <= this")
    target.add_argument("--target-tr", type=float, help="drop the most harmful rules until TR on --corpus is <= this")
    p.add_argument("--corpus", type=Path, help="text, one document per line: TR before/after (needed with --target-tr)")
    p.add_argument("--model", help="model folder whose tokenizer reads --corpus (checked against the rules)")
    p.add_argument("--documents", type=int, default=None, help="use the first N documents of --corpus")
    p.add_argument("--unscored", choices=UNSCORED_CHOICES, default=default_of(select_by_harm, "unscored"),
                   help="what happens to rules without a harm score (default: %(default)s)")
    p.add_argument("--min-count", type=int, default=default_of(select_by_harm, "min_count"),
                   help="treat rules scored on fewer merges as unscored (a single occurrence's harm is noisy)")
    p.add_argument("-o", "--output", required=True, type=Path)


def run(args) -> None:
    from vllm_umim.errors import SelectionError
    from vllm_umim.rules import load_rules, save_rules
    from vllm_umim.rules.selection import merge_counts, select_for_target_tr, token_reduction

    rules = load_rules(args.rules)
    sequences = None
    if args.corpus is not None:
        if args.model is None:
            raise SelectionError("--corpus needs --model (its tokenizer reads the corpus)")
        from vllm_umim.data.model import load_tokenizer
        from vllm_umim.evaluation.token_reduction import tokenized_documents

        tokenizer = load_tokenizer(args.model)
        rules.check_tokenizer(tokenizer)
        sequences = tokenized_documents(tokenizer, args.corpus, args.documents)
    if args.target_tr is not None:
        if sequences is None:
            raise SelectionError("--target-tr needs --corpus and --model (TR is measured on that text)")
        selected = select_for_target_tr(rules, args.target_tr, sequences, args.unscored, args.min_count)
    else:
        selected = select_by_harm(rules, args.max_harm, args.unscored, args.min_count)
    save_rules(selected, args.output)
    print(f"kept {len(selected)} of {len(rules)} rules ({100 * len(selected) / max(len(rules), 1):.1f} %): "
          f"{selected.meta['selection']}")
    if sequences is not None:
        raw = sum(map(len, sequences))
        before, after = token_reduction(rules, sequences), token_reduction(selected, sequences)
        merges_before, merges_after = merge_counts(rules, sequences).sum(), merge_counts(selected, sequences).sum()
        print(f"{args.corpus}: {len(sequences)} documents, {raw} tokens; TR {100 * before:.2f} % -> {100 * after:.2f} %; "
              f"merges {merges_before} -> {merges_after}")
    print(f"wrote {args.output}: {selected.summary()}")
