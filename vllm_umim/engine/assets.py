"""The rules and merge module an engine runs with: loaded once per process, checked against the
model and tokenizer, and fingerprinted for vLLM's config hash.

The API process checks the files (:func:`validate_umim_files`) and records their sha256 in the
config (``additional_config["umim"]["files"]``); the EngineCore (scheduler) and every worker (model
runner) reopen them by path, so each recomputes the sha256 before and after loading and refuses,
naming the file, one that changed in between (:func:`load_checked_files`). Rule token ids must be
below the model's vocabulary size: the ids from there up are the merged spans' virtual ids
(``engine.config.virtual_base``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from vllm_umim.engine.config import UmimConfig
from vllm_umim.errors import MismatchError, OptionError, RulesFileError
from vllm_umim.files import file_sha256
from vllm_umim.module import model_identity, resolve_module
from vllm_umim.module.file_format import check_reader
from vllm_umim.rules import RuleSet, load_rules

_RULES: dict[tuple[str, str], RuleSet] = {}  # (path, sha256) -> rules: a file rewritten in place is read again
_RULES_KEPT = 4


def load_engine_rules(path: str) -> RuleSet:
    """The rules file at ``path`` (cached per content; the matcher's hash index built up front)."""
    digest = file_sha256(path) if Path(path).is_file() else ""
    key = (str(path), digest)
    if key not in _RULES:
        rules = load_rules(path)
        if digest and file_sha256(path) != digest:
            raise RulesFileError(f"{path} changed while it was being read; start the engine again")
        if len(rules):
            rules.index  # build the matcher's hash index once, up front
        while len(_RULES) >= _RULES_KEPT:
            _RULES.pop(next(iter(_RULES)))
        _RULES[key] = rules
    return _RULES[key]


def check_rules_vocab(rules: RuleSet, vocab_size: int, path: str) -> None:
    """Every rule token id below the model's vocabulary size (the merged ids start there)."""
    top = max((int(table.max()) for table in rules.ngrams.values() if table.size), default=-1)
    if top >= vocab_size:
        raise MismatchError(f"rules file {path} holds token id {top}, but the model's vocabulary has {vocab_size} ids "
                            "(ids from there up are UMIM's merged ids): mine rules with this model's tokenizer")


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


def file_digests(config: UmimConfig) -> dict:
    """sha256 of the rules file and of the module file (None: no such file, or ``"mean"``; loading
    it then gives the error that names the problem)."""
    from vllm_umim.module.file_format import MEAN_POOLING

    def digest(path) -> str | None:
        return file_sha256(path) if path is not None and str(path) != MEAN_POOLING and Path(path).is_file() else None

    return {"rules_sha256": digest(config.rules), "module_sha256": digest(config.module_path())}


def verify_file_digests(config: UmimConfig, expected: dict | None, where: str) -> None:
    """Refuse (one line naming the file) a rules or module file whose sha256 is not ``expected``."""
    if not expected:
        return
    actual = file_digests(config)
    for key, what, path in (("rules_sha256", "rules file", config.rules), ("module_sha256", "merge module", config.module_path())):
        if expected.get(key) != actual[key]:
            raise MismatchError(f"{what} {path} changed after the API process checked it (sha256 {str(expected.get(key))[:12]} "
                                f"then, {str(actual[key])[:12]} in the {where}); start the engine again")


def load_checked_files(config: UmimConfig, vocab_size: int, where: str, hf_config=None):
    """(rules, module) as an EngineCore or worker loads them: each file's sha256 must be the one the
    API process recorded (``config.files``), before and after reading; rule ids below ``vocab_size``.
    ``hf_config=None``: the rules only (module None)."""
    expected = dict(config.files)
    verify_file_digests(config, expected, where)
    rules = load_engine_rules(config.rules)
    check_rules_vocab(rules, vocab_size, config.rules)
    module = None if hf_config is None else load_engine_module(config, hf_config, rules)
    verify_file_digests(config, expected, where)
    return rules, module


def files_fingerprint(config: UmimConfig, rules: RuleSet) -> str:
    """Content hash of the rules and merge module an engine runs with (16 hex digits).

    It goes into ``additional_config`` and so into vLLM's config hash, which keys its compile cache:
    a rules or module file rewritten in place then never meets a graph compiled for the old one."""
    digest = hashlib.sha256(rules.fingerprint.encode())
    module = config.module_path()
    digest.update(module.read_bytes() if module is not None and module.is_file() else str(module).encode())
    return digest.hexdigest()[:16]


def validate_umim_files(engine_args, config: UmimConfig) -> dict:
    """Load rules and module once in the API process and check them against model, its vocabulary
    and tokenizer (one clear error naming the problem); returns what goes into the config: their
    content ``fingerprint`` and the ``files``' sha256 the engine processes verify."""
    from transformers import AutoConfig, AutoTokenizer

    digests = file_digests(config)
    rules = load_engine_rules(config.rules)
    tokenizer_path = engine_args.tokenizer or engine_args.model
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=engine_args.trust_remote_code)
    rules.check_tokenizer(tokenizer, what=f"tokenizer of {tokenizer_path}")
    hf_config = AutoConfig.from_pretrained(engine_args.model, trust_remote_code=engine_args.trust_remote_code)
    check_rules_vocab(rules, hf_config.get_text_config().vocab_size, config.rules)
    load_engine_module(config, hf_config, rules)
    fingerprint = files_fingerprint(config, rules)
    verify_file_digests(config, digests, "API process")  # unchanged while being checked
    return {"fingerprint": fingerprint, "files": digests}
