"""Shared pieces of the loader fuzz tests (tests/rules/test_file_fuzz.py, tests/module/test_file_fuzz.py).

Each test mutates a real shipped file (byte flips biased to the header, truncation, inserted or
deleted ranges, appended garbage, edits of the header JSON re-framed consistently or not) and
requires that the loader either returns something usable or raises ``UmimError``: never another
exception type, never a crash, never a hang, never a pickle load.

``UMIM_FUZZ_EXAMPLES`` sets the examples per test (default 300, the CI run); ``UMIM_FUZZ_REPORT``
names a JSON file that receives per-test counts (inputs, loaded, raised by error type, seconds).
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import math
import os
import pickle
import signal
import struct
import sys
import time
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts" / "smollm2-135m"
EXAMPLES = int(os.environ.get("UMIM_FUZZ_EXAMPLES", "300"))
SOFT_DEADLINE_S = 20.0  # one load + usability check; a Python-level hang is interrupted here
HARD_DEADLINE_S = 120.0  # a hang inside native code: dump tracebacks and exit the run

FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,  # timing is enforced by per_example_deadline (hypothesis' deadline is flaky on a busy box)
    database=None,
    derandomize=False,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)


# ---------------------------------------------------------------- deadline, pickle guard, stats


class LoaderHang(BaseException):
    """Raised by the deadline alarm; a BaseException so a loader's ``except Exception`` cannot hide it."""


