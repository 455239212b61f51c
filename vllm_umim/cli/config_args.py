"""Command-line flags from config dataclasses, so every default lives once: in the dataclass.

A field becomes a flag when its ``metadata`` has a ``help``: ``--field-name``, its type from the
annotation (``int``, ``float``, ``str``, ``Path``, ``X | None``, ``list[X]``), its default the
field's (no default: a required flag; the help text says the default). ``bool`` fields are switches: ``--field-name`` for a False
default, ``--no-field-name`` for a True one. Other metadata keys are passed on to argparse
(``choices``, ``metavar``, ``action``, ``type``: a converter for the string), and ``flags`` names
the option strings when they differ (``("-o", "--output")``). A flag that feeds a plain function
takes its default from the function's signature (:func:`default_of`).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import types
import typing

PASSED_ON = ("choices", "metavar", "action", "type", "nargs")


def add_config_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """Add a flag for every field of dataclass ``cls`` that has a ``help`` (and is not in ``skip``)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata or f.name in skip:
            continue
        default = _default(f)
        kind = _scalar(hints[f.name])
        kwargs = {"dest": f.name, "help": _with_default(f.metadata["help"], default)}
        name = f.name.replace("_", "-")
        if kind is bool:
            flags = f.metadata.get("flags", (f"--no-{name}" if default else f"--{name}",))
            kwargs["action"] = "store_false" if default else "store_true"
        else:
            flags = f.metadata.get("flags", (f"--{name}",))
            kwargs["type"] = kind
            kwargs.update({key: f.metadata[key] for key in PASSED_ON if key in f.metadata})
            if default is dataclasses.MISSING:
                kwargs["required"] = True
            else:
                kwargs["default"] = default
        parser.add_argument(*flags, **kwargs)


def config_from_args(cls, args: argparse.Namespace, **overrides):
    """``cls`` from the parsed flags (fields without a flag keep their defaults), then ``overrides``."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **overrides})


def _with_default(help: str, default) -> str:
    if default in (None, dataclasses.MISSING) or isinstance(default, (bool, list, tuple, dict)) or "default" in help:
        return help
    return help + " (default: %(default)s)"


def _default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _scalar(annotation):
    """``int`` from ``int``, ``int | None``, ``list[int]`` or ``tuple[int, ...]``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) in (list, tuple):
        annotation = typing.get_args(annotation)[0]
    return annotation


def default_of(func, name: str):
    """The default of ``func``'s parameter ``name``, for a flag that feeds a plain function."""
    return inspect.signature(func).parameters[name].default
