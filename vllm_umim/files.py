"""Writing the artifacts the tools produce (rules files, module files, checkpoints, teacher caches,
model folders, measurement JSON).

Every write goes through :func:`atomic_write`: the data lands in a fresh temporary file beside the
target (a unique name, so two writers never share one), which is flushed to disk, renamed over the
target, and the folder is flushed too; on any failure the temporary file is removed and the target is
left as it was. A reader therefore sees the old file or the new one, never half of either.
A writer killed outright (SIGKILL, power loss) cannot remove its temporary file; the name carries
the writer's process id, and the next write of the same target removes such leftovers once their
writer is gone and they are an hour old (:func:`remove_leftovers`).

The file gets the user's normal mode (0666 less the umask), like any file the user writes:
``safetensors`` alone would make it owner-only (0600), so a server running as another user could not
read the module it was given. The mode is read from the temporary file the kernel created with the
umask applied; the process umask is never changed (changing it, even briefly, is process-wide).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file


LEFTOVER_AGE_S = 3600  # a dead writer's temporary file is removed only this long after it was last written


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_leftovers(path: Path) -> list[Path]:
    """Remove the temporary files beside ``path`` that a killed writer of it left: named by
    :func:`_new_temp`, their process gone, untouched for ``LEFTOVER_AGE_S`` (a writer on another
    machine sharing the folder is left alone while it could still be writing). Returns them."""
    removed = []
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".")[0]
        try:
            old = time.time() - tmp.stat().st_mtime > LEFTOVER_AGE_S
        except FileNotFoundError:
            continue
        if pid.isdigit() and old and not _pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _new_temp(path: Path) -> tuple[Path, int]:
    """Create an empty, uniquely named file beside ``path`` (named after this process, so a killed
    writer's leftover can be told apart); return it and the mode the umask gave it."""
    remove_leftovers(path)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
        return tmp, mode
    raise FileExistsError(f"could not create a temporary file beside {path}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an error, publish it as
    ``path`` (normal file mode, flushed, renamed, folder flushed). On an error it is removed."""
    path = Path(path)
    tmp, mode = _new_temp(path)
    try:
        yield tmp
        os.chmod(tmp, mode)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` through :func:`atomic_write`."""
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def write_bytes_atomic(data: bytes, path: str | Path) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_write`."""
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(obj, path: str | Path, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON (UTF-8, trailing newline) to ``path`` through :func:`atomic_write`."""
    write_bytes_atomic((json.dumps(obj, indent=indent) + "\n").encode("utf-8"), path)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes: what a measurement records to name the exact rules or module it used."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
