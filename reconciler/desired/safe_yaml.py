"""Reading a YAML document that anyone may have saved, within bounds.

Whatever the input (any bytes, any YAML construct, any size), the outcome is a node tree or
a ``Problem``, never another exception: the daemon's watcher and the REST API read files that
anyone may have saved. Sizes are bounded before any work is done (``MAX_BYTES``), nesting while
composing (``MAX_DEPTH``), and alias expansion by counting values as they are built
(``MAX_VALUES``), so a small file of nested aliases cannot make a billion values. Every value
keeps its line.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

from .problems import (
    InvalidDesiredState,
    Problem,
    YamlPath,
    format_path,
    shown,
    yaml_type,
)

# desired.yaml is a few KiB; a file near these limits is a mistake or an attack
MAX_BYTES = 1 << 20     # 1 MiB
MAX_DEPTH = 32          # nesting levels; the schema needs 4
MAX_VALUES = 100_000    # values built, an alias counted again each time it is used
_MAP_TAG, _SEQ_TAG, _MERGE_TAG = "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq", "tag:yaml.org,2002:merge"


class Refused(Exception):
    """Building stopped: the document is too deep, too big once aliases are expanded, or loops."""

    def __init__(self, line: int, path: YamlPath, message: str):
        self.line, self.path, self.message = line, path, message
        super().__init__(message)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing documents nested deeper than ``MAX_DEPTH`` while composing
    (its composer recurses once per level, so ``[[[[...`` would otherwise end in RecursionError)."""

    def __init__(self, text: str):
        super().__init__(text)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                # types-PyYAML leaves the pure-Python Parser.peek_event unannotated
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise Refused(mark.line + 1, (), f"nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def compose(text: str) -> yaml.Node | None:
    loader = _Loader(text)  # the reader checks every character here: ReaderError
    try:
        return loader.get_single_node()
    finally:
        loader.dispose()


def _reader_problem(exc: yaml.reader.ReaderError, text: str, file: str) -> Problem:
    """A character YAML does not allow (a control character, NUL), at its line."""
    line = text.count("\n", 0, max(exc.position, 0)) + 1
    char = exc.character if isinstance(exc.character, str) else chr(exc.character)
    return Problem(file, line, "", f"character U+{ord(char):04X} is not allowed in YAML "
                                   "(control characters other than tab and line breaks cannot appear)")


def _text_problem(value: str) -> str | None:
    if "\x00" in value:
        return "contains a NUL character (\\0)"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "contains an escape that is not a Unicode character (a lone surrogate)"
    return None


def _kind(node: yaml.Node) -> str:
    return "a mapping" if isinstance(node, yaml.MappingNode) else "a list"


class Located:
    """The parsed document plus the line of every key and value in it."""

    def __init__(self, text: str, file: str):
        self.file = file
        self.lines: dict[YamlPath, int] = {}
        self.problems: list[Problem] = []
        self.data: Any = None   # the document as plain values, once built
        self._constructor = yaml.SafeLoader("")
        self._built = 0
        self._open: set[int] = set()  # ids of the nodes being built: an alias to one of them loops
        try:
            root = compose(text)
            self.data = self._build(root, ()) if root is not None else None
        # on any of these self.data stays None: nothing else is checked
        except yaml.reader.ReaderError as exc:
            self.problems.append(_reader_problem(exc, text, file))
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark else 1
            reason = exc.problem or str(exc)
            self.problems.append(Problem(file, line, "", f"YAML syntax error: {reason}"))
        except yaml.YAMLError as exc:  # any other complaint of the parser: still located at the top
            self.problems.append(Problem(file, 1, "", f"YAML syntax error: {exc}"))
        except Refused as exc:
            self.problems.append(Problem(file, exc.line, format_path(exc.path), exc.message))

    def _build(self, node: yaml.Node, path: YamlPath) -> Any:
        line = node.start_mark.line + 1
        self._built += 1
        if self._built > MAX_VALUES:
            raise Refused(line, path, f"the document expands to more than {MAX_VALUES} values "
                                       "(each use of an alias repeats what it names)")
        if len(path) > MAX_DEPTH:
            raise Refused(line, path, f"nested more than {MAX_DEPTH} levels deep (through aliases)")
        if id(node) in self._open:
            raise Refused(line, path, "an alias refers to a value that contains it (a loop)")
        self.lines.setdefault(path, line)
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node, path)
        expected = _MAP_TAG if isinstance(node, yaml.MappingNode) else _SEQ_TAG
        if node.tag != expected:
            raise Refused(line, path, f"the tag {node.tag} is not supported here (write {_kind(node)} without a tag)")
        self._open.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self._build(item, (*path, i)) for i, item in enumerate(node.value)]
            assert isinstance(node, yaml.MappingNode)
            return self._mapping(node, path)
        finally:
            self._open.discard(id(node))

    def _mapping(self, node: yaml.MappingNode, path: YamlPath) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                raise Refused(key_line, path, f"a key must be plain text, not {_kind(key_node)}")
            if key_node.tag == _MERGE_TAG:
                raise Refused(key_line, path, "merge keys (<<) are not supported: write the values out")
            key = self._scalar(key_node, path)
            if not isinstance(key, str):
                raise Refused(key_line, path, f"a key must be text, got {yaml_type(key)} {shown.repr(key)} "
                                               "(quote it)")
            child = (*path, key)
            if key in out:
                self.problems.append(Problem(self.file, key_line, format_path(child),
                                             "key appears twice in the same mapping"))
            # a key's own line, so "unknown key" points at the key itself
            self.lines[child] = key_line
            out[key] = self._build(value_node, child)
        return out

    def _scalar(self, node: yaml.ScalarNode, path: YamlPath) -> Any:
        line = node.start_mark.line + 1
        try:
            value = self._constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:  # an unknown tag, bad !!binary...
            reason = getattr(exc, "problem", None) or str(exc)
            raise Refused(line, path, f"cannot read this value: {reason}") from None
        except (ValueError, TypeError, LookupError, AttributeError, OverflowError):
            # an explicit tag the text does not fit: !!int abc, !!bool maybe, !!timestamp x
            raise Refused(line, path, f"{shown.repr(node.value)} is not a valid {node.tag.rsplit(':', 1)[-1]}") from None
        problem = _text_problem(value) if isinstance(value, str) else None
        if problem:
            raise Refused(line, path, problem)
        return value

    def line_of(self, path: YamlPath) -> int:
        while path and path not in self.lines:
            path = path[:-1]
        return self.lines.get(path, 1)

    def problem(self, path: YamlPath, message: str) -> Problem:
        return Problem(self.file, self.line_of(path), format_path(path), message)


