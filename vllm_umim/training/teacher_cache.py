"""Run the frozen teacher once over the training windows and keep its top-k logits.

Only the rows the loss needs are kept (``Batch.teacher_mask``: the last raw token of every
element from the first merge on). Per row: the top-k logits (fp32), their token ids (int32) and
the logsumexp over the full vocabulary, so ``exp(logit - lse)`` is the *exact* teacher
probability of each kept id (and ``1 - sum`` the mass left out).

Layout under ``cache_dir``::

    manifest.json              what the cache was built from (model, rules, seq_len, k, windows)
    windows.safetensors        int32 [N, seq_len] raw token windows, in training order
    shard-00000.safetensors    windows [0, W): row_offsets int64 [W+1], topk_ids int32 [R, k],
                               topk_logits fp32 [R, k], lse fp32 [R]
    ...

Shards, the windows and the manifest are written atomically (tmp + rename); shards are skipped when
present, so an interrupted build resumes where it stopped. ``TeacherCache`` reads the finished
shards back; a file it cannot read whole is one ``TeacherCacheError`` naming it.

Provenance (``COMPARED``): a cache is reused only for the same top-k, sequence length, shard size,
rules, model and corpus. The model is its :func:`~vllm_umim.module.file_format.model_identity` plus
:func:`teacher_fingerprint` (a sample of its weights, so two checkpoints of one architecture and
tokenizer differ); the corpus is the sha256 of the corpus file's bytes (``corpus_sha256``, given by
``train_run.build_teacher_caches``; the windows themselves are compared token by token too). A
manifest written before these were recorded is accepted with a warning when its model path is the
same, and the current values are recorded in it.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from vllm_umim.errors import TeacherCacheError
from vllm_umim.files import save_safetensors, write_json_atomic
from vllm_umim.training.teacher_shards import compute_shard, teacher_topk

__all__ = ["COMPARED", "FORMAT", "TeacherCache", "TeacherRay", "build_cache", "compute_shard", "read_manifest",
           "shard_path", "teacher_fingerprint", "teacher_topk"]
FORMAT = "umim-teacher-cache/1"
# manifest fields a reused cache must match; the last three were added later (PROVENANCE)
COMPARED = ("k", "seq_len", "shard_windows", "rules_fingerprint", "model_identity", "teacher_fingerprint", "corpus_sha256")
PROVENANCE = ("model_identity", "teacher_fingerprint", "corpus_sha256")
SHARD_TENSORS = ("row_offsets", "topk_ids", "topk_logits", "lse")
SAMPLE = 1 << 16  # values per weight tensor that teacher_fingerprint hashes


@dataclass
class TeacherRay:
    """Where the missing shards are computed: in this process (``teacher_workers=0``) or by that
    many Ray actors (``vllm_umim.training.ray_teacher``)."""

    teacher_workers: int = field(default=0, metadata={
        "metavar": "N", "help": "compute the teacher cache's missing shards with N Ray actors (one CPU each; 0: in this "
                                "process). Same shard files either way; an interrupted cache resumes with either"})
    ray_address: str | None = field(default=None, metadata={
        "help": "Ray cluster for --teacher-workers (default: RAY_ADDRESS or the `ray start` cluster on this node, "
                "else a new local instance)"})
    teacher_threads: int = field(default=1, metadata={"help": "torch threads per Ray teacher actor"})


def shard_path(cache_dir: Path, shard: int) -> Path:
    return Path(cache_dir) / f"shard-{shard:05d}.safetensors"


def shard_done(path: Path, num_windows: int) -> bool:
    """Whether ``path`` is a readable shard of ``num_windows`` windows. The last shard of a smaller
    cache is shorter: a larger budget recomputes it whole; so is any shard that cannot be read."""
    from safetensors import safe_open

    if not path.exists():
        return False
    try:
        with safe_open(path, "pt") as f:
            return (f.metadata() or {}).get("num_windows") == str(num_windows)
    except (SafetensorError, OSError, RuntimeError, ValueError):
        return False


def teacher_fingerprint(model) -> str:
    """sha256 (16 hex digits) of every parameter's name, shape and dtype and of up to ``SAMPLE``
    evenly strided values of each: tells two checkpoints of one architecture apart in well under a
    second, without reading every weight of a large model."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // SAMPLE)
            digest.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            digest.update(flat[::step].float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def read_manifest(path: Path) -> dict:
    """A cache's ``manifest.json``, or one TeacherCacheError naming it."""
    try:
        manifest = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise TeacherCacheError(f"{path}: not a readable teacher cache manifest ({error}); remove the cache folder "
                                "to rebuild it") from None
    missing = [key for key in ("k", "seq_len", "shard_windows") if not isinstance(manifest, dict) or key not in manifest]
    if missing:
        raise TeacherCacheError(f"{path}: the teacher cache manifest lacks {', '.join(missing)}; remove the cache folder "
                                "to rebuild it")
    return manifest


def read_tensors(path: Path, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors of one cache file, or one TeacherCacheError naming it (truncated, foreign, keys missing)."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise TeacherCacheError(f"{path}: not a readable teacher cache file ({error}); remove it to recompute it") from None
    missing = [name for name in names if name not in tensors]
    if missing:
        raise TeacherCacheError(f"{path}: lacks the tensor(s) {', '.join(missing)}; remove it to recompute it")
    return tensors


def check_manifest(cache_dir: Path, old: dict, info: dict) -> dict:
    """The manifest to write for ``info`` over an existing ``old`` one: one TeacherCacheError
    naming the first field that differs; an old manifest without the provenance fields is accepted
    (warning) for the same model path, and gets the current values."""
    absent = [key for key in PROVENANCE if key not in old and info.get(key) is not None]
    for key in COMPARED:
        if key in absent:
            continue
        if old.get(key) != info.get(key):
            raise TeacherCacheError(f"teacher cache {cache_dir} was built with {key}={old.get(key)}, not {info.get(key)}; "
                                    "remove it or use another cache directory")
    if absent:
        if old.get("model") != info.get("model"):
            raise TeacherCacheError(f"teacher cache {cache_dir} records no {', '.join(absent)} and was built for model "
                                    f"{old.get('model')!r}, not {info.get('model')!r}; remove it or use another cache directory")
        print(f"warning: teacher cache {cache_dir} predates the {', '.join(absent)} records; reusing it for the same "
              "model path and recording the current values", file=sys.stderr, flush=True)
    return info


def build_cache(
    model,
    rules,
    windows: list[list[int]],
    cache_dir: str | Path,
    k: int = 64,
    batch_size: int = 8,
    shard_windows: int = 256,
    manifest: dict | None = None,
    progress: bool = True,
    ray: TeacherRay | None = None,
) -> Path:
    """Fill ``cache_dir`` for ``windows`` (resumable). Returns the directory. A cache already there
    is reused only if it matches on every ``COMPARED`` field and its windows start with ``windows``
    (else one TeacherCacheError); ``manifest`` adds fields (``corpus_sha256``, ``model``, ...).

    ``ray.teacher_workers > 0``: the missing shards are computed by that many Ray actors (one CPU
    and ``ray.teacher_threads`` torch threads each; ``vllm_umim.training.ray_teacher``) on the
    cluster at ``ray.ray_address`` (default: the one ``ray.init()`` finds, else a local instance); this process
    writes every shard as it arrives, so the files are the local path's, and resuming works the
    same either way."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    from vllm_umim.module.file_format import model_identity

    info = {
        "format": FORMAT,
        "k": k,
        "seq_len": len(windows[0]),
        "num_windows": len(windows),
        "shard_windows": shard_windows,
        "rules_fingerprint": rules.fingerprint,
        "model_identity": model_identity(model.config),
        "teacher_fingerprint": teacher_fingerprint(model),
        "corpus_sha256": None,
        **(manifest or {}),
    }
    manifest_path = cache_dir / "manifest.json"
    if manifest_path.exists():
        info = check_manifest(cache_dir, read_manifest(manifest_path), info)
        old_windows = read_tensors(cache_dir / "windows.safetensors", ("windows",))["windows"]
        n = min(len(old_windows), len(windows))
        if not torch.equal(old_windows[:n], torch.tensor(windows[:n], dtype=torch.int32)):
            raise TeacherCacheError(f"teacher cache {cache_dir} holds different windows (another corpus, seq_len or seed); "
                                    "remove it or use another cache directory")
    save_safetensors({"windows": torch.tensor(windows, dtype=torch.int32)}, cache_dir / "windows.safetensors")
    write_json_atomic(info, manifest_path)

    model.eval()
    num_shards = (len(windows) + shard_windows - 1) // shard_windows
    ranges = [(shard, shard * shard_windows, min((shard + 1) * shard_windows, len(windows))) for shard in range(num_shards)]
    todo = [r for r in ranges if not shard_done(shard_path(cache_dir, r[0]), r[2] - r[1])]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(windows) * len(windows[0]), unit="tok", desc="teacher", smoothing=0.05)
        bar.update(sum(hi - lo for r, lo, hi in ranges if not any(r == t[0] for t in todo)) * len(windows[0]))
    started, done_tokens = time.perf_counter(), 0
    if ray is not None and ray.teacher_workers:
        from vllm_umim.training.ray_teacher import compute_shards_on_ray

        results = compute_shards_on_ray(model, rules, windows, todo, k, batch_size, ray.teacher_workers, ray.ray_address,
                                        ray.teacher_threads)
    else:
        results = ((shard, lo, hi, compute_shard(model, rules, windows[lo:hi], k, batch_size)) for shard, lo, hi in todo)
    for shard, lo, hi, (tensors, num_raw_tokens) in results:
        save_safetensors(tensors, shard_path(cache_dir, shard), metadata={"first_window": str(lo), "num_windows": str(hi - lo)})
        done_tokens += num_raw_tokens
        if bar:
            bar.update(num_raw_tokens)
        elapsed = time.perf_counter() - started
        if progress:
            print(json.dumps({"shard": shard, "windows": hi, "tok_per_s": round(done_tokens / max(elapsed, 1e-9), 1)}), flush=True)
    if bar:
        bar.close()
    return cache_dir


class TeacherCache:
    """Read-only view of the finished shards: ``rows(window_indices)`` -> concatenated targets."""

    def __init__(self, cache_dir: str | Path, require_complete: bool = False):
        self.dir = Path(cache_dir)
        self.manifest = read_manifest(self.dir / "manifest.json")
        self.k, self.seq_len = self.manifest["k"], self.manifest["seq_len"]
        all_windows = read_tensors(self.dir / "windows.safetensors", ("windows",))["windows"]
        sw = self.manifest["shard_windows"]
        offsets, ids, vals, lse = [torch.zeros(1, dtype=torch.int64)], [], [], []
        n_windows, base = 0, 0
        shard = 0
        while (self.dir / f"shard-{shard:05d}.safetensors").exists():
            path = self.dir / f"shard-{shard:05d}.safetensors"
            t = read_tensors(path, SHARD_TENSORS)
            rows = int(t["row_offsets"][-1]) if len(t["row_offsets"]) else -1
            if rows < 0 or t["topk_ids"].shape != (rows, self.k) or t["topk_logits"].shape != (rows, self.k) \
                    or t["lse"].shape != (rows,):
                raise TeacherCacheError(f"{path}: its tensors do not fit together or k={self.k}; remove it to recompute it")
            offsets.append(t["row_offsets"][1:] + base)
            base += int(t["row_offsets"][-1])
            ids.append(t["topk_ids"])
            vals.append(t["topk_logits"])
            lse.append(t["lse"])
            n_windows += len(t["row_offsets"]) - 1
            shard += 1
            if n_windows != shard * sw and n_windows != len(all_windows):
                raise TeacherCacheError(f"{self.dir}: shard {shard - 1} is incomplete")
        if require_complete and n_windows < len(all_windows):
            raise TeacherCacheError(f"{self.dir}: only {n_windows} of {len(all_windows)} windows cached")
        self.windows = all_windows[:n_windows]
        self.row_offsets = torch.cat(offsets)
        k = self.k
        self.topk_ids = torch.cat(ids) if ids else torch.zeros(0, k, dtype=torch.int32)
        self.topk_logits = torch.cat(vals) if vals else torch.zeros(0, k)
        self.lse = torch.cat(lse) if lse else torch.zeros(0)

    def __len__(self) -> int:
        return len(self.windows)

    @property
    def num_tokens(self) -> int:
        return len(self) * self.seq_len

    def window(self, i: int) -> list[int]:
        return self.windows[i].tolist()

    def rows(self, window_indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(topk_logits [R, k], topk_ids [R, k] long, lse [R]) for these windows, in order."""
        sel = torch.cat([torch.arange(self.row_offsets[i], self.row_offsets[i + 1]) for i in window_indices])
        return self.topk_logits[sel], self.topk_ids[sel].long(), self.lse[sel]

    def num_rows(self, i: int) -> int:
        return int(self.row_offsets[i + 1] - self.row_offsets[i])
