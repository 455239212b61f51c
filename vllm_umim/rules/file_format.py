"""rules.bin: a versioned, mmap-able, pickle-free file for a RuleSet.

Layout (little-endian)::

    offset 0   magic      8 bytes  b"UMIMRULE"
    offset 8   version    uint32   (1)
    offset 12  header_len uint32
    offset 16  header     JSON, utf-8, space-padded so the payload starts 64-byte aligned
    payload    per n in header["tables"]: ngrams int32 [count, n], then counts uint32 [count],
               each table at the 64-byte aligned offset the header gives (relative to payload)

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
from vllm_umim.rules.ruleset import MAX_SPAN, RuleSet

MAGIC = b"UMIMRULE"
VERSION = 1
ALIGN = 64
_PREFIX = struct.Struct("<8sII")


def _align(offset: int) -> int:
    return (offset + ALIGN - 1) // ALIGN * ALIGN


def save_rules(rules: RuleSet, path: str | Path) -> None:
    """Write ``rules`` to ``path`` (atomically: a temp file renamed into place)."""
    payload = bytearray()
    tables = []
    for n in rules.lengths:
        grams = np.ascontiguousarray(rules.ngrams[n], dtype="<i4")
        counts = np.ascontiguousarray(rules.counts[n], dtype="<u4")
        payload += b"\0" * (_align(len(payload)) - len(payload))
        ngrams_offset = len(payload)
        payload += grams.tobytes()
        payload += b"\0" * (_align(len(payload)) - len(payload))
        counts_offset = len(payload)
        payload += counts.tobytes()
        tables.append({"n": n, "count": len(grams), "ngrams_offset": ngrams_offset, "counts_offset": counts_offset})
    header = {
        "format": "umim-rules",
        "tokenizer_fingerprint": rules.tokenizer_fingerprint,
        "vocab_size": rules.vocab_size,
        "min_n": min(rules.lengths, default=0),
        "max_n": rules.max_n,
        "threshold": rules.threshold,
        "counts": {str(n): rules.count(n) for n in rules.lengths},
        "tables": tables,
        "payload_size": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "meta": rules.meta,
    }
    header_bytes = json.dumps(header, sort_keys=True).encode()
    header_bytes += b" " * (_align(_PREFIX.size + len(header_bytes)) - _PREFIX.size - len(header_bytes))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(_PREFIX.pack(MAGIC, VERSION, len(header_bytes)))
        f.write(header_bytes)
        f.write(payload)
    tmp.replace(path)


def read_header(path: str | Path) -> tuple[dict, int]:
    """Parse and check the fixed prefix and JSON header; return (header, payload offset)."""
    path = Path(path)
    if not path.is_file():
        raise RulesFileError(f"rules file {path} does not exist")
    with open(path, "rb") as f:
        prefix = f.read(_PREFIX.size)
        if len(prefix) < _PREFIX.size:
            raise RulesFileError(f"{path} is not a UMIM rules file: only {len(prefix)} bytes long")
        magic, version, header_len = _PREFIX.unpack(prefix)
        if magic != MAGIC:
            raise RulesFileError(f"{path} is not a UMIM rules file (magic {magic!r}, expected {MAGIC!r})")
        if version != VERSION:
            raise RulesFileError(f"{path} has rules format version {version}; this vllm_umim reads version {VERSION}")
        raw = f.read(header_len)
    if len(raw) < header_len:
        raise RulesFileError(f"{path} is truncated inside its header")
    try:
        header = json.loads(raw.decode())
        if header.get("format") != "umim-rules":
            raise ValueError("format field is not 'umim-rules'")
    except ValueError as exc:
        raise RulesFileError(f"{path} has a corrupted header: {exc}") from None
    return header, _PREFIX.size + header_len


def load_rules(path: str | Path) -> RuleSet:
    """Read and verify a rules file. Raises RulesFileError naming what is wrong."""
    path = Path(path)
    header, payload_offset = read_header(path)
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=payload_offset) if path.stat().st_size > payload_offset else np.zeros(0, np.uint8)
        if len(data) != header["payload_size"]:
            raise RulesFileError(
                f"{path} is truncated or padded: payload is {len(data)} bytes, header says {header['payload_size']}"
            )
        if hashlib.sha256(data).hexdigest() != header["payload_sha256"]:
            raise RulesFileError(f"{path} is corrupted: payload checksum does not match its header")
        ngrams, counts = {}, {}
        for table in header["tables"]:
            n, count = int(table["n"]), int(table["count"])
            if not 2 <= n <= MAX_SPAN:
                raise RulesFileError(f"{path} has a table of {n}-grams; rules must have 2..{MAX_SPAN} tokens")
            grams = np.frombuffer(data, "<i4", count * n, table["ngrams_offset"]).reshape(count, n)
            ngrams[n] = grams.astype(np.int32)
            counts[n] = np.frombuffer(data, "<u4", count, table["counts_offset"]).astype(np.uint32)
            if count and (grams.min() < 0 or grams.max() >= header["vocab_size"]):
                raise RulesFileError(f"{path} has {n}-gram token ids outside the vocabulary of {header['vocab_size']}")
        return RuleSet(
            tokenizer_fingerprint=header["tokenizer_fingerprint"],
            vocab_size=int(header["vocab_size"]),
            threshold=int(header["threshold"]),
            ngrams=ngrams,
            counts=counts,
            meta=header.get("meta", {}),
        )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, RulesFileError):
            raise
        raise RulesFileError(f"{path} has an inconsistent header or tables: {exc!r}") from None
