"""Artifacts are written atomically: unique temporary names, flushed, renamed, cleaned up on failure,
in the user's normal file mode (safetensors alone makes them 0600), without touching the umask."""

import os
import stat
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from vllm_umim import files
from vllm_umim.files import atomic_write, save_safetensors, write_bytes_atomic, write_json_atomic
from vllm_umim.module import MergeModule, MergeModuleConfig, save_module


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_module_file_and_raw_writes_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_module(MergeModule(MergeModuleConfig(8, num_heads=2)), tmp_path / "m.safetensors", {"name": "x"}, "t", "r")
        save_safetensors({"x": torch.zeros(2)}, tmp_path / "x.safetensors")
        write_bytes_atomic(b"abc", tmp_path / "r.bin")
        assert mode(tmp_path / "m.safetensors") == mode(tmp_path / "x.safetensors") == mode(tmp_path / "r.bin") == 0o644
        os.umask(0o077)
        save_safetensors({"x": torch.zeros(2)}, tmp_path / "private.safetensors")
        assert mode(tmp_path / "private.safetensors") == 0o600
    finally:
        os.umask(old)
    assert not list(tmp_path.glob("*.tmp"))


def test_the_umask_is_never_changed(tmp_path, monkeypatch):
    def refuse(*_):
        raise AssertionError("os.umask called: it changes the mode of files other threads create")

    monkeypatch.setattr(os, "umask", refuse)
    save_safetensors({"x": torch.zeros(2)}, tmp_path / "x.safetensors")
    write_json_atomic({"a": 1}, tmp_path / "a.json")
    assert (tmp_path / "a.json").read_text() == '{\n  "a": 1\n}\n'


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "t.bin"
    write_bytes_atomic(b"old", target)
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["t.bin"]


def test_file_and_folder_are_flushed_before_and_after_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_bytes_atomic(b"x", tmp_path / "t.bin")
    assert len(synced) == 2
    assert synced[0].endswith(".tmp") and synced[1] == str(tmp_path)


def test_concurrent_writers_of_one_target_never_mix(tmp_path):
    """Each writer has its own temporary file: the target is always one writer's whole content."""
    target = tmp_path / "shared.safetensors"
    errors = []

    def writer(value):
        try:
            for _ in range(20):
                save_safetensors({"x": torch.full((4096,), float(value))}, target)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(v,)) for v in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    x = load_file(str(target))["x"]
    assert bool((x == x[0]).all()) and float(x[0]) in {0.0, 1.0, 2.0, 3.0}
    assert not list(tmp_path.glob("*.tmp"))


def test_temporary_names_are_unique(tmp_path):
    names = {files._new_temp(tmp_path / "t.bin")[0].name for _ in range(50)}
    assert len(names) == 50


def test_a_killed_writers_leftover_is_removed_by_the_next_write_once_its_writer_is_gone(tmp_path):
    target = tmp_path / "module.safetensors"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process id that no longer runs
    hour_ago = time.time() - files.LEFTOVER_AGE_S - 60
    leftovers = {name: tmp_path / name for name in (
        f".module.safetensors.{dead.pid}.aaaaaaaaaaaa.tmp",  # dead writer, old: removed
        f".module.safetensors.{dead.pid}.bbbbbbbbbbbb.tmp",  # dead writer, fresh: it may be another machine's, kept
        f".module.safetensors.{os.getpid()}.cccccccccccc.tmp",  # a live writer: kept
        ".other.json.1.dddddddddddd.tmp",  # another target's: kept
    )}
    for name, path in leftovers.items():
        path.write_bytes(b"half")
        if "bbbb" not in name:
            os.utime(path, (hour_ago, hour_ago))
    files.write_bytes_atomic(b"whole", target)
    assert target.read_bytes() == b"whole"
    left = sorted(p.name for p in tmp_path.glob(".*.tmp"))
    assert left == sorted(n for n in leftovers if "aaaa" not in n)
