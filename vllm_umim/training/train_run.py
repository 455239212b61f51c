"""A whole training run from a corpus: the teacher cache (built once, resumable), then the
distillation of a merge module (paper §3.3). ``vllm-umim train`` builds a :class:`TrainJob` from
its flags and calls :func:`run_train`; the teacher cache alone is :func:`build_teacher_caches`.

Single process::

    OMP_NUM_THREADS=1 vllm-umim train --model DIR --rules rules.bin --corpus train.txt \\
        -o module.safetensors --max-tokens 524288 --threads 1

Two CPU processes (torch DDP, gloo)::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 -m vllm_umim.cli.main train ...

Teacher cache over a Ray cluster (the student still trains here, or under torchrun)::

    vllm-umim train ... --teacher-workers 16 --ray-address HEAD_IP:6379
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vllm_umim.errors import OptionError
from vllm_umim.training.reader import ReaderConfig
from vllm_umim.training.teacher_cache import TeacherRay
from vllm_umim.training.trainer import TrainConfig


@dataclass
class TeacherCacheJob:
    """What the teacher cache is built from, and where the teacher runs (``ray``). Fields with a
    ``help`` are command-line flags."""

    model: str = field(metadata={"help": "HF model folder (frozen teacher and student LM)"})
    rules: Path = field(metadata={"help": "rules file"})
    corpus: Path = field(metadata={"help": "training text: .txt, one document per line, or .jsonl with a 'text' per "
                                           "record (vllm-umim training-mix)"})
    seq_len: int = field(default=256, metadata={"help": "raw tokens per training window"})
    val_windows: int = field(default=32, metadata={"help": "windows held out for validation"})
    k: int = field(default=64, metadata={"help": "teacher top-k kept in the cache"})
    threads: int = field(default=0, metadata={"help": "torch threads per process (0: torch default)"})
    teacher_batch_size: int = 8  # windows per teacher forward
    seed: int = field(default=0, metadata={"help": "window split and order (as the --seed of vllm-umim train)"})
    progress: bool = field(default=True, metadata={"help": "no progress bars or per-shard lines"})
    ray: TeacherRay = field(default_factory=TeacherRay)


@dataclass
class TrainJob:
    """A training run: the teacher cache's inputs in ``teacher``, the optimisation in ``train``
    (:class:`TrainConfig`), files here. Fields with a ``help`` are ``vllm-umim train`` flags."""

    teacher: TeacherCacheJob
    output: Path = field(metadata={"flags": ("-o", "--output"), "help": "final merge module (.safetensors)"})
    cache_tokens: int | None = field(default=None, metadata={"help": "raw tokens in the teacher cache (default: --max-tokens)"})
    init_module: Path | None = field(default=None, metadata={
        "help": "start from this trained module instead of mean pooling (needed by --refine-rules)"})
    refine_rules: int = field(default=0, metadata={
        "metavar": "K", "help": "add a per-rule residual for the K spans merged most often in the training windows and "
                                "train only those residuals (module/refinement.py); the module's own weights stay fixed"})
    context_tokens: int = field(default=0, metadata={
        "metavar": "K", "help": "the module also reads the K raw tokens before each span (module/context.py); with "
                                "--init-module, a context branch starting at zero is added to that module"})
    run_dir: Path | None = field(default=None, metadata={"help": "checkpoints and log.jsonl (default: <output>.run/)"})
    cache_dir: Path | None = field(default=None, metadata={"help": "teacher cache (default: <run-dir>/teacher)"})
    resume: bool = field(default=False, metadata={
        "help": "continue from <run-dir>/ckpt-last.safetensors (a larger --max-tokens stretches the schedule)"})
    train: TrainConfig = field(default_factory=TrainConfig)
    reader: ReaderConfig = field(default_factory=ReaderConfig)

    def __post_init__(self):
        if self.refine_rules < 0:
            raise OptionError(f"--refine-rules must be >= 0, got {self.refine_rules}")
        if self.refine_rules and self.init_module is None:
            raise OptionError("--refine-rules refines a trained module: pass it with --init-module")
        if self.refine_rules and self.context_tokens:
            raise OptionError("--refine-rules trains only per-rule residuals; a context branch (--context-tokens) must train: "
                              "use one or the other")
        self.train.train_part = "refinement" if self.refine_rules else "all"

    @property
    def run_folder(self) -> Path:
        return self.run_dir or self.output.with_name(self.output.name + ".run")

    @property
    def cache_folder(self) -> Path:
        return self.cache_dir or self.run_folder / "teacher"


def build_teacher_caches(job: TeacherCacheJob, frozen, cache_dir: Path, max_tokens: int) -> None:
    """``cache_dir/val`` and ``cache_dir/train`` for ``max_tokens`` raw training tokens of the corpus
    (resumable; a cache built from other windows, rules, k, model or corpus file is refused with a
    TeacherCacheError, see ``teacher_cache.COMPARED``)."""
    from vllm_umim.files import file_sha256
    from vllm_umim.module.batches import corpus_windows
    from vllm_umim.training.teacher_cache import build_cache

    train_w, val_w = corpus_windows(job.corpus, frozen.tokenizer, job.seq_len, max_tokens, job.val_windows, job.seed)
    manifest = {"corpus": str(job.corpus), "corpus_sha256": file_sha256(job.corpus), "model": str(job.model)}
    options = {"k": job.k, "batch_size": job.teacher_batch_size, "manifest": manifest, "progress": job.progress, "ray": job.ray}
    if val_w:
        build_cache(frozen.model, frozen.rules, val_w, Path(cache_dir) / "val", **options)
    build_cache(frozen.model, frozen.rules, train_w, Path(cache_dir) / "train", **options)


def starting_module(job: TrainJob, model, rules, train_cache_dir: Path):
    """None (a new module), the ``init_module``, that module with a context branch
    (``context_tokens``), or refined for the ``refine_rules`` spans merged most often in the cached
    training windows (the same on every rank and on resume)."""
    from vllm_umim.module.merge_module import MergeModule, MergeModuleConfig

    if job.init_module is None:
        if not job.context_tokens:
            return None
        config = MergeModuleConfig(model.config.hidden_size, num_heads=job.train.heads, variant=job.train.variant,
                                   context_tokens=job.context_tokens)
        torch.manual_seed(job.train.seed)
        return MergeModule(config)
    from vllm_umim.module.batches import segment
    from vllm_umim.module.file_format import load_module, model_identity
    from vllm_umim.module.refinement import most_frequent_spans
    from vllm_umim.rules.ruleset import MAX_SPAN
    from vllm_umim.training.teacher_cache import TeacherCache

    module = load_module(job.init_module, model_identity(model.config), rules.tokenizer_fingerprint)[0]
    if job.context_tokens:
        if module.config.context_tokens:
            raise OptionError(f"{job.init_module} already reads {module.config.context_tokens} context tokens; drop --context-tokens")
        torch.manual_seed(job.train.seed)
        return module.with_context(job.context_tokens)
    if not job.refine_rules:
        return module
    cache = TeacherCache(train_cache_dir)
    spans = (span for seg in segment([cache.window(i) for i in range(len(cache))], rules) for span in seg.merged_spans())
    return module.refined(most_frequent_spans(spans, job.refine_rules, MAX_SPAN))


def run_train(job: TrainJob) -> dict:
    """Teacher cache on rank 0, then ``trainer.train`` on every rank (``torchrun``: DDP on gloo).
    Returns the final module's metadata (printed on rank 0)."""
    from vllm_umim.module.frozen_model import load_frozen_model
    from vllm_umim.rules.ruleset import tokenizer_fingerprint
    from vllm_umim.training.trainer import train

    if job.teacher.threads:
        torch.set_num_threads(job.teacher.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    run_dir, cache_dir, teacher = job.run_folder, job.cache_folder, job.teacher
    frozen = load_frozen_model(teacher.model, teacher.rules)
    if rank == 0:
        build_teacher_caches(teacher, frozen, cache_dir, job.cache_tokens or job.train.max_tokens)
    if world > 1:
        torch.distributed.barrier()
    config = job.train
    config.extra = {**config.extra, "rules": str(teacher.rules), "model_dir": str(teacher.model)}
    module = starting_module(job, frozen.model, frozen.rules, cache_dir / "train")
    if job.init_module is not None:
        config.extra["init_module"] = str(job.init_module)
    meta = train(frozen.model, frozen.rules, cache_dir, run_dir, config, resume=job.resume, output=job.output,
                 tokenizer_fingerprint=tokenizer_fingerprint(frozen.tokenizer), module=module, reader=job.reader)
    if rank == 0:
        print(json.dumps(meta, indent=2))
        print(f"wrote {job.output}")
    if world > 1:
        torch.distributed.destroy_process_group()
    return meta
