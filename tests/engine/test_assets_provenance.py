"""Start-up checks on the files an engine loads, without starting one: rule ids against the model's
vocabulary, and the EngineCore / worker refusing a rules or module file swapped after the API
process checked it (they reopen the files by path)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.conftest import make_ruleset, tiny_llama
from vllm_umim.engine.assets import file_digests, load_checked_files, load_engine_rules
from vllm_umim.engine.config import CONFIG_KEY, UmimConfig
from vllm_umim.errors import MismatchError
from vllm_umim.module import MergeModule, MergeModuleConfig, model_identity
from vllm_umim.module.file_format import save_module
from vllm_umim.rules import save_rules

VOCAB = 64


@pytest.fixture
def files(tmp_path):
    model = tiny_llama(vocab_size=VOCAB)
    rules = make_ruleset([(2, 3), (5, 6, 7)], vocab_size=VOCAB)
    save_rules(rules, tmp_path / "rules.bin")
    save_module(MergeModule(MergeModuleConfig(32)), tmp_path / "module.safetensors", model_identity(model.config),
                rules.tokenizer_fingerprint, rules.fingerprint)
    options = {"rules": str(tmp_path / "rules.bin"), "module": str(tmp_path / "module.safetensors")}
    checked = UmimConfig.from_dict(options)
    return SimpleNamespace(model=model, rules=rules, options={**options, "files": file_digests(checked)}, dir=tmp_path)


def _swap_rules(files):
    save_rules(make_ruleset([(2, 3), (5, 6, 8)], vocab_size=VOCAB), files.dir / "rules.bin")


def _swap_module(files):
    module = MergeModule(MergeModuleConfig(32))
    module.output_proj.weight.data.mul_(2)
    save_module(module, files.dir / "module.safetensors", model_identity(files.model.config),
                files.rules.tokenizer_fingerprint, files.rules.fingerprint)


def test_unchanged_files_load(files):
    config = UmimConfig.from_dict(files.options)
    rules, module = load_checked_files(config, VOCAB, "worker", hf_config=files.model.config)
    assert rules.fingerprint == files.rules.fingerprint and module.config.hidden_size == 32


@pytest.mark.parametrize("swap, name", [(_swap_rules, "rules.bin"), (_swap_module, "module.safetensors")])
def test_a_file_swapped_after_the_api_check_is_refused(files, swap, name):
    config = UmimConfig.from_dict(files.options)  # what the EngineCore and workers receive
    load_engine_rules(config.rules)  # an earlier parse of the old file is cached in this process
    swap(files)
    for where, hf_config in (("EngineCore", None), ("worker", files.model.config)):
        with pytest.raises(MismatchError, match=f"{name} changed after the API process checked it .* in the {where}"):
            load_checked_files(config, VOCAB, where, hf_config=hf_config)


def test_rules_ids_checked_against_the_model_vocabulary(files):
    """Ids at or above the model's vocabulary would be read as merged (virtual) ids."""
    save_rules(make_ruleset([(2, 3), (5, 70)], vocab_size=128), files.dir / "big.bin")
    config = UmimConfig.from_dict({"rules": str(files.dir / "big.bin"), "module": "mean"})
    with pytest.raises(MismatchError, match=r"big.bin holds token id 70, but the model's vocabulary has 64 ids"):
        load_checked_files(config, VOCAB, "worker")
    load_checked_files(config, 71, "worker")


def test_scheduler_and_model_runner_verify_the_files(files, monkeypatch):
    """The EngineCore's scheduler and the workers' model runner both go through the check."""
    from vllm.v1.core.sched.scheduler import Scheduler

    from vllm_umim.engine.model_runner import UmimModelRunnerMixin
    from vllm_umim.engine.scheduler import UmimScheduler

    vllm_config = SimpleNamespace(additional_config={CONFIG_KEY: files.options},
                                  model_config=SimpleNamespace(get_vocab_size=lambda: VOCAB, hf_config=files.model.config))

    class Base:
        def load_model(self, *args, **kwargs):
            pass

    class Runner(UmimModelRunnerMixin, Base):
        pass

    runner = Runner()
    runner.vllm_config, runner.model_config = vllm_config, vllm_config.model_config
    monkeypatch.setattr(Scheduler, "__init__", lambda self, *args, **kwargs: None)
    _swap_module(files)
    with pytest.raises(MismatchError, match="module.safetensors changed .* in the worker"):
        runner.load_model()
    _swap_rules(files)
    with pytest.raises(MismatchError, match="rules.bin changed .* in the EngineCore"):
        UmimScheduler(vllm_config)
