"""Fidelity prompts for a base model (Gemma 3 270M: no chat template, needs <bos>)."""

from __future__ import annotations

import pytest

from vllm_umim.evaluation.fidelity_prompts import KINDS, PromptKindError, build_prompts, default_kinds

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma_tokenizer():
    from transformers import AutoTokenizer

    from vllm_umim.data import fetch_model

    return AutoTokenizer.from_pretrained(fetch_model("gemma3-270m"))


def test_chat_kind_is_left_out_with_one_message(gemma_tokenizer, capsys):
    assert default_kinds(gemma_tokenizer) == [k for k in KINDS if k != "chat"]
    assert "no chat template" in capsys.readouterr().err
    with pytest.raises(PromptKindError, match="leave 'chat' out of --kinds"):
        build_prompts("chat", gemma_tokenizer, 2)


def test_plain_text_prompts_start_with_bos(gemma_tokenizer):
    for kind in ("wiki", "gsm8k"):
        prompts = build_prompts(kind, gemma_tokenizer, 3)
        assert len(prompts) == 3
        assert all(p.token_ids[0] == gemma_tokenizer.bos_token_id for p in prompts), kind
        assert all(gemma_tokenizer.bos_token_id not in p.token_ids[1:] for p in prompts), kind
