"""Training text for the merge module beyond Wikipedia (issue 10, "Better surrogates").

The merge module is trained by distillation (paper §3.3: the frozen model reading raw tokens
teaches the module, whose surrogates replace merged spans) on windows of a corpus
(:func:`vllm_umim.module.batches.corpus_windows`). Wikipedia alone leaves out two kinds of text
the engine merges in practice: chat-formatted conversations, and the model's own output, which
is what decode-time merging actually sees. :func:`build_training_mix` writes a JSON Lines corpus
(read by :func:`vllm_umim.data.corpus.read_documents`), one record
``{"text": ..., "source": ...}`` per document, from three sources:

* ``chat``: an instruction over a train Wikipedia opening (summarize, title, key facts, explain
  simply, ask a question, rewrite, ...) through the model's chat template, then the model's own
  answer sampled from stock vLLM (no UMIM), closed by the template's end of turn;
* ``continuation``: the first 32-64 tokens of a train article, then the model's sampled
  continuation (stock vLLM);
* ``wiki``: train Wikipedia articles as they are.

Disjoint from the evaluation sets: only ``train.txt`` of ``fetch_corpus("wiki")`` is read, never
``heldout.txt`` (the held-out PPL text and the wiki and instruction prompts of
:mod:`vllm_umim.evaluation.fidelity_prompts`), and no QA set (ARC, OpenBookQA, PIQA, COPA, GSM8K)
is opened. Each train article feeds at most one record. Articles are drawn for chat first, then
continuations, then wiki, so ``--wiki`` never changes the generated records.

Generation samples (``temperature``, ``top_p``) from an engine seeded with ``seed``, so a seed
gives the same mix. It goes through the ``generate`` parameter (token prompts in, generated token ids out);
tests inject a fake one, the default starts stock vLLM (:func:`generate_with_stock_vllm`).
Records are shuffled (seeded), so any prefix of the file mixes the sources. Beside the output,
``<name>.manifest.json`` records counts and tokens per source, the seed, the sampling settings,
the model and how long the generate call took.
"""

from __future__ import annotations

import functools
import json
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vllm_umim.data.cache import DataError
from vllm_umim.data.corpus import fetch_corpus, read_documents
from vllm_umim.data.instructions import INSTRUCTION_WORDS, INSTRUCTIONS, has_chat_template
from vllm_umim.data.model import bos_prefix
from vllm_umim.files import write_bytes_atomic

SOURCES = ("chat", "continuation", "wiki")
CONTINUATION_PREFIX_TOKENS = (32, 64)  # a continuation's prompt is this many article tokens (inclusive range, drawn per record)
ENGINE_MAX_MODEL_LEN = 1024
EXTRA_INSTRUCTIONS = (  # beside the fidelity suite's three (summary, title, key facts)
    "Explain this to a ten-year-old in simple words:\n\n{text}",
    "Ask one question about this paragraph and answer it:\n\n{text}",
    "Rewrite this paragraph in your own words:\n\n{text}",
    "What is this text about? Answer briefly.\n\n{text}",
    "Write a short tweet about the following:\n\n{text}",
)


