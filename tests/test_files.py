"""Artifacts the tools write get the user's normal file mode (safetensors alone makes them 0600)."""

import os
import stat

import torch

from vllm_umim.files import save_safetensors
from vllm_umim.module import MergeModule, MergeModuleConfig, save_module


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_module_file_and_raw_writes_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_module(MergeModule(MergeModuleConfig(8, num_heads=2)), tmp_path / "m.safetensors", {"name": "x"}, "t", "r")
        save_safetensors({"x": torch.zeros(2)}, tmp_path / "x.safetensors")
        assert mode(tmp_path / "m.safetensors") == mode(tmp_path / "x.safetensors") == 0o644
        os.umask(0o077)
        save_safetensors({"x": torch.zeros(2)}, tmp_path / "private.safetensors")
        assert mode(tmp_path / "private.safetensors") == 0o600
    finally:
        os.umask(old)
    assert not list(tmp_path.glob("*.tmp"))
