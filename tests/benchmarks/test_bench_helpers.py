"""The benchmark's helpers without engines: workloads, never-matching rules, ratios and outputs."""

import numpy as np
import pytest

from tests.conftest import make_ruleset
from tests.package.test_layers import subpackage_imports
from vllm_umim.bench import summary as bench_summary
from vllm_umim.bench import workloads
from vllm_umim.errors import UmimError


def test_bench_sits_on_the_engine_not_on_server_or_cli():
    assert not subpackage_imports()["bench"] & {"server", "cli"}


class CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 64 for c in text]}


def test_prompts_are_document_prefixes_of_the_asked_length():
    documents = ["short", "a" * 40, "b" * 10, "c" * 12]
    prompts = workloads.natural_prompts(CharTokenizer(), documents, num_prompts=2, input_len=10)
    assert prompts == [[ord("a") % 64] * 10, [ord("b") % 64] * 10]
    with pytest.raises(UmimError, match="only 3 documents have >= 10 tokens"):
        workloads.natural_prompts(CharTokenizer(), documents, num_prompts=4, input_len=10)


def test_scenarios_take_overrides_and_refuse_unknown_names():
    assert workloads.scenario("decode-heavy", num_prompts=3, input_len=None).num_prompts == 3
    with pytest.raises(UmimError, match="unknown scenario 'fast'"):
        workloads.scenario("fast")


def test_never_matching_rules_keep_the_shape_and_never_match():
    real = make_ruleset([(1, 2), (2, 3), (4, 5), (1, 2, 3), (7, 8, 9, 10)], vocab_size=256)
    texts = [list(np.random.default_rng(0).integers(0, 128, 500))]
    rules = workloads.never_matching_rules(real, None, texts)
    assert {n: rules.count(n) for n in rules.lengths} == {n: real.count(n) for n in real.lengths}
    assert all(token >= 128 for n in rules.lengths for token in rules.ngrams[n].ravel())
    assert all(span == -1 for span in rules.find_spans(texts)[0])


def run(tokens_per_s, peak, preemptions, merged=True):
    return {"tokens_per_s": tokens_per_s, "requests_per_s": tokens_per_s / 100, "peak_kv_blocks": peak, "preemptions": preemptions,
            "merged_requests": 4 if merged else 0, "tokens_merged_away": 25, "raw_tokens": 100, "prompt_positions": 60,
            "raw_prompt_tokens": 80, "prefill_merges": 20, "decode_merges": 5, "num_kv_blocks": 48}


def test_ratios_pair_repetitions_and_check_the_goal():
    result = {"scenario": {"name": "decode-heavy", "num_prompts": 4, "input_len": 8, "output_len": 8, "kv_blocks": 48},
              "runs": {"stock": [run(100, 48, 3), run(120, 48, 4)], "umim": [run(150, 36, 0), run(132, 36, 1)]}}
    summary = bench_summary.summarize(result)
    assert summary["tokens_per_s_ratio"]["min"] == pytest.approx(1.1)
    assert summary["tokens_per_s_ratio"]["max"] == pytest.approx(1.5)
    assert summary["token_reduction"] == pytest.approx(0.25)
    assert summary["peak_kv_saved"] == pytest.approx(0.25)
    assert summary["goal"]["met"] is True  # median 1.3 >= 1.25


def test_outputs_are_written(tmp_path):
    result = {"scenario": {"name": "prefill-heavy", "num_prompts": 4, "input_len": 8, "output_len": 2, "kv_blocks": None},
              "runs": {"stock": [run(100, 10, 0)], "umim": [run(110, 8, 0)]}}
    summary = bench_summary.summarize(result)
    assert summary["goal"]["target_ratio"] == pytest.approx(0.9 / 0.75) and summary["goal"]["met"] is False
    full = {"scenarios": [summary], "umim": {"module": "mean"}, "module_eval": None, "when": "now", "cpu_count": 2,
            "load_average_start": [1, 1, 1], "load_average_1_5_15": [1, 1, 1], "command": "vllm-umim bench",
            "engine_kwargs": {"model": "m", "additional_config": {}, "max_model_len": 1024}}
    paths = bench_summary.write_outputs(full, tmp_path)
    table = paths["markdown"].read_text()
    assert paths["plot"].stat().st_size > 0 and "NOT met" in table
    assert "vLLM's defaults except max_model_len=1024." in table
