"""Fuzz load_rules with mutated copies of the shipped rules.bin (issue 12, "Loader robustness at scale").

Every mutated file must either load into a RuleSet the native matcher ops can use, or raise
UmimError (RulesFileError) naming the file. Mutations: raw byte damage (biased to the prefix and
JSON header), header JSON edits re-framed consistently or not, and payload edits whose checksum
is then recomputed ("consistent" corruption the sha256 cannot catch). The long run is this test
with more examples::

    UMIM_FUZZ_EXAMPLES=10000 UMIM_FUZZ_REPORT=fuzz.json python -m pytest -q tests/rules/test_file_fuzz.py
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from tests.fuzzing import (
    ARTIFACTS,
    FUZZ_SETTINGS,
    RULES_FRAMING,
    FuzzStats,
    apply_byte_mutation,
    byte_mutation,
    edit_header,
    forbid_pickle,
    header_actions,
    header_end,
    json_paths,
    per_example_deadline,
)
from vllm_umim.errors import RulesFileError, UmimError
from vllm_umim.rules import load_rules

ORIGINAL = (ARTIFACTS / "rules.bin").read_bytes()
HEADER_END = header_end(ORIGINAL, RULES_FRAMING)
HEADER = json.loads(ORIGINAL[RULES_FRAMING.prefix_size : HEADER_END])
PATHS = json_paths(HEADER)
STRINGS = ["umim-rules", "46c0542294848967", "ffffffffffffffff", "6b6bd17dc959598b", "2", "3", "4"]
TABLES = HEADER["tables"]  # where each n-gram table sits in the payload, for targeted payload edits
VOCAB = HEADER["vocab_size"]


@pytest.fixture(scope="module")
def stats():
    stats = FuzzStats()
    yield stats
    stats.write()


# ---------------------------------------------------------------- mutations


@st.composite
def payload_edit(draw):
    """Change the tables themselves (token ids, duplicated or swapped rows, counts); the checksum is
    recomputed afterwards, so only the loader's own table checks stand between this and the ops."""
    t = draw(st.integers(0, len(TABLES) - 1))
    table = TABLES[t]
    row = draw(st.one_of(st.integers(1, table["count"] - 1), st.sampled_from([1, table["count"] - 1])))
    kind = draw(st.sampled_from(["set_token", "dup_row", "swap_rows", "set_count"]))
    if kind == "set_token":
        value = draw(st.one_of(st.integers(0, VOCAB - 1), st.sampled_from([-1, -2**31, VOCAB - 1, VOCAB, 2**31 - 1])))
        return ("set_token", t, row, draw(st.integers(0, table["n"] - 1)), value)
    if kind == "set_count":
        return ("set_count", t, row, draw(st.sampled_from([0, 1, 2**32 - 1])))
    return (kind, t, row)


def apply_payload_edit(data: bytes, op) -> bytes:
    table = TABLES[op[1]]
    n, row = table["n"], op[2]
    base = HEADER_END + table["ngrams_offset"]
    buf = bytearray(data)
    grams = np.frombuffer(data, "<i4", table["count"] * n, base).reshape(-1, n).copy()
    if op[0] == "set_token":
        grams[row, op[3]] = op[4]
    elif op[0] == "dup_row":
        grams[row] = grams[row - 1]
    elif op[0] == "swap_rows":
        grams[[row - 1, row]] = grams[[row, row - 1]]
    elif op[0] == "set_count":
        counts_at = HEADER_END + table["counts_offset"] + 4 * row
        buf[counts_at : counts_at + 4] = np.uint32(op[3]).tobytes()
    buf[base : base + grams.nbytes] = grams.astype("<i4").tobytes()
    return bytes(buf)


def rechecksum(data: bytes) -> bytes:
    """Make the header agree with whatever payload follows it (size and sha256)."""
    parts = RULES_FRAMING.split(data)
    if parts is None:
        return data
    prefix, header, payload = parts
    try:
        obj = json.loads(header)
    except ValueError:
        return data
    if not isinstance(obj, dict):
        return data
    obj["payload_size"] = len(payload)
    obj["payload_sha256"] = hashlib.sha256(payload).hexdigest()
    return RULES_FRAMING.join(prefix, json.dumps(obj, allow_nan=True).encode(), payload, len(header), consistent=True)


@st.composite
def rules_mutations(draw):
    """A short list of mutations; the mode decides the mix, so each kind also comes alone."""
    mode = draw(st.sampled_from(["bytes", "header", "payload", "mixed"]))
    ops = []
    if mode in ("header", "mixed"):
        for _ in range(draw(st.integers(1, 2))):
            path = draw(st.sampled_from(PATHS))
            ops.append(("header", path, draw(header_actions(STRINGS)), draw(st.booleans())))
    if mode in ("payload", "mixed"):
        ops += draw(st.lists(payload_edit(), min_size=1 if mode == "payload" else 0, max_size=2))
    if mode in ("bytes", "mixed"):
        ops += draw(st.lists(byte_mutation(len(ORIGINAL), HEADER_END), min_size=1 if mode == "bytes" else 0, max_size=3))
    if mode == "payload" or (mode != "bytes" and draw(st.booleans())) or (mode == "bytes" and draw(st.integers(0, 3)) == 0):
        ops.append(("rechecksum",))
    return ops


