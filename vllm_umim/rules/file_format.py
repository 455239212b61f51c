"""rules.bin: a versioned, mmap-able, pickle-free file for a RuleSet.

Layout (little-endian)::

    offset 0   magic      8 bytes  b"UMIMRULE"
    offset 8   version    uint32   (2; version 1 files are still read)
    offset 12  header_len uint32
    offset 16  header     JSON, utf-8, space-padded so the payload starts 64-byte aligned
    payload    per n in header["tables"]: ngrams int32 [count, n], then counts uint32 [count],
               then, in a scored file, harm float32 [count] and harm_count uint32 [count],
               each table at the 64-byte aligned offset the header gives (relative to payload)

Version 2 (issue 13) adds the optional harm tables: a scored file lists ``harm_offset`` and
``harm_count_offset`` in every table entry (an unscored file in none). Harm is the rule's mean
KL divergence (``vllm_umim.evaluation.rule_harm``): NaN with count 0 = not scored; a negative
or infinite harm, or NaN beside a non-zero count, is refused. A version-1 file has no harm
tables and loads unscored. Rule ids and their order are the same in both versions.

The header names the tokenizer fingerprint, vocab size, n range, threshold, counts per n, the
tables' offsets and the sha256 of the payload, so a truncated, corrupted or foreign file is
refused with one error that says which of these is wrong. Tables are sorted, so a reader can
also binary-search the mmap directly; the engine builds a hash index from them once.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np

from vllm_umim.errors import RulesFileError
from vllm_umim.files import write_bytes_atomic
from vllm_umim.rules.ruleset import MAX_SPAN, RuleSet, harm_problem

MAGIC = b"UMIMRULE"
VERSION = 2
READABLE_VERSIONS = (1, 2)
_HARM_KEYS = ("harm_offset", "harm_count_offset")
ALIGN = 64
_PREFIX = struct.Struct("<8sII")


def _align(offset: int) -> int:
    return (offset + ALIGN - 1) // ALIGN * ALIGN


def save_rules(rules: RuleSet, path: str | Path) -> None:
    """Write ``rules`` to ``path`` (atomically: a temp file renamed into place, normal file mode)."""
    write_bytes_atomic(encode_rules(rules), path)


def encode_rules(rules: RuleSet) -> bytes:
    """The bytes of a version-2 rules file holding ``rules`` (with its harm tables if scored)."""
    payload = bytearray()

    def append(array: np.ndarray) -> int:
        payload.extend(b"\0" * (_align(len(payload)) - len(payload)))
        offset = len(payload)
        payload.extend(array.tobytes())
        return offset

    tables = []
    for n in rules.lengths:
        table = {
            "n": n,
            "count": rules.count(n),
            "ngrams_offset": append(np.ascontiguousarray(rules.ngrams[n], dtype="<i4")),
            "counts_offset": append(np.ascontiguousarray(rules.counts[n], dtype="<u4")),
        }
        if rules.scored:
            table["harm_offset"] = append(np.ascontiguousarray(rules.harm[n], dtype="<f4"))
            table["harm_count_offset"] = append(np.ascontiguousarray(rules.harm_counts[n], dtype="<u4"))
        tables.append(table)
    header = {
        "format": "umim-rules",
        "tokenizer_fingerprint": rules.tokenizer_fingerprint,
        "vocab_size": rules.vocab_size,
        "min_n": min(rules.lengths, default=0),
        "max_n": rules.max_n,
        "threshold": rules.threshold,
        "counts": {str(n): rules.count(n) for n in rules.lengths},
        "scored": rules.scored,
        "tables": tables,
        "payload_size": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "meta": rules.meta,
    }
    header_bytes = json.dumps(header, sort_keys=True).encode()
    header_bytes += b" " * (_align(_PREFIX.size + len(header_bytes)) - _PREFIX.size - len(header_bytes))
    return _PREFIX.pack(MAGIC, VERSION, len(header_bytes)) + header_bytes + bytes(payload)


def read_header(path: str | Path) -> tuple[dict, int]:
    """Parse and check the fixed prefix and JSON header; return (header, payload offset). The
    file's format version is put in the returned header as ``"version"``."""
    path = Path(path)
    if path.is_dir():
        raise RulesFileError(f"rules file {path} is a folder: name its rules.bin here (only the engine's "
                             "rules option, --umim-rules, takes an operating-point folder)")
    if not path.is_file():
        raise RulesFileError(f"rules file {path} does not exist")
    with open(path, "rb") as f:
        prefix = f.read(_PREFIX.size)
        if len(prefix) < _PREFIX.size:
            raise RulesFileError(f"{path} is not a UMIM rules file: only {len(prefix)} bytes long")
        magic, version, header_len = _PREFIX.unpack(prefix)
        if magic != MAGIC:
            raise RulesFileError(f"{path} is not a UMIM rules file (magic {magic!r}, expected {MAGIC!r})")
        if version not in READABLE_VERSIONS:
            raise RulesFileError(
                f"{path} has rules format version {version}; this vllm_umim reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))} (a newer vllm_umim may have written it)"
            )
        raw = f.read(header_len)
    if len(raw) < header_len:
        raise RulesFileError(f"{path} is truncated inside its header")
    try:
        header = json.loads(raw.decode())
        if not isinstance(header, dict):
            raise ValueError(f"expected a JSON object, got {header!r:.40}")
        if header.get("format") != "umim-rules":
            raise ValueError("format field is not 'umim-rules'")
    except (ValueError, RecursionError) as exc:
        raise RulesFileError(f"{path} has a corrupted header: {exc}") from None
    header["version"] = version
    return header, _PREFIX.size + header_len