@contextlib.contextmanager
def per_example_deadline(seconds: float = SOFT_DEADLINE_S):
    def on_alarm(signum, frame):
        raise LoaderHang(f"loading one mutated file took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(HARD_DEADLINE_S, exit=True)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        faulthandler.cancel_dump_traceback_later()


def forbid_pickle(monkeypatch) -> None:
    """Make any unpickling during the test an immediate failure (loaders must never unpickle)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a loader tried to unpickle data")

    class RefusingUnpickler:
        def __init__(self, *args, **kwargs):
            refuse()

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", RefusingUnpickler)
    if "torch" in sys.modules:
        monkeypatch.setattr(sys.modules["torch"], "load", refuse)


class FuzzStats:
    """Counts per test; written (merged by test name) to $UMIM_FUZZ_REPORT at module teardown."""

    def __init__(self):
        self.tests: dict[str, dict] = {}

    def test(self, name: str) -> dict:
        return self.tests.setdefault(
            name,
            {
                "inputs": 0,
                "loaded": 0,
                "raised": 0,
                "errors": Counter(),
                "mutations": Counter(),  # inputs per mutation kind (an input may combine kinds)
                "loaded_mutations": Counter(),  # the same, for the inputs that loaded
                "started": time.perf_counter(),
            },
        )

    def record(self, name: str, ops, outcome: str | None, unchanged: bool = False) -> None:
        """outcome: None when the file loaded, else the error class name. Inputs that came out
        byte-identical to the original are counted apart, not as mutated inputs."""
        entry = self.test(name)
        if unchanged:
            entry["unchanged"] = entry.get("unchanged", 0) + 1
            return
        entry["inputs"] += 1
        kinds = {op[0] for op in ops}
        entry["mutations"].update(kinds)
        if outcome is None:
            entry["loaded"] += 1
            entry["loaded_mutations"].update(kinds)
        else:
            entry["raised"] += 1
            entry["errors"][outcome] += 1
        entry["seconds"] = round(time.perf_counter() - entry["started"], 1)

    def write(self) -> None:
        target = os.environ.get("UMIM_FUZZ_REPORT")
        if not target or not self.tests:
            return
        path = Path(target)
        report = json.loads(path.read_text()) if path.is_file() else {}
        for name, entry in self.tests.items():
            report[name] = {
                "examples_setting": EXAMPLES,
                **{k: (dict(v.most_common()) if isinstance(v, Counter) else v) for k, v in entry.items() if k != "started"},
            }
        path.write_text(json.dumps(report, indent=2) + "\n")


# ---------------------------------------------------------------- framing of the two formats


class Framing:
    """A file = prefix holding the header length + JSON header + rest (payload / tensor data)."""

    def __init__(self, length_format: str, length_offset: int, prefix_size: int, align: int, separators: tuple[str, str]):
        self.length = struct.Struct(length_format)
        self.length_offset, self.prefix_size, self.align = length_offset, prefix_size, align
        self.separators = separators  # as the writer's json.dumps, so an edit can keep the length

    def split(self, data: bytes) -> tuple[bytes, bytes, bytes] | None:
        if len(data) < self.prefix_size:
            return None
        (size,) = self.length.unpack_from(data, self.length_offset)
        if self.prefix_size + size > len(data):
            return None
        return data[: self.prefix_size], data[self.prefix_size : self.prefix_size + size], data[self.prefix_size + size :]

    def join(self, prefix: bytes, header: bytes, rest: bytes, old_size: int, consistent: bool) -> bytes:
        if consistent:  # new length in the prefix, padded with spaces as the writers do
            header += b" " * (-(self.prefix_size + len(header)) % self.align)
        else:  # keep the old length: pad or cut the JSON to fit
            header = header[:old_size].ljust(old_size, b" ")
        prefix = bytearray(prefix)
        self.length.pack_into(prefix, self.length_offset, len(header))
        return bytes(prefix) + header + rest


RULES_FRAMING = Framing("<I", 12, 16, 64, (", ", ": "))  # b"UMIMRULE", version, header_len, header
SAFETENSORS_FRAMING = Framing("<Q", 0, 8, 8, (",", ":"))  # header size (u64), compact header


def header_end(data: bytes, framing: Framing) -> int:
    parts = framing.split(data)
    return framing.prefix_size + len(parts[1])


# ---------------------------------------------------------------- JSON header edits

EMBEDDED = "$json"  # path step: the value is a string holding JSON (safetensors metadata)
DROP = object()


def _embedded(value):
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return json.loads(value)
        except ValueError:
            return None
    return None


def json_paths(obj, prefix=()) -> list[tuple]:
    """Every node of a JSON document (descending into JSON held in strings)."""
    paths = [prefix]
    inner = _embedded(obj)
    if inner is not None:
        paths += json_paths(inner, prefix + (EMBEDDED,))
    elif isinstance(obj, dict):
        for key, value in obj.items():
            paths += json_paths(value, prefix + (key,))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            paths += json_paths(value, prefix + (i,))
    return paths


def _apply_action(value, action):
    kind = action[0]
    if kind == "drop":
        return DROP
    if kind == "set":
        return action[1]
    if kind == "add" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return value + action[1]
    if kind == "scale" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return value * action[1]
    if kind == "add_key" and isinstance(value, dict):
        return {**value, action[1]: action[2]}
    if kind == "stringify":  # 576 -> "576", a list -> its JSON text
        return json.dumps(value)
    return value  # an action that does not apply to this node leaves it alone


def edit_json(obj, path: tuple, action):
    if not path:
        return _apply_action(obj, action)
    step, rest = path[0], path[1:]
    if step == EMBEDDED:
        inner = edit_json(json.loads(obj), rest, action)
        return "" if inner is DROP else json.dumps(inner, allow_nan=True)
    new = dict(obj) if isinstance(obj, dict) else list(obj)
    result = edit_json(obj[step], rest, action)
    if result is DROP:
        del new[step]
    else:
        new[step] = result
    return new


def edit_header(data: bytes, framing: Framing, path: tuple, action, consistent: bool) -> bytes:
    parts = framing.split(data)
    if parts is None:
        return data
    prefix, header, rest = parts
    try:
        obj = json.loads(header)
        edited = edit_json(obj, path, action)
    except (ValueError, KeyError, IndexError, TypeError):
        return data  # an earlier mutation already broke the header: nothing to edit
    text = b"" if edited is DROP else json.dumps(edited, allow_nan=True, separators=framing.separators).encode()
    return framing.join(prefix, text, rest, len(header), consistent)


# ---------------------------------------------------------------- strategies

EVIL_SCALARS = [
    None, True, False, 0, -1, 1, 3, -4, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63), 10**30,
    0.5, -0.0, 1e308, math.inf, -math.inf, math.nan, "", "0", "576", "x" * 40, [], {}, [[]], [0], [-1, 2], {"a": 1},
]


def evil_values(strings: list[str]) -> st.SearchStrategy:
    return st.one_of(
        st.sampled_from(EVIL_SCALARS),
        st.integers(-(2**70), 2**70),
        st.floats(),
        st.text(max_size=12),
        st.sampled_from(strings) if strings else st.nothing(),
        st.lists(st.integers(-10, 10**7), max_size=4),
    )


def header_actions(strings: list[str]) -> st.SearchStrategy:
    return st.one_of(
        st.tuples(st.just("set"), evil_values(strings)),
        st.tuples(st.just("drop")),
        st.tuples(st.just("add"), st.sampled_from([-(2**32), -64, -8, -4, -1, 1, 4, 8, 64, 4096, 2**32])),
        st.tuples(st.just("scale"), st.sampled_from([-1, 0, 2, 3, 1000, 2**40, 0.5])),
        st.tuples(st.just("add_key"), st.sampled_from(["extra", "n", "count", "dtype", "__metadata__", "x"]), evil_values(strings)),
        st.tuples(st.just("stringify")),
    )


@st.composite
def byte_mutation(draw, size: int, head_end: int):
    """One raw byte-level mutation of a file of ``size`` bytes whose header ends at ``head_end``."""
    biased = st.one_of(st.integers(0, head_end - 1), st.integers(0, 31), st.integers(0, size - 1))
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "append", "overwrite"]))
    if kind == "flip":
        flips = draw(st.lists(st.tuples(biased, st.integers(1, 255)), min_size=1, max_size=8))
        return ("flip", tuple(flips))
    if kind == "truncate":
        return ("truncate", draw(st.one_of(biased, st.integers(0, size - 1), st.integers(size - 64, size - 1))))
    if kind == "insert":
        return ("insert", draw(biased), draw(st.binary(min_size=1, max_size=64) | st.sampled_from([b"\0" * 8, b" " * 64, b"{}", b'"'])))
    if kind == "delete":
        return ("delete", draw(biased), draw(st.integers(1, 256) | st.integers(1, size)))
    if kind == "append":
        return ("append", draw(st.binary(min_size=1, max_size=256) | st.sampled_from([b"\0" * 4096, b"\xff" * 64])))
    return ("overwrite", draw(biased), draw(st.binary(min_size=1, max_size=16)))


def apply_byte_mutation(data: bytes, op) -> bytes:
    kind = op[0]
    if kind == "flip":
        buf = bytearray(data)
        for offset, mask in op[1]:
            if offset < len(buf):
                buf[offset] ^= mask
        return bytes(buf)
    if kind == "truncate":
        return data[: op[1]]
    if kind == "insert":
        return data[: op[1]] + op[2] + data[op[1] :]
    if kind == "delete":
        return data[: op[1]] + data[op[1] + op[2] :]
    if kind == "append":
        return data + op[1]
    if kind == "overwrite":
        return data[: op[1]] + op[2] + data[op[1] + len(op[2]) :]
    raise ValueError(kind)
