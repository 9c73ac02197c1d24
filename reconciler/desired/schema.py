"""desired.yaml's JSON Schema: the one place settings' defaults live, and problems said in YAML's
words at the line they are on."""
from __future__ import annotations

import copy
import json
from functools import lru_cache
from importlib import resources
from typing import Any, Iterator, Mapping

import jsonschema

from .problems import Problem, YamlPath, shown, yaml_type
from .safe_yaml import Located

SCHEMAS = "reconciler.schemas"  # the top-level schemas/ folder, shipped inside the package


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    text = resources.files(SCHEMAS).joinpath("desired.schema.json").read_text(encoding="utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


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


def with_defaults(value: Any, node: dict[str, Any]) -> Any:
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
            value[key] = with_defaults(value[key], child)
    elif isinstance(value, list) and "items" in node:
        for item in value:
            with_defaults(item, node["items"])
    return value


_YAML_TYPE_NAMES = {"object": "a mapping", "array": "a list", "integer": "an integer",
                    "string": "a string", "number": "a number", "boolean": "true or false",
                    "null": "null"}


def _schema_message(error: jsonschema.ValidationError) -> tuple[YamlPath, str]:
    path: YamlPath = tuple(error.absolute_path)
    # the value checked and the schema's own value, both JSON (jsonschema leaves them unset only
    # on an error built by hand, never on one iter_errors yields)
    value: Any = error.instance
    declared: Any = error.validator_value
    kind = error.validator
    quoted = shown.repr(value)
    if kind == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}) if isinstance(error.schema, Mapping) else {})
        extra = sorted(set(value) - set(allowed), key=str)
        return (*path, extra[0]), f"unknown key (expected one of: {', '.join(allowed)})"
    if kind == "required":
        return path, f"missing required key '{declared}'"   # the one key (_required_keys)
    if kind == "type":
        types = declared if isinstance(declared, list) else [declared]
        expected = " or ".join(_YAML_TYPE_NAMES.get(t, str(t)) for t in types)
        return path, f"expected {expected}, got {yaml_type(value)} {quoted}"
    if kind == "enum":
        choices = ", ".join(str(c) for c in declared)
        return path, f"{quoted} is not one of: {choices}"
    if kind == "const":
        return path, f"{quoted} is not supported (expected {declared!r})"
    if kind in ("minimum", "maximum") and path and path[-1] == "port":
        return path, f"{quoted} is outside 1024-65535"
    if kind == "pattern" and path and str(path[-1]).endswith("_env"):
        return path, f"{quoted} is not an environment variable name (letters, digits, _)"
    if kind == "pattern" and path and path[-1] == "listen":
        return path, f"{quoted} is not host:port (like 127.0.0.1:3000)"
    if kind == "pattern":
        return path, f"{quoted} is not valid here (expected to match {declared})"
    if kind == "format":
        return path, f"{quoted} is not a valid {declared} address"
    if kind == "oneOf" and path and path[-1] in ("max_memory", "max_size", "max_body"):
        return path, f"{quoted} is not a size (bytes, or like 512MiB, 1.5GiB)"
    if kind == "oneOf" and path and path[-1] in ("refresh", "start_timeout", "stop_timeout", "timeout", "resync",
                                                    "retention", "every", "pause"):
        return path, f"{quoted} is not a duration (a number of seconds, or like 30s, 5m, 1h, 90d)"
    return path, error.message


def _is_integer(_checker: Any, value: Any) -> bool:
    # JSON Schema counts 8001.0 as an integer; a port or a count written 8001.0 is a typo here
    return isinstance(value, int) and not isinstance(value, bool)


def _required_keys(validator: jsonschema.protocols.Validator, required: list[str], instance: Any,
                   schema: Mapping[str, Any]) -> Iterator[jsonschema.ValidationError]:
    """``required`` as jsonschema checks it, each error holding the one key it misses as its
    ``validator_value`` (jsonschema's own holds the whole list, and names the key only in prose)."""
    if not validator.is_type(instance, "object"):
        return
    for key in required:
        if key not in instance:
            yield jsonschema.ValidationError(f"{key!r} is a required property", validator_value=key)


# types-jsonschema leaves extend() unannotated; the class it makes is a Validator
_Validator: type[jsonschema.protocols.Validator] = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
    jsonschema.Draft202012Validator, validators={"required": _required_keys},
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer))


def schema_problems(doc: Located) -> Iterator[Problem]:
    validator = _Validator(schema(), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    errors = sorted(validator.iter_errors(doc.data), key=lambda e: doc.line_of(tuple(e.absolute_path)))
    for error in errors:
        path, message = _schema_message(error)
        yield doc.problem(path, message)
