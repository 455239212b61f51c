"""The rules and merge module an engine runs with: loaded once per process, checked against the
model and tokenizer, and fingerprinted for vLLM's config hash."""

from __future__ import annotations

import hashlib
from functools import lru_cache

from vllm_umim.engine.config import UmimConfig
from vllm_umim.errors import OptionError
from vllm_umim.module import model_identity, resolve_module
from vllm_umim.module.file_format import check_reader
from vllm_umim.rules import RuleSet, load_rules


@lru_cache(maxsize=4)
def load_engine_rules(path: str) -> RuleSet:
    rules = load_rules(path)
    if len(rules):
        rules.index  # build the matcher's hash index once, up front
    return rules


def load_engine_module(config: UmimConfig, hf_config, rules: RuleSet):
    """The merge module for this model and these rules; raises on any mismatch."""
    module, meta = resolve_module(
        config.module_path(),
        hidden_size=hf_config.hidden_size,
        model=model_identity(hf_config),
        tokenizer_fingerprint=rules.tokenizer_fingerprint,
    )
    if module.config.context_tokens:
        raise OptionError(f"merge module {config.module_path()} reads {module.config.context_tokens} tokens before each span "
                          "(a context-aware module): the engine serves context-free modules only; measure it with "
                          "`vllm-umim eval` or the reference runtime (`vllm-umim generate --engine reference`)")
    check_reader(meta, hf_config, config.module_path())
    return module


def files_fingerprint(config: UmimConfig, rules: RuleSet) -> str:
    """Content hash of the rules and merge module an engine runs with (16 hex digits).

    It goes into ``additional_config`` and so into vLLM's config hash, which keys its compile cache:
    a rules or module file rewritten in place then never meets a graph compiled for the old one."""
    digest = hashlib.sha256(rules.fingerprint.encode())
    module = config.module_path()
    digest.update(module.read_bytes() if module is not None and module.is_file() else str(module).encode())
    return digest.hexdigest()[:16]


def validate_umim_files(engine_args, config: UmimConfig) -> str:
    """Load rules and module once in the API process and check them against model and tokenizer
    (one clear error naming the problem); returns their content fingerprint."""
    from transformers import AutoConfig, AutoTokenizer

    rules = load_engine_rules(config.rules)
    tokenizer_path = engine_args.tokenizer or engine_args.model
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=engine_args.trust_remote_code)
    rules.check_tokenizer(tokenizer, what=f"tokenizer of {tokenizer_path}")
    hf_config = AutoConfig.from_pretrained(engine_args.model, trust_remote_code=engine_args.trust_remote_code)
    load_engine_module(config, hf_config, rules)
    return files_fingerprint(config, rules)
