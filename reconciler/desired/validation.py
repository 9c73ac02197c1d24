"""Check a desired.yaml text and say exactly where each problem is.

YAML is composed into a node tree first so that every value keeps its line;
the JSON Schema in ``schemas/desired.schema.json`` then checks shape and types,
and a few rules that a schema cannot express (duplicates, one-of-two fields,
exposure rules) run on top. Every problem carries the file, the line and the
YAML path (``instances[1].port``). Warnings are kept apart from problems: a file
with warnings is valid and applied, and the warnings are shown beside it (secrets
sent over plain http beyond this machine).

Whatever the input (any bytes, any YAML construct, any size), the outcome is the
data or ``InvalidDesiredState``, never another exception: the daemon's watcher
and the REST API read files that anyone may have saved. Sizes are bounded before
any work is done (``MAX_BYTES``), nesting while composing (``MAX_DEPTH``), and
alias expansion by counting values as they are built (``MAX_VALUES``), so a small
file of nested aliases cannot make a billion values.
"""
from __future__ import annotations

import copy
import ipaddress
import json
import math
import os
import re
import reprlib
import stat
import urllib.parse
import zoneinfo
from importlib import resources
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import jsonschema
import yaml

SCHEMAS = "reconciler.schemas"  # the top-level schemas/ folder, shipped inside the package

# desired.yaml is a few KiB; a file near these limits is a mistake or an attack
MAX_BYTES = 1 << 20     # 1 MiB
MAX_DEPTH = 32          # nesting levels; the schema needs 4
MAX_VALUES = 100_000    # values built, an alias counted again each time it is used
MAX_PROBLEMS = 50       # listed of a file's problems; the rest are counted (a log must not take 18,000 lines)
MAX_DURATION = 365 * 86400.0
MIN_DURATION = 0.001
MAX_SIZE = 1 << 50      # 1 PiB: any size beyond is a typo

_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)$")
_UNIT_BYTES = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
_MAP_TAG, _SEQ_TAG, _MERGE_TAG = "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq", "tag:yaml.org,2002:merge"
_shown = reprlib.Repr()
_shown.maxstring, _shown.maxother = 60, 60


def parse_duration(value: float | int | str) -> float:
    """Seconds from a schema-checked duration (``90``, ``"30s"``, ``"5m"``)."""
    if isinstance(value, (int, float)):
        return float(value)
    number, unit = _DURATION.match(value).groups()
    return float(number) * _UNIT_SECONDS[unit]


def parse_size(value: int | str) -> int:
    """Bytes from a schema-checked size (``1048576``, ``"512MiB"``, ``"1.5GiB"``)."""
    if isinstance(value, int):
        return value
    number, unit = _SIZE.match(value).groups()
    return int(float(number) * _UNIT_BYTES[unit])

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


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    return json.loads(resources.files(SCHEMAS).joinpath("desired.schema.json").read_text(encoding="utf-8"))