def too_big(size: int, file: str) -> InvalidDesiredState:
    return InvalidDesiredState([Problem(file, 1, "", f"the file is {size} bytes, more than the limit of "
                                                     f"{MAX_BYTES} bytes (1 MiB) for a desired-state file")])


def decode(data: bytes, file: str = "desired.yaml") -> str:
    """The text of a desired-state file's bytes; InvalidDesiredState when too big or not UTF-8."""
    if len(data) > MAX_BYTES:
        raise too_big(len(data), file)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        line = data.count(b"\n", 0, exc.start) + 1
        raise InvalidDesiredState([Problem(file, line, "", f"not UTF-8 text: byte 0x{data[exc.start]:02x} "
                                                           f"at column {exc.start - line_start + 1}")]) from None


def read_text(path: Path) -> str:
    """The text of the file at ``path``, or InvalidDesiredState saying why it has none: unreadable,
    not a regular file (a FIFO would block the reader for good), too big, not UTF-8."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise InvalidDesiredState([Problem(str(path), 1, "", f"cannot read the file: {exc.strerror or exc}")]) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidDesiredState([Problem(str(path), 1, "", "not a regular file")])
        if info.st_size > MAX_BYTES:
            raise too_big(info.st_size, str(path))
        with os.fdopen(fd, "rb", closefd=False) as stream:
            data = stream.read(MAX_BYTES + 1)
    except OSError as exc:
        raise InvalidDesiredState([Problem(str(path), 1, "", f"cannot read the file: {exc.strerror or exc}")]) from None
    finally:
        os.close(fd)
    return decode(data, str(path))
