"""Corpus windows start with BOS exactly when the model's tokenizer starts text with it."""

from vllm_umim.module.batches import bos_prefix, make_windows


class Tokenizer:
    def __init__(self, bos, adds):
        self.bos_token_id, self.adds = bos, adds

    def __call__(self, text):
        return {"input_ids": ([self.bos_token_id] if self.adds else []) + [7]}


def test_bos_prefix():
    assert bos_prefix(Tokenizer(2, True)) == [2]  # Gemma
    assert bos_prefix(Tokenizer(1, False)) == []  # SmolLM2: a BOS token exists, but is not added
    assert bos_prefix(Tokenizer(None, False)) == []


def test_windows_with_and_without_bos():
    stream = list(range(10, 30))
    assert make_windows(stream, 5) == [stream[i : i + 5] for i in range(0, 20, 5)]
    with_bos = make_windows(stream, 5, prefix=[2])
    assert with_bos == [[2] + stream[i : i + 4] for i in range(0, 20, 4)]
    assert all(len(w) == 5 for w in with_bos)
    assert make_windows(stream, 5, max_windows=2, prefix=[2]) == with_bos[:2]
