"""Training provenance: resume refuses a changed configuration, the log never repeats a step, the
teacher cache records its model and corpus, and every unreadable checkpoint or cache file is one
UmimError naming it."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from tests.conftest import make_ruleset, tiny_llama
from tests.training.test_training import RULES, _setup, windows
from vllm_umim.errors import CheckpointError, TeacherCacheError
from vllm_umim.training.checkpoint import METADATA_KEY, load_checkpoint, read_checkpoint
from vllm_umim.training.teacher_cache import TeacherCache, build_cache
from vllm_umim.training.trainer import CHECKPOINT, TrainConfig, Trainer

STEP_TOKENS = 16 * 4  # seq_len x batch_size


def _trainer(root, model, rules, **kw):
    cfg = dict(max_tokens=STEP_TOKENS * 12, batch_size=4, lr=5e-3, eval_every=3, patience=0, checkpoint_every=4,
               progress=False)
    cfg.update(kw)
    return Trainer(model, rules, TeacherCache(root / "cache" / "train"), TeacherCache(root / "cache" / "val"),
                   root / "run", TrainConfig(**cfg))


def _log(root):
    return [json.loads(line) for line in (root / "run" / "log.jsonl").read_text().splitlines()]


def _stopped_at(root, model, rules, steps, **kw):
    """A run of the 12-step schedule killed right after step ``steps`` (``fit``'s loop, cut short)."""
    part = _trainer(root, model, rules, **kw)
    part.truncate_log(-1)
    part.validate_start()
    while part.step < steps:
        loss, grad_norm = part.train_step()
        part.after_step(loss, grad_norm)
    return part


def test_resume_is_bit_equal_and_the_log_never_repeats_a_step(tmp_path):
    model, rules = _setup(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "cache").symlink_to(tmp_path / "cache")
    ref = _trainer(tmp_path / "a", model, rules)
    ref.fit()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "cache").symlink_to(tmp_path / "cache")
    _stopped_at(tmp_path / "b", model, rules, 8)
    # steps 9 and 10 ran (and were logged, with an evaluation) before a kill: the log runs ahead
    with open(tmp_path / "b" / "run" / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 9, "loss": 1.0}) + "\n" + json.dumps({"step": 10, "loss": 1.0}) + "\n{\"step\": 1")
    resumed = _trainer(tmp_path / "b", model, rules)
    assert resumed.resume() and resumed.step == 8
    resumed.fit()
    for (name, a), b in zip(ref.module.state_dict().items(), resumed.module.state_dict().values()):
        assert torch.equal(a, b), name
    log = [r for r in _log(tmp_path / "b") if not r.get("resumed")]
    steps = [(r["step"], "val_loss" in r) for r in log]
    assert steps == [(r["step"], "val_loss" in r) for r in _log(tmp_path / "a")]
    assert len(steps) == len(set(steps))  # no step twice
    assert [r["loss"] for r in log if "loss" in r] == [r["loss"] for r in _log(tmp_path / "a") if "loss" in r]


@pytest.mark.parametrize("change", [{"lr": 1e-3}, {"batch_size": 2}, {"seed": 1}, {"target": "forward"},
                                    {"lr": 1e-3, "weight_decay": 0.5}])
def test_resume_refuses_a_changed_config(tmp_path, change):
    model, rules = _setup(tmp_path)
    _stopped_at(tmp_path, model, rules, 4)
    before = (tmp_path / "run" / CHECKPOINT).read_bytes()
    with pytest.raises(CheckpointError) as error:
        _trainer(tmp_path, model, rules, **change).resume()
    message = str(error.value)
    assert str(tmp_path / "run" / CHECKPOINT) in message and "\n" not in message
    for key, value in change.items():
        assert f"{key}: " in message and repr(value) in message
    assert (tmp_path / "run" / CHECKPOINT).read_bytes() == before


def test_resume_accepts_safe_changes_and_records_them(tmp_path):
    model, rules = _setup(tmp_path)
    _stopped_at(tmp_path, model, rules, 4)
    resumed = _trainer(tmp_path, model, rules, max_tokens=STEP_TOKENS * 14, eval_every=2, checkpoint_every=2, patience=5)
    assert resumed.resume()
    record = _log(tmp_path)[-1]
    assert record["resumed"] and record["step"] == 4
    assert record["changed"] == {"max_tokens": [STEP_TOKENS * 12, STEP_TOKENS * 14], "eval_every": [3, 2],
                                 "checkpoint_every": [4, 2], "patience": [0, 5]}
    resumed.fit()
    assert resumed.step == 14


