"""Per-rule refinement (module/refinement.py): lookup by tokens, zero residual = the base module,
the residual changes only its own n-gram, file round trip and one clear error per corruption."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_umim.errors import ModuleFileError
from vllm_umim.module import MergeModule, MergeModuleConfig, load_module, save_module
from vllm_umim.module.refinement import most_frequent_spans

MODEL = {"architecture": "LlamaForCausalLM", "hidden_size": 32, "vocab_size": 64, "num_hidden_layers": 2, "name": "tiny"}
NGRAMS = torch.tensor([[2, 3, -1, -1], [7, 8, 9, -1], [10, 11, 12, 13]])


def trained_module(seed=0) -> MergeModule:
    torch.manual_seed(seed)
    module = MergeModule(MergeModuleConfig(32))
    for p in module.parameters():
        p.data.normal_(0, 0.2)
    return module


def spans(tokens: list[list[int]]):
    table = torch.full((len(tokens), 4), -1)
    for i, row in enumerate(tokens):
        table[i, : len(row)] = torch.tensor(row)
    embeds = torch.nn.Embedding(64, 32)(table.clamp(min=0)).detach()
    return embeds, (table >= 0).sum(1), table


def test_lookup_finds_whole_ngrams_only():
    refined = trained_module().refined(NGRAMS)
    _, _, table = spans([[2, 3], [7, 8, 9], [7, 8], [10, 11, 12, 13], [3, 2], [2, 3, 4]])
    assert refined.refinement.lookup(table).tolist() == [0, 1, -1, 2, -1, -1]
    assert refined.refinement.lookup(table[:, :3][:2]).tolist() == [0, 1]  # narrower span tensors are padded


def test_zero_residual_is_the_base_module_and_a_residual_moves_only_its_ngram():
    base = trained_module()
    refined = base.refined(NGRAMS)
    embeds, lengths, table = spans([[2, 3], [7, 8, 9], [5, 6], [10, 11, 12, 13]])
    torch.testing.assert_close(refined(embeds, lengths, table), base(embeds, lengths))
    refined.refinement.residuals.data[1] = 1.0
    delta = refined(embeds, lengths, table) - base(embeds, lengths)
    assert torch.allclose(delta[1], torch.ones(32)) and delta[[0, 2, 3]].abs().max() < 1e-6
    torch.testing.assert_close(refined.pool(embeds, lengths), base(embeds, lengths))


def test_refined_module_needs_span_tokens():
    embeds, lengths, _ = spans([[2, 3]])
    with pytest.raises(ValueError, match="span_tokens"):
        trained_module().refined(NGRAMS)(embeds, lengths)


def test_most_frequent_spans_is_deterministic():
    rows = [[2, 3]] * 3 + [[7, 8, 9]] * 3 + [[5, 6]] * 5 + [[4, 4]]
    table = most_frequent_spans(rows, 3, 4)
    assert table.tolist() == [[5, 6, -1, -1], [2, 3, -1, -1], [7, 8, 9, -1]]  # ties by tokens


def test_refined_file_round_trip(tmp_path):
    refined = trained_module().refined(NGRAMS)
    refined.refinement.residuals.data.normal_()
    path = tmp_path / "refined.safetensors"
    save_module(refined, path, MODEL, "tok", "rules")
    loaded, meta = load_module(path, model=MODEL)
    assert meta["config"]["refined_rules"] == 3
    assert torch.equal(loaded.refinement.ngrams, NGRAMS)
    embeds, lengths, table = spans([[2, 3], [5, 6], [10, 11, 12, 13]])
    torch.testing.assert_close(loaded(embeds, lengths, table), refined(embeds, lengths, table))


def test_files_without_refinement_still_load(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_module(trained_module(), path, MODEL, "tok", "rules")
    module, meta = load_module(path)
    assert module.refinement is None and "refined_rules" not in json.dumps(meta["training"])


@pytest.mark.parametrize("corrupt, message", [
    (lambda t: t.__setitem__("refinement.ngrams", torch.tensor([[2, -1, 3, -1], [7, 8, 9, -1], [10, 11, 12, 13]])), "padding"),
    (lambda t: t.__setitem__("refinement.ngrams", torch.tensor([[2, -1, -1, -1], [7, 8, 9, -1], [10, 11, 12, 13]])), "2 or more"),
    (lambda t: t.__setitem__("refinement.ngrams", torch.tensor([[2, 3, -1, -1], [2, 3, -1, -1], [10, 11, 12, 13]])), "not unique"),
    (lambda t: t.__setitem__("refinement.ngrams", torch.tensor([[2, 99, -1, -1], [7, 8, 9, -1], [10, 11, 12, 13]])), "vocabulary"),
    (lambda t: t.__setitem__("refinement.ngrams", t["refinement.ngrams"].float()), "token ids"),
    (lambda t: t.__setitem__("refinement.residuals", torch.full((3, 32), float("nan"))), "NaN"),
    (lambda t: t.pop("refinement.residuals"), "missing tensors"),
])
def test_corrupted_refinement_is_one_error(tmp_path, corrupt, message):
    path = tmp_path / "refined.safetensors"
    save_module(trained_module().refined(NGRAMS), path, MODEL, "tok", "rules")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    corrupt(tensors)
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ModuleFileError, match=message):
        load_module(path)


def test_negative_refined_rules_in_config_is_one_error(tmp_path):
    path = tmp_path / "refined.safetensors"
    save_module(trained_module().refined(NGRAMS), path, MODEL, "tok", "rules")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    metadata["config"] = json.dumps({**json.loads(metadata["config"]), "refined_rules": -2})
    save_file(load_file(str(path)), str(path), metadata=metadata)
    with pytest.raises(ModuleFileError, match="refined_rules"):
        load_module(path)


def test_a_module_shorter_than_the_longest_rule_is_one_error(tmp_path):
    """A (refined) module whose max_span is below the rules' 4 used to fail at engine load with a raw
    RuntimeError (span tokens [S, 4] against n-grams [K, 3]); it is refused when the file is read."""
    path = tmp_path / "short.safetensors"
    torch.manual_seed(0)
    short = MergeModule(MergeModuleConfig(32, max_span=3)).refined(torch.tensor([[2, 3, -1], [7, 8, 9]]))
    save_module(short, path, MODEL, "tok", "rules")
    with pytest.raises(ModuleFileError, match="max_span is 3, but rules merge spans of up to 4 tokens"):
        load_module(path)