@dataclass(frozen=True)
class Sampling:
    """How the model's own text is sampled (recorded in the manifest)."""

    max_new_tokens: int = field(default=128, metadata={"help": "longest generated answer or continuation"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature of the model's own text"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling of the model's own text"})
    seed: int = field(default=0, metadata={"help": "article choice, record order and sampling"})


# token prompts -> generated token ids, one list per prompt, in order
Generate = Callable[[Sequence[Sequence[int]], Sampling], list[list[int]]]


def chat_instructions() -> tuple[str, ...]:
    """The instruction templates (``{text}``: a Wikipedia opening) of the chat records."""
    return INSTRUCTIONS + EXTRA_INSTRUCTIONS


def build_training_mix(
    model_dir: str | Path,
    out_path: str | Path,
    chat: int = 0,
    continuations: int = 0,
    wiki: int = 0,
    seed: int = 0,
    max_new_tokens: int = Sampling.max_new_tokens,
    temperature: float = Sampling.temperature,
    top_p: float = Sampling.top_p,
    corpus_dir: str | Path | None = None,
    generate: Generate | None = None,
) -> dict:
    """Write ``out_path`` (``.jsonl``) and its manifest; return the manifest.

    ``corpus_dir`` holds ``train.txt`` (default: ``fetch_corpus("wiki")``); ``generate`` defaults
    to stock vLLM on ``model_dir``.
    """
    from transformers import AutoTokenizer

    out_path = Path(out_path)
    if out_path.suffix != ".jsonl":
        raise DataError(f"{out_path}: the training mix is JSON Lines; name it *.jsonl")
    if min(chat, continuations, wiki) < 0 or not chat + continuations + wiki:
        raise DataError(f"record counts must be >= 0 and not all 0, got chat={chat}, continuations={continuations}, wiki={wiki}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if chat and not has_chat_template(tokenizer):
        raise DataError(f"{model_dir}: no chat template (a base model), so no chat records: use --chat 0")
    sampling = Sampling(max_new_tokens, temperature, top_p, seed)
    generator = _describe_generator(generate)
    generate = generate or functools.partial(generate_with_stock_vllm, model_dir)

    train_path = Path(corpus_dir or fetch_corpus("wiki")) / "train.txt"
    rng = random.Random(seed)
    articles = _shuffled(read_documents(train_path), rng)
    chat_messages = list(_chat_messages(articles, chat, train_path))
    continuation_ids = list(_continuation_prompts(articles, continuations, tokenizer, rng, train_path))
    wiki_texts = _take(articles, wiki, lambda _: True, "wiki", train_path)

    chat_prompts = [_chat_prompt(tokenizer, message) for message in chat_messages]
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in chat_prompts]
    prompts += [bos_prefix(tokenizer) + ids for ids in continuation_ids]
    clock = time.perf_counter()
    generated = generate(prompts, sampling) if prompts else []
    seconds = time.perf_counter() - clock
    if len(generated) != len(prompts):
        raise DataError(f"the generator returned {len(generated)} outputs for {len(prompts)} prompts")

    answers, continued = generated[: len(chat_prompts)], generated[len(chat_prompts) :]
    records = [{"text": _chat_text(tokenizer, prompt, message, ids), "source": "chat"}
               for prompt, message, ids in zip(chat_prompts, chat_messages, answers)]
    records += [{"text": tokenizer.decode(prefix + ids, skip_special_tokens=True), "source": "continuation"}
                for prefix, ids in zip(continuation_ids, continued)]
    records += [{"text": text, "source": "wiki"} for text in wiki_texts]
    rng.shuffle(records)

    generated_tokens = sum(len(ids) for ids in generated)
    manifest = {
        "model": str(model_dir),
        "corpus": str(train_path),
        "seed": seed,
        "sampling": asdict(sampling),
        "generator": generator,
        "instructions": list(chat_instructions()),
        "counts": {source: sum(r["source"] == source for r in records) for source in SOURCES},
        "tokens": _tokens_per_source(tokenizer, records),
        "generated_tokens": generated_tokens,
        "generations_at_max_length": sum(len(ids) >= max_new_tokens for ids in generated),
        # the whole generate call, engine start included (the stock generator prints the split on stderr)
        "generate_call_seconds": round(seconds, 1),
        "generated_tokens_per_call_second": round(generated_tokens / seconds, 1) if seconds > 0 and generated_tokens else None,
    }
    _write_atomically(out_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    _write_atomically(manifest_path(out_path), json.dumps(manifest, indent=2) + "\n")
    return manifest


def manifest_path(out_path: str | Path) -> Path:
    """``mix.jsonl`` -> ``mix.manifest.json`` (same folder)."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.stem + ".manifest.json")


def generate_with_stock_vllm(model_dir: str | Path, prompts: Sequence[Sequence[int]], sampling: Sampling) -> list[list[int]]:
    """Sampled continuations of token prompts from a stock (no UMIM) fp32 eager vLLM engine,
    started for this call and shut down after it, seeded with ``sampling.seed`` (the same prompts in
    the same order give the same text)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    clock = time.perf_counter()
    llm = LLM(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=ENGINE_MAX_MODEL_LEN, seed=sampling.seed)
    started = time.perf_counter()
    try:
        # no per-request seed: vLLM's CPU worker rewinds a request's generator with set_offset, which
        # CPU generators refuse ("CPU Generator does not use offset"); the engine seed fixes the draws
        params = SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_new_tokens,
                                detokenize=False)
        outputs = llm.generate([TokensPrompt(prompt_token_ids=list(ids)) for ids in prompts], params, use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()
    generated = [list(output.outputs[0].token_ids) for output in outputs]
    seconds = time.perf_counter() - started
    tokens = sum(map(len, generated))
    print(f"training-mix: engine start {started - clock:.1f} s; {len(prompts)} prompts, {tokens} tokens generated in "
          f"{seconds:.1f} s ({tokens / seconds:.1f} tok/s)", file=sys.stderr)
    return generated


def _describe_generator(generate: Generate | None) -> str:
    if generate is None:
        from importlib.metadata import version

        return f"stock vLLM {version('vllm')} (fp32, enforce_eager, no UMIM)"
    return getattr(generate, "__qualname__", repr(generate))


def _shuffled(items: list[str], rng: random.Random) -> Iterator[str]:
    items = list(items)
    rng.shuffle(items)
    return iter(items)


def _take(articles: Iterator[str], count: int, usable: Callable[[str], bool], source: str, train_path: Path) -> list[str]:
    """The next ``count`` usable articles (each article is used once over all sources)."""
    taken = []
    while len(taken) < count:
        article = next(articles, None)
        if article is None:
            raise DataError(f"{train_path}: ran out of articles after {len(taken)} of {count} {source} records")
        if usable(article):
            taken.append(article)
    return taken


def _chat_messages(articles: Iterator[str], count: int, train_path: Path) -> Iterator[str]:
    """User messages: the instruction templates in turn over article openings."""
    templates = chat_instructions()
    long_enough = lambda article: len(article.split()) >= INSTRUCTION_WORDS // 2  # noqa: E731
    for index, article in enumerate(_take(articles, count, long_enough, "chat", train_path)):
        yield templates[index % len(templates)].format(text=" ".join(article.split()[:INSTRUCTION_WORDS]))


def _continuation_prompts(articles: Iterator[str], count: int, tokenizer, rng: random.Random, train_path: Path) -> Iterator[list[int]]:
    """The first 32-64 tokens (drawn per record) of articles longer than that."""
    shortest, longest = CONTINUATION_PREFIX_TOKENS
    encode = lambda article: tokenizer(article, add_special_tokens=False)["input_ids"]  # noqa: E731
    for article in _take(articles, count, lambda article: len(encode(article)) > longest, "continuation", train_path):
        yield encode(article)[: rng.randint(shortest, longest)]


def _chat_prompt(tokenizer, message: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True, tokenize=False)


def _chat_text(tokenizer, prompt: str, message: str, answer_ids: list[int]) -> str:
    """The conversation with the model's answer, as the chat template renders it (end of turn
    included); it must extend the prompt the answer was generated from."""
    answer = tokenizer.decode(answer_ids, skip_special_tokens=True)
    text = tokenizer.apply_chat_template([{"role": "user", "content": message}, {"role": "assistant", "content": answer}],
                                         tokenize=False)
    if not text.startswith(prompt):
        raise DataError("the chat template renders a conversation that does not start with its generation prompt; "
                        f"prompt {prompt!r}, conversation {text[: len(prompt) + 40]!r}")
    return text


def _tokens_per_source(tokenizer, records: list[dict]) -> dict[str, int]:
    """Tokens per source as the corpus reader tokenizes documents (no special tokens added)."""
    tokens = dict.fromkeys(SOURCES, 0)
    for record in records:
        tokens[record["source"]] += len(tokenizer(record["text"], add_special_tokens=False)["input_ids"])
    return tokens


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(text.encode("utf-8"), path)
