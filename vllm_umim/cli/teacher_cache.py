"""``vllm-umim teacher-cache``: build (or resume) the teacher cache alone, the first half of
``vllm-umim train`` (same flags, same files), e.g. on a Ray cluster before training elsewhere."""

from __future__ import annotations

from pathlib import Path

from vllm_umim.cli.config_args import add_config_arguments, config_from_args
from vllm_umim.training.teacher_cache import TeacherRay
from vllm_umim.training.train_run import TeacherCacheJob


def register(subparsers) -> None:
    p = subparsers.add_parser("teacher-cache", help="build or resume the teacher cache of a training run (no training)")
    add_config_arguments(p, TeacherCacheJob)
    p.add_argument("--cache-dir", required=True, type=Path, help="teacher cache folder (val/ and train/ go inside)")
    p.add_argument("--max-tokens", required=True, type=int, help="raw training tokens to cache")
    add_config_arguments(p, TeacherRay)


def run(args) -> None:
    import torch

    from vllm_umim.module.frozen_model import load_frozen_model
    from vllm_umim.training.train_run import build_teacher_caches

    job = config_from_args(TeacherCacheJob, args, ray=config_from_args(TeacherRay, args))
    if job.threads:
        torch.set_num_threads(job.threads)
    build_teacher_caches(job, load_frozen_model(job.model, job.rules), args.cache_dir, args.max_tokens)
    print(f"wrote {args.cache_dir}")
