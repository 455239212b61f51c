"""Shared fixtures: a word-level fake tokenizer and a tiny random Llama (no downloads)."""

from __future__ import annotations

import pytest
import torch


class WordTokenizer:
    """A deterministic whitespace tokenizer over a fixed word list (enough for mining tests)."""

    def __init__(self, words: list[str]):
        self.vocab = {w: i for i, w in enumerate(words)}
        self.name_or_path = "word-tokenizer"

    def get_vocab(self):
        return dict(self.vocab)

    def __len__(self):
        return len(self.vocab)

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[self.vocab[w] for w in text.split()] for text in texts]}

    def decode(self, ids):
        inverse = {i: w for w, i in self.vocab.items()}
        return " ".join(inverse[i] for i in ids)


@pytest.fixture
def word_tokenizer():
    return WordTokenizer("the of a in united states new york city is was and to".split())


def tiny_llama(vocab_size: int = 64, hidden_size: int = 32, seed: int = 0):
    """A 2-layer random Llama built from a config (fp32, eager attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_model():
    return tiny_llama()


def make_ruleset(ngrams, vocab_size: int = 64):
    """A RuleSet from a list of token tuples (any order, duplicates dropped)."""
    import numpy as np

    from vllm_umim.rules import RuleSet

    by_n = {}
    for gram in set(map(tuple, ngrams)):
        by_n.setdefault(len(gram), []).append(gram)
    tables = {n: np.array(sorted(grams), dtype=np.int32).reshape(-1, n) for n, grams in by_n.items()}
    return RuleSet(
        tokenizer_fingerprint="test",
        vocab_size=vocab_size,
        threshold=1,
        ngrams=tables,
        counts={n: np.ones(len(t), np.uint32) for n, t in tables.items()},
    )
