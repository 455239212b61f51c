"""Resume checkpoints: safetensors round trip of module, AdamW and scheduler; bad files refused."""

from __future__ import annotations

import pytest
import torch

from vllm_umim.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from vllm_umim.training.trainer import lr_factor


def _parts(seed=0):
    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2, weight_decay=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, 10, 2, "cosine"))
    return module, optimizer, scheduler


def _steps(module, optimizer, scheduler, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        loss = module(torch.randn(5, 4, generator=g)).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def test_round_trip_continues_like_never_stopped(tmp_path):
    ref = _parts()
    _steps(*ref, 3)
    _steps(*ref, 3, seed=2)
    part = _parts()
    _steps(*part, 3)
    save_checkpoint(tmp_path / "ckpt.safetensors", *part, {"step": 3, "best_val": float("inf")})
    fresh = _parts(seed=7)  # different initial weights: everything must come from the file
    counters = load_checkpoint(tmp_path / "ckpt.safetensors", *fresh)
    assert counters == {"step": 3, "best_val": float("inf")}
    assert fresh[2].last_epoch == 3 and fresh[1].param_groups[0]["lr"] == pytest.approx(part[1].param_groups[0]["lr"])
    _steps(*fresh, 3, seed=2)
    for a, b in zip(ref[0].state_dict().values(), fresh[0].state_dict().values()):
        assert torch.allclose(a, b, atol=1e-7)


def test_bad_files_give_one_error(tmp_path):
    module, optimizer, scheduler = _parts()
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, module, optimizer, scheduler, {"step": 0})
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a readable safetensors checkpoint"):
        load_checkpoint(truncated, *_parts())
    pickle = tmp_path / "ckpt-last.pt"
    torch.save({"module": module.state_dict()}, pickle)
    with pytest.raises(CheckpointError, match="not a readable safetensors checkpoint"):
        load_checkpoint(pickle, *_parts())
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a vllm_umim resume checkpoint"):
        load_checkpoint(foreign, *_parts())
    other = torch.nn.Linear(4, 2)
    other_opt = torch.optim.AdamW(other.parameters())
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(path, other, other_opt, torch.optim.lr_scheduler.LambdaLR(other_opt, lambda s: 1.0))
