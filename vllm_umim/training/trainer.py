"""Train a merge module by sequential computation distillation (paper §3.3, App. E.2).

* The LM is frozen (``requires_grad=False``) but differentiable: gradients flow through it into
  the surrogate embeddings and from there into the merge module, the only trainable part.
* Targets come from a :mod:`teacher cache <vllm_umim.training.teacher_cache>` built once.
* AdamW (lr 8e-4, weight decay 1e-3, paper App. E.2), linear warmup then cosine (or linear)
  decay over the run; validation loss every ``eval_every`` steps with early stopping
  (``patience`` evaluations without improvement); the best module by validation loss is the
  result, as in the paper.
* ``max_tokens`` is the budget in *raw* training tokens (windows x seq_len, summed over ranks);
  epochs repeat over the cached windows until it is spent.
* Checkpoint (``ckpt-last.safetensors``: module, optimizer, scheduler, step and counters; see
  :mod:`~vllm_umim.training.checkpoint`) every ``checkpoint_every`` steps and at the end, plus
  ``module-step<N>.safetensors`` snapshots; ``resume=True`` continues from it exactly (same data
  order, bit for bit). Resuming with a larger ``max_tokens`` stretches the LR schedule over the new budget.
* Resume checks provenance: the checkpoint records the ``TrainConfig`` and the run's shape (world
  size, training windows, sequence length, rules, model). Only ``SAFE_CHANGES`` may differ on
  resume (each accepted change is one ``{"resumed": ...}`` record in ``log.jsonl``); any other
  difference (``lr``, ``batch_size``, ``seed``, ...) is one ``CheckpointError`` listing the fields
  with their old and new values, since it would silently change the optimizer or the data order.
* ``log.jsonl``: one line per logged step/evaluation (the learning curve). A resume cuts it back
  to the checkpoint's step (records of steps redone are dropped); a fresh start empties it.
* Refinement (issue 10): ``train(..., module=base.refined(ngrams))`` with ``train_part="refinement"``
  trains only the per-rule residuals (:mod:`~vllm_umim.module.refinement`) of a trained module;
  the module's own weights stay fixed, so step 0 is exactly the module being refined.
* Adapted reader (``reader=ReaderConfig(rank=r)``, :mod:`~vllm_umim.training.reader`): LoRA
  adapters on the LM train with the module; the loss adds the KL of ``raw_windows`` unmerged
  windows per batch, so the adapted model stays close to the teacher on ordinary text. The
  adapters go into the checkpoint and, in PEFT's layout, beside every module snapshot.
* Top-1 term (``top1_weight``, issue 20): the loss adds a hinge that keeps the teacher's argmax
  first (:func:`~vllm_umim.training.loss.top1_margin_loss`); validation then scores the same
  objective, and every validation record also carries ``val_top1``, the share of merged-window
  rows whose argmax is the teacher's (what greedy decoding sees).
* ``precision="bf16"``: the student's forward runs under CPU/GPU autocast (matmuls in bfloat16;
  the module's weights, the optimizer and the loss stay fp32). Measured on this 2-core CPU with
  AVX512-BF16 (``benchmarks/training_profile.py``): 1.53x the fp32 student throughput at
  seq_len 256 (519 vs 340 raw tok/s), loss within 0.03 %. Off by default: CPUs without bf16 units run it slower.
* Distributed: under ``torchrun`` (env ``WORLD_SIZE`` > 1) the module is wrapped in torch DDP on
  the gloo backend; each rank takes every ``world``-th batch of the epoch's permutation.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from vllm_umim.errors import CheckpointError, OptionError, TeacherCacheError
from vllm_umim.files import write_bytes_atomic
from vllm_umim.module.file_format import model_identity, save_module
from vllm_umim.module.merge_module import VARIANTS, MergeModule, MergeModuleConfig
from vllm_umim.module.batches import collate, segment
from vllm_umim.training.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from vllm_umim.training.loss import TARGETS, batch_terms, distillation_loss
from vllm_umim.training.reader import CONFIG_KEY as READER_KEY
from vllm_umim.training.reader import ReaderConfig, adapt, adapter_sha256, adapter_state, load_adapter_state, save_adapter
from vllm_umim.training.teacher_cache import TeacherCache

TRAIN_PARTS = ("all", "refinement")
PRECISIONS = ("fp32", "bf16")
SCHEDULES = ("cosine", "linear")
CHECKPOINT = "ckpt-last.safetensors"  # resume state (training/checkpoint.py): no pickle
LOG = "log.jsonl"
# TrainConfig fields a resume may change: they touch neither the optimizer nor the data order
# (max_tokens stretches the LR schedule over the new budget; extra is metadata such as paths)
SAFE_CHANGES = ("max_tokens", "eval_every", "checkpoint_every", "log_every", "patience", "progress", "extra")


@dataclass
class TrainConfig:
    """The optimisation (paper App. E.2). Fields with a ``help`` are ``vllm-umim train`` flags."""

    max_tokens: int = field(default=100_000, metadata={"help": "training budget in raw tokens (all ranks)"})
    batch_size: int = field(default=8, metadata={"help": "windows per step per rank"})
    lr: float = field(default=8e-4, metadata={"help": "AdamW learning rate (peak)"})
    weight_decay: float = field(default=1e-3, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "share of the steps with linear warmup"})
    schedule: str = field(default="cosine", metadata={"choices": SCHEDULES, "help": "learning-rate decay after warmup"})
    min_lr_ratio: float = 0.0
    eval_every: int = field(default=50, metadata={"help": "validation every N steps (0: never)"})
    patience: int = field(default=3, metadata={"help": "early stopping after N evaluations without improvement (0: off)"})
    checkpoint_every: int = field(default=50, metadata={"help": "resume checkpoint every N steps and at the end (0: none)"})
    log_every: int = 1
    grad_clip: float = 1.0
    target: str = field(default="renorm", metadata={"choices": TARGETS, "help": "teacher top-k target (see training/loss.py)"})
    top1_weight: float = field(default=0.0, metadata={
        "help": "weight of the top-1 margin term on the merged windows' rows (training/loss.py; 0: the paper's loss only)"})
    top1_cap: float = field(default=1.0, metadata={
        "help": "the top-1 term asks for the teacher's own top-1 margin, at most this many logits"})
    seed: int = field(default=0, metadata={"help": "window split and order, module initialisation"})
    heads: int = field(default=4, metadata={"help": "attention heads of a new merge module"})
    variant: str = field(default="paper", metadata={"choices": VARIANTS, "help": "architecture of a new merge module"})
    train_part: str = "all"  # or "refinement": only the per-rule residuals learn
    precision: str = field(default="fp32", metadata={
        "choices": PRECISIONS, "help": "bf16: autocast for the student's forward (1.5x on a CPU with AVX512-BF16, slower "
                                      "without; the teacher cache stays fp32)"})
    progress: bool = field(default=True, metadata={"help": "no progress bars or per-shard lines"})
    extra: dict = field(default_factory=dict)


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float = 0.0) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_ratio + (1 - min_ratio) * decay


def trainable_parameters(module: MergeModule, part: str) -> list[torch.nn.Parameter]:
    """The parameters ``part`` trains ("all", or "refinement": the per-rule residuals only); the
    others are frozen."""
    if part not in TRAIN_PARTS:
        raise OptionError(f"unknown train part {part!r}; expected one of {TRAIN_PARTS}")
    if part == "refinement" and module.refinement is None:
        raise OptionError("train part 'refinement' needs a refined module (MergeModule.refined, --refine-rules)")
    for name, p in module.named_parameters():
        p.requires_grad_(part == "all" or name.startswith("refinement."))
    return [p for p in module.parameters() if p.requires_grad]


def freeze(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


class Trainer:
    COUNTERS = ("step", "tokens_seen", "best_val", "best_step", "bad_evals", "stopped_early", "elapsed")  # saved with the checkpoint

    def __init__(self, model, rules, train_cache: TeacherCache, val_cache: TeacherCache | None, out_dir, config: TrainConfig,
                 module: MergeModule | None = None, tokenizer_fingerprint: str | None = None, reader: ReaderConfig | None = None):
        self.model = freeze(model)
        self.rules = rules
        self.train, self.val = train_cache, val_cache
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.cfg = config
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("gloo")
        torch.manual_seed(config.seed)
        hidden = model.config.hidden_size
        self.module = module or MergeModule(MergeModuleConfig(hidden, num_heads=config.heads, variant=config.variant))
        self.module.train()
        self.trainable = trainable_parameters(self.module, config.train_part)
        self.identity = model_identity(model.config)
        self.check_cache_model(model)  # the frozen model, before any adapter is injected
        self.reader = reader if reader is not None and reader.rank else None
        self.val_raw: float | None = None  # an adapted reader's drift on the unmerged validation windows
        self.val_top1: float | None = None  # share of validation rows whose argmax is the teacher's
        if self.reader is not None:
            self.trainable += adapt(self.model, self.reader)
        if config.precision not in PRECISIONS:
            raise OptionError(f"unknown precision {config.precision!r}; expected one of {PRECISIONS}")
        if config.top1_weight < 0 or config.top1_cap <= 0:
            raise OptionError(f"the top-1 term needs top1_weight >= 0 and top1_cap > 0, got {config.top1_weight} "
                              f"and {config.top1_cap}")
        self.ddp = None
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(self.module)  # broadcasts rank 0's init
        self.optimizer = torch.optim.AdamW(self.trainable, lr=config.lr, weight_decay=config.weight_decay)
        if len(self.train) == 0:
            raise TeacherCacheError("the teacher cache holds no training windows")
        self.tokens_per_step = config.batch_size * self.train.seq_len * self.world
        self.total_steps = max(1, math.ceil(config.max_tokens / self.tokens_per_step))
        self.warmup = int(config.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.total_steps, self.warmup, config.schedule, config.min_lr_ratio)
        )
        self.step = 0
        self.tokens_seen = 0
        self.best_val = float("inf")
        self.best_step = -1
        self.bad_evals = 0
        self.stopped_early = False
        self.history: list[dict] = []
        self.best_state: dict[str, torch.Tensor] | None = None  # weights of best.safetensors, kept for the checkpoint
        self.elapsed = 0.0
        self.tokenizer_fingerprint = tokenizer_fingerprint or rules.tokenizer_fingerprint

    def check_cache_model(self, model) -> None:
        """The teacher caches hold this model's targets (where their manifests record the model)."""
        from vllm_umim.training.teacher_cache import teacher_fingerprint

        fingerprint = None
        for cache in (self.train, self.val):
            if cache is None:
                continue
            recorded = cache.manifest.get("model_identity")
            if recorded is not None and recorded != self.identity:
                raise TeacherCacheError(f"teacher cache {cache.dir} was built for model {recorded}, not {self.identity}")
            if cache.manifest.get("teacher_fingerprint") is not None:
                fingerprint = fingerprint or teacher_fingerprint(model)
                if cache.manifest["teacher_fingerprint"] != fingerprint:
                    raise TeacherCacheError(f"teacher cache {cache.dir} was built with other weights (teacher_fingerprint "
                                            f"{cache.manifest['teacher_fingerprint']}, this model {fingerprint})")

    def autocast(self):
        """bf16 autocast for the student when ``precision="bf16"``, else nothing."""
        if self.cfg.precision == "fp32":
            return contextlib.nullcontext()
        device = next(self.model.parameters()).device.type
        return torch.autocast(device, dtype=torch.bfloat16)

    # ---- data ---------------------------------------------------------------------------------
    @property
    def batches_per_epoch(self) -> int:
        return max(1, len(self.train) // (self.cfg.batch_size * self.world))

    def batch_indices(self, step: int) -> list[int]:
        """Window indices for this rank at global step ``step`` (deterministic, resumable)."""
        epoch, within = divmod(step, self.batches_per_epoch)
        order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch)).tolist()
        bs = self.cfg.batch_size
        start = (within * self.world + self.rank) * bs
        return order[start : start + bs]

    def make_batch(self, cache: TeacherCache, indices: list[int]):
        batch = collate(segment([cache.window(i) for i in indices], self.rules))
        counts = batch.teacher_mask.sum(1).tolist()
        cached = [cache.num_rows(i) for i in indices]
        if counts != cached:
            raise TeacherCacheError(f"teacher cache rows {cached} do not match the segmentation {counts}: rules or windows differ")
        return batch, cache.rows(indices)

    # ---- loop ---------------------------------------------------------------------------------
    def raw_loss(self, batch, teacher, windows: int) -> torch.Tensor:
        """An adapted reader's drift: the first ``windows`` windows *unmerged* through the adapted
        model against the same cached teacher rows (their rows come first). Always the "bucket"
        target (training/loss.py): the exact KL on {top-k, rest}, whose minimum is the teacher
        itself; the renormalised top-k target would reward a model that sharpens on raw text."""
        mask = batch.teacher_mask[:windows]
        n = int(mask.sum())
        logits = self.model(input_ids=batch.raw_ids[:windows], use_cache=False).logits[mask]
        topk_logits, topk_ids, lse = teacher
        return distillation_loss(logits.float(), topk_logits[:n], topk_ids[:n], lse[:n], "bucket")

    def validate(self) -> float:
        if self.val is None or len(self.val) == 0:
            return float("nan")
        self.module.eval()
        total, rows, raw_total, raw_rows, agree = 0.0, 0, 0.0, 0, 0
        with torch.no_grad():
            for i in range(0, len(self.val), self.cfg.batch_size):
                idx = list(range(i, min(i + self.cfg.batch_size, len(self.val))))
                batch, teacher = self.make_batch(self.val, idx)
                n = int(batch.loss_mask.sum())
                with self.autocast():
                    loss, agreed = self.loss_terms(self.module, batch, teacher)
                    total += float(loss) * n
                    agree += int(agreed.sum())
                    if self.reader is not None:
                        raw_total += float(self.raw_loss(batch, teacher, len(idx))) * n
                        raw_rows += n
                rows += n
        self.module.train()
        self.val_raw = raw_total / raw_rows if raw_rows else None
        self.val_top1 = agree / rows if rows else None
        return total / max(rows, 1)

    def loss_terms(self, module, batch, teacher):
        """The merged windows' loss (§3.3, plus the top-1 term when asked) and their top-1 agreements."""
        return batch_terms(self.model, module, batch, teacher, self.cfg.target, self.cfg.top1_weight, self.cfg.top1_cap)

    def log(self, record: dict) -> None:
        if self.rank == 0:
            self.history.append(record)
            with open(self.out / LOG, "a") as f:
                f.write(json.dumps(record) + "\n")

    def truncate_log(self, step: int) -> None:
        """Keep the records of steps ``<= step`` (none for ``step < 0``); a line cut short by a kill
        is dropped. Rewritten atomically."""
        path = self.out / LOG
        if self.rank != 0 or not path.exists():
            return
        kept = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line + "\n")
        write_bytes_atomic("".join(kept).encode(), path)

    def training_meta(self) -> dict:
        return {
            "tokens_seen": self.tokens_seen,
            "max_tokens": self.cfg.max_tokens,
            "steps": self.step,
            "seq_len": self.train.seq_len,
            "batch_size": self.cfg.batch_size,
            "world_size": self.world,
            "teacher_cache_tokens": self.train.num_tokens,
            "teacher_topk": self.train.k,
            "target": self.cfg.target,
            "top1_weight": self.cfg.top1_weight,
            "top1_cap": self.cfg.top1_cap,
            "lr": self.cfg.lr,
            "weight_decay": self.cfg.weight_decay,
            "schedule": self.cfg.schedule,
            "train_part": self.cfg.train_part,
            "precision": self.cfg.precision,
            "reader": asdict(self.reader) if self.reader is not None else None,
            "best_val_loss": self.best_val,
            "best_step": self.best_step,
            "stopped_early": self.stopped_early,
            "corpus": self.train.manifest.get("corpus"),
            "train_seconds": round(self.elapsed, 1),
            **self.cfg.extra,
        }

    def save_snapshot(self, path: Path, module_state: dict | None = None) -> None:
        if self.rank != 0:
            return
        module = self.module
        if module_state is not None:
            module = copy.deepcopy(self.module)
            module.load_state_dict(module_state)
        meta = self.training_meta()
        if self.reader is not None and module_state is None:
            folder = save_adapter(self.model, self.reader, reader_folder(path), self.cfg.extra.get("model_dir", ""))
            meta[READER_KEY] = adapter_sha256(folder)
        save_module(module, path, self.identity, self.tokenizer_fingerprint, self.rules.fingerprint, meta)

    def save_best(self) -> None:
        """The current module is the best so far: ``best.safetensors``, and its weights for the checkpoint."""
        self.best_state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        self.save_snapshot(self.out / "best.safetensors")

    def run_shape(self) -> dict:
        """What fixes the data order and the targets besides the TrainConfig: checked on resume."""
        return {"world_size": self.world, "train_windows": len(self.train), "seq_len": self.train.seq_len,
                "rules_fingerprint": self.rules.fingerprint, "model": self.identity,
                "reader": asdict(self.reader) if self.reader is not None else None}

    def checkpoint(self) -> None:
        if self.rank != 0:
            return
        self.save_snapshot(self.out / f"module-step{self.step}.safetensors")  # before the checkpoint that names its step
        counters = {key: getattr(self, key) for key in self.COUNTERS}
        extra = {f"best/{k}": v for k, v in (self.best_state or {}).items()}
        if self.reader is not None:  # the adapters as they are now (the best ones are in best.reader/)
            extra.update({f"reader/{k}": v for k, v in adapter_state(self.model).items()})
        save_checkpoint(self.out / CHECKPOINT, self.module, self.optimizer, self.scheduler,
                        {**counters, "config": asdict(self.cfg), "run": self.run_shape()}, extra_tensors=extra)

    def config_changes(self, path: Path, saved: dict) -> dict:
        """``{field: [old, new]}`` for the safe changes; one CheckpointError listing every other one."""
        if not isinstance(saved, dict):
            raise CheckpointError(f"{path}: the checkpoint records no training configuration")
        current = asdict(self.cfg)
        defaults = asdict(TrainConfig())
        changed = {key: [saved.get(key, defaults.get(key)), value] for key, value in current.items()
                   if saved.get(key, defaults.get(key)) != value}
        refused = {key: pair for key, pair in changed.items() if key not in SAFE_CHANGES}
        if refused:
            listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in refused.items())
            raise CheckpointError(f"{path}: cannot resume with a changed {', '.join(refused)} ({listed}); only "
                                  f"{', '.join(SAFE_CHANGES)} may change. Resume with the checkpoint's values or "
                                  "start a new run folder")
        return changed

    def check_run_shape(self, path: Path, saved: dict | None) -> None:
        if saved is None:  # a checkpoint written before the run's shape was recorded
            return
        current = self.run_shape()
        differ = {key: (saved.get(key), value) for key, value in current.items() if saved.get(key) != value}
        if differ:
            listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in differ.items())
            raise CheckpointError(f"{path}: this run is not the checkpoint's ({listed}); the data order or the "
                                  "targets would change mid-run. Resume with the same teacher cache, rules, model "
                                  "and process count, or start a new run folder")

    def resume(self) -> bool:
        """Continue from ``ckpt-last.safetensors`` if there is one (False: none, a fresh start).
        Refuses (CheckpointError) a changed configuration or run; cuts ``log.jsonl`` back to the
        checkpoint's step and records the safe changes there."""
        path = self.out / CHECKPOINT
        if not path.exists():
            return False
        loaded = read_checkpoint(path)
        counters = loaded[1]["trainer"]
        if not isinstance(counters, dict) or any(key not in counters for key in self.COUNTERS):
            raise CheckpointError(f"{path}: the trainer state lacks "
                                  f"{', '.join(k for k in self.COUNTERS if not isinstance(counters, dict) or k not in counters)}")
        changed = self.config_changes(path, counters.get("config"))
        self.check_run_shape(path, counters.get("run"))
        load_checkpoint(path, self.module, self.optimizer, self.scheduler, loaded=loaded)
        adapters = {k.removeprefix("reader/"): v for k, v in loaded[0].items() if k.startswith("reader/")}
        if self.reader is not None:
            load_adapter_state(self.model, adapters, path)
        elif adapters:
            raise CheckpointError(f"{path}: the checkpoint holds an adapted reader's adapters; this run has none (--reader-rank)")
        for key in self.COUNTERS:
            setattr(self, key, counters[key])
        best = {k.removeprefix("best/"): v for k, v in loaded[0].items() if k.startswith("best/")}
        self.best_state = best or None
        self.restore_best()
        self.truncate_log(self.step)
        self.log({"step": self.step, "tokens": self.tokens_seen, "resumed": True,
                  "changed": {key: pair for key, pair in changed.items() if key != "progress"}})
        return True

    def restore_best(self) -> None:
        """``best.safetensors`` as the checkpoint knows it: a kill after a later improvement leaves a
        newer file, which the steps redone may not reproduce (another ``eval_every``)."""
        best = self.out / "best.safetensors"
        if self.rank != 0 or self.best_state is None or self.val is None:
            return
        from vllm_umim.errors import UmimError
        from vllm_umim.module.file_format import load_module

        try:
            on_disk = load_module(best)[0].state_dict() if best.exists() else None
        except UmimError:
            on_disk = None
        if on_disk is not None and on_disk.keys() == self.best_state.keys() and all(
                torch.equal(on_disk[k], v) for k, v in self.best_state.items()):
            return
        self.save_snapshot(best, module_state=self.best_state)

    def fit(self) -> dict:
        """Train until the token budget is spent or validation stops improving; returns the
        training record. Each step: one batch, one optimizer step, then logging, validation and
        checkpoints on their schedules."""
        bar = self.progress_bar()
        if self.step == 0:
            self.truncate_log(-1)  # a fresh start: no records of an earlier run in this folder
        self.validate_start()
        started = time.perf_counter() - self.elapsed
        ema = None
        while self.tokens_seen < self.cfg.max_tokens and not self.stopped_early:
            loss, grad_norm = self.train_step()
            self.elapsed = time.perf_counter() - started
            ema = loss if ema is None else 0.95 * ema + 0.05 * loss
            if bar:
                bar.update(self.tokens_per_step)
                bar.set_postfix(loss=f"{loss:.3f}", ema=f"{ema:.3f}", tokens=self.tokens_seen)
            self.after_step(loss, grad_norm)
        if bar:
            bar.close()
        if self.cfg.checkpoint_every:
            self.checkpoint()
        return self.training_meta()

    def progress_bar(self):
        if not (self.cfg.progress and self.rank == 0):
            return None
        from tqdm import tqdm

        return tqdm(total=self.cfg.max_tokens, initial=self.tokens_seen, unit="tok", desc="train", smoothing=0.05)

    def validate_start(self) -> None:
        """Step 0 of a fresh run: validation loss of the starting module (mean pooling, or the
        module being refined), kept as best."""
        if self.step == 0 and self.rank == 0 and self.val is not None:
            val = self.validate()
            self.best_val, self.best_step = val, 0
            self.save_best()
            self.log({"step": 0, "tokens": 0, "val_loss": val, **self.val_record()})

    def val_record(self) -> dict:
        """The validation figures beside the loss: top-1 agreement, an adapted reader's drift."""
        record = {"val_top1": round(self.val_top1, 5)} if self.val_top1 is not None else {}
        return record | ({"val_raw_loss": round(self.val_raw, 5)} if self.val_raw is not None else {})

    def train_step(self) -> tuple[float, torch.Tensor | None]:
        """One batch of distillation (paper §3.3): loss, backward, clip, AdamW and LR schedule."""
        batch, teacher = self.make_batch(self.train, self.batch_indices(self.step))
        with self.autocast():
            loss = self.loss_terms(self.ddp or self.module, batch, teacher)[0]
            if self.reader is not None and self.reader.raw_windows:
                loss = loss + self.reader.raw_weight * self.raw_loss(batch, teacher, self.reader.raw_windows)
        if not batch.merged_mask.any():  # keep DDP's reducer fed even without merged spans
            loss = loss + 0.0 * sum(p.sum() for p in self.trainable)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.grad_clip) if self.cfg.grad_clip else None
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        return float(loss.detach()), grad_norm

    def after_step(self, loss: float, grad_norm) -> None:
        """Logging, validation (with early stopping) and checkpoints, each on its schedule."""
        cfg = self.cfg
        if self.step % cfg.log_every == 0:
            self.log({
                "step": self.step, "tokens": self.tokens_seen, "loss": round(loss, 5),
                "lr": self.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tok_per_s": round(self.tokens_seen / max(self.elapsed, 1e-9), 1),
                "elapsed": round(self.elapsed, 1),
            })
        last = self.tokens_seen >= cfg.max_tokens
        if cfg.eval_every and (self.step % cfg.eval_every == 0 or last):
            self.evaluate_and_maybe_stop()
        if cfg.checkpoint_every and (self.step % cfg.checkpoint_every == 0 or last or self.stopped_early):
            self.checkpoint()

    def evaluate_and_maybe_stop(self) -> None:
        stop = torch.zeros(1)
        if self.rank == 0:
            val = self.validate()
            improved = val < self.best_val
            if improved:
                self.best_val, self.best_step, self.bad_evals = val, self.step, 0
                self.save_best()
            else:
                self.bad_evals += 1
            self.log({"step": self.step, "tokens": self.tokens_seen, "val_loss": round(val, 5), "best": improved, **self.val_record()})
            if self.cfg.patience and self.bad_evals >= self.cfg.patience:
                stop[0] = 1
        if self.world > 1:
            torch.distributed.broadcast(stop, 0)
        self.stopped_early = bool(stop[0])

    def final_reader(self) -> Path | None:
        """The adapted reader's folder that goes with :meth:`final_module` (None without a reader)."""
        if self.reader is None:
            return None
        best = reader_folder(self.out / "best.safetensors")
        if self.val is not None and best.exists():
            return best
        return save_adapter(self.model, self.reader, self.out / "last.reader", self.cfg.extra.get("model_dir", ""))

    def final_module(self) -> MergeModule:
        """The best module by validation loss (the last one when there is no validation set)."""
        best = self.out / "best.safetensors"
        if self.val is not None and best.exists():
            from vllm_umim.module.file_format import load_module

            return load_module(best)[0]
        return self.module


