"""README.md stays short and true: every command in it is run by something, every relative link in
it and in docs/ resolves.

Commands are the lines of README's fenced ``bash`` blocks (comments stripped) and its ``python``
blocks. A cheap one is run here; any other must be in ``RUN_ELSEWHERE`` with what runs it verbatim,
and this test checks that it does. A new command nothing runs fails here.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 200
CI_RUN = ".ci/run"
SERVE_TEST = "tests/server/test_readme_serve.py"

# README command -> what runs it exactly as written there
RUN_ELSEWHERE = {
    "bash scripts/setup.sh && vllm-umim demo": CI_RUN,
    "bash scripts/test.sh": CI_RUN,
    "bash scripts/test.sh --fast": CI_RUN,
    "vllm serve ~/.cache/vllm_umim/models/smollm2-135m --umim-rules artifacts/smollm2-135m/balanced": SERVE_TEST,
}

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def readme_blocks() -> list[tuple[str, str]]:
    return FENCE.findall(README.read_text())


def readme_commands() -> list[str]:
    """The command lines of README's bash blocks, without comments."""
    commands = []
    for language, body in readme_blocks():
        if language != "bash":
            continue
        for line in body.splitlines():
            command = line.split(" #")[0].strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_LINES, f"README.md has {len(lines)} lines (at most {MAX_LINES}): move detail to docs/"


def test_readme_blocks_are_bash_or_python():
    languages = [language for language, _ in readme_blocks()]
    assert languages and set(languages) <= {"bash", "python"}, f"README code blocks: {languages}"
    assert languages.count("python") == 1


def test_every_readme_command_is_run():
    commands = readme_commands()
    unrun = [c for c in commands if c not in RUN_ELSEWHERE]
    assert not unrun, f"README commands nothing runs (add a test, or map them in RUN_ELSEWHERE): {unrun}"
    stale = [c for c in RUN_ELSEWHERE if c not in commands]
    assert not stale, f"RUN_ELSEWHERE maps commands README no longer has: {stale}"


def test_ci_runs_its_readme_commands_verbatim():
    ci_lines = [line.strip() for line in (ROOT / CI_RUN).read_text().splitlines()]
    for command, runner in RUN_ELSEWHERE.items():
        if runner == CI_RUN:
            assert command in ci_lines, f"{CI_RUN} does not run README's `{command}`"


def test_serve_test_runs_readmes_serve_command():
    from tests.server.test_readme_serve import readme_serve_command

    serve = [c for c, runner in RUN_ELSEWHERE.items() if runner == SERVE_TEST]
    assert [shlex.split(c) for c in serve] == [readme_serve_command()]


def test_operating_points_markers():
    text = README.read_text()
    start, end = text.find("<!-- operating-points:start -->"), text.find("<!-- operating-points:end -->")
    assert 0 <= start < end, "README lacks the operating-points markers"
    rows = [line for line in text[start:end].splitlines() if line.startswith("| **")]
    assert [r.split("|")[1].strip() for r in rows] == ["**faithful**", "**balanced**", "**max**"]


def github_anchor(heading: str) -> str:
    """GitHub's id for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {github_anchor(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("page", [README, *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked here
        path, _, fragment = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists() or ROOT not in resolved.parents:
            broken.append(target)
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: links that do not resolve in the repository: {broken}"


def test_readme_python_snippet_compiles():
    (snippet,) = [body for language, body in readme_blocks() if language == "python"]
    compile(snippet, "README.md", "exec")


@pytest.mark.slow
def test_readme_python_snippet_runs_and_merges():
    """The snippet as written, in vLLM's defaults, from the repository root (a fresh process: it
    starts its own engine)."""
    from vllm_umim.data.model import fetch_model

    fetch_model("smollm2-135m")  # what scripts/setup.sh fetched; the snippet reads it from the cache
    (snippet,) = [body for language, body in readme_blocks() if language == "python"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-c", snippet], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    figures = re.search(r"\{'raw_tokens'.*\}", run.stdout)
    assert figures, f"no merge figures printed: {run.stdout[-2000:]}"
    stats = ast.literal_eval(figures.group(0))
    print(f"\nREADME's Python snippet: {stats}")
    assert stats["prefill_merges"] > 0 and stats["positions"] < stats["raw_tokens"]
