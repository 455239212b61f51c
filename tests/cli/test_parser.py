"""The command line without running a command (fast): one module per subcommand, flags built from
the config dataclasses, help without issue numbers, errors as one line."""

from __future__ import annotations

import argparse
import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vllm_umim.cli import config_args
from vllm_umim.cli.main import COMMANDS, build_parser, main
from vllm_umim.errors import UmimError

PACKAGE = Path(__file__).resolve().parents[2] / "vllm_umim"


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_subcommand_is_a_module_with_register_and_run():
    assert all(callable(command.register) and callable(command.run) for command in COMMANDS)
    assert set(subparsers()) == {"fetch-model", "fetch-corpus", "training-mix", "mine", "inspect", "generate", "demo", "train",
                                 "teacher-cache", "eval", "fidelity", "lm-eval", "score-rules", "select-rules", "ceiling", "bench", "bench-pair",
                                     "readers", "merge-reader"}


def test_each_subcommand_runs_its_modules_run():
    assert {p.get_default("func") for p in subparsers().values()} == {command.run for command in COMMANDS}


def test_no_help_text_cites_an_issue():
    parser = build_parser()
    texts = [parser.description or ""]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    texts += [choice.help or "" for choice in sub._choices_actions]
    for name, p in sub.choices.items():
        texts += [p.description or ""] + [f"{name} {a.option_strings}: {a.help}" for a in p._actions if a.help]
    cited = [t for t in texts if re.search(r"issue\s*#?\d", t, re.IGNORECASE)]
    assert cited == []


def test_a_umim_error_is_one_line_with_exit_status_2(tmp_path, capsys):
    missing = tmp_path / "missing.bin"
    assert main(["inspect", str(missing)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("vllm-umim: error: ") and captured.err.count("\n") == 1 and str(missing) in captured.err


def test_error_classes_live_in_errors_py():
    """Every exception class of the package is defined in errors.py, except one that must extend a
    vLLM exception (vLLM turns VLLMValidationError into HTTP 400), which errors.py cannot import."""
    outside = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(ast.unparse(b).endswith(("Error", "Exception")) for b in node.bases):
                bases = {ast.unparse(b) for b in node.bases}
                if "VLLMValidationError" not in bases:
                    outside.append(f"{path.relative_to(PACKAGE)}:{node.name}")
    assert outside == []


def test_the_package_raises_no_plain_value_error():
    allowed = {
        "rules/file_format.py": "ValueError(",  # inside a try that turns it into RulesFileError
        "server/cli_args.py": "SystemExit(",  # vllm serve's own one-line error, exit status 1
        "server/plugin.py": "SystemExit(",  # --umim-* flags on another vLLM: one line, exit status 1
    }
    raised = [f"{path.relative_to(PACKAGE)}:{node.lineno}" for path in PACKAGE.rglob("*.py")
              for node in ast.walk(ast.parse(path.read_text()))
              if isinstance(node, ast.Raise) and node.exc is not None
              and ast.unparse(node.exc).startswith(("ValueError(", "SystemExit("))
              and not ast.unparse(node.exc).startswith(allowed.get(str(path.relative_to(PACKAGE)), "-"))]
    assert raised == []


@dataclass
class Example:
    path: Path = field(metadata={"help": "a required path"})
    count: int = field(default=3, metadata={"help": "a count"})
    name: str | None = field(default=None, metadata={"help": "optional"})
    verbose: bool = field(default=False, metadata={"help": "switch on"})
    progress: bool = field(default=True, metadata={"help": "switch off"})
    items: list[str] = field(default_factory=list, metadata={"flags": ("--item",), "action": "append", "help": "repeatable"})
    words: tuple[str, ...] = field(default=("a", "b"), metadata={"type": lambda s: tuple(s.split(",")), "help": "comma list"})
    mode: str = field(default="x", metadata={"choices": ("x", "y"), "help": "one of two"})
    hidden: int = 7  # no help: no flag


def test_config_arguments_follow_the_dataclass():
    parser = argparse.ArgumentParser()
    config_args.add_config_arguments(parser, Example)
    assert config_args.config_from_args(Example, parser.parse_args(["--path", "p"])) == Example(Path("p"))
    args = parser.parse_args(["--path", "p", "--count", "5", "--name", "n", "--verbose", "--no-progress", "--item", "i",
                              "--item", "j", "--words", "c,d", "--mode", "y"])
    assert config_args.config_from_args(Example, args, hidden=8) == Example(Path("p"), 5, "n", True, False, ["i", "j"], ("c", "d"), "y", 8)
    assert "--hidden" not in parser.format_help() and "(default: 3)" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--count", "5"])  # --path is required: it has no default
    with pytest.raises(SystemExit):
        parser.parse_args(["--path", "p", "--mode", "z"])


def test_umim_error_is_a_value_error():
    assert issubclass(UmimError, ValueError)  # vLLM's request and config validation treat it as bad input


def test_a_missing_corpus_or_model_folder_is_one_line(tmp_path, capsys):
    rules = Path(__file__).resolve().parents[2] / "artifacts" / "smollm2-135m" / "rules.bin"
    assert main(["mine", "--model", str(tmp_path / "no-model"), "--corpus", str(tmp_path / "c.txt"), "-o", str(tmp_path / "r.bin")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vllm-umim: error: {tmp_path / 'no-model'}: cannot load a tokenizer") and err.count("\n") == 1
    from vllm_umim.data.corpus import read_documents
    from vllm_umim.errors import DataError

    with pytest.raises(DataError, match="no such corpus file"):
        read_documents(tmp_path / "c.txt")
    assert main(["train", "--model", str(tmp_path / "no-model"), "--rules", str(rules), "--corpus", "c", "-o", "m"]) == 2
    assert "cannot load a tokenizer" in capsys.readouterr().err
