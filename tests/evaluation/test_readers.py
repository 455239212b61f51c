"""vllm_umim.evaluation.readers on the tiny random Llama: the design comparison's pieces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import make_ruleset, tiny_llama
from tests.training.test_training import RULES, windows
from vllm_umim.errors import OptionError
from vllm_umim.evaluation.ceiling import Split, evaluate, module_surrogates
from vllm_umim.evaluation.readers import ReadersConfig, drift, two_stage_ppl
from vllm_umim.module.merge_module import MergeModule, MergeModuleConfig


def _module(seed=1):
    torch.manual_seed(seed)
    module = MergeModule(MergeModuleConfig(32))
    for p in module.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    return module.eval()


def _rows(teacher, student, split, module):
    return evaluate(teacher, split, lambda i: module_surrogates(teacher, split.batches[i], module), {}, student)


def test_rows_of_a_frozen_reader_are_the_ceilings_module_rows():
    model, module = tiny_llama(), _module()
    split = Split.build(windows(8, seq_len=24, seed=3), make_ruleset(RULES), 4)
    ours = _rows(model, tiny_llama(), split, module)  # a student with the teacher's weights
    theirs = evaluate(model, split, lambda i: module_surrogates(model, split.batches[i], module))
    assert np.allclose(ours["kl"], theirs["kl"], atol=1e-6) and np.array_equal(ours["top1"], theirs["top1"])


def test_an_adapted_reader_is_scored_against_the_base_model():
    teacher, student, module = tiny_llama(), tiny_llama(seed=5), _module()
    split = Split.build(windows(8, seq_len=24, seed=3), make_ruleset(RULES), 4)
    same = _rows(teacher, teacher, split, module)
    other = _rows(teacher, student, split, module)
    assert other["kl"].mean() > same["kl"].mean()
    prompts = [w[:10] for w in windows(3, seq_len=12, seed=4)]
    assert drift(teacher, teacher, split, prompts, 6) == pytest.approx(
        {"raw_kl": 0.0, "raw_top1": 1.0, "raw_positions": 8 * 24, "first_divergence": 6.0, "equal_all": 1.0, "prompts": 3,
         "new_tokens": 6}, abs=1e-6)
    moved = drift(teacher, student, split, prompts, 6)
    assert moved["raw_kl"] > 0.01 and moved["raw_top1"] < 1.0


def test_two_stage_ppl_of_the_unmerged_text_is_the_base_ppl():
    from vllm_umim.module.batches import segment

    model, module = tiny_llama(), _module()
    plain = segment(windows(2, seq_len=20, seed=6), make_ruleset([]))
    result = two_stage_ppl(model, model, module, plain)
    assert result["merged"] == pytest.approx(result["base"], rel=1e-5) and result["tokens"] == 2 * 19
    merged = two_stage_ppl(model, model, module, segment(windows(2, seq_len=20, seed=6), make_ruleset(RULES)))
    assert merged["base"] == pytest.approx(result["base"], rel=1e-6) and merged["merged"] != pytest.approx(result["base"])


def test_design_specs():
    config = ReadersConfig("m", "r", "h", ("a=x.safetensors", "b=y.safetensors+y.reader"), "o.json")
    assert config.parsed() == [("a", "x.safetensors", None), ("b", "y.safetensors", "y.reader")]
    for bad in (("a",), ("=x",), ("a=x", "a=y")):
        with pytest.raises(OptionError):
            ReadersConfig("m", "r", "h", bad, "o.json").parsed()