_MAX_VOCAB = 2**31 - 1  # token ids are int32


def _field(obj: dict, key: str, kind: type, where: str, path: Path):
    """``obj[key]`` if it is a ``kind`` (an int field rejects bools); else RulesFileError."""
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RulesFileError(f"{path} has a corrupted header: {where}{key} is {value!r}, expected {kind.__name__}")
    return value


def _int_field(obj: dict, key: str, lo: int, hi: int, where: str, path: Path) -> int:
    value = _field(obj, key, int, where, path)
    if not lo <= value <= hi:
        raise RulesFileError(f"{path} has a corrupted header: {where}{key} is {value}, expected {lo}..{hi}")
    return value


def _table_array(data, n: int, name: str, offset: int, dtype: str, shape: tuple, path: Path) -> np.ndarray:
    """One array of a table, bounds- and alignment-checked against the payload."""
    size = 4 * int(np.prod(shape))
    if offset % 4 or offset + size > len(data):
        raise RulesFileError(
            f"{path} has a corrupted header: the {n}-gram {name} table (bytes {offset}..{offset + size}) "
            f"is misaligned or outside the {len(data)}-byte payload"
        )
    return np.frombuffer(data, dtype, int(np.prod(shape)), offset).reshape(shape)


def _read_table(data, table, index: int, vocab_size: int, version: int, path: Path) -> dict:
    """One n-gram table, checked: in bounds, token ids in the vocabulary, rows sorted and unique
    (the matcher's hash index refuses duplicates; readers may binary-search the tables), and the
    harm tables, where present, legal (:func:`harm_problem`).
    Returns {"n", "ngrams", "counts"} plus {"harm", "harm_counts"} for a scored table."""
    where = f"tables[{index}]."
    if not isinstance(table, dict):
        raise RulesFileError(f"{path} has a corrupted header: {where[:-1]} is {table!r}, expected an object")
    n = _int_field(table, "n", 2, MAX_SPAN, where, path)
    count = _int_field(table, "count", 0, len(data), where, path)
    ngrams_offset = _int_field(table, "ngrams_offset", 0, len(data), where, path)
    counts_offset = _int_field(table, "counts_offset", 0, len(data), where, path)
    grams = _table_array(data, n, "ngrams", ngrams_offset, "<i4", (count, n), path).astype(np.int32)
    counts = _table_array(data, n, "counts", counts_offset, "<u4", (count,), path).astype(np.uint32)
    if count and (grams.min() < 0 or grams.max() >= vocab_size):
        raise RulesFileError(f"{path} has {n}-gram token ids outside the vocabulary of {vocab_size}")
    if count > 1:
        prev, nxt = grams[:-1], grams[1:]
        differ = prev != nxt
        first = differ.argmax(axis=1)
        rows = np.arange(count - 1)
        ordered = differ.any(axis=1) & (prev[rows, first] < nxt[rows, first])
        if not ordered.all():
            bad = int(np.argmin(ordered))
            raise RulesFileError(
                f"{path} has a corrupted {n}-gram table: rows {bad} and {bad + 1} are duplicated or out of order "
                f"({grams[bad].tolist()}, {grams[bad + 1].tolist()})"
            )
    out = {"n": n, "ngrams": grams, "counts": counts}
    present = [key for key in _HARM_KEYS if key in table]
    if present and version < 2:
        raise RulesFileError(f"{path} is a version-1 rules file but {where}{present[0]} names a harm table")
    if present and len(present) < len(_HARM_KEYS):
        missing = next(key for key in _HARM_KEYS if key not in table)
        raise RulesFileError(f"{path} has a corrupted header: {where}{present[0]} is given but {where}{missing} is not")
    if present:
        harm_offset = _int_field(table, "harm_offset", 0, len(data), where, path)
        harm_count_offset = _int_field(table, "harm_count_offset", 0, len(data), where, path)
        harm = _table_array(data, n, "harm", harm_offset, "<f4", (count,), path).astype(np.float32)
        harm_counts = _table_array(data, n, "harm_count", harm_count_offset, "<u4", (count,), path).astype(np.uint32)
        problem = harm_problem(harm, harm_counts)
        if problem:
            raise RulesFileError(f"{path} has illegal {n}-gram harm scores: {problem}")
        out.update(harm=harm, harm_counts=harm_counts)
    return out


