"""Bad or mismatched files stop an engine before it starts, with one error naming the problem."""

import numpy as np
import torch
import pytest
from vllm.engine.arg_utils import EngineArgs

from tests.engine.conftest import RULES
from vllm_umim.engine.patches import apply_patches
from vllm_umim.errors import MismatchError, ModuleFileError, RulesFileError, UmimError
from vllm_umim.module import MergeModule, MergeModuleConfig, save_module
from vllm_umim.rules import RuleSet, load_rules, save_rules

pytestmark = pytest.mark.slow


def engine_config(model_dir, **umim):
    apply_patches()
    return EngineArgs(model=model_dir, dtype="float32", enforce_eager=True, additional_config={"umim": umim}).create_engine_config()


def test_corrupt_rules_file(model_dir, tmp_path):
    bad = tmp_path / "rules.bin"
    bad.write_bytes(RULES.read_bytes()[:-10])
    with pytest.raises(RulesFileError, match="truncated"):
        engine_config(model_dir, rules=str(bad), module="mean")


def test_rules_for_another_tokenizer(model_dir, tmp_path):
    other = RuleSet("0123456789abcdef", 49152, 5, {2: np.array([[1, 2]], np.int32)}, {2: np.array([9], np.uint32)})
    save_rules(other, tmp_path / "other.bin")
    with pytest.raises(MismatchError, match="mined for tokenizer 0123456789abcdef"):
        engine_config(model_dir, rules=str(tmp_path / "other.bin"), module="mean")


def test_module_for_another_model(model_dir, tmp_path):
    model = {"architecture": "X", "hidden_size": 64, "vocab_size": 49152, "num_hidden_layers": 2, "name": "other"}
    save_module(MergeModule(MergeModuleConfig(64)), tmp_path / "m.safetensors", model, "t", "r")
    with pytest.raises(MismatchError, match="hidden_size=64"):
        engine_config(model_dir, rules=str(RULES), module=str(tmp_path / "m.safetensors"))


def test_missing_module(model_dir, tmp_path):
    with pytest.raises(ModuleFileError, match="does not exist"):
        engine_config(model_dir, rules=str(RULES), module=str(tmp_path / "nope.safetensors"))


def test_good_files_select_umim_components(model_dir):
    config = engine_config(model_dir, rules=str(RULES), module="mean")
    assert config.scheduler_config.scheduler_cls.endswith("UmimScheduler")
    assert config.parallel_config.worker_cls.endswith("UmimCPUWorker")
    assert config.scheduler_config.async_scheduling is False


def test_explicit_async_scheduling_is_refused_naming_the_flag(model_dir):
    apply_patches()
    args = EngineArgs(model=model_dir, async_scheduling=True, additional_config={"umim": {"rules": str(RULES), "module": "mean"}})
    with pytest.raises(UmimError, match="--no-async-scheduling"):
        args.create_engine_config()


@pytest.mark.parametrize("budget", [-1, "big", True])
def test_bad_table_budget_is_one_clear_error(model_dir, budget):
    with pytest.raises(UmimError, match="table_budget_mib must be a number >= 0"):
        engine_config(model_dir, rules=str(RULES), module="mean", table_budget_mib=budget)


def test_config_hash_follows_file_contents(model_dir, tmp_path):
    """vLLM keys its compile cache by the config hash: a module rewritten in place must change it."""
    module = MergeModule(MergeModuleConfig(576, num_heads=4))
    path = tmp_path / "module.safetensors"
    rules = load_rules(RULES)

    def config_hash():
        save_module(module, path, model=model_identity_of(model_dir), tokenizer_fingerprint=rules.tokenizer_fingerprint,
                    rules_fingerprint=rules.fingerprint)
        config = engine_config(model_dir, rules=str(RULES), module=str(path))
        assert len(config.additional_config["umim"]["fingerprint"]) == 16
        return config.compute_hash()

    before = config_hash()
    with torch.no_grad():
        module.output_proj.weight.mul_(2)
    assert config_hash() != before


def model_identity_of(model_dir):
    from transformers import AutoConfig

    from vllm_umim.module import model_identity

    return model_identity(AutoConfig.from_pretrained(model_dir))


def test_ngram_speculation_and_fp8_kv_compose_other_drafters_are_refused_in_one_line(model_dir):
    """UMIM + n-gram speculation and UMIM + fp8 KV cache start (the n-gram pair's output is tested
    in ``test_ngram_speculation``); a drafter with its own state of the sequence (here vLLM's GPU
    n-gram drafter, which needs no model to configure) fails at start-up, one line naming it."""
    apply_patches()
    umim = {"umim": {"rules": str(RULES), "module": "mean"}}
    ngram = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    config = EngineArgs(model=model_dir, speculative_config=ngram, additional_config=umim).create_engine_config()
    assert config.speculative_config.method == "ngram" and config.scheduler_config.scheduler_cls.endswith("UmimScheduler")
    with pytest.raises(UmimError, match="speculative decoding by 'ngram_gpu'") as refused:
        EngineArgs(model=model_dir, speculative_config={**ngram, "method": "ngram_gpu"}, additional_config=umim).create_engine_config()
    assert "\n" not in str(refused.value) and "eagle" in str(refused.value)
    config = EngineArgs(model=model_dir, kv_cache_dtype="fp8", additional_config=umim).create_engine_config()
    assert config.cache_config.cache_dtype == "fp8" and config.scheduler_config.scheduler_cls.endswith("UmimScheduler")
