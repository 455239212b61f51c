import numpy as np
import pytest

from vllm_umim.errors import MismatchError, RulesFileError
from vllm_umim.rules import RuleSet, load_rules, save_rules, tokenizer_fingerprint


def make_rules(tokenizer):
    return RuleSet(
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        vocab_size=len(tokenizer),
        threshold=5,
        ngrams={2: np.array([[0, 1], [4, 5]], np.int32), 4: np.array([[1, 2, 3, 4]], np.int32)},
        counts={2: np.array([10, 7], np.uint32), 4: np.array([5], np.uint32)},
        meta={"source": "test"},
    )


def test_round_trip(tmp_path, word_tokenizer):
    rules = make_rules(word_tokenizer)
    save_rules(rules, tmp_path / "r.bin")
    loaded = load_rules(tmp_path / "r.bin")
    assert loaded.fingerprint == rules.fingerprint
    assert loaded.rule_ids == {(0, 1): 0, (4, 5): 1, (1, 2, 3, 4): 2}
    assert loaded.counts[4].tolist() == [5] and loaded.meta == {"source": "test"}
    loaded.check_tokenizer(word_tokenizer)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[:40], "truncated"),
        (lambda b: b[:-3], "truncated"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 0xFF]), "checksum"),
        (lambda b: b"NOTRULES" + b[8:], "magic"),
        (lambda b: b[:8] + (99).to_bytes(4, "little") + b[12:], "version 99"),
        (lambda b: b[:20] + b"\xff" + b[21:], "header"),
        (lambda b: b"", "only 0 bytes"),
    ],
)
def test_damaged_files_fail_with_one_clear_error(tmp_path, word_tokenizer, damage, message):
    save_rules(make_rules(word_tokenizer), tmp_path / "r.bin")
    raw = (tmp_path / "r.bin").read_bytes()
    (tmp_path / "bad.bin").write_bytes(damage(raw))
    with pytest.raises(RulesFileError, match=message):
        load_rules(tmp_path / "bad.bin")


def test_missing_file(tmp_path):
    with pytest.raises(RulesFileError, match="does not exist"):
        load_rules(tmp_path / "nope.bin")


def test_tokenizer_mismatch(word_tokenizer):
    from tests.conftest import WordTokenizer

    rules = make_rules(word_tokenizer)
    with pytest.raises(MismatchError, match="mined for tokenizer"):
        rules.check_tokenizer(WordTokenizer(["other", "words"]))
