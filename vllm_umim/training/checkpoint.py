"""Resume checkpoints as safetensors: tensors in the file, everything else as JSON metadata.

A checkpoint holds the merge module's weights, AdamW's moment buffers, the LR scheduler's state
and the trainer's counters. ``torch.save`` would pickle all of that; reading a pickle can run code,
so this format keeps the tensors in safetensors and the rest (numbers, strings, lists) as JSON
under the metadata key ``umim_checkpoint``. Reading never unpickles anything.

Layout: ``module/<name>`` (module state dict), ``optimizer/<param index>/<buffer>`` (per-parameter
optimizer state); metadata ``{"optimizer_param_groups": ..., "scheduler": ..., "trainer": ...}``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from vllm_umim.errors import CheckpointError
from vllm_umim.files import save_safetensors

METADATA_KEY = "umim_checkpoint"


def save_checkpoint(path: str | Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, trainer_state: dict,
                    extra: dict[str, torch.Tensor] | None = None) -> None:
    """Write atomically (a temporary file, then rename), so an interrupted write leaves the old one.
    ``extra``: more trained tensors (an adapted reader's LoRA weights), stored as ``extra/<name>``."""
    path = Path(path)
    tensors = {f"module/{k}": v.detach().contiguous() for k, v in module.state_dict().items()}
    tensors.update({f"extra/{k}": v.detach().contiguous() for k, v in (extra or {}).items()})
    optim = optimizer.state_dict()
    for index, buffers in optim["state"].items():
        for name, value in buffers.items():
            tensors[f"optimizer/{index}/{name}"] = torch.as_tensor(value).detach().contiguous()
    scheduler_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}  # lambdas are code
    meta = {"optimizer_param_groups": optim["param_groups"], "scheduler": scheduler_state, "trainer": trainer_state}
    save_safetensors(tensors, path, metadata={METADATA_KEY: json.dumps(meta)})


def load_checkpoint(path: str | Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, load_extra=None) -> dict:
    """Restore module, optimizer and scheduler in place; return the trainer's counters.
    ``load_extra(tensors)`` receives the checkpoint's ``extra/`` tensors (names without the prefix)."""
    path = Path(path)
    try:
        with safe_open(path, "pt") as f:  # one read: metadata and tensors
            raw = (f.metadata() or {}).get(METADATA_KEY)
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({error})") from None
    if raw is None:
        raise CheckpointError(f"{path}: no '{METADATA_KEY}' metadata; not a vllm_umim resume checkpoint")
    meta = json.loads(raw)
    module_state = {k.removeprefix("module/"): v for k, v in tensors.items() if k.startswith("module/")}
    try:
        module.load_state_dict(module_state)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: the checkpoint's module does not fit this configuration ({error})") from None
    extra = {k.removeprefix("extra/"): v for k, v in tensors.items() if k.startswith("extra/")}
    if load_extra is not None:
        load_extra(extra)
    elif extra:
        raise CheckpointError(f"{path}: the checkpoint holds {len(extra)} more trained tensors (an adapted reader) this run does not have")
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer_param_groups"]})
    scheduler.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    return meta["trainer"]
