"""Fuzz the merge module loader with mutated copies of the shipped module.safetensors (issue 12).

Every mutated file must either load into a MergeModule that runs (finite output of the right
shape) or raise UmimError (ModuleFileError / MismatchError) naming the file. Mutations: raw byte
damage (biased to the 8-byte length and the JSON header), edits of the safetensors header JSON
(dtypes, shapes, data offsets, the metadata and the JSON inside it: config, model, training),
re-framed consistently or not, and non-finite values written into the weights. The long run is
this test with more examples::

    UMIM_FUZZ_EXAMPLES=10000 UMIM_FUZZ_REPORT=fuzz.json python -m pytest -q tests/module/test_file_fuzz.py
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from tests.fuzzing import (
    ARTIFACTS,
    FUZZ_SETTINGS,
    SAFETENSORS_FRAMING,
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
from vllm_umim.errors import MismatchError, ModuleFileError, UmimError
from vllm_umim.module.file_format import load_module, resolve_module

ORIGINAL = (ARTIFACTS / "module.safetensors").read_bytes()
HEADER_END = header_end(ORIGINAL, SAFETENSORS_FRAMING)
HEADER = json.loads(ORIGINAL[SAFETENSORS_FRAMING.prefix_size : HEADER_END])
PATHS = json_paths(HEADER)
METADATA = HEADER["__metadata__"]
IDENTITY = json.loads(METADATA["model"])
TOKENIZER = METADATA["tokenizer_fingerprint"]
HIDDEN = IDENTITY["hidden_size"]
TENSORS = {name: entry for name, entry in HEADER.items() if name != "__metadata__"}
DTYPES = ["F16", "BF16", "F32", "F64", "I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64", "BOOL", "F8_E4M3", "F8_E5M2", "C64", "X"]
STRINGS = DTYPES + ["merge-module/1", "merge-module/2", "paper", "token_processor", "mean", "query", "key_proj.weight", TOKENIZER]


@pytest.fixture(scope="module")
def stats():
    stats = FuzzStats()
    yield stats
    stats.write()


# ---------------------------------------------------------------- mutations


@st.composite
def weight_edit(draw):
    """A non-finite or extreme float32 written into a weight (safetensors has no checksum)."""
    name = draw(st.sampled_from(sorted(TENSORS)))
    entry = TENSORS[name]
    index = draw(st.integers(0, math.prod(entry["shape"]) - 1))
    return ("set_weight", name, index, draw(st.sampled_from([math.nan, math.inf, -math.inf, 3e38, -0.0, 1e-45])))


def apply_weight_edit(data: bytes, op) -> bytes:
    at = HEADER_END + TENSORS[op[1]]["data_offsets"][0] + 4 * op[2]
    return data[:at] + np.float32(op[3]).tobytes() + data[at + 4 :]


@st.composite
def module_mutations(draw):
    mode = draw(st.sampled_from(["bytes", "header", "header", "weights", "mixed"]))
    ops = []
    if mode in ("header", "mixed"):
        for _ in range(draw(st.integers(1, 2))):
            path = draw(st.sampled_from(PATHS))
            ops.append(("header", path, draw(header_actions(STRINGS)), draw(st.booleans())))
    if mode in ("weights", "mixed"):
        ops += draw(st.lists(weight_edit(), min_size=1 if mode == "weights" else 0, max_size=2))
    if mode in ("bytes", "mixed"):
        ops += draw(st.lists(byte_mutation(len(ORIGINAL), HEADER_END), min_size=1 if mode == "bytes" else 0, max_size=3))
    return ops


def mutate(ops) -> bytes:
    data = ORIGINAL
    for op in ops:
        if op[0] == "header":
            data = edit_header(data, SAFETENSORS_FRAMING, op[1], op[2], consistent=op[3])
        elif op[0] == "set_weight":
            data = apply_weight_edit(data, op)
        else:
            data = apply_byte_mutation(data, op)
    return data


def op_names(ops):
    return [("header_" + op[2][0],) if op[0] == "header" else op for op in ops]


# ---------------------------------------------------------------- usability of whatever loads


def check_usable(module, meta, expectations: bool) -> None:
    """What the engine does with a loaded module must work: it embeds spans, finitely."""
    hidden = module.config.hidden_size
    if expectations:
        assert hidden == HIDDEN
    for key in ("config", "model", "training"):
        assert isinstance(meta[key], dict), f"metadata {key} is {meta[key]!r}"
    assert isinstance(meta["tokenizer_fingerprint"], str) and isinstance(meta["rules_fingerprint"], str)
    for p in module.parameters():
        assert p.dtype.is_floating_point and bool(torch.isfinite(p).all())
    torch.manual_seed(0)
    with torch.no_grad():
        out = module(torch.randn(3, 4, hidden), torch.tensor([2, 3, 4]))
    assert out.shape == (3, hidden)
    # Finite weights of a sane size (the shipped ones are below 2) give finite surrogates; a weight
    # near float32's limit may overflow the matmuls, which is the weights' fault, not the loader's.
    if max(float(p.detach().abs().max()) for p in module.parameters()) <= 1e6:
        assert bool(torch.isfinite(out).all())


# ---------------------------------------------------------------- the test


def load_and_check(path, expectations: bool):
    """None if the file loaded and is usable; the UmimError subclass name if it was refused.

    ``expectations``: load as the engine does (``resolve_module`` with the model identity and
    tokenizer fingerprint), else as the trainer does (``load_module`` with no expectations)."""
    with per_example_deadline():
        try:
            if expectations:
                module, meta = resolve_module(path, HIDDEN, model=IDENTITY, tokenizer_fingerprint=TOKENIZER)
            else:
                module, meta = load_module(path)
        except UmimError as exc:
            assert path.name in str(exc), f"error does not name the file: {exc}"
            return type(exc).__name__
        check_usable(module, meta, expectations)
    return None


@pytest.mark.parametrize("expectations", [True, False])
def test_original_loads(tmp_path, expectations):
    path = tmp_path / "module.safetensors"
    path.write_bytes(ORIGINAL)
    assert load_and_check(path, expectations) is None


def _config(key, action):
    return [("header", ("__metadata__", "config", "$json", key), action, True)]


# Mutations the fuzzer found that the loader used to get wrong (each now a clear UmimError): a
# stray exception type, or a module that loaded but computed garbage.
FOUND = [
    ([("set_weight", "key_proj.weight", 0, math.nan)], ModuleFileError, "key_proj.weight holds NaN or infinite"),  # loaded; NaN out
    ([("header", ("query", "dtype"), ("set", "I32"), False)], ModuleFileError, "query has dtype I32"),  # loaded the bits as ~1e9
    ([("header", ("__metadata__", "training", "$json"), ("set", -643740), False)], ModuleFileError, "training is -643740"),
    ([("header", ("__metadata__", "model", "$json"), ("set", [8663, 1735]), True)], ModuleFileError, "model is"),  # AttributeError
    (_config("hidden_size", ("set", 7.2e16)), ModuleFileError, "hidden_size is 7.2e"),  # was TypeError
    (_config("hidden_size", ("scale", 0)), ModuleFileError, "hidden_size is 0"),  # was ZeroDivisionError
    (_config("num_heads", ("set", 0)), ModuleFileError, "num_heads is 0"),  # was ZeroDivisionError
    (_config("hidden_size", ("scale", 8)), ModuleFileError, r"query has shape \(4, 144\), expected \(4, 1152\)"),
]


@pytest.mark.parametrize("ops, error, message", FOUND)
def test_found_mutations_raise_umim_error(tmp_path, ops, error, message):
    path = tmp_path / "mutated-module.safetensors"
    path.write_bytes(mutate(ops))
    with pytest.raises(error, match=message):
        load_module(path)


def test_config_is_checked_against_the_file_before_allocating(tmp_path, monkeypatch):
    """A config edited to a huge hidden size used to build the module first: 3 x 13 GB of weights
    for hidden_size 57600. The shapes are now compared on the meta device, before any allocation."""
    import vllm_umim.module.file_format as file_format

    built = []
    real = file_format.MergeModule

    def spy(config):
        built.append(torch.empty(0).device.type)
        return real(config)

    monkeypatch.setattr(file_format, "MergeModule", spy)
    path = tmp_path / "mutated-module.safetensors"
    path.write_bytes(mutate(_config("hidden_size", ("scale", 100))))
    with pytest.raises(ModuleFileError, match=r"expected \(4, 14400\)"):
        load_module(path)
    with pytest.raises(MismatchError, match="hidden_size=57600"):
        resolve_module(path, HIDDEN, model=IDENTITY, tokenizer_fingerprint=TOKENIZER)
    assert built == ["meta"]


@FUZZ_SETTINGS
@given(ops=module_mutations(), expectations=st.booleans())
def test_mutated_module_loads_or_raises_umim_error(ops, expectations, tmp_path, monkeypatch, stats):
    forbid_pickle(monkeypatch)
    data = mutate(ops)
    path = tmp_path / "mutated-module.safetensors"
    if data == ORIGINAL:  # an edit that changed nothing: not a mutated input, draw another
        stats.record("module", op_names(ops), None, unchanged=True)
        assume(False)
    path.write_bytes(data)
    stats.record("module", op_names(ops), load_and_check(path, expectations))
