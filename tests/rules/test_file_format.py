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


# ---------------------------------------------------------------- version 2: harm scores (issue 13)

SHIPPED = __import__("pathlib").Path(__file__).resolve().parents[2] / "artifacts" / "smollm2-135m" / "rules.bin"


def scored_rules(tokenizer):
    rules = make_rules(tokenizer)
    return rules.with_harm(np.array([0.5, np.nan, 0.0], np.float32), np.array([4, 0, 1], np.uint32), {"harm": {"windows": 2}})


def test_version_1_file_loads_unscored():
    import struct

    assert struct.unpack_from("<I", SHIPPED.read_bytes(), 8) == (1,)
    rules = load_rules(SHIPPED)
    assert not rules.scored and len(rules) == 48187
    assert np.isnan(rules.harm_scores()).all() and rules.harm_scores().dtype == np.float32
    assert (rules.harm_count_by_rule() == 0).all()


def test_version_2_round_trip_with_scores(tmp_path, word_tokenizer):
    rules = scored_rules(word_tokenizer)
    save_rules(rules, tmp_path / "r.bin")
    assert (tmp_path / "r.bin").read_bytes()[8:12] == (2).to_bytes(4, "little")
    loaded = load_rules(tmp_path / "r.bin")
    assert loaded.scored and loaded.meta["harm"] == {"windows": 2}
    np.testing.assert_array_equal(loaded.harm_scores(), [0.5, np.nan, 0.0])
    assert loaded.harm_count_by_rule().tolist() == [4, 0, 1]
    assert loaded.rule_ids == make_rules(word_tokenizer).rule_ids  # ids and order unchanged
    assert loaded.fingerprint == make_rules(word_tokenizer).fingerprint  # scores are not part of the rules' identity


def test_version_2_without_scores_round_trips_unscored(tmp_path, word_tokenizer):
    save_rules(make_rules(word_tokenizer), tmp_path / "r.bin")
    assert not load_rules(tmp_path / "r.bin").scored


def test_shipped_rules_keep_ids_when_scored(tmp_path):
    rules = load_rules(SHIPPED)
    harm = np.full(len(rules), np.nan, np.float32)
    harm[::7] = np.linspace(0, 3, len(harm[::7]))
    counts = np.where(np.isnan(harm), 0, 2).astype(np.uint32)
    save_rules(rules.with_harm(harm, counts), tmp_path / "scored.bin")
    loaded = load_rules(tmp_path / "scored.bin")
    assert np.array_equal(loaded.padded.numpy(), rules.padded.numpy())
    np.testing.assert_array_equal(loaded.harm_scores(), harm)
    assert (tmp_path / "scored.bin").stat().st_size < 2 * SHIPPED.stat().st_size


@pytest.mark.parametrize("version", [0, 3, 99])
def test_unknown_version_is_refused_naming_it(tmp_path, word_tokenizer, version):
    save_rules(make_rules(word_tokenizer), tmp_path / "r.bin")
    raw = bytearray((tmp_path / "r.bin").read_bytes())
    raw[8:12] = version.to_bytes(4, "little")
    (tmp_path / "new.bin").write_bytes(bytes(raw))
    with pytest.raises(RulesFileError, match=f"version {version}; this vllm_umim reads versions 1, 2"):
        load_rules(tmp_path / "new.bin")


def _rewrite_harm(path, row: int, harm: float | None = None, count: int | None = None):
    """Overwrite one harm / harm_count value in a saved scored file and fix the checksum."""
    import hashlib
    import json

    from vllm_umim.rules.file_format import read_header

    header, start = read_header(path)
    raw = bytearray(path.read_bytes())
    table = header["tables"][0]
    if harm is not None:
        raw[start + table["harm_offset"] + 4 * row : start + table["harm_offset"] + 4 * row + 4] = np.float32(harm).tobytes()
    if count is not None:
        at = start + table["harm_count_offset"] + 4 * row
        raw[at : at + 4] = np.uint32(count).tobytes()
    payload = bytes(raw[start:])
    old = json.dumps({k: v for k, v in header.items() if k != "version"}, sort_keys=True)
    new = old.replace(header["payload_sha256"], hashlib.sha256(payload).hexdigest())
    path.write_bytes(bytes(raw[:start]).replace(old.encode(), new.encode()) + payload)


@pytest.mark.parametrize(
    "row, harm, count, message",
    [
        (0, -0.25, None, "harm of rule row 0 is negative"),
        (0, np.inf, None, "harm of rule row 0 is infinite"),
        (0, np.nan, None, "rule row 0 has harm nan but harm_count 4"),  # NaN beside a count
        (1, None, 3, "rule row 1 has harm nan but harm_count 3"),
        (0, None, 0, "rule row 0 has harm 0.5 but harm_count 0"),  # a score measured on nothing
    ],
)
def test_illegal_harm_is_refused(tmp_path, word_tokenizer, row, harm, count, message):
    path = tmp_path / "r.bin"
    save_rules(scored_rules(word_tokenizer), path)
    _rewrite_harm(path, row, harm, count)
    with pytest.raises(RulesFileError, match=f"illegal 2-gram harm scores: {message}"):
        load_rules(path)


def test_with_harm_refuses_illegal_scores(word_tokenizer):
    rules = make_rules(word_tokenizer)
    with pytest.raises(ValueError, match="negative"):
        rules.with_harm(np.array([-1, 0, 0], np.float32), np.ones(3, np.uint32))
    with pytest.raises(ValueError, match="expected 3 harm scores"):
        rules.with_harm(np.zeros(2, np.float32), np.ones(2, np.uint32))


def test_subset_renumbers_and_keeps_scores(word_tokenizer):
    rules = scored_rules(word_tokenizer)
    sub = rules.subset(np.array([False, True, True]), {"selection": "test"})
    assert sub.rule_ids == {(4, 5): 0, (1, 2, 3, 4): 1}
    np.testing.assert_array_equal(sub.harm_scores(), [np.nan, 0.0])
    assert sub.counts[2].tolist() == [7] and sub.meta["selection"] == "test" and sub.meta["source"] == "test"


def test_folder_in_place_of_a_file_says_so(tmp_path):
    with pytest.raises(RulesFileError, match="is a folder: name its rules.bin"):
        load_rules(tmp_path)
