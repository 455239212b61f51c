"""``vllm-umim train``: build the teacher cache (once, resumable), then distil a merge module
(paper §3.3). The flags are the fields of ``TeacherCacheJob``, ``TrainJob``, ``TrainConfig``,
``ReaderConfig`` and ``TeacherRay`` (``vllm_umim.training``); ``torchrun ... -m vllm_umim.cli.main train`` runs it on
several processes."""

from __future__ import annotations

from vllm_umim.cli.config_args import add_config_arguments, config_from_args
from vllm_umim.training.reader import ReaderConfig
from vllm_umim.training.teacher_cache import TeacherRay
from vllm_umim.training.train_run import TeacherCacheJob, TrainJob
from vllm_umim.training.trainer import TrainConfig


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a merge module by sequential computation distillation (paper §3.3)")
    add_config_arguments(p, TeacherCacheJob, skip=("seed", "progress"))  # TrainConfig's seed and progress serve both
    for config in (TrainJob, TrainConfig, ReaderConfig, TeacherRay):
        add_config_arguments(p, config)


def job_from_args(args) -> TrainJob:
    train = config_from_args(TrainConfig, args)
    teacher = config_from_args(TeacherCacheJob, args, seed=train.seed, progress=train.progress,
                               ray=config_from_args(TeacherRay, args))
    return config_from_args(TrainJob, args, teacher=teacher, train=train, reader=config_from_args(ReaderConfig, args))


def run(args) -> None:
    from vllm_umim.training.train_run import run_train

    run_train(job_from_args(args))
