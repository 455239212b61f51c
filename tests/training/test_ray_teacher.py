"""Teacher caching over Ray (``build_cache(..., ray=TeacherRay(teacher_workers=N))``) on a local Ray instance: the same
shard files as the local path, and resuming skips the shards already written."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

from tests.conftest import make_ruleset, tiny_llama
from tests.training.test_training import RULES, windows
from vllm_umim.training.teacher_cache import TeacherCache, TeacherRay, build_cache

ray = pytest.importorskip("ray")
SHARD_WINDOWS, NUM_WINDOWS = 10, 34  # 4 shards, the last one short


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")  # no OOM killer watching a shared machine
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def read_shard(path):
    with safe_open(str(path), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}, f.metadata()


def shards_written(output: str) -> list[int]:
    return sorted(json.loads(line)["shard"] for line in output.splitlines() if line.startswith('{"shard"'))


def test_ray_shards_equal_local_shards_and_resume(local_ray, tmp_path, capsys):
    torch.set_num_threads(1)
    model, rules, data = tiny_llama(), make_ruleset(RULES), windows(NUM_WINDOWS, seed=3)
    options = dict(k=8, batch_size=4, shard_windows=SHARD_WINDOWS, manifest={"model": "tiny"})
    build_cache(model, rules, data, tmp_path / "local", progress=False, **options)
    capsys.readouterr()
    build_cache(model, rules, data, tmp_path / "ray", progress=True, ray=TeacherRay(teacher_workers=2), **options)
    assert shards_written(capsys.readouterr().out) == [0, 1, 2, 3]

    local_files = sorted(p.name for p in (tmp_path / "local").iterdir())
    assert local_files == sorted(p.name for p in (tmp_path / "ray").iterdir())
    assert [n for n in local_files if n.startswith("shard-")] == [f"shard-{i:05d}.safetensors" for i in range(4)]
    assert (tmp_path / "local" / "manifest.json").read_text() == (tmp_path / "ray" / "manifest.json").read_text()
    for name in local_files:
        if not name.endswith(".safetensors"):
            continue
        (a, meta_a), (b, meta_b) = read_shard(tmp_path / "local" / name), read_shard(tmp_path / "ray" / name)
        assert meta_a == meta_b and a.keys() == b.keys(), name
        for key in a:
            if a[key].is_floating_point():
                assert torch.allclose(a[key], b[key], atol=1e-5), (name, key)
            else:
                assert torch.equal(a[key], b[key]), (name, key)
    local, remote = TeacherCache(tmp_path / "local", require_complete=True), TeacherCache(tmp_path / "ray", require_complete=True)
    assert len(remote) == NUM_WINDOWS and torch.allclose(local.rows(list(range(NUM_WINDOWS)))[0], remote.rows(list(range(NUM_WINDOWS)))[0], atol=1e-5)

    # resume: only the missing shards are computed again, the others are left as they are
    kept = {i: os.stat(tmp_path / "ray" / f"shard-{i:05d}.safetensors").st_mtime_ns for i in (0, 2)}
    for i in (1, 3):
        (tmp_path / "ray" / f"shard-{i:05d}.safetensors").unlink()
    build_cache(model, rules, data, tmp_path / "ray", progress=True, ray=TeacherRay(teacher_workers=2), **options)
    assert shards_written(capsys.readouterr().out) == [1, 3]
    assert {i: os.stat(tmp_path / "ray" / f"shard-{i:05d}.safetensors").st_mtime_ns for i in (0, 2)} == kept
    for i in (1, 3):
        name = f"shard-{i:05d}.safetensors"
        assert torch.allclose(read_shard(tmp_path / "local" / name)[0]["topk_logits"], read_shard(tmp_path / "ray" / name)[0]["topk_logits"], atol=1e-5)
    build_cache(model, rules, data, tmp_path / "ray", progress=True, ray=TeacherRay(teacher_workers=2), **options)  # complete: nothing to do
    assert shards_written(capsys.readouterr().out) == []
