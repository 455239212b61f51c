"""Merge module files: safetensors weights plus metadata naming what they belong to.

Metadata (all strings, as safetensors requires): ``umim_format`` = "merge-module/1", the
architecture (``config`` JSON), the model identity (``model`` JSON: architecture, hidden size,
vocab size, layers, name), ``tokenizer_fingerprint`` and ``rules_fingerprint``, plus free-form
``training`` JSON (token budget, losses). Loading checks each against what the caller expects and
raises one error naming the mismatch.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from vllm_umim.errors import MismatchError, ModuleFileError
from vllm_umim.module.merge_module import MergeModule, MergeModuleConfig

FORMAT = "merge-module/1"
MEAN_POOLING = "mean"  # module path meaning "the untrained mean-pooling baseline"


def model_identity(hf_config) -> dict:
    """What a merge module is tied to: the LM's embedding space (from its HF config)."""
    return {
        "architecture": (getattr(hf_config, "architectures", None) or ["?"])[0],
        "hidden_size": int(hf_config.hidden_size),
        "vocab_size": int(hf_config.vocab_size),
        "num_hidden_layers": int(getattr(hf_config, "num_hidden_layers", 0)),
        "name": Path(str(getattr(hf_config, "_name_or_path", "") or "")).name,
    }


def save_module(
    module: MergeModule,
    path: str | Path,
    model: dict,
    tokenizer_fingerprint: str,
    rules_fingerprint: str,
    training: dict | None = None,
) -> None:
    metadata = {
        "umim_format": FORMAT,
        "config": json.dumps(module.config.to_dict()),
        "model": json.dumps(model),
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "rules_fingerprint": rules_fingerprint,
        "training": json.dumps(training or {}),
    }
    tensors = {name: t.detach().contiguous().cpu() for name, t in module.state_dict().items()}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def read_metadata(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ModuleFileError(f"merge module file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModuleFileError(f"{path} is not a readable safetensors merge module: {exc}") from None
    if metadata.get("umim_format") != FORMAT:
        raise ModuleFileError(f"{path} is not a UMIM merge module (umim_format={metadata.get('umim_format')!r})")
    try:
        return {
            "config": json.loads(metadata["config"]),
            "model": json.loads(metadata["model"]),
            "tokenizer_fingerprint": metadata["tokenizer_fingerprint"],
            "rules_fingerprint": metadata["rules_fingerprint"],
            "training": json.loads(metadata.get("training", "{}")),
        }
    except (KeyError, ValueError) as exc:
        raise ModuleFileError(f"{path} has incomplete or corrupted metadata: {exc!r}") from None


def check_compatible(meta: dict, path, model: dict | None = None, tokenizer_fingerprint: str | None = None) -> None:
    """Raise MismatchError if the module was trained for another model or tokenizer."""
    if model is not None:
        for key in ("hidden_size", "vocab_size"):
            if meta["model"].get(key) != model[key]:
                raise MismatchError(
                    f"merge module {path} was trained for a model with {key}={meta['model'].get(key)} "
                    f"({meta['model'].get('name')}), but this model has {key}={model[key]} ({model['name']})"
                )
    if tokenizer_fingerprint is not None and meta["tokenizer_fingerprint"] != tokenizer_fingerprint:
        raise MismatchError(
            f"merge module {path} was trained with tokenizer {meta['tokenizer_fingerprint']}, "
            f"but this tokenizer is {tokenizer_fingerprint}"
        )


def load_module(
    path: str | Path,
    model: dict | None = None,
    tokenizer_fingerprint: str | None = None,
) -> tuple[MergeModule, dict]:
    """Load a merge module, checking it against the model identity and tokenizer when given."""
    meta = read_metadata(path)
    check_compatible(meta, path, model, tokenizer_fingerprint)
    try:
        config = MergeModuleConfig(**meta["config"])
    except (TypeError, ValueError) as exc:
        raise ModuleFileError(f"{path} has an invalid module config: {exc}") from None
    module = MergeModule(config)
    state = load_file(str(path))
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModuleFileError(f"{path} does not match its config: missing tensors {missing}, unexpected {unexpected}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ModuleFileError(f"{path}: tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}")
    module.load_state_dict(state)
    return module.eval(), meta


def resolve_module(
    path: str | Path | None,
    hidden_size: int,
    model: dict | None = None,
    tokenizer_fingerprint: str | None = None,
) -> tuple[MergeModule, dict]:
    """A module file, or ``"mean"`` for the untrained mean-pooling baseline."""
    if path is None:
        raise ModuleFileError(
            "no merge module: pass one (--umim-module / 'module'), put module.safetensors beside the "
            "rules file, or use 'mean' for the untrained mean-pooling baseline"
        )
    if str(path) == MEAN_POOLING:
        return MergeModule(MergeModuleConfig(hidden_size)).eval(), {"training": {"baseline": "mean pooling"}}
    return load_module(path, model, tokenizer_fingerprint)


def module_dtype(module: MergeModule) -> torch.dtype:
    return next(module.parameters()).dtype
