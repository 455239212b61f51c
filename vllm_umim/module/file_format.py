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
from safetensors.torch import safe_open

from vllm_umim.errors import MismatchError, ModuleFileError
from vllm_umim.files import save_safetensors
from vllm_umim.module.merge_module import MergeModule, MergeModuleConfig
from vllm_umim.rules.ruleset import MAX_SPAN

FORMAT = "merge-module/1"
MEAN_POOLING = "mean"  # module path meaning "the untrained mean-pooling baseline"
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
READER_KEY = "umim_reader_sha256"  # a merged reader's config.json and its module's training metadata: the adapters' sha256
_INT_TENSORS = {"refinement.ngrams": ("I64", "I32")}  # token ids; every other tensor is a weight


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
    save_safetensors(tensors, path, metadata=metadata)


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
        meta = {
            "config": json.loads(metadata["config"]),
            "model": json.loads(metadata["model"]),
            "tokenizer_fingerprint": metadata["tokenizer_fingerprint"],
            "rules_fingerprint": metadata["rules_fingerprint"],
            "training": json.loads(metadata.get("training", "{}")),
        }
    except (KeyError, ValueError, RecursionError) as exc:
        raise ModuleFileError(f"{path} has incomplete or corrupted metadata: {exc!r}") from None
    for key in ("config", "model", "training"):
        if not isinstance(meta[key], dict):
            raise ModuleFileError(f"{path} has corrupted metadata: {key} is {meta[key]!r}, expected a JSON object")
    return meta


def _module_config(meta: dict, path) -> MergeModuleConfig:
    """The config from the metadata, with its sizes checked before anything is allocated."""
    fields = meta["config"]
    for key in ("hidden_size", "num_heads", "max_span"):
        value = fields.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ModuleFileError(f"{path} has an invalid module config: {key} is {value!r}, expected a positive integer")
    if fields.get("max_span", MAX_SPAN) < MAX_SPAN:
        raise ModuleFileError(f"{path} has an invalid module config: max_span is {fields['max_span']}, but rules "
                              f"merge spans of up to {MAX_SPAN} tokens (App. A)")
    refined = fields.get("refined_rules", 0)
    if not isinstance(refined, int) or isinstance(refined, bool) or refined < 0:
        raise ModuleFileError(f"{path} has an invalid module config: refined_rules is {refined!r}, expected an integer >= 0")
    try:
        return MergeModuleConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise ModuleFileError(f"{path} has an invalid module config: {exc}") from None


def _read_state(path, config: MergeModuleConfig) -> dict[str, torch.Tensor]:
    """The file's tensors, checked against ``config`` (names, shapes, floating dtypes) before any
    is read, so a corrupted config cannot make the loader allocate more than the file holds; then
    checked for NaN/inf, which safetensors would load silently (it has no checksum)."""
    try:
        with torch.device("meta"):  # expected shapes without allocating the weights
            expected = {name: tuple(t.shape) for name, t in MergeModule(config).state_dict().items()}
    except (RuntimeError, ValueError, OverflowError) as exc:
        raise ModuleFileError(f"{path} has an invalid module config {config}: {exc}") from None
    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            missing, unexpected = sorted(set(expected) - names), sorted(names - set(expected))
            if missing or unexpected:
                raise ModuleFileError(f"{path} does not match its config: missing tensors {missing}, unexpected {unexpected}")
            for name, shape in expected.items():
                info = f.get_slice(name)
                if tuple(info.get_shape()) != shape:
                    raise ModuleFileError(f"{path}: tensor {name} has shape {tuple(info.get_shape())}, expected {shape}")
                if name in _INT_TENSORS:
                    if info.get_dtype() not in _INT_TENSORS[name]:
                        raise ModuleFileError(f"{path}: tensor {name} has dtype {info.get_dtype()}; expected token ids ({', '.join(_INT_TENSORS[name])})")
                elif info.get_dtype() not in _FLOAT_DTYPES:
                    raise ModuleFileError(f"{path}: tensor {name} has dtype {info.get_dtype()}; merge module weights are floating point (F64, F32, F16, BF16)")
            state = {name: f.get_tensor(name) for name in expected}
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as exc:
        if isinstance(exc, ModuleFileError):
            raise
        raise ModuleFileError(f"{path} is not a readable safetensors merge module: {exc}") from None
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModuleFileError(f"{path} is corrupted: tensor {name} holds NaN or infinite values")
    return state


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
    config = _module_config(meta, path)
    if model is not None and config.hidden_size != model["hidden_size"]:
        raise MismatchError(
            f"merge module {path} has hidden_size={config.hidden_size} in its config, "
            f"but this model has hidden_size={model['hidden_size']} ({model['name']})"
        )
    state = _read_state(path, config)
    module = MergeModule(config)
    module.load_state_dict(state)
    if module.refinement is not None:
        try:
            vocab_size = meta["model"].get("vocab_size")
            module.refinement.check(vocab_size if isinstance(vocab_size, int) else None)
        except ValueError as exc:
            raise ModuleFileError(f"{path} has a corrupted per-rule refinement: {exc}") from None
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
    module, meta = load_module(path, model, tokenizer_fingerprint)
    if module.config.hidden_size != hidden_size:
        raise MismatchError(f"merge module {path} has hidden_size={module.config.hidden_size}, but this model has hidden_size={hidden_size}")
    return module, meta


def check_reader(module_meta: dict, hf_config, module_path) -> None:
    """Refuse a module trained with an adapted reader on another model, and a module trained for
    the frozen model on an adapted reader (one line each)."""
    wanted = (module_meta.get("training") or {}).get(READER_KEY)
    served = getattr(hf_config, READER_KEY, None)
    if wanted != served:
        if wanted:
            raise MismatchError(f"merge module {module_path} was trained with an adapted reader (adapters {wanted[:12]}…): serve "
                                f"the model folder `vllm-umim merge-reader` wrote for it, not this one (reader {served and served[:12]})")
        raise MismatchError(f"this model is an adapted reader (adapters {served[:12]}…) and merge module {module_path} was "
                            "trained for the frozen model: use the module trained with this reader")


def module_dtype(module: MergeModule) -> torch.dtype:
    return next(module.parameters()).dtype