def test_resume_refuses_another_run_shape(tmp_path):
    model, rules = _setup(tmp_path)
    _stopped_at(tmp_path, model, rules, 4)
    # the training cache grew (another --cache-tokens): batches per epoch and so the data order change
    build_cache(model, rules, windows(34, seed=1), tmp_path / "cache" / "train", k=8, batch_size=4, shard_windows=10,
                progress=False)
    with pytest.raises(CheckpointError, match=r"train_windows: 24 -> 34"):
        _trainer(tmp_path, model, rules).resume()


def test_a_newer_best_than_the_checkpoint_is_replaced_on_resume(tmp_path):
    """A kill after an improvement that followed the last checkpoint leaves best.safetensors ahead
    of the checkpoint; resuming without re-evaluating that step must not keep it."""
    from vllm_umim.module.file_format import load_module

    model, rules = _setup(tmp_path)
    part = _stopped_at(tmp_path, model, rules, 4, eval_every=2)
    best_then = {k: v.clone() for k, v in part.best_state.items()}
    for p in part.module.parameters():  # a later, "better" module lands in best.safetensors
        p.data.add_(1.0)
    part.save_snapshot(tmp_path / "run" / "best.safetensors")
    resumed = _trainer(tmp_path, model, rules, eval_every=0)
    assert resumed.resume()
    on_disk = load_module(tmp_path / "run" / "best.safetensors")[0].state_dict()
    assert all(torch.equal(on_disk[k], v) for k, v in best_then.items())