def _resolved(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = {**schema()["$defs"][node["$ref"].rsplit("/", 1)[1]], **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def _schema_node(path: tuple[str, ...]) -> dict[str, Any]:
    node = schema()
    for key in path:
        node = _resolved(node)
        node = node["items"] if node.get("type") == "array" else node["properties"][key]
        if key in ("accounts", "instances"):
            node = _resolved(node)["items"]
    return _resolved(node)


def schema_default(*path: str) -> Any:
    """The default of a setting, as the schema (the one place defaults live) declares it:
    ``schema_default("settings", "api", "listen")``; inside a list, ``("accounts", "refresh")``."""
    return copy.deepcopy(_schema_node(path)["default"])


def _with_defaults(value: Any, node: dict[str, Any]) -> Any:
    """``value`` (already valid) with every absent setting that has a default filled in."""
    node = _resolved(node)
    if isinstance(value, dict):
        for key, child in node.get("properties", {}).items():
            child_resolved = _resolved(child)
            if key not in value:
                if "default" in child_resolved:
                    value[key] = copy.deepcopy(child_resolved["default"])
                elif child_resolved.get("type") == "object" and not child_resolved.get("required"):
                    value[key] = {}  # a section left out: its own defaults apply
                else:
                    continue
            value[key] = _with_defaults(value[key], child)
    elif isinstance(value, list) and "items" in node:
        for item in value:
            _with_defaults(item, node["items"])
    return value


def format_path(path: YamlPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class _Refused(Exception):
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

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise _Refused(mark.line + 1, (), f"nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _compose(text: str) -> yaml.Node | None:
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


class _Located:
    """The parsed document plus the line of every key and value in it."""

    def __init__(self, text: str, file: str):
        self.file = file
        self.lines: dict[YamlPath, int] = {}
        self.problems: list[Problem] = []
        self.data = None
        self._constructor = yaml.SafeLoader("")
        self._built = 0
        self._open: set[int] = set()  # ids of the nodes being built: an alias to one of them loops
        try:
            root = _compose(text)
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
        except _Refused as exc:
            self.problems.append(Problem(file, exc.line, format_path(exc.path), exc.message))

    def _build(self, node: yaml.Node, path: YamlPath) -> Any:
        line = node.start_mark.line + 1
        self._built += 1
        if self._built > MAX_VALUES:
            raise _Refused(line, path, f"the document expands to more than {MAX_VALUES} values "
                                       "(each use of an alias repeats what it names)")
        if len(path) > MAX_DEPTH:
            raise _Refused(line, path, f"nested more than {MAX_DEPTH} levels deep (through aliases)")
        if id(node) in self._open:
            raise _Refused(line, path, "an alias refers to a value that contains it (a loop)")
        self.lines.setdefault(path, line)
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node, path)
        expected = _MAP_TAG if isinstance(node, yaml.MappingNode) else _SEQ_TAG
        if node.tag != expected:
            raise _Refused(line, path, f"the tag {node.tag} is not supported here (write {_kind(node)} without a tag)")
        self._open.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self._build(item, (*path, i)) for i, item in enumerate(node.value)]
            return self._mapping(node, path)
        finally:
            self._open.discard(id(node))

    def _mapping(self, node: yaml.MappingNode, path: YamlPath) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                raise _Refused(key_line, path, f"a key must be plain text, not {_kind(key_node)}")
            if key_node.tag == _MERGE_TAG:
                raise _Refused(key_line, path, "merge keys (<<) are not supported: write the values out")
            key = self._scalar(key_node, path)
            if not isinstance(key, str):
                raise _Refused(key_line, path, f"a key must be text, got {_yaml_type(key)} {_shown.repr(key)} "
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
            raise _Refused(line, path, f"cannot read this value: {reason}") from None
        except (ValueError, TypeError, LookupError, AttributeError, OverflowError):
            # an explicit tag the text does not fit: !!int abc, !!bool maybe, !!timestamp x
            raise _Refused(line, path, f"{_shown.repr(node.value)} is not a valid {node.tag.rsplit(':', 1)[-1]}") from None
        problem = _text_problem(value) if isinstance(value, str) else None
        if problem:
            raise _Refused(line, path, problem)
        return value

    def line_of(self, path: YamlPath) -> int:
        while path and path not in self.lines:
            path = path[:-1]
        return self.lines.get(path, 1)

    def problem(self, path: YamlPath, message: str) -> Problem:
        return Problem(self.file, self.line_of(path), format_path(path), message)


_YAML_TYPE_NAMES = {"object": "a mapping", "array": "a list", "integer": "an integer",
                    "string": "a string", "number": "a number", "boolean": "true or false",
                    "null": "null"}


def _yaml_type(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "nothing"}.get(type(value), type(value).__name__)


def _schema_message(error: jsonschema.ValidationError) -> tuple[YamlPath, str]:
    path: YamlPath = tuple(error.absolute_path)
    value = error.instance
    kind = error.validator
    shown = _shown.repr(value)
    if kind == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(value) - set(allowed), key=str)
        return (*path, extra[0]), f"unknown key (expected one of: {', '.join(allowed)})"
    if kind == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        return path, f"missing required key '{missing}'"
    if kind == "type":
        types = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        expected = " or ".join(_YAML_TYPE_NAMES.get(t, t) for t in types)
        return path, f"expected {expected}, got {_yaml_type(value)} {shown}"
    if kind == "enum":
        choices = ", ".join(str(c) for c in error.validator_value)
        return path, f"{shown} is not one of: {choices}"
    if kind == "const":
        return path, f"{shown} is not supported (expected {error.validator_value!r})"
    if kind in ("minimum", "maximum") and path and path[-1] == "port":
        return path, f"{shown} is outside 1024-65535"
    if kind == "pattern" and path and str(path[-1]).endswith("_env"):
        return path, f"{shown} is not an environment variable name (letters, digits, _)"
    if kind == "pattern" and path and path[-1] == "listen":
        return path, f"{shown} is not host:port (like 127.0.0.1:3000)"
    if kind == "pattern":
        return path, f"{shown} is not valid here (expected to match {error.validator_value})"
    if kind == "format":
        return path, f"{shown} is not a valid {error.validator_value} address"
    if kind == "oneOf" and path and path[-1] in ("max_memory", "max_size", "max_body"):
        return path, f"{shown} is not a size (bytes, or like 512MiB, 1.5GiB)"
    if kind == "oneOf" and path and path[-1] in ("refresh", "start_timeout", "stop_timeout", "timeout", "resync",
                                                    "retention", "every"):
        return path, f"{shown} is not a duration (a number of seconds, or like 30s, 5m, 1h, 90d)"
    return path, error.message


def _is_integer(_checker: Any, value: Any) -> bool:
    # JSON Schema counts 8001.0 as an integer; a port or a count written 8001.0 is a typo here
    return isinstance(value, int) and not isinstance(value, bool)


_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer))


