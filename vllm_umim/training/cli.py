"""``vllm-umim train``: build the teacher cache (once, resumable), then distil a merge module.

Kept free of heavy imports at module level so building the CLI parser stays fast.

Single process::

    OMP_NUM_THREADS=1 vllm-umim train --model DIR --rules rules.bin --corpus train.txt \\
        -o module.safetensors --max-tokens 524288 --threads 1

Two CPU processes (torch DDP, gloo)::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 -m vllm_umim.cli.main train ...

Teacher cache over a Ray cluster (the student still trains here, or under torchrun)::

    vllm-umim train ... --teacher-workers 16 --ray-address HEAD_IP:6379
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF model folder (frozen teacher and student LM)")
    p.add_argument("--rules", required=True, type=Path)
    p.add_argument("--corpus", required=True, type=Path, help="training text: .txt, one document per line, or .jsonl with a 'text' per record (vllm-umim training-mix)")
    p.add_argument("-o", "--output", required=True, type=Path, help="final merge module (.safetensors)")
    p.add_argument("--max-tokens", type=int, default=100_000, help="training budget in raw tokens (all ranks)")
    p.add_argument("--cache-tokens", type=int, default=None, help="raw tokens in the teacher cache (default: --max-tokens)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8, help="windows per step per rank")
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--weight-decay", type=float, default=1e-3)
    p.add_argument("--warmup-ratio", type=float, default=0.05)
    p.add_argument("--schedule", choices=("cosine", "linear"), default="cosine")
    p.add_argument("--eval-every", type=int, default=50, help="validation every N steps (0: never)")
    p.add_argument("--patience", type=int, default=3, help="early stopping after N evaluations without improvement (0: off)")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--val-windows", type=int, default=32)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--variant", choices=("paper", "token_processor"), default="paper")
    p.add_argument("--init-module", type=Path, default=None,
                   help="start from this trained module instead of mean pooling (needed by --refine-rules)")
    p.add_argument("--refine-rules", type=int, default=0, metavar="K",
                   help="add a per-rule residual for the K spans merged most often in the training windows and train "
                        "only those residuals (module/refinement.py); the module's own weights stay fixed")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: autocast for the student's forward (1.5x on a CPU with AVX512-BF16, slower without; the teacher cache stays fp32)")
    p.add_argument("--target", choices=("renorm", "bucket"), default="renorm", help="teacher top-k target (see training/loss.py)")
    p.add_argument("--k", type=int, default=64, help="teacher top-k kept in the cache")
    p.add_argument("--run-dir", type=Path, default=None, help="checkpoints and log.jsonl (default: <output>.run/)")
    p.add_argument("--cache-dir", type=Path, default=None, help="teacher cache (default: <run-dir>/teacher)")
    p.add_argument("--resume", action="store_true", help="continue from <run-dir>/ckpt-last.safetensors (a larger --max-tokens stretches the schedule)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch default)")
    add_teacher_ray_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def add_teacher_ray_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher-workers", type=int, default=0, metavar="N",
                   help="compute the teacher cache's missing shards with N Ray actors (one CPU each; 0: in this "
                        "process). Same shard files either way; an interrupted cache resumes with either")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster for --teacher-workers (default: RAY_ADDRESS or the `ray start` cluster on this "
                        "node, else a new local instance)")
    p.add_argument("--teacher-threads", type=int, default=1, help="torch threads per Ray teacher actor")


def teacher_ray_options(args) -> dict:
    """``build_cache`` keyword arguments from ``add_teacher_ray_arguments``' flags."""
    return {"ray_workers": args.teacher_workers, "ray_address": args.ray_address, "ray_threads": args.teacher_threads}


def starting_module(args, model, rules, train_cache_dir: Path):
    """None (a new module), the ``--init-module``, or that module refined for the ``--refine-rules``
    spans merged most often in the cached training windows (the same on every rank and on resume)."""
    if args.refine_rules and args.init_module is None:
        raise SystemExit("--refine-rules refines a trained module: pass it with --init-module")
    if args.init_module is None:
        return None
    from vllm_umim.module.batches import segment
    from vllm_umim.module.file_format import load_module, model_identity
    from vllm_umim.module.refinement import most_frequent_spans
    from vllm_umim.rules.ruleset import MAX_SPAN
    from vllm_umim.training.teacher_cache import TeacherCache

    module = load_module(args.init_module, model_identity(model.config), rules.tokenizer_fingerprint)[0]
    if not args.refine_rules:
        return module
    cache = TeacherCache(train_cache_dir)
    spans = (span for seg in segment([cache.window(i) for i in range(len(cache))], rules) for span in seg.merged_spans())
    return module.refined(most_frequent_spans(spans, args.refine_rules, MAX_SPAN))


def run_train(args) -> dict:
    import json

    import torch
    from vllm_umim.module.frozen_model import load_frozen_model
    from vllm_umim.rules.ruleset import tokenizer_fingerprint
    from vllm_umim.module.batches import corpus_windows
    from vllm_umim.training.teacher_cache import build_cache
    from vllm_umim.training.trainer import TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    run_dir = args.run_dir or args.output.with_name(args.output.name + ".run")
    cache_dir = args.cache_dir or run_dir / "teacher"
    frozen = load_frozen_model(args.model, args.rules)
    model, tok, rules = frozen.model, frozen.tokenizer, frozen.rules
    cache_tokens = args.cache_tokens or args.max_tokens
    if rank == 0:
        train_w, val_w = corpus_windows(args.corpus, tok, args.seq_len, cache_tokens, args.val_windows, args.seed)
        meta = {"corpus": str(args.corpus), "model": str(args.model)}
        if val_w:
            build_cache(model, rules, val_w, cache_dir / "val", k=args.k, manifest=meta, progress=not args.no_progress,
                        **teacher_ray_options(args))
        build_cache(model, rules, train_w, cache_dir / "train", k=args.k, manifest=meta, progress=not args.no_progress,
                    **teacher_ray_options(args))
    if world > 1:
        torch.distributed.barrier()
    config = TrainConfig(
        max_tokens=args.max_tokens, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio, schedule=args.schedule, eval_every=args.eval_every, patience=args.patience,
        checkpoint_every=args.checkpoint_every, target=args.target, seed=args.seed, heads=args.heads,
        variant=args.variant, progress=not args.no_progress,
        train_part="refinement" if args.refine_rules else "all", precision=args.precision,
        extra={"rules": str(args.rules), "model_dir": str(args.model)},
    )
    module = starting_module(args, model, rules, cache_dir / "train")
    if args.init_module is not None:
        config.extra["init_module"] = str(args.init_module)
    meta = train(model, rules, cache_dir, run_dir, config, resume=args.resume, output=args.output,
                 tokenizer_fingerprint=tokenizer_fingerprint(tok), module=module)
    if rank == 0:
        print(json.dumps(meta, indent=2))
        print(f"wrote {args.output}")
    if world > 1:
        torch.distributed.destroy_process_group()
    return meta
