"""Fuzz load_rules with mutated copies of the shipped rules.bin (issue 12, "Loader robustness at scale")
and of a version-2 file made from it with harm scores attached (issue 13).

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
from dataclasses import dataclass

from vllm_umim.errors import RulesFileError, UmimError
from vllm_umim.rules import load_rules
from vllm_umim.rules.file_format import encode_rules

STRINGS = ["umim-rules", "46c0542294848967", "ffffffffffffffff", "6b6bd17dc959598b", "2", "3", "4", "harm_offset"]


@dataclass(frozen=True)
class Target:
    """One original file to mutate, with what the targeted edits need to know about it."""

    original: bytes
    header_end: int
    header: dict
    paths: list
    tables: list  # where each n-gram table (and harm table) sits in the payload

    @classmethod
    def of(cls, original: bytes) -> "Target":
        end = header_end(original, RULES_FRAMING)
        header = json.loads(original[RULES_FRAMING.prefix_size : end])
        return cls(original, end, header, json_paths(header), header["tables"])

    @property
    def vocab(self) -> int:
        return self.header["vocab_size"]

    @property
    def scored(self) -> bool:
        return "harm_offset" in self.tables[0]


def scored_version_2(original: bytes) -> bytes:
    """The shipped rules with synthetic harm: ~30 % unscored (NaN, count 0), the rest gamma-distributed."""
    path = ARTIFACTS / "rules.bin"
    rules = load_rules(path)
    rng = np.random.default_rng(13)
    harm = rng.gamma(1.0, 0.5, len(rules)).astype(np.float32)
    counts = rng.integers(1, 60, len(rules)).astype(np.uint32)
    unscored = rng.random(len(rules)) < 0.3
    harm[unscored], counts[unscored] = np.nan, 0
    return encode_rules(rules.with_harm(harm, counts, {"harm": {"synthetic": True}}))


V1 = Target.of((ARTIFACTS / "rules.bin").read_bytes())
V2 = Target.of(scored_version_2(V1.original))
ORIGINAL = V1.original  # the names the issue-12 tests use


@pytest.fixture(scope="module")
def stats():
    stats = FuzzStats()
    yield stats
    stats.write()


# ---------------------------------------------------------------- mutations


PAYLOAD_EDITS = ("set_token", "dup_row", "swap_rows", "set_count", "set_harm", "set_harm_count")
HARM_VALUES = [math.nan, 0.0, -0.0, 0.25, -1e-30, -1.0, math.inf, -math.inf, 3.4e38, 1e-45]


@st.composite
def payload_edit(draw, target: Target):
    """Change the tables themselves (token ids, duplicated or swapped rows, counts, harm scores and
    their counts); the checksum is recomputed afterwards, so only the loader's own table checks
    stand between this and the ops."""
    t = draw(st.integers(0, len(target.tables) - 1))
    table = target.tables[t]
    row = draw(st.one_of(st.integers(1, table["count"] - 1), st.sampled_from([1, table["count"] - 1])))
    kind = draw(st.sampled_from(PAYLOAD_EDITS if target.scored else PAYLOAD_EDITS[:4]))
    if kind == "set_token":
        vocab = target.vocab
        value = draw(st.one_of(st.integers(0, vocab - 1), st.sampled_from([-1, -2**31, vocab - 1, vocab, 2**31 - 1])))
        return ("set_token", t, row, draw(st.integers(0, table["n"] - 1)), value)
    if kind in ("set_count", "set_harm_count"):
        return (kind, t, row, draw(st.sampled_from([0, 1, 2**32 - 1])))
    if kind == "set_harm":
        return ("set_harm", t, row, draw(st.one_of(st.sampled_from(HARM_VALUES), st.floats(width=32))))
    return (kind, t, row)


def apply_payload_edit(target: Target, data: bytes, op) -> bytes:
    table = target.tables[op[1]]
    n, row = table["n"], op[2]
    base = target.header_end + table["ngrams_offset"]
    buf = bytearray(data)
    grams = np.frombuffer(data, "<i4", table["count"] * n, base).reshape(-1, n).copy()
    if op[0] == "set_token":
        grams[row, op[3]] = op[4]
    elif op[0] == "dup_row":
        grams[row] = grams[row - 1]
    elif op[0] == "swap_rows":
        grams[[row - 1, row]] = grams[[row, row - 1]]
    else:
        offset_key, dtype = {
            "set_count": ("counts_offset", "<u4"),
            "set_harm": ("harm_offset", "<f4"),
            "set_harm_count": ("harm_count_offset", "<u4"),
        }[op[0]]
        at = target.header_end + table[offset_key] + 4 * row
        buf[at : at + 4] = np.array([op[3]], dtype).tobytes()
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
def rules_mutations(draw, target: Target):
    """A short list of mutations; the mode decides the mix, so each kind also comes alone."""
    mode = draw(st.sampled_from(["bytes", "header", "payload", "mixed"]))
    ops = []
    if mode in ("header", "mixed"):
        for _ in range(draw(st.integers(1, 2))):
            path = draw(st.sampled_from(target.paths))
            ops.append(("header", path, draw(header_actions(STRINGS)), draw(st.booleans())))
    if mode in ("payload", "mixed"):
        ops += draw(st.lists(payload_edit(target), min_size=1 if mode == "payload" else 0, max_size=2))
    if mode in ("bytes", "mixed"):
        ops += draw(st.lists(byte_mutation(len(target.original), target.header_end),
                             min_size=1 if mode == "bytes" else 0, max_size=3))
    if mode == "payload" or (mode != "bytes" and draw(st.booleans())) or (mode == "bytes" and draw(st.integers(0, 3)) == 0):
        ops.append(("rechecksum",))
    return ops


def mutate(ops, target: Target = V1) -> bytes:
    data = target.original
    for op in ops:
        if op[0] == "header":
            data = edit_header(data, RULES_FRAMING, op[1], op[2], consistent=op[3])
        elif op[0] in PAYLOAD_EDITS:
            data = apply_payload_edit(target, data, op)
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
    harm, harm_counts = rules.harm_scores(), rules.harm_count_by_rule()
    assert harm.dtype == np.float32 and harm.shape == (len(rules),) and harm_counts.shape == (len(rules),)
    scored = ~np.isnan(harm)
    assert np.isfinite(harm[scored]).all() and (harm[scored] >= 0).all()
    assert ((harm_counts > 0) == scored).all()
    assert rules.scored or not scored.any()
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


@pytest.mark.parametrize("target", [V1, V2], ids=["v1", "v2-scored"])
def test_original_loads(tmp_path, target):
    path = tmp_path / "rules.bin"
    path.write_bytes(target.original)
    assert load_and_check(path) is None
    assert load_rules(path).scored == target.scored


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


# Version 2 (issue 13): the harm tables' own checks, each with the checksum made consistent.
FOUND_V2 = [
    ([("set_harm", 0, 5, -1.0), ("rechecksum",)], "illegal 2-gram harm scores: harm of rule row 5 is negative"),
    ([("set_harm", 1, 5, math.inf), ("rechecksum",)], "illegal 3-gram harm scores: harm of rule row 5 is infinite"),
    ([("set_harm", 2, 5, math.nan), ("rechecksum",)], "rule row 5 has harm nan but harm_count"),
    ([("set_harm_count", 0, 5, 0), ("rechecksum",)], "rule row 5 has harm .* but harm_count 0"),
    ([("header", ("tables", 0, "harm_offset"), ("drop",), True)], r"tables\[0\]\.harm_count_offset is given but"),
    ([("header", ("tables", 1, "harm_offset"), ("set", -64), True)], r"tables\[1\]\.harm_offset is -64"),
    ([("header", ("tables", 2, "harm_count_offset"), ("add", 10**9), True)], r"tables\[2\]\.harm_count_offset is 1001054144"),
    ([("header", ("tables", 2, "harm_offset"), ("set", 1083020), True)], "4-gram harm table .* outside the 1083024-byte payload"),
    ([("header", ("scored",), ("set", False), True)], "scored is False, but 3 of its 3 tables have harm tables"),
    ([("header", ("scored",), ("set", 1), True)], "scored is 1, expected a bool"),
]


def with_version(data: bytes, version: int) -> bytes:
    return data[:8] + version.to_bytes(4, "little") + data[12:]


@pytest.mark.parametrize("ops, message", FOUND_V2)
def test_found_v2_mutations_raise_rules_file_error(tmp_path, ops, message):
    path = tmp_path / "mutated-rules.bin"
    path.write_bytes(mutate(ops, V2))
    with pytest.raises(RulesFileError, match=message):
        load_rules(path)


def test_version_1_file_with_harm_tables_is_refused(tmp_path):
    path = tmp_path / "mutated-rules.bin"
    path.write_bytes(with_version(V2.original, 1))
    with pytest.raises(RulesFileError, match=r"version-1 rules file but tables\[0\]\.harm_offset names a harm table"):
        load_rules(path)


def fuzz_one(target: Target, name: str, ops, tmp_path, monkeypatch, stats) -> None:
    forbid_pickle(monkeypatch)
    data = mutate(ops, target)
    path = tmp_path / "mutated-rules.bin"
    if data == target.original:  # an edit that changed nothing: not a mutated input, draw another
        stats.record(name, op_names(ops), None, unchanged=True)
        assume(False)
    path.write_bytes(data)
    stats.record(name, op_names(ops), load_and_check(path))


@FUZZ_SETTINGS
@given(ops=rules_mutations(V1))
def test_mutated_rules_load_or_raise_umim_error(ops, tmp_path, monkeypatch, stats):
    fuzz_one(V1, "rules", ops, tmp_path, monkeypatch, stats)


@FUZZ_SETTINGS
@given(ops=rules_mutations(V2))
def test_mutated_scored_rules_load_or_raise_umim_error(ops, tmp_path, monkeypatch, stats):
    fuzz_one(V2, "rules-v2-scored", ops, tmp_path, monkeypatch, stats)
