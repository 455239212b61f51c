"""The one Markdown-table writer of the benchmarks and the results page, and the "wiki / chat / gsm8k"
cells that the fidelity tables share."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

TEXT_KINDS = ("wiki", "chat", "gsm8k")  # the three kinds of text of ``vllm-umim fidelity``, in its order


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A Markdown table: one header row, then one row per sequence of cells (each ``str()``-ed;
    a ``|`` inside a cell is escaped). Every row must have as many cells as the header."""
    lines = [header, ["---"] * len(header)]
    for row in rows:
        if len(row) != len(header):
            raise TypeError(f"a table row has {len(row)} cells for {len(header)} columns: {row!r}")
        lines.append(row)
    return "\n".join("| " + " | ".join(str(cell).replace("|", "\\|") for cell in line) + " |" for line in lines)


def kinds_of(figures: dict) -> list[str]:
    """The kinds of text a fidelity result covers (a model without a chat template has no chat)."""
    return [kind for kind in TEXT_KINDS if kind in figures]


def per_kind(figures: dict, key: str, fmt: Callable[[float], str], kinds: Sequence[str] | None = None) -> str:
    """One cell with ``figures[kind][key]`` for each kind, e.g. ``"8.5 / 24.9 / 10.5"``; "–" when
    the figure was not recorded."""
    kinds = kinds or kinds_of(figures)
    values = [figures[kind].get(key) for kind in kinds]
    return "–" if any(v is None for v in values) else " / ".join(fmt(v) for v in values)


def percent(value: float, digits: int = 0) -> str:
    return f"{100 * value:.{digits}f}"


def ratio_cell(ratio: dict) -> str:
    """A throughput ratio with its spread over repetitions: ``median [min–max] (n)``."""
    return f"{ratio['median']:.3f} [{ratio['min']:.3f}–{ratio['max']:.3f}] ({ratio['n']})"
