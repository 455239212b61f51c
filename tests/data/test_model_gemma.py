"""fetch-model on a second architecture (Gemma 3 270M, a base model): what the build checks.

The folder is built once per machine (scripts/setup.sh does it; ~2 min on 2 cores) and then read
from the cache. The checks here are the ones that catch a conversion that "works" but is wrong:
a lost BOS (the GGUF tokenizer drops ``add_bos_token``), and a greedy continuation that is not the
known-good one recorded for the model.
"""

from __future__ import annotations

import pytest

from vllm_umim.data.cache import DataError, read_manifest
from vllm_umim.data.model import CHECK_PROMPT, MODELS, adds_bos, check_expected, has_chat_template

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma_dir():
    from vllm_umim.data import fetch_model

    return fetch_model("gemma3-270m")


@pytest.fixture(scope="module")
def gemma(gemma_dir):
    import torch

    from vllm_umim.data.model import load_folder

    torch.set_num_threads(1)
    return load_folder(gemma_dir)


def test_folder_is_a_gemma3_base_model_with_bos(gemma_dir, gemma):
    from safetensors import safe_open

    model, tokenizer = gemma
    config = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert (config.hidden_size, config.vocab_size) == (640, 262144)
    assert config.tie_word_embeddings and not hasattr(config, "quantization_config")
    with safe_open(gemma_dir / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
    manifest = read_manifest(gemma_dir)
    assert manifest["add_bos_token"] is True and manifest["chat_template"] is False
    assert not has_chat_template(gemma_dir) and has_chat_template(_smollm2_dir())
    assert adds_bos(tokenizer) and tokenizer(CHECK_PROMPT)["input_ids"][0] == tokenizer.bos_token_id == 2
    assert len(manifest["source"]["parts"]) == 4


def test_reloaded_folder_decodes_the_known_good_continuation(gemma):
    from vllm_umim.data.model import greedy_ids

    model, tokenizer = gemma
    got = greedy_ids(model, tokenizer)
    assert tuple(got) == MODELS["gemma3-270m"].expect_ids
    assert " capital" in tokenizer.decode(got)


def test_a_lost_bos_is_caught_by_the_known_good_check(gemma):
    """What the GGUF tokenizer gives without the fix: no BOS, and Gemma decodes garbage."""
    import copy

    from vllm_umim.data.model import greedy_ids

    model, tokenizer = gemma
    broken = copy.deepcopy(tokenizer)
    broken.add_bos_token = False
    assert not adds_bos(broken)
    got = greedy_ids(model, broken)
    with pytest.raises(DataError, match="conversion or tokenizer is broken"):
        check_expected(MODELS["gemma3-270m"], got, broken)


def test_expectations_are_recorded_for_every_known_model():
    for name, known in MODELS.items():
        assert len(known.expect_ids) == 16 and known.expect_text, name


def _smollm2_dir():
    from vllm_umim.data import fetch_model

    return fetch_model("smollm2-135m")