def reader_folder(module_path: Path) -> Path:
    """Where an adapted reader's adapters go beside a module file: ``<name>.reader/``."""
    return Path(module_path).with_name(Path(module_path).stem + ".reader")


def train(model, rules, cache_dir, out_dir, config: TrainConfig, resume: bool = False, output: str | Path | None = None,
          tokenizer_fingerprint: str | None = None, module: MergeModule | None = None, reader: ReaderConfig | None = None) -> dict:
    """Train from ``cache_dir/{train,val}`` into ``out_dir``; write the final module to ``output``.
    ``module``: the starting module (default: a new one, i.e. mean pooling)."""
    cache_dir = Path(cache_dir)
    train_cache = TeacherCache(cache_dir / "train")
    val_cache = TeacherCache(cache_dir / "val") if (cache_dir / "val" / "manifest.json").exists() else None
    trainer = Trainer(model, rules, train_cache, val_cache, out_dir, config, module=module,
                      tokenizer_fingerprint=tokenizer_fingerprint, reader=reader)
    if resume and trainer.resume() and trainer.rank == 0:
        print(f"resumed from step {trainer.step} ({trainer.tokens_seen} tokens)", flush=True)
    meta = trainer.fit()
    if output is not None and trainer.rank == 0:
        module = trainer.final_module()
        meta = {**meta, "selected": "best validation loss" if trainer.val is not None else "last"}
        adapters = trainer.final_reader()
        if adapters is not None:
            import shutil

            target = reader_folder(Path(output))
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(adapters, target)
            meta[READER_KEY] = adapter_sha256(target)
        save_module(module, output, trainer.identity, trainer.tokenizer_fingerprint, rules.fingerprint, meta)
    if trainer.world > 1:
        torch.distributed.barrier()
    return meta