def test_fresh_start_empties_the_log(tmp_path):
    model, rules = _setup(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.jsonl").write_text(json.dumps({"step": 7, "loss": 9.0}) + "\n")
    _trainer(tmp_path, model, rules, max_tokens=STEP_TOKENS * 2).fit()
    assert [r["step"] for r in _log(tmp_path)] == [0, 1, 2, 2]


# ---- unreadable files: one error naming the file ---------------------------------------------------
def _rewrite_metadata(path, meta: str | None):
    """The same tensors with the checkpoint metadata replaced (None: removed)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata=None if meta is None else {METADATA_KEY: meta})


@pytest.mark.parametrize("damage", ["truncated", "header", "json", "keys", "counters", "optimizer", "empty"])
def test_damaged_checkpoint_is_one_error_naming_it(tmp_path, damage):
    model, rules = _setup(tmp_path)
    part = _stopped_at(tmp_path, model, rules, 4)
    path = tmp_path / "run" / CHECKPOINT
    data = path.read_bytes()
    meta = json.loads(read_checkpoint(path)[1] and json.dumps(read_checkpoint(path)[1]))
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "header":
        path.write_bytes(struct.pack("<Q", 10**9) + data[8:])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "json":
        _rewrite_metadata(path, json.dumps(meta)[:-5])
    elif damage == "keys":
        del meta["scheduler"]
        _rewrite_metadata(path, json.dumps(meta))
    elif damage == "counters":
        del meta["trainer"]["best_val"]
        _rewrite_metadata(path, json.dumps(meta))
    elif damage == "optimizer":
        meta["optimizer_param_groups"] = []
        _rewrite_metadata(path, json.dumps(meta))
    with pytest.raises(CheckpointError) as error:
        _trainer(tmp_path, model, rules).resume()
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    if damage in ("truncated", "header", "empty", "json", "keys", "optimizer"):
        with pytest.raises(CheckpointError, match=str(path)):
            load_checkpoint(path, part.module, part.optimizer, part.scheduler)


@pytest.mark.parametrize("damage", ["manifest-json", "manifest-keys", "windows-truncated", "shard-truncated",
                                    "shard-tensors", "shard-shape"])
def test_damaged_teacher_cache_is_one_error_naming_the_file(tmp_path, damage):
    from safetensors.torch import load_file, save_file

    _setup(tmp_path)
    cache = tmp_path / "cache" / "train"
    shard = cache / "shard-00001.safetensors"
    if damage == "manifest-json":
        path = cache / "manifest.json"
        path.write_text(path.read_text()[:40])
    elif damage == "manifest-keys":
        path = cache / "manifest.json"
        manifest = json.loads(path.read_text())
        del manifest["shard_windows"]
        path.write_text(json.dumps(manifest))
    elif damage == "windows-truncated":
        path = cache / "windows.safetensors"
        path.write_bytes(path.read_bytes()[:-7])
    elif damage == "shard-truncated":
        path = shard
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "shard-tensors":
        path = shard
        tensors = load_file(str(path))
        del tensors["lse"]
        save_file(tensors, str(path))
    else:
        path = shard
        tensors = load_file(str(path))
        tensors["topk_ids"] = tensors["topk_ids"][:, :4].contiguous()
        save_file(tensors, str(path))
    with pytest.raises(TeacherCacheError) as error:
        TeacherCache(cache)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_teacher_cache_records_and_compares_model_and_corpus(tmp_path, capsys):
    model, rules = _setup(tmp_path)
    cache = tmp_path / "cache" / "train"
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["model_identity"]["hidden_size"] == 32 and len(manifest["teacher_fingerprint"]) == 16
    assert manifest["k"] == 8
    args = dict(k=8, batch_size=4, shard_windows=10, progress=False)
    # the same architecture and tokenizer, other weights: refused, naming the field
    other = tiny_llama(seed=1)
    with pytest.raises(TeacherCacheError, match=r"was built with teacher_fingerprint="):
        build_cache(other, rules, windows(24, seed=1), cache, **args)
    with pytest.raises(TeacherCacheError, match=r"was built with model_identity="):
        build_cache(tiny_llama(hidden_size=48), rules, windows(24, seed=1), cache, **args)
    with pytest.raises(TeacherCacheError, match="built with other weights"):
        Trainer(other, rules, TeacherCache(cache), None, tmp_path / "run", TrainConfig(progress=False))
    # the corpus file's hash
    build_cache(model, rules, windows(24, seed=1), tmp_path / "c2", manifest={"corpus_sha256": "aa"}, **args)
    with pytest.raises(TeacherCacheError, match=r"was built with corpus_sha256=aa, not bb"):
        build_cache(model, rules, windows(24, seed=1), tmp_path / "c2", manifest={"corpus_sha256": "bb"}, **args)
    # a manifest from before the provenance fields: reused for the same model path, with a warning
    old = {k: v for k, v in manifest.items() if k not in ("model_identity", "teacher_fingerprint", "corpus_sha256")}
    (cache / "manifest.json").write_text(json.dumps({**old, "model": "m1"}))
    with pytest.raises(TeacherCacheError, match="records no model_identity"):
        build_cache(model, rules, windows(24, seed=1), cache, manifest={"model": "m2"}, **args)
    build_cache(model, rules, windows(24, seed=1), cache, manifest={"model": "m1"}, **args)
    assert "predates" in capsys.readouterr().err
    assert json.loads((cache / "manifest.json").read_text())["teacher_fingerprint"] == manifest["teacher_fingerprint"]


def test_build_teacher_caches_records_the_corpus_file(tmp_path, monkeypatch):
    """build_teacher_caches puts the corpus file's sha256 in both manifests; an edited corpus is refused."""
    from types import SimpleNamespace

    import vllm_umim.module.batches as batches
    from vllm_umim.files import file_sha256
    from vllm_umim.training.train_run import TeacherCacheJob, build_teacher_caches

    monkeypatch.setattr(batches, "corpus_windows", lambda *args: (windows(8, seed=1), windows(2, seed=2)))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the city of new york\n")
    frozen = SimpleNamespace(model=tiny_llama(), tokenizer=None, rules=make_ruleset(RULES))
    job = TeacherCacheJob(model="m", rules=tmp_path / "r.bin", corpus=corpus, seq_len=16, val_windows=2, k=4,
                          progress=False)
    build_teacher_caches(job, frozen, tmp_path / "cache", 16 * 8)
    for part in ("train", "val"):
        manifest = json.loads((tmp_path / "cache" / part / "manifest.json").read_text())
        assert manifest["corpus_sha256"] == file_sha256(corpus)
    corpus.write_text("the city of new york\nthe united states\n")
    with pytest.raises(TeacherCacheError, match="corpus_sha256"):
        build_teacher_caches(job, frozen, tmp_path / "cache", 16 * 8)
