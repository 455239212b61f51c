"""An adapted reader: LoRA on the language model, co-trained with the merge module.

The paper freezes the model (§3.3) and asks a context-free surrogate to stand in for the span. An
adapted reader also trains small low-rank adapters (PEFT LoRA on attention and MLP) so the model
learns to read surrogates, as zip2zip does with its hypertokens. The distillation target stays the
frozen, *unadapted* model (the cached teacher), and every batch also runs some raw (unmerged)
windows through the adapted model against the same teacher rows, so the adapter does not drift on
ordinary text: ``loss = KL(merged) + raw_weight * KL(raw)``.

The adapters are saved in PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors``,
loadable with ``peft.PeftModel.from_pretrained``), and :func:`merge_reader` writes a model folder
with the adapters folded into the weights (an operating point that carries its own model).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vllm_umim.errors import CheckpointError, OptionError
from vllm_umim.files import write_json_atomic
from vllm_umim.module.file_format import READER_KEY as CONFIG_KEY  # which adapters a module was trained with

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_PREFIX = "base_model.model."  # PEFT's key prefix for a causal LM (PeftModelForCausalLM)


@dataclass
class ReaderConfig:
    """LoRA of an adapted reader; ``rank`` 0 means none (the paper's frozen model)."""

    rank: int = field(default=0, metadata={"flags": ("--reader-rank",), "help": "LoRA rank of an adapted reader co-trained with the module (0: the model stays frozen)"})
    alpha: float = field(default=16.0, metadata={"flags": ("--reader-alpha",), "help": "LoRA alpha (scale alpha / rank)"})
    raw_windows: int = field(default=2, metadata={"flags": ("--reader-raw-windows",), "help": "windows of each batch also run unmerged through the adapted reader (its drift term)"})
    raw_weight: float = field(default=1.0, metadata={"flags": ("--reader-raw-weight",), "help": "weight of the unmerged windows' KL in the loss"})

    def __post_init__(self):
        if self.rank < 0 or self.raw_windows < 0 or self.raw_weight < 0 or self.alpha <= 0:
            raise OptionError(f"invalid reader settings {self}: rank, raw_windows, raw_weight >= 0 and alpha > 0")

    def lora_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=0.0, target_modules=list(TARGET_MODULES),
                          task_type="CAUSAL_LM", bias="none")


def adapt(model: torch.nn.Module, config: ReaderConfig) -> list[torch.nn.Parameter]:
    """Inject zero-initialised LoRA adapters into ``model`` in place (the model computes exactly
    what it did until they train) and return the adapter parameters, the only trainable ones."""
    from peft import inject_adapter_in_model

    for p in model.parameters():
        p.requires_grad_(False)
    inject_adapter_in_model(config.lora_config(), model)
    params = [p for name, p in model.named_parameters() if "lora_" in name]
    for p in params:
        p.requires_grad_(True)
    return params


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights under the names of the model (``...q_proj.lora_A.default.weight``)."""
    return {name: p.detach() for name, p in model.named_parameters() if "lora_" in name}


def load_adapter_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source) -> None:
    params = dict(model.named_parameters())
    missing = sorted(set(k for k in params if "lora_" in k) - set(state))
    unknown = sorted(set(state) - set(params))
    if missing or unknown:
        raise CheckpointError(f"{source}: reader adapters do not fit this model (missing {missing[:3]}, unexpected {unknown[:3]})")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def save_adapter(model: torch.nn.Module, config: ReaderConfig, folder: str | Path, base_model: str) -> Path:
    """Write the adapters in PEFT's layout into ``folder``."""
    from vllm_umim.files import save_safetensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {ADAPTER_PREFIX + name.replace(".default", ""): value.contiguous()
               for name, value in adapter_state(model).items()}
    save_safetensors(tensors, folder / ADAPTER_FILE)
    peft_config = config.lora_config()
    peft_config.base_model_name_or_path = str(base_model)
    write_json_atomic(json.loads(json.dumps(peft_config.to_dict(), default=list)), folder / "adapter_config.json")
    return folder


def adapter_parameters(folder: str | Path) -> int:
    """How many numbers the adapters of ``folder`` hold (read from the file's header)."""
    import math

    from safetensors import safe_open

    with safe_open(str(Path(folder) / ADAPTER_FILE), "pt") as f:
        return sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())


def adapter_sha256(folder: str | Path) -> str:
    from vllm_umim.files import file_sha256

    return file_sha256(Path(folder) / ADAPTER_FILE)


def merge_reader(base_model: str | Path, adapter: str | Path, out: str | Path) -> Path:
    """A model folder with the adapters folded into the weights (PEFT ``merge_and_unload``), the
    base folder's tokenizer and chat-template files beside it, and the adapters' sha256 in its ``config.json``
    (``umim_reader_sha256``): the engine serves a module trained with this reader only on it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_model, torch_dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    setattr(merged.config, CONFIG_KEY, adapter_sha256(adapter))
    out = Path(out)
    merged.save_pretrained(out)
    for item in Path(base_model).iterdir():  # tokenizer, chat template (chat_template.jinja), generation defaults
        if item.is_file() and ("token" in item.name or "chat_template" in item.name or item.name == "generation_config.json"):
            shutil.copy2(item, out / item.name)
    return out
