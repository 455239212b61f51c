"""Resume checkpoints as safetensors: tensors in the file, everything else as JSON metadata.

A checkpoint holds the merge module's weights, AdamW's moment buffers, the LR scheduler's state
and the trainer's counters. ``torch.save`` would pickle all of that; reading a pickle can run code,
so this format keeps the tensors in safetensors and the rest (numbers, strings, lists) as JSON
under the metadata key ``umim_checkpoint``. Reading never unpickles anything.

Layout: ``module/<name>`` (module state dict), ``optimizer/<param index>/<buffer>`` (per-parameter
optimizer state), ``best/<name>`` (the best module so far, when there is a validation set);
metadata ``{"optimizer_param_groups": ..., "scheduler": ..., "trainer": ...}``. A file that cannot
be read back whole (truncated, bad JSON, keys missing, state that does not fit) is one
``CheckpointError`` naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from vllm_umim.errors import CheckpointError
from vllm_umim.files import save_safetensors

METADATA_KEY = "umim_checkpoint"
META_KEYS = ("optimizer_param_groups", "scheduler", "trainer")


def save_checkpoint(path: str | Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, trainer_state: dict,
                    extra_tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Write atomically (a temporary file, then rename), so an interrupted write leaves the old one.
    ``extra_tensors`` (names with a prefix of their own, e.g. ``best/``) ride along unread by
    :func:`load_checkpoint`; :func:`read_checkpoint` returns them."""
    path = Path(path)
    tensors = {f"module/{k}": v.detach().contiguous() for k, v in module.state_dict().items()}
    tensors.update({k: v.detach().contiguous() for k, v in (extra_tensors or {}).items()})
    optim = optimizer.state_dict()
    for index, buffers in optim["state"].items():
        for name, value in buffers.items():
            tensors[f"optimizer/{index}/{name}"] = torch.as_tensor(value).detach().contiguous()
    scheduler_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}  # lambdas are code
    meta = {"optimizer_param_groups": optim["param_groups"], "scheduler": scheduler_state, "trainer": trainer_state}
    save_safetensors(tensors, path, metadata={METADATA_KEY: json.dumps(meta)})


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the metadata of a checkpoint file, nothing restored yet. Any unreadable,
    truncated or foreign file is one CheckpointError naming it."""
    path = Path(path)
    try:
        with safe_open(path, "pt") as f:  # one read: metadata and tensors
            raw = (f.metadata() or {}).get(METADATA_KEY)
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({error})") from None
    if raw is None:
        raise CheckpointError(f"{path}: no '{METADATA_KEY}' metadata; not a vllm_umim resume checkpoint")
    try:
        meta = json.loads(raw)
    except ValueError as error:
        raise CheckpointError(f"{path}: the '{METADATA_KEY}' metadata is not JSON ({error})") from None
    missing = [key for key in META_KEYS if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise CheckpointError(f"{path}: the '{METADATA_KEY}' metadata lacks {', '.join(missing)}; not a complete checkpoint")
    return tensors, meta


def load_checkpoint(path: str | Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, loaded: tuple[dict, dict] | None = None) -> dict:
    """Restore module, optimizer and scheduler in place; return the trainer's counters.
    ``loaded``: what :func:`read_checkpoint` returned for ``path``, if the caller read it already."""
    path = Path(path)
    tensors, meta = loaded if loaded is not None else read_checkpoint(path)
    module_state = {k.removeprefix("module/"): v for k, v in tensors.items() if k.startswith("module/")}
    try:
        module.load_state_dict(module_state)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: the checkpoint's module does not fit this configuration ({error})") from None
    state: dict[int, dict] = {}
    try:
        for key, value in tensors.items():
            if key.startswith("optimizer/"):
                _, index, name = key.split("/", 2)
                state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer_param_groups"]})
        scheduler.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    except (ValueError, KeyError, TypeError, IndexError) as error:
        raise CheckpointError(f"{path}: the optimizer or scheduler state does not fit this run ({error!r})") from None
    if not isinstance(meta["trainer"], dict):
        raise CheckpointError(f"{path}: the trainer state is not a JSON object")
    return meta["trainer"]
