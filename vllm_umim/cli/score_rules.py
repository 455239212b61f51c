"""``vllm-umim score-rules``: score every rule by the harm of its merge and write the rules file
with the scores attached (format v2; rule ids unchanged). See ``vllm_umim.evaluation.rule_harm``.

Example::

    vllm-umim score-rules --model DIR --rules rules.bin --module module.safetensors \\
        --corpus train.txt --windows 96 --seq-len 128 --heldout heldout.txt --output scored.bin
"""

from __future__ import annotations

import json
from pathlib import Path

from vllm_umim.evaluation.rule_harm import DEFAULT_HORIZON


def register(subparsers) -> None:
    p = subparsers.add_parser("score-rules", help="score each rule by the harm (KL at its App. C row) of its merge")
    p.add_argument("--model", required=True, help="HF model folder")
    p.add_argument("--rules", required=True, type=Path, help="rules file to score")
    p.add_argument("--module", required=True, help="merge module file (or 'mean' for the mean-pooling baseline)")
    p.add_argument("--corpus", required=True, type=Path, help="training text, one document per line")
    p.add_argument("--windows", type=int, default=96, help="training windows scored")
    p.add_argument("--seq-len", type=int, default=128, help="raw tokens per window")
    p.add_argument("--seed", type=int, default=0, help="window shuffle seed (as training's corpus_windows)")
    p.add_argument("--horizon", type=int, default=DEFAULT_HORIZON,
                   help="also average the KL of the next H aligned rows (default: the merge's own row only)")
    p.add_argument("--heldout", type=Path, default=None, help="held-out text for coverage and merge-share thresholds")
    p.add_argument("--heldout-documents", type=int, default=None, help="use the first N documents of --heldout")
    p.add_argument("--json", type=Path, default=None, help="also write the summary here")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-o", "--output", required=True, type=Path)


def run(args) -> None:
    import dataclasses

    import torch

    from vllm_umim.evaluation.rule_harm import score_rules, summarize_harm
    from vllm_umim.evaluation.token_reduction import tokenized_documents
    from vllm_umim.module.batches import corpus_windows
    from vllm_umim.module.file_format import model_identity, resolve_module
    from vllm_umim.module.frozen_model import load_frozen_model
    from vllm_umim.rules import save_rules
    from vllm_umim.rules.ruleset import tokenizer_fingerprint

    if args.threads:
        torch.set_num_threads(args.threads)
    frozen = load_frozen_model(args.model, args.rules)
    model, tokenizer, rules = frozen.model, frozen.tokenizer, frozen.rules
    module, _ = resolve_module(args.module, model.config.hidden_size, model_identity(model.config),
                               tokenizer_fingerprint(tokenizer))
    module = module.float().eval()
    windows, _ = corpus_windows(args.corpus, tokenizer, args.seq_len, args.windows * args.seq_len, 0, args.seed)
    meta = {"module": str(args.module), "corpus": str(args.corpus), "seq_len": args.seq_len, "seed": args.seed}
    scored, _ = score_rules(model, module, rules, windows, args.horizon, not args.no_progress, meta)
    save_rules(scored, args.output)
    print(f"wrote {args.output} ({args.output.stat().st_size} bytes): {scored.summary()}")
    heldout = tokenized_documents(tokenizer, args.heldout, args.heldout_documents) if args.heldout else None
    summary = summarize_harm(scored, tokenizer, heldout)
    print(f"harm: {json.dumps(scored.meta['harm'])}")
    print("\n".join(summary.lines()))
    if args.json:
        from vllm_umim.files import write_bytes_atomic

        write_bytes_atomic(json.dumps({"harm": scored.meta["harm"], **dataclasses.asdict(summary)}, indent=2).encode(), args.json)