def _schema_problems(doc: _Located) -> Iterator[Problem]:
    validator = _Validator(schema(), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    errors = sorted(validator.iter_errors(doc.data), key=lambda e: doc.line_of(tuple(e.absolute_path)))
    for error in errors:
        path, message = _schema_message(error)
        yield doc.problem(path, message)


def _listen_port(value: str) -> int:
    return int(value.rsplit(":", 1)[1])


def is_loopback_host(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_loopback(listen: str) -> bool:
    return is_loopback_host(listen.rsplit(":", 1)[0])


def _mapping(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _listen_of(settings: dict, section: str) -> str:
    default = schema_default("settings", section, "listen")
    listen = _mapping(settings.get(section)).get("listen", default)
    port = listen.rsplit(":", 1)[1] if isinstance(listen, str) and ":" in listen else ""
    return listen if port.isascii() and port.isdigit() else default


_BAD_BRANCH = re.compile(r"\.\.|//|@\{|/\.|[/.]$|\.lock$")
_DURATIONS = (("settings", "resync"), ("settings", "sillytavern", "start_timeout"),
              ("settings", "sillytavern", "stop_timeout"), ("settings", "proxy", "timeout"),
              ("settings", "api", "timeout"), ("settings", "usage", "retention"), ("settings", "git", "every"))
_SIZES = (("settings", "logs", "max_size"), ("settings", "proxy", "max_body"))
_PATHS = (("settings", "state_dir"), ("settings", "data_root"), ("settings", "sillytavern", "server"),
          ("settings", "api", "tls", "cert"), ("settings", "api", "tls", "key"),
          ("settings", "usage", "store_password_file"))
_URLS = (("settings", "proxy", "upstream"),)
_LISTENS = (("settings", "api", "listen"), ("settings", "proxy", "listen"))


def _at(data: Any, path: YamlPath) -> Any:
    for key in path:
        data = _mapping(data).get(key)
    return data


def _each(data: dict, fields: tuple[YamlPath, ...], list_key: str,
          item_fields: tuple[str, ...]) -> Iterator[tuple[YamlPath, Any]]:
    """(path, value) of every given field that is present, including those of each list item."""
    for path in fields:
        value = _at(data, path)
        if value is not None:
            yield path, value
    items = data.get(list_key)
    for i, item in enumerate(items if isinstance(items, list) else []):
        for name in item_fields:
            value = _mapping(item).get(name)
            if value is not None:
                yield (list_key, i, name), value


def _magnitude_problem(value: Any, parse: Any, numbers: tuple[type, ...], pattern: re.Pattern[str],
                       low: float, high: float, allowed: str) -> str | None:
    """Why a duration or size (of the right shape, else None: the schema says so) is out of range."""
    if isinstance(value, bool) or not isinstance(value, (*numbers, str)):
        return None
    if isinstance(value, str) and not pattern.match(value):
        return None
    try:
        amount = parse(value)
    except OverflowError:
        amount = math.inf
    if math.isnan(amount) or not low <= amount <= high:
        return f"{_shown.repr(value)} is out of range ({allowed})"
    return None


def _url_problem(value: Any) -> str | None:
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        return None  # the schema says so
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 -- raises on a port that is not a number in range
    except ValueError as exc:
        return f"{_shown.repr(value)} is not a valid URL: {exc}"
    if not parts.hostname:
        return f"{_shown.repr(value)} names no host"
    return _host_problem(parts.hostname)


def _host_problem(host: str) -> str | None:
    """Why ``host`` cannot be looked up (name resolution refuses an empty or over-long label)."""
    try:
        ipaddress.ip_address(host.strip("[]"))
        return None
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if len(host) > 253 or any(not 1 <= len(label) <= 63 for label in labels):
        return f"{_shown.repr(host)} is not a valid host name"
    return None


def _path_problem(value: Any) -> str | None:
    if not isinstance(value, str) or not value.startswith("~"):
        return None
    try:
        Path(value).expanduser()
    except RuntimeError as exc:
        return f"{_shown.repr(value)}: cannot expand ~ ({exc})"
    return None


def _value_problems(doc: _Located) -> Iterator[Problem]:
    """Values of the right shape that still cannot be used: out of range, unreachable, unexpandable."""
    data = doc.data
    for path, value in _each(data, _DURATIONS, "accounts", ("refresh",)):
        problem = _magnitude_problem(value, parse_duration, (int, float), _DURATION, MIN_DURATION, MAX_DURATION,
                                     "from 1ms to 365 days")
        if problem:
            yield doc.problem(path, problem)
    for path, value in _each(data, _SIZES, "instances", ("max_memory",)):
        problem = _magnitude_problem(value, parse_size, (int,), _SIZE, 1, MAX_SIZE, "from 1 byte to 1 PiB")
        if problem:
            yield doc.problem(path, problem)
    for path, value in _each(data, _URLS, "accounts", ("api_base",)):
        problem = _url_problem(value)
        if problem:
            yield doc.problem(path, problem)
    for path, value in _each(data, _PATHS, "accounts", ("password_file", "keys_file")):
        problem = _path_problem(value)
        if problem:
            yield doc.problem(path, problem)
    for path, value in _each(data, _LISTENS, "", ()):
        if isinstance(value, str) and ":" in value:
            problem = _host_problem(value.rsplit(":", 1)[0])
            if problem:
                yield doc.problem(path, problem)


def proxy_listen_problems(listen: str, anonymous: bool, client_keys: bool) -> list[tuple[str, str]]:
    """(field of settings.proxy, why) for a proxy address beyond loopback that would let anyone in;
    also for ``cst proxy --listen``, which overrides the file's address."""
    if _is_loopback(listen):
        return []
    problems = []
    if not client_keys:
        problems.append(("listen", f"{listen!r} is not a loopback address: set client_keys_env "
                                   "so that the proxy asks its clients for a key"))
    if anonymous:
        problems.append(("anonymous", f"true would open the key pool to anyone who reaches {listen!r}: "
                                      "it is allowed only on a loopback address"))
    return problems


def listen_problem(value: str) -> str | None:
    """Why ``value`` is not a host:port to listen on, or None."""
    if not re.match(schema()["$defs"]["listen"]["pattern"], value):
        return f"{_shown.repr(value)} is not host:port (127.0.0.1:5101, [::1]:5101)"
    if not 1 <= _listen_port(value) <= 65535:
        return f"port in {value!r} is outside 1-65535"
    return _host_problem(value.rsplit(":", 1)[0])


def _rule_problems(doc: _Located) -> Iterator[Problem]:
    """Rules across fields. They run beside the schema, so they skip values of the wrong shape."""
    data = doc.data
    settings = _mapping(data.get("settings"))
    for section in ("api", "proxy"):
        listen = _listen_of(settings, section)
        if not 1 <= _listen_port(listen) <= 65535:
            yield doc.problem(("settings", section, "listen"), f"port in {listen!r} is outside 1-65535")
    proxy = _mapping(settings.get("proxy"))
    for field, problem in proxy_listen_problems(_listen_of(settings, "proxy"), proxy.get("anonymous") is True,
                                                bool(proxy.get("client_keys_env"))):
        yield doc.problem(("settings", "proxy", field), problem)

    reserved = {_listen_port(_listen_of(settings, s)): f"settings.{s}.listen" for s in ("api", "proxy")}
    first_use: dict[int, int] = {}
    instances = data.get("instances")
    for i, instance in enumerate(instances if isinstance(instances, list) else []):
        port = _mapping(instance).get("port")
        if not isinstance(port, int) or isinstance(port, bool):
            continue
        if port in first_use:
            yield doc.problem(("instances", i, "port"),
                              f"{port} is used twice (first at instances[{first_use[port]}])")
        else:
            first_use[port] = i
        if port in reserved:
            yield doc.problem(("instances", i, "port"), f"{port} is already taken by {reserved[port]}")

    yield from _usage_problems(doc, settings)
    proxies = _mapping(settings.get("api")).get("trusted_proxies")
    for i, proxy in enumerate(proxies if isinstance(proxies, list) else []):
        if isinstance(proxy, str):
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                yield doc.problem(("settings", "api", "trusted_proxies", i),
                                  f"{_shown.repr(proxy)} is not an address or a network (10.0.0.1, 10.0.0.0/8, ::1)")
    branch = _mapping(settings.get("git")).get("branch")
    if isinstance(branch, str) and _BAD_BRANCH.search(branch):
        yield doc.problem(("settings", "git", "branch"), f"{_shown.repr(branch)} is not a branch name git accepts "
                          "(no '..', '//', '@{', and no '/', '.' or '.lock' at the end)")

    names: dict[str, int] = {}
    accounts = data.get("accounts")
    for i, account in enumerate(accounts if isinstance(accounts, list) else []):
        account = _mapping(account)
        name = account.get("name")
        if isinstance(name, str) and name in names:
            yield doc.problem(("accounts", i, "name"), f"{name!r} is used twice (first at accounts[{names[name]}])")
        elif isinstance(name, str):
            names[name] = i
        provider = account.get("provider")
        own = _PROVIDER_KEYS.get(provider) if isinstance(provider, str) else None
        if own is None:
            continue
        for key in sorted(set(account) - own - {"name", "provider"}):
            yield doc.problem(("accounts", i, key), f"not a setting of a {provider} account")
        if provider == "daidai":
            if "email" not in account:
                yield doc.problem(("accounts", i), "missing required key 'email'")
            yield from _exactly_one(doc, ("accounts", i), account, "password_env", "password_file")
        else:
            yield from _exactly_one(doc, ("accounts", i), account, "keys_env", "keys_file")


def _usage_problems(doc: _Located, settings: dict) -> Iterator[Problem]:
    """The ledger's settings: a time zone that exists, a retention of at least a day, and no budget on
    an instance that does not use the pool."""
    usage = _mapping(settings.get("usage"))
    zone = usage.get("timezone")
    if isinstance(zone, str) and zone and zone_problem(zone):
        yield doc.problem(("settings", "usage", "timezone"), zone_problem(zone) or "")
    retention = usage.get("retention")
    if isinstance(retention, (int, float, str)) and not isinstance(retention, bool):
        try:
            too_short = parse_duration(retention) < 86400
        except (AttributeError, OverflowError):   # not a duration at all: the schema says so
            too_short = False
        if too_short:
            yield doc.problem(("settings", "usage", "retention"), f"{_shown.repr(retention)} is shorter than a day "
                              "(ledger rows are kept at least for the day they count in)")
    store = usage.get("store")
    if isinstance(store, str):
        problem = store_problem(store)
        if problem:
            yield doc.problem(("settings", "usage", "store"), problem)
    if "store" not in usage:
        for name in ("store_password_env", "store_password_file"):
            if name in usage:
                yield doc.problem(("settings", "usage", name), "there is no settings.usage.store to use it for")
    elif "store_password_env" in usage and "store_password_file" in usage:
        yield doc.problem(("settings", "usage"), "give store_password_env or store_password_file, not both")
    instances = doc.data.get("instances")
    for i, instance in enumerate(instances if isinstance(instances, list) else []):
        instance = _mapping(instance)
        if instance.get("proxy") is False and instance.get("budget"):
            yield doc.problem(("instances", i, "budget"), "this instance does not use the key pool (proxy: false), "
                              "so a budget would limit nothing")


def store_problem(url: str) -> str | None:
    """Why ``url`` is not a PostgreSQL URL CST may hold, or None. The password must not be in the
    file (kept in git, shown by the API): it comes from the environment or a 0600 file."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port   # raises on a port that is not a number
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as exc:
        return f"{_shown.repr(url)} is not a PostgreSQL URL ({exc})"
    if parts.password is not None or "password" in query:
        return ("the URL holds a password: put it in the environment (store_password_env) or a 0600 file "
                "(store_password_file), never in desired.yaml")
    if not parts.hostname and "host" not in query:
        return f"{_shown.repr(url)} names no host (postgresql://user@host:5432/database)"
    if not parts.path.strip("/"):
        return f"{_shown.repr(url)} names no database (postgresql://user@host:5432/database)"
    return None


def zone_problem(name: str) -> str | None:
    """Why ``name`` is not an IANA time zone this machine knows, or None."""
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        return f"{_shown.repr(name)} is not a known time zone (an IANA name such as Asia/Shanghai or UTC)"
    return None


_PROVIDER_KEYS = {
    "daidai": {"email", "password_env", "password_file", "api_base", "refresh"},
    "static": {"keys_env", "keys_file"},
}


def _plain_http_beyond_loopback(url: Any) -> bool:
    if not isinstance(url, str) or not url.lower().startswith("http://"):
        return False
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        return False
    return not is_loopback_host(host)


def _warnings(doc: _Located) -> Iterator[Problem]:
    """Settings that are valid but send secrets in clear across the network."""
    settings = _mapping(doc.data.get("settings"))
    upstream = _mapping(settings.get("proxy")).get("upstream")
    if _plain_http_beyond_loopback(upstream):
        yield doc.problem(("settings", "proxy", "upstream"),
                          f"{upstream!r} is plain http to another machine: the pool's keys cross the network "
                          "in clear (use https)")
    accounts = doc.data.get("accounts")
    for i, account in enumerate(accounts if isinstance(accounts, list) else []):
        api_base = _mapping(account).get("api_base")
        if _plain_http_beyond_loopback(api_base):
            yield doc.problem(("accounts", i, "api_base"),
                              f"{api_base!r} is plain http to another machine: the account's password and "
                              "keys cross the network in clear (use https)")


def _exactly_one(doc: _Located, path: YamlPath, item: dict, a: str, b: str) -> Iterator[Problem]:
    if a in item and b in item:
        yield doc.problem((*path, b), f"give either {a} or {b}, not both")
    elif a not in item and b not in item:
        yield doc.problem(path, f"missing {a} (the name of an environment variable) or {b}")


def _too_big(size: int, file: str) -> InvalidDesiredState:
    return InvalidDesiredState([Problem(file, 1, "", f"the file is {size} bytes, more than the limit of "
                                                     f"{MAX_BYTES} bytes (1 MiB) for a desired-state file")])


def decode(data: bytes, file: str = "desired.yaml") -> str:
    """The text of a desired-state file's bytes; InvalidDesiredState when too big or not UTF-8."""
    if len(data) > MAX_BYTES:
        raise _too_big(len(data), file)
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
            raise _too_big(info.st_size, str(path))
        with os.fdopen(fd, "rb", closefd=False) as stream:
            data = stream.read(MAX_BYTES + 1)
    except OSError as exc:
        raise InvalidDesiredState([Problem(str(path), 1, "", f"cannot read the file: {exc.strerror or exc}")]) from None
    finally:
        os.close(fd)
    return decode(data, str(path))


def check(text: str, file: str = "desired.yaml", warnings: list[Problem] | None = None) -> dict[str, Any]:
    """Return the document as plain data with every default filled in, or raise InvalidDesiredState
    listing every problem. The warnings of a valid document are added to ``warnings`` if given."""
    size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_BYTES:
        raise _too_big(size, file)
    doc = _Located(text, file)
    if doc.problems and doc.data is None:
        raise InvalidDesiredState(doc.problems)
    if doc.data is None:
        raise InvalidDesiredState([Problem(file, 1, "", "the file is empty (expected at least 'version: 1')")])
    if not isinstance(doc.data, dict):
        raise InvalidDesiredState([Problem(file, 1, "", "the top level must be a mapping")])
    problems = doc.problems + list(_schema_problems(doc)) + list(_rule_problems(doc)) + list(_value_problems(doc))
    if problems:
        problems.sort(key=lambda p: p.line)
        if len(problems) > MAX_PROBLEMS:
            rest = len(problems) - MAX_PROBLEMS
            problems = problems[:MAX_PROBLEMS] + [Problem(file, problems[MAX_PROBLEMS].line, "",
                                                          f"and {rest} more problems from this line on")]
        raise InvalidDesiredState(problems)
    if warnings is not None:
        warnings.extend(_warnings(doc))
    return _with_defaults(doc.data, schema())
