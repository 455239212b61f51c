"""Writing the artifacts the tools produce (rules files, module files, checkpoints, teacher caches, model folders).

``safetensors`` creates its files owner-only (mode 0600), so a server running as another user could
not read the module it was given. Every safetensors file here is written through
:func:`save_safetensors`: atomically (a temporary file, then a rename) and with the user's normal
file mode (0666 less the umask), like any file the user writes. Other binary files (rules.bin) go
through :func:`write_bytes_atomic`, which does the same.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import save_file


def normal_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.chmod(tmp, normal_file_mode())
    tmp.replace(path)


def write_bytes_atomic(data: bytes, path: str | Path) -> None:
    """Write ``data`` to ``path`` through a temporary file renamed into place, in the normal file mode."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, normal_file_mode())
    tmp.replace(path)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes: what a measurement records to name the exact rules or module it used."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
