"""A problem in a desired-state file: the file, the line, the YAML path and what is wrong."""
from __future__ import annotations

import reprlib
from dataclasses import dataclass
from typing import Any

shown = reprlib.Repr()   # a value quoted in a message, cut short
shown.maxstring, shown.maxother = 60, 60

YamlPath = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{self.file}:{self.line}: {where}{self.message}"


class InvalidDesiredState(Exception):
    """The desired-state text is not usable; ``problems`` says where and why."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def format_path(path: YamlPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def yaml_type(value: Any) -> str:
    """What a value is, in YAML's words (for "expected a list, got a string")."""
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "nothing"}.get(type(value), type(value).__name__)
