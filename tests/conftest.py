"""Shared fixtures: a word-level fake tokenizer and a tiny random Llama (no downloads); the real
SmolLM2 and the vLLM engines that several test packages share, each shut down after its last test."""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path

import pytest
import torch


class WordTokenizer:
    """A deterministic whitespace tokenizer over a fixed word list (enough for mining tests)."""

    def __init__(self, words: list[str]):
        self.vocab = {w: i for i, w in enumerate(words)}
        self.name_or_path = "word-tokenizer"

    def get_vocab(self):
        return dict(self.vocab)

    def __len__(self):
        return len(self.vocab)

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[self.vocab[w] for w in text.split()] for text in texts]}

    def decode(self, ids):
        inverse = {i: w for w, i in self.vocab.items()}
        return " ".join(inverse[i] for i in ids)


@pytest.fixture
def word_tokenizer():
    return WordTokenizer("the of a in united states new york city is was and to".split())


def tiny_llama(vocab_size: int = 64, hidden_size: int = 32, seed: int = 0):
    """A 2-layer random Llama built from a config (fp32, eager attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_model():
    return tiny_llama()


def make_ruleset(ngrams, vocab_size: int = 64):
    """A RuleSet from a list of token tuples (any order, duplicates dropped)."""
    import numpy as np

    from vllm_umim.rules import RuleSet

    by_n = {}
    for gram in set(map(tuple, ngrams)):
        by_n.setdefault(len(gram), []).append(gram)
    tables = {n: np.array(sorted(grams), dtype=np.int32).reshape(-1, n) for n, grams in by_n.items()}
    return RuleSet(
        tokenizer_fingerprint="test",
        vocab_size=vocab_size,
        threshold=1,
        ngrams=tables,
        counts={n: np.ones(len(t), np.uint32) for n, t in tables.items()},
    )


# ---- vLLM engines shared across test packages ----------------------------------------------------
# One start per session each (~30 s apiece). An engine fixture yields through ``until_last_use``,
# which shuts the engine down right after the last test of the run that names the fixture, rather
# than when its scope ends: a session-scoped engine then holds its memory (weights, 1 GiB of KV
# cache) only as long as some test still needs it, and the engines and servers that later tests
# start find it free. A test that reaches an engine through ``request.getfixturevalue`` names it in
# ``@pytest.mark.engines(...)``, so that it counts as a user.

_last_user: dict[str, str] = {}  # fixture name -> node id of the last test in the run that uses it
_release: dict[str, Callable[[], None]] = {}  # fixture name -> shut its engine down (once)
TESTS = Path(__file__).resolve().parent
ENGINE_PACKAGES = ("engine", "server")  # they share stock_llm and umim_llm
# engines several modules of one package use: those modules run first in their package, one after
# the other, so that the engine stops before the package's other engines start
GROUPED_ENGINES = ("umim_server", "default_umim_llm", "empty_rules_llm")


def pytest_collection_modifyitems(items):
    """Run order: the packages of ENGINE_PACKAGES last, one after the other (the fast tests'
    failures show first, and the engines those packages share stop before any other package's
    engines start), and in them the modules that use GROUPED_ENGINES first, grouped by engine.
    Otherwise the order stays as collected."""
    used: dict[Path, set[str]] = {}
    for item in items:
        used.setdefault(item.path, set()).update(getattr(item, "fixturenames", ()))

    def key(item):
        parts = item.path.relative_to(TESTS).parts if item.path.is_relative_to(TESTS) else ()
        package = parts[0] if len(parts) > 1 else ""
        if package not in ENGINE_PACKAGES:
            return (0, 0)
        engines = [GROUPED_ENGINES.index(name) for name in used[item.path] if name in GROUPED_ENGINES]
        return (1 + ENGINE_PACKAGES.index(package), min(engines, default=len(GROUPED_ENGINES)))

    items.sort(key=key)


def pytest_collection_finish(session):
    for item in session.items:
        named = [name for marker in item.iter_markers("engines") for name in marker.args]
        for name in [*getattr(item, "fixturenames", ()), *named]:
            _last_user[name] = item.nodeid


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    try:
        return (yield)
    finally:
        for name in [name for name, nodeid in _last_user.items() if nodeid == item.nodeid and name in _release]:
            _release.pop(name)()


def until_last_use(request, engine, shutdown: Callable[[], None]):
    """Yield ``engine`` from the fixture ``request`` belongs to; ``shutdown()`` runs once, after
    the last test that uses the fixture or when the fixture's scope ends, whichever comes first."""
    done = []

    def once():
        if not done:
            done.append(True)
            shutdown()
            gc.collect()

    _release[request.fixturename] = once
    try:
        yield engine
    finally:
        _release.pop(request.fixturename, None)
        once()


def shut_down(llm) -> Callable[[], None]:
    """Stop an offline ``LLM``'s EngineCore process (and with it the memory it holds)."""
    return lambda: llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="session")
def model_dir() -> str:
    from vllm_umim.data.model import fetch_model

    return str(fetch_model("smollm2-135m"))


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def heldout_prompts(tokenizer) -> list[list[int]]:
    """60 held-out Wikipedia openings, 64 tokens each (articles shorter than that skipped)."""
    from vllm_umim.data.corpus import fetch_corpus, read_documents

    prompts = []
    for document in read_documents(fetch_corpus("wiki") / "heldout.txt"):
        ids = tokenizer(document, add_special_tokens=False)["input_ids"]
        if len(ids) >= 64:
            prompts.append(ids[:64])
        if len(prompts) == 60:
            break
    return prompts


@pytest.fixture(scope="session")
def stock_llm(request, model_dir):
    """Stock vLLM (no UMIM), fp32 eager: the engine tests' baseline and the load test's opt-out reference."""
    from vllm import LLM

    from tests.engine.conftest import ENGINE_ARGS

    llm = LLM(model=model_dir, **ENGINE_ARGS)
    yield from until_last_use(request, llm, shut_down(llm))


@pytest.fixture(scope="session")
def umim_llm(request, model_dir):
    """The UMIM engine most engine tests and the server tests compare against (fp32 eager, the
    session's module, per-request raw windows up to MAX_WINDOW)."""
    from vllm import LLM

    from tests.engine.conftest import ENGINE_ARGS, MAX_WINDOW, RULES, module_for_tests

    options = {"rules": str(RULES), "module": module_for_tests(), "max_window": MAX_WINDOW}
    llm = LLM(model=model_dir, additional_config={"umim": options}, **ENGINE_ARGS)
    yield from until_last_use(request, llm, shut_down(llm))
