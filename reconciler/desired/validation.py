"""Check a desired.yaml text and say exactly where each problem is.

YAML is composed into a node tree first so that every value keeps its line;
the JSON Schema in ``schemas/desired.schema.json`` then checks shape and types,
and a few rules that a schema cannot express (duplicates, one-of-two fields,
exposure rules) run on top. Every problem carries the file, the line and the
YAML path (``instances[1].port``). Warnings are kept apart from problems: a file
with warnings is valid and applied, and the warnings are shown beside it (secrets
sent over plain http beyond this machine).
"""
from __future__ import annotations

import copy
import ipaddress
import json
from importlib import resources
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import jsonschema
import yaml

SCHEMAS = "reconciler.schemas"  # the top-level schemas/ folder, shipped inside the package

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


class _Located:
    """The parsed document plus the line of every key and value in it."""

    def __init__(self, text: str, file: str):
        self.file = file
        self.lines: dict[YamlPath, int] = {}
        self.problems: list[Problem] = []
        self._constructor = yaml.SafeLoader("")
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark else 1
            reason = exc.problem or str(exc)
            self.problems.append(Problem(file, line, "", f"YAML syntax error: {reason}"))
            self.data = None
            return
        self.data = self._build(root, ()) if root is not None else None

    def _build(self, node: yaml.Node, path: YamlPath) -> Any:
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = self._constructor.construct_object(key_node, deep=True)
                child = (*path, key)
                if key in out:
                    self.problems.append(Problem(
                        self.file, key_node.start_mark.line + 1, format_path(child),
                        "key appears twice in the same mapping"))
                # a key's own line, so "unknown key" points at the key itself
                self.lines[child] = key_node.start_mark.line + 1
                out[key] = self._build(value_node, child)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self._build(item, (*path, i)) for i, item in enumerate(node.value)]
        return self._constructor.construct_object(node, deep=True)

    def line_of(self, path: YamlPath) -> int:
        while path and path not in self.lines:
            path = path[:-1]
        return self.lines.get(path, 1)

    def problem(self, path: YamlPath, message: str) -> Problem:
        return Problem(self.file, self.line_of(path), format_path(path), message)


_YAML_TYPE_NAMES = {"object": "a mapping", "array": "a list", "integer": "an integer",
                    "string": "a string", "number": "a number", "boolean": "true or false"}


def _yaml_type(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "nothing"}.get(type(value), type(value).__name__)


def _schema_message(error: jsonschema.ValidationError) -> tuple[YamlPath, str]:
    path: YamlPath = tuple(error.absolute_path)
    value = error.instance
    kind = error.validator
    if kind == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(value) - set(allowed), key=str)
        return (*path, extra[0]), f"unknown key (expected one of: {', '.join(allowed)})"
    if kind == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        return path, f"missing required key '{missing}'"
    if kind == "type":
        expected = _YAML_TYPE_NAMES.get(error.validator_value, error.validator_value)
        return path, f"expected {expected}, got {_yaml_type(value)} {value!r}"
    if kind == "enum":
        choices = ", ".join(str(c) for c in error.validator_value)
        return path, f"{value!r} is not one of: {choices}"
    if kind == "const":
        return path, f"{value!r} is not supported (expected {error.validator_value!r})"
    if kind in ("minimum", "maximum") and path and path[-1] == "port":
        return path, f"{value} is outside 1024-65535"
    if kind == "pattern" and path and str(path[-1]).endswith("_env"):
        return path, f"{value!r} is not an environment variable name (letters, digits, _)"
    if kind == "pattern" and path and path[-1] == "listen":
        return path, f"{value!r} is not host:port (like 127.0.0.1:3000)"
    if kind == "pattern":
        return path, f"{value!r} is not valid here (expected to match {error.validator_value})"
    if kind == "format":
        return path, f"{value!r} is not a valid {error.validator_value} address"
    if kind == "oneOf" and path and path[-1] in ("max_memory", "max_size", "max_body"):
        return path, f"{value!r} is not a size (bytes, or like 512MiB, 1.5GiB)"
    if kind == "oneOf" and path and path[-1] in ("refresh", "start_timeout", "stop_timeout", "timeout", "resync"):
        return path, f"{value!r} is not a duration (a number of seconds, or like 30s, 5m, 1h)"
    return path, error.message


def _schema_problems(doc: _Located) -> Iterator[Problem]:
    validator = jsonschema.Draft202012Validator(
        schema(), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
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
    return listen if isinstance(listen, str) and ":" in listen and listen.rsplit(":", 1)[1].isdigit() else default


def _rule_problems(doc: _Located) -> Iterator[Problem]:
    """Rules across fields. They run beside the schema, so they skip values of the wrong shape."""
    data = doc.data
    settings = _mapping(data.get("settings"))
    for section in ("api", "proxy"):
        listen = _listen_of(settings, section)
        if not 1 <= _listen_port(listen) <= 65535:
            yield doc.problem(("settings", section, "listen"), f"port in {listen!r} is outside 1-65535")
    proxy = _mapping(settings.get("proxy"))
    proxy_listen = _listen_of(settings, "proxy")
    if not _is_loopback(proxy_listen) and not proxy.get("client_keys_env"):
        yield doc.problem(("settings", "proxy", "listen"),
                          f"{proxy_listen!r} is not a loopback address: set client_keys_env "
                          "so that the proxy asks its clients for a key")
    if proxy.get("anonymous") is True and not _is_loopback(proxy_listen):
        yield doc.problem(("settings", "proxy", "anonymous"),
                          f"true would open the key pool to anyone who reaches {proxy_listen!r}: "
                          "it is allowed only on a loopback address")

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


def check(text: str, file: str = "desired.yaml", warnings: list[Problem] | None = None) -> dict[str, Any]:
    """Return the document as plain data with every default filled in, or raise InvalidDesiredState
    listing every problem. The warnings of a valid document are added to ``warnings`` if given."""
    doc = _Located(text, file)
    if doc.problems and doc.data is None:
        raise InvalidDesiredState(doc.problems)
    if doc.data is None:
        raise InvalidDesiredState([Problem(file, 1, "", "the file is empty (expected at least 'version: 1')")])
    if not isinstance(doc.data, dict):
        raise InvalidDesiredState([Problem(file, 1, "", "the top level must be a mapping")])
    problems = doc.problems + list(_schema_problems(doc)) + list(_rule_problems(doc))
    if problems:
        problems.sort(key=lambda p: p.line)
        raise InvalidDesiredState(problems)
    if warnings is not None:
        warnings.extend(_warnings(doc))
    return _with_defaults(doc.data, schema())
