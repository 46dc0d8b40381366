"""Dataclass fields that are command-line flags: a field's default, help and argparse options sit at the field
(``flag``), and ``add_flags`` turns a dataclass's fields into arguments (``batch_size`` is ``--batch-size``)."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable


def at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an int >= ``low``, else the flag's error message giving the bound."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"  # (argparse names the type in "invalid <type> value")
    return parse


def flag(default: Any, help: str, **argparse_options: Any) -> Any:
    """A dataclass field that is a command-line flag: its default, its help and its argparse options (type, choices,
    nargs). A ``False`` default makes a switch (``store_true``); otherwise the type is the default's unless given."""
    return dataclasses.field(default=default, metadata={"help": help, **argparse_options})


def add_flags(parser: argparse.ArgumentParser, kind: type) -> None:
    """One argument per field of the dataclass ``kind`` (``flag`` fields), in an argument group titled by the first
    line of its docstring."""
    arguments = parser.add_argument_group(kind.__doc__.splitlines()[0])
    for field in dataclasses.fields(kind):
        options = dict(field.metadata)
        if field.default is False:
            options["action"] = "store_true"
        elif "type" not in options:
            options["type"] = type(field.default)
        arguments.add_argument("--" + field.name.replace("_", "-"), default=field.default, **options)


def from_args(kind: type, args: argparse.Namespace) -> Any:
    """The dataclass ``kind`` with each field's value from the parsed ``args``."""
    return kind(**{field.name: getattr(args, field.name) for field in dataclasses.fields(kind)})