def mutate(ops) -> bytes:
    data = ORIGINAL
    for op in ops:
        if op[0] == "header":
            data = edit_header(data, RULES_FRAMING, op[1], op[2], consistent=op[3])
        elif op[0] in ("set_token", "dup_row", "swap_rows", "set_count"):
            data = apply_payload_edit(data, op)
        elif op[0] == "rechecksum":
            data = rechecksum(data)
        else:
            data = apply_byte_mutation(data, op)
    return data


def op_names(ops):
    return [("header_" + op[2][0],) if op[0] == "header" else op for op in ops]


# ---------------------------------------------------------------- usability of whatever loads


def check_usable(rules) -> None:
    """What the engine does with loaded rules must work: the tables are well-typed, the native
    ops build their index and return rule ids that really match the tokens."""
    assert isinstance(rules.tokenizer_fingerprint, str) and isinstance(rules.meta, dict)
    assert type(rules.vocab_size) is int and 0 < rules.vocab_size < 2**31
    assert type(rules.threshold) is int
    for n in rules.lengths:
        grams, counts = rules.ngrams[n], rules.counts[n]
        assert 2 <= n <= 4 and grams.dtype == np.int32 and grams.ndim == 2 and grams.shape[1] == n
        assert counts.dtype == np.uint32 and counts.shape == (len(grams),)
        assert len(grams) == 0 or (grams.min() >= 0 and grams.max() < rules.vocab_size)
    rules.summary()
    if len(rules) == 0:
        return
    rules.index
    rng = np.random.default_rng(len(rules))
    seq = []
    for n in rules.lengths:
        for i in sorted({0, len(rules.ngrams[n]) // 2, len(rules.ngrams[n]) - 1} if len(rules.ngrams[n]) else ()):
            seq += rules.ngrams[n][i].tolist()
    seq += rng.integers(0, rules.vocab_size, 32).tolist() + [rules.vocab_size - 1, 0, rules.vocab_size + 5]
    for sequence, spans in zip([seq, seq[::-1], []], rules.find_spans([seq, seq[::-1], []])):
        assert len(spans) == len(sequence)
        for i, r in enumerate(spans):
            assert -2 <= r < len(rules)
            if r >= 0:
                tokens = rules.tokens_of(r)
                assert tuple(sequence[i : i + len(tokens)]) == tokens
    for r in {0, len(rules) // 2, len(rules) - 1}:
        assert rules.match_suffix(list(rules.tokens_of(r))) == r


# ---------------------------------------------------------------- the test


def load_and_check(path):
    """None if the file loaded and is usable; the UmimError subclass name if it was refused."""
    with per_example_deadline():
        try:
            rules = load_rules(path)
        except UmimError as exc:
            assert path.name in str(exc), f"error does not name the file: {exc}"
            return type(exc).__name__
        check_usable(rules)
    return None


def test_original_loads(tmp_path):
    path = tmp_path / "rules.bin"
    path.write_bytes(ORIGINAL)
    assert load_and_check(path) is None


# Mutations the fuzzer found that the loader used to get wrong (each now a clear RulesFileError):
# a stray exception type, or a RuleSet that loaded but broke the matcher ops or lied about itself.
FOUND = [
    ([("header", (), ("set", None), False)], "corrupted header: expected a JSON object"),  # was AttributeError
    ([("header", ("tables", 0, "n"), ("set", -math.inf), True)], r"tables\[0\]\.n is -inf"),  # was OverflowError
    ([("header", ("threshold",), ("set", -math.inf), True)], "threshold is -inf"),  # was OverflowError
    ([("header", ("vocab_size",), ("set", math.inf), True)], "vocab_size is inf"),  # was OverflowError
    ([("header", ("tables", 0, "count"), ("set", -7.2e111), True)], r"tables\[0\]\.count is"),  # was OverflowError
    # numpy reads count=-k as "the rest of the buffer": the 4-gram table swallowed the counts table
    ([("header", ("tables", 2, "count"), ("add", -(2**32)), True)], r"tables\[2\]\.count is -4294960076"),
    # checksum recomputed: loaded, then build_rule_index raised RuntimeError("duplicate rule")
    ([("dup_row", 1, 473), ("rechecksum",)], "3-gram table: rows 472 and 473 are duplicated or out of order"),
    ([("swap_rows", 0, 100), ("rechecksum",)], "2-gram table: rows 99 and 100 are duplicated or out of order"),
    ([("header", ("meta",), ("set", "3"), False)], "meta is '3'"),  # loaded with meta a str
    ([("header", ("tokenizer_fingerprint",), ("set", 5), True)], "tokenizer_fingerprint is 5"),  # RuleSet.fingerprint crashed
    ([("header", ("counts", "2"), ("add", 1), True)], "inconsistent header: counts is"),  # inspect printed wrong counts
]


@pytest.mark.parametrize("ops, message", FOUND)
def test_found_mutations_raise_rules_file_error(tmp_path, ops, message):
    path = tmp_path / "mutated-rules.bin"
    path.write_bytes(mutate(ops))
    with pytest.raises(RulesFileError, match=message):
        load_rules(path)


@FUZZ_SETTINGS
@given(ops=rules_mutations())
def test_mutated_rules_load_or_raise_umim_error(ops, tmp_path, monkeypatch, stats):
    forbid_pickle(monkeypatch)
    data = mutate(ops)
    path = tmp_path / "mutated-rules.bin"
    if data == ORIGINAL:  # an edit that changed nothing: not a mutated input, draw another
        stats.record("rules", op_names(ops), None, unchanged=True)
        assume(False)
    path.write_bytes(data)
    stats.record("rules", op_names(ops), load_and_check(path))