def load_rules(path: str | Path) -> RuleSet:
    """Read and verify a rules file. Raises RulesFileError naming what is wrong."""
    path = Path(path)
    header, payload_offset = read_header(path)
    try:
        return _load_payload(path, header, payload_offset)
    except (KeyError, TypeError, ValueError, OverflowError) as exc:  # backstop: _load_payload names what it checks
        if isinstance(exc, RulesFileError):
            raise
        raise RulesFileError(f"{path} has an inconsistent header or tables: {exc!r}") from None


def _load_payload(path: Path, header: dict, payload_offset: int) -> RuleSet:
    payload_size = _int_field(header, "payload_size", 0, 2**63, "", path)
    payload_sha256 = _field(header, "payload_sha256", str, "", path)
    vocab_size = _int_field(header, "vocab_size", 1, _MAX_VOCAB, "", path)
    threshold = _int_field(header, "threshold", 0, 2**63, "", path)
    fingerprint = _field(header, "tokenizer_fingerprint", str, "", path)
    tables = _field(header, "tables", list, "", path)
    meta = header.get("meta", {})
    if not isinstance(meta, dict):
        raise RulesFileError(f"{path} has a corrupted header: meta is {meta!r}, expected an object")
    size = path.stat().st_size
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=payload_offset) if size > payload_offset else np.zeros(0, np.uint8)
    if len(data) != payload_size:
        raise RulesFileError(f"{path} is truncated or padded: payload is {len(data)} bytes, header says {payload_size}")
    if hashlib.sha256(data).hexdigest() != payload_sha256:
        raise RulesFileError(f"{path} is corrupted: payload checksum does not match its header")
    ngrams, counts, harm, harm_counts = {}, {}, {}, {}
    for index, table in enumerate(tables):
        read = _read_table(data, table, index, vocab_size, header["version"], path)
        n = read["n"]
        if n in ngrams:
            raise RulesFileError(f"{path} has a corrupted header: two tables of {n}-grams")
        ngrams[n], counts[n] = read["ngrams"], read["counts"]
        if "harm" in read:
            harm[n], harm_counts[n] = read["harm"], read["harm_counts"]
    scored = header.get("scored", False)
    if not isinstance(scored, bool) or (scored and header["version"] < 2):
        raise RulesFileError(f"{path} has a corrupted header: scored is {scored!r}, expected a bool (version 2 only)")
    if len(harm) != (len(ngrams) if scored else 0):
        raise RulesFileError(
            f"{path} has an inconsistent header: scored is {scored}, but {len(harm)} of its {len(ngrams)} tables have harm tables"
        )
    # The summary fields must agree with the tables (``vllm-umim inspect`` prints them).
    lengths = sorted(ngrams)
    expected = {
        "counts": {str(n): len(ngrams[n]) for n in lengths},
        "min_n": min(lengths, default=0),
        "max_n": max(lengths, default=0),
    }
    for key, value in expected.items():
        if header.get(key) != value or isinstance(header.get(key), bool):
            raise RulesFileError(f"{path} has an inconsistent header: {key} is {header.get(key)!r}, but its tables give {value!r}")
    return RuleSet(
        tokenizer_fingerprint=fingerprint,
        vocab_size=vocab_size,
        threshold=threshold,
        ngrams=ngrams,
        counts=counts,
        meta=meta,
        harm=harm if scored else None,
        harm_counts=harm_counts if scored else None,
    )
