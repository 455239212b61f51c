"""The train / eval / teacher-cache flags parse into the typed configs the library takes, with the
dataclasses' defaults (each default lives once)."""

from pathlib import Path

import pytest

from vllm_umim.cli.main import build_parser
from vllm_umim.cli.train import job_from_args
from vllm_umim.errors import OptionError
from vllm_umim.training.teacher_cache import TeacherRay
from vllm_umim.training.train_run import TeacherCacheJob, TrainJob, starting_module
from vllm_umim.training.trainer import TrainConfig

TRAIN = ["train", "--model", "m", "--rules", "r", "--corpus", "c", "-o", "o.safetensors"]


def test_train_and_eval_subcommands_parse():
    p = build_parser()
    a = p.parse_args([*TRAIN, "--max-tokens", "10", "--resume"])
    assert a.command == "train" and a.max_tokens == 10 and a.resume and a.lr == 8e-4 and a.weight_decay == 1e-3
    a = p.parse_args(["eval", "--model", "m", "--rules", "r", "--module", "x.safetensors", "--corpus", "c", "--qa", "--limit", "5"])
    assert a.command == "eval" and a.qa and a.limit == 5 and a.modules == ["x.safetensors"]


def test_train_flags_build_the_configs_with_the_dataclass_defaults():
    job = job_from_args(build_parser().parse_args(TRAIN))
    assert job.train == TrainConfig()  # every training default comes from TrainConfig
    assert job.teacher == TeacherCacheJob("m", Path("r"), Path("c"))
    assert job.teacher.ray == TeacherRay() and job.output == Path("o.safetensors")
    assert (job.cache_tokens, job.init_module, job.refine_rules, job.resume) == (None, None, 0, False)
    assert job.run_folder == Path("o.safetensors.run") and job.cache_folder == Path("o.safetensors.run/teacher")
    job = job_from_args(build_parser().parse_args([
        *TRAIN, "--max-tokens", "10", "--seed", "3", "--no-progress", "--lr", "0.01", "--schedule", "linear", "--k", "8",
        "--seq-len", "64", "--threads", "2", "--run-dir", "runs/a"]))
    assert (job.train.max_tokens, job.train.seed, job.train.progress, job.train.lr, job.train.schedule) == (10, 3, False, 0.01, "linear")
    # the teacher cache uses the training seed (window split) and progress setting
    assert (job.teacher.seed, job.teacher.progress, job.teacher.k, job.teacher.seq_len, job.teacher.threads) == (3, False, 8, 64, 2)
    assert job.cache_folder == Path("runs/a/teacher")


def test_teacher_ray_flags_parse():
    p = build_parser()
    assert job_from_args(p.parse_args(TRAIN)).teacher.ray == TeacherRay(teacher_workers=0, ray_address=None, teacher_threads=1)
    a = p.parse_args([*TRAIN, "--teacher-workers", "8", "--ray-address", "10.0.0.1:6379", "--teacher-threads", "2"])
    assert job_from_args(a).teacher.ray == TeacherRay(teacher_workers=8, ray_address="10.0.0.1:6379", teacher_threads=2)


def test_teacher_cache_subcommand_parses():
    a = build_parser().parse_args(["teacher-cache", "--model", "m", "--rules", "r", "--corpus", "c", "--cache-dir", "cache",
                                   "--max-tokens", "4096", "--teacher-workers", "2", "--seed", "5", "--no-progress"])
    assert (a.command, a.max_tokens, a.cache_dir, a.seed, a.progress, a.teacher_workers) == ("teacher-cache", 4096, Path("cache"), 5, False, 2)


def test_refinement_and_precision_flags():
    p = build_parser()
    job = job_from_args(p.parse_args(TRAIN))
    assert (job.init_module, job.refine_rules, job.train.precision, job.train.train_part) == (None, 0, "fp32", "all")
    assert starting_module(job, None, None, None) is None  # a new module: mean pooling at step 0
    job = job_from_args(p.parse_args([*TRAIN, "--init-module", "base.safetensors", "--refine-rules", "64", "--precision", "bf16"]))
    assert (job.refine_rules, job.train.precision, job.train.train_part) == (64, "bf16", "refinement")
    with pytest.raises(OptionError, match="--init-module"):  # refused before any model is loaded
        job_from_args(p.parse_args([*TRAIN, "--refine-rules", "64"]))


def test_refine_rules_without_init_module_is_one_line_from_the_command(capsys):
    from vllm_umim.cli.main import main

    assert main([*TRAIN, "--refine-rules", "4"]) == 2
    err = capsys.readouterr().err
    assert err == "vllm-umim: error: --refine-rules refines a trained module: pass it with --init-module\n"


def test_train_job_refuses_a_negative_refinement():
    with pytest.raises(OptionError, match=">= 0"):
        TrainJob(TeacherCacheJob("m", Path("r"), Path("c")), Path("o"), refine_rules=-1)
