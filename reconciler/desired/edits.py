"""Edits of desired.yaml's text that touch only the lines they must.

The REST API changes the file a person keeps in git, so a change must not
re-flow it: comments, blank lines, quoting, key order and indentation stay
byte for byte. Each edit finds its place with the YAML parser's position marks
and splices text there; the caller validates the result before writing it.
(A round-trip through ruamel.yaml was tried first: it moved comments between
list items and re-indented sequences.)
"""
from __future__ import annotations

import yaml

from .safe_yaml import Refused, compose


class EditError(Exception):
    """The edit does not apply to this document (e.g. no such instance)."""


def _root(text: str) -> yaml.MappingNode:
    try:
        root = compose(text)   # within the loader's limits: the text may be anything saved
    except (yaml.YAMLError, Refused) as exc:
        raise EditError(f"the file cannot be read as YAML: {exc}") from None
    if not isinstance(root, yaml.MappingNode):
        raise EditError("the top level of the file is not a mapping")
    return root


def _value(mapping: yaml.MappingNode, key: str) -> tuple[yaml.Node, yaml.Node] | None:
    for key_node, value_node in mapping.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
            return key_node, value_node
    return None


def _port(item: yaml.Node) -> int | None:
    if isinstance(item, yaml.MappingNode):
        found = _value(item, "port")
        if found and isinstance(found[1], yaml.ScalarNode) and found[1].value.isdigit():
            return int(found[1].value)
    return None


def _last_line(node: yaml.Node) -> int:
    """The last line holding part of ``node`` (0-based); trailing comments are not part of it."""
    if isinstance(node, yaml.MappingNode) and not node.flow_style and node.value:
        return _last_line(node.value[-1][1])
    if isinstance(node, yaml.SequenceNode) and not node.flow_style and node.value:
        return _last_line(node.value[-1])
    end = node.end_mark
    # a block scalar's end mark sits at the start of the line after it
    return end.line - 1 if end.column == 0 and end.line > node.start_mark.line else end.line


def _line_starts(text: str) -> list[int]:
    starts = [0]
    for i, ch in enumerate(text):
        if ch == "\n":
            starts.append(i + 1)
    return starts


def _splice(text: str, start: int, end: int, new: str) -> str:
    return text[:start] + new + text[end:]


def _instances(text: str) -> tuple[yaml.MappingNode, tuple[yaml.Node, yaml.Node] | None]:
    root = _root(text)
    return root, _value(root, "instances")


def _find(text: str, port: int) -> tuple[yaml.Node, yaml.SequenceNode, int, yaml.MappingNode]:
    _, found = _instances(text)
    if found and isinstance(found[1], yaml.SequenceNode):
        for index, item in enumerate(found[1].value):
            if _port(item) == port:
                return found[0], found[1], index, item
    raise EditError(f"no instance with port {port} in the file")


def _dash_column(text: str, item: yaml.Node) -> int:
    """Column of the ``-`` that opens a block sequence item."""
    dash = text.rfind("-", 0, item.start_mark.index)
    return dash - text.rfind("\n", 0, dash) - 1


def _block_item(indent: int, port: int, state: str) -> str:
    pad = " " * indent
    return f"{pad}- port: {port}\n{pad}  state: {state}\n"


def _sequence_indent(text: str, root: yaml.MappingNode) -> int:
    """Indent of '-' used by the file's other block lists (2 when it has none)."""
    for _, value in root.value:
        if isinstance(value, yaml.SequenceNode) and not value.flow_style and value.value:
            return _dash_column(text, value.value[0])
    return 2


def add_instance(text: str, port: int, state: str = "running") -> str:
    root, found = _instances(text)
    starts = _line_starts(text)
    if found is None:
        body = text if text.endswith("\n") or not text else text + "\n"
        return body + "instances:\n" + _block_item(_sequence_indent(text, root), port, state)
    key, seq = found
    if isinstance(seq, yaml.SequenceNode) and not seq.flow_style and seq.value:
        last = seq.value[-1]
        after = starts[_last_line(last) + 1] if _last_line(last) + 1 < len(starts) else len(text)
        prefix = "" if text[:after].endswith("\n") else "\n"
        return _splice(text, after, after, prefix + _block_item(_dash_column(text, last), port, state))
    if isinstance(seq, yaml.SequenceNode) and seq.flow_style:
        close = text.rfind("]", seq.start_mark.index, seq.end_mark.index)
        separator = ", " if seq.value else ""
        return _splice(text, close, close, f"{separator}{{port: {port}, state: {state}}}")
    if isinstance(seq, yaml.ScalarNode) and seq.value in ("", "~", "null") and seq.tag.endswith(":null"):
        # `instances:` (or `instances: ~`) with nothing in it: the list starts on the next line
        text = _splice(text, seq.start_mark.index, seq.end_mark.index, "")
        eol = text.find("\n", key.end_mark.index)
        if eol < 0:
            text, eol = text + "\n", len(text)
        item = _block_item(_sequence_indent(text, root), port, state)
        return text[:eol + 1] + item + text[eol + 1:]
    raise EditError("'instances' is not a list")


def set_instance_state(text: str, port: int, state: str) -> str:
    *_, item = _find(text, port)
    found = _value(item, "state")
    if found:
        value = found[1]
        return _splice(text, value.start_mark.index, value.end_mark.index, state)
    if item.flow_style:
        close = text.rfind("}", item.start_mark.index, item.end_mark.index)
        return _splice(text, close, close, f", state: {state}")
    port_entry = _value(item, "port")
    assert port_entry is not None, "_find found the item by its port"
    port_key = port_entry[0]
    starts = _line_starts(text)
    line = _last_line(item) + 1
    at = starts[line] if line < len(starts) else len(text)
    prefix = "" if text[:at].endswith("\n") else "\n"
    return _splice(text, at, at, f"{prefix}{' ' * port_key.start_mark.column}state: {state}\n")


def remove_instance(text: str, port: int) -> str:
    key, seq, index, item = _find(text, port)
    if seq.flow_style:
        start, end = item.start_mark.index, item.end_mark.index
        if index + 1 < len(seq.value):
            end = seq.value[index + 1].start_mark.index      # drop "item, "
        elif index > 0:
            start = seq.value[index - 1].end_mark.index      # drop ", item"
        return _splice(text, start, end, "")
    starts = _line_starts(text)
    first = starts[text.count("\n", 0, text.rfind("-", 0, item.start_mark.index))]
    last = _last_line(item) + 1
    end = starts[last] if last < len(starts) else len(text)
    text = text[:first] + text[end:]
    if len(seq.value) == 1:
        # the list is now empty: say so, rather than leave `instances:` meaning null
        colon = text.index(":", key.end_mark.index) + 1
        text = _splice(text, colon, colon, " []")
    return text


def instance_lines(text: str) -> dict[int, tuple[int, int]]:
    """Where each instance is written: port -> (first line, last line), 1-based, for links into
    the file. Empty when the text is not a mapping with a list of instances."""
    try:
        _, found = _instances(text)
    except EditError:
        return {}
    if not found or not isinstance(found[1], yaml.SequenceNode):
        return {}
    return {port: (item.start_mark.line + 1, _last_line(item) + 1)
            for item in found[1].value if (port := _port(item)) is not None}
