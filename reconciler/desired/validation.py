"""Check a desired.yaml text and say exactly where each problem is.

The text is read within bounds into values that keep their lines (``safe_yaml``); the JSON
Schema then checks shape and types (``schema``), and the rules a schema cannot express
(duplicates, one-of-two fields, ranges, exposure rules) run on top, here. Every problem carries
the file, the line and the YAML path (``instances[1].port``). Warnings are kept apart from
problems: a file with warnings is valid and applied, and the warnings are shown beside it
(secrets sent over plain http beyond this machine).
"""
from __future__ import annotations

import ipaddress
import math
import re
import urllib.parse
import zoneinfo
from itertools import chain
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

from .problems import InvalidDesiredState, Problem, YamlPath, format_path, shown
from .safe_yaml import MAX_BYTES, Located, too_big
from .schema import schema, schema_default, schema_problems, with_defaults

MAX_PROBLEMS = 50       # listed of a file's problems; the rest are counted (a log must not take 18,000 lines)
MAX_DURATION = 365 * 86400.0
MIN_DURATION = 0.001
MAX_SIZE = 1 << 50      # 1 PiB: any size beyond is a typo

_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)$")
_UNIT_BYTES = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def parse_duration(value: float | int | str) -> float:
    """Seconds from a schema-checked duration (``90``, ``"30s"``, ``"5m"``); ValueError for text
    that is none (the rules run beside the schema, on values it has not passed)."""
    if isinstance(value, (int, float)):
        return float(value)
    match = _DURATION.match(value)
    if match is None:
        raise ValueError(f"not a duration: {shown.repr(value)}")
    number, unit = match.groups()
    return float(number) * _UNIT_SECONDS[unit]


def parse_size(value: int | str) -> int:
    """Bytes from a schema-checked size (``1048576``, ``"512MiB"``, ``"1.5GiB"``)."""
    if isinstance(value, int):
        return value
    match = _SIZE.match(value)
    if match is None:
        raise ValueError(f"not a size: {shown.repr(value)}")
    number, unit = match.groups()
    return int(float(number) * _UNIT_BYTES[unit])

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


def _mapping(value: Any) -> dict[Any, Any]:   # a YAML mapping: its keys may be numbers too
    return value if isinstance(value, dict) else {}


def _listen_of(settings: dict[str, Any], section: str) -> str:
    default: str = schema_default("settings", section, "listen")
    listen = _mapping(settings.get(section)).get("listen", default)
    if isinstance(listen, str) and ":" in listen:
        port = listen.rsplit(":", 1)[1]
        if port.isascii() and port.isdigit():
            return listen
    return default


_BAD_BRANCH = re.compile(r"\.\.|//|@\{|/\.|[/.]$|\.lock$")
_DURATIONS = (("settings", "resync"), ("settings", "sillytavern", "start_timeout"),
              ("settings", "sillytavern", "stop_timeout"), ("settings", "proxy", "timeout"),
              ("settings", "api", "timeout"), ("settings", "usage", "retention"), ("settings", "git", "every"),
              ("settings", "sillytavern", "rollout", "pause"), ("settings", "backups", "every"),
              ("settings", "sillytavern", "park_after"))
_SIZES = (("settings", "logs", "max_size"), ("settings", "proxy", "max_body"), ("settings", "sillytavern", "sandbox", "tmp_size"),
          ("settings", "kubernetes", "storage", "size"), ("settings", "kubernetes", "memory_request"))
_PATHS = (("settings", "state_dir"), ("settings", "data_root"), ("settings", "sillytavern", "server"),
          ("settings", "api", "tls", "cert"), ("settings", "api", "tls", "key"),
          ("settings", "usage", "store_password_file"), ("settings", "edge", "tls", "cert"),
          ("settings", "edge", "tls", "key"))
_URLS = (("settings", "proxy", "upstream"),)
_LISTENS = (("settings", "api", "listen"), ("settings", "proxy", "listen"), ("settings", "edge", "listen"),
            ("settings", "edge", "redirect_http"))


def _at(data: Any, path: YamlPath) -> Any:
    for key in path:
        data = _mapping(data).get(key)
    return data


def _each(data: dict[str, Any], fields: tuple[YamlPath, ...], list_key: str,
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
        return f"{shown.repr(value)} is out of range ({allowed})"
    return None


def _url_problem(value: Any) -> str | None:
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        return None  # the schema says so
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 -- raises on a port that is not a number in range
    except ValueError as exc:
        return f"{shown.repr(value)} is not a valid URL: {exc}"
    if not parts.hostname:
        return f"{shown.repr(value)} names no host"
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
        return f"{shown.repr(host)} is not a valid host name"
    return None


def _path_problem(value: Any) -> str | None:
    if not isinstance(value, str) or not value.startswith("~"):
        return None
    try:
        Path(value).expanduser()
    except RuntimeError as exc:
        return f"{shown.repr(value)}: cannot expand ~ ({exc})"
    return None


def _value_problems(doc: Located) -> Iterator[Problem]:
    """Values of the right shape that still cannot be used: out of range, unreachable, unexpandable."""
    data = doc.data
    durations = chain(_each(data, _DURATIONS, "accounts", ("refresh",)), _each(data, (), "instances", ("park_after",)))
    for path, value in durations:
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
    networks = _at(data, ("settings", "kubernetes", "internal_networks"))
    for i, value in enumerate(networks if isinstance(networks, list) else []):
        if isinstance(value, str):
            try:
                ipaddress.ip_network(value)
            except ValueError as exc:
                yield doc.problem(("settings", "kubernetes", "internal_networks", i), f"not a network: {exc}")


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
        return f"{shown.repr(value)} is not host:port (127.0.0.1:5101, [::1]:5101)"
    if not 1 <= _listen_port(value) <= 65535:
        return f"port in {value!r} is outside 1-65535"
    return _host_problem(value.rsplit(":", 1)[0])


def _rule_problems(doc: Located) -> Iterator[Problem]:
    """Rules across fields. They run beside the schema, so they skip values of the wrong shape."""
    data = doc.data
    settings = _mapping(data.get("settings"))
    instances = data.get("instances")
    instances = instances if isinstance(instances, list) else []
    yield from _listen_rules(doc, settings)
    yield from _port_rules(doc, settings, instances)

    # a checkout of one's own (settings.sillytavern.server) runs every instance: a release named
    # for one instance would be silently ignored, so the two together are refused
    server = _mapping(settings.get("sillytavern")).get("server")
    for i, instance in enumerate(instances):
        if server is not None and "sillytavern_version" in _mapping(instance):
            yield doc.problem(("instances", i, "sillytavern_version"),
                              "cannot be used with settings.sillytavern.server (your own checkout runs every "
                              "instance); remove one of them")

    yield from _edge_problems(doc, settings, instances)
    yield from _usage_problems(doc, settings)
    proxies = _mapping(settings.get("api")).get("trusted_proxies")
    for i, proxy in enumerate(proxies if isinstance(proxies, list) else []):
        if isinstance(proxy, str):
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                yield doc.problem(("settings", "api", "trusted_proxies", i),
                                  f"{shown.repr(proxy)} is not an address or a network (10.0.0.1, 10.0.0.0/8, ::1)")
    branch = _mapping(settings.get("git")).get("branch")
    if isinstance(branch, str) and _BAD_BRANCH.search(branch):
        yield doc.problem(("settings", "git", "branch"), f"{shown.repr(branch)} is not a branch name git accepts "
                          "(no '..', '//', '@{', and no '/', '.' or '.lock' at the end)")
    yield from _account_rules(doc, data.get("accounts"))


def _listen_rules(doc: Located, settings: dict[str, Any]) -> Iterator[Problem]:
    """The API's and the proxy's own listen addresses."""
    for section in ("api", "proxy"):
        listen = _listen_of(settings, section)
        if not 1 <= _listen_port(listen) <= 65535:
            yield doc.problem(("settings", section, "listen"), f"port in {listen!r} is outside 1-65535")
    proxy = _mapping(settings.get("proxy"))
    for field, problem in proxy_listen_problems(_listen_of(settings, "proxy"), proxy.get("anonymous") is True,
                                                bool(proxy.get("client_keys_env"))):
        yield doc.problem(("settings", "proxy", field), problem)


def _port_rules(doc: Located, settings: dict[str, Any], instances: list[Any]) -> Iterator[Problem]:
    """Each instance's port used once, and by none of the API and the proxy."""
    reserved = {_listen_port(_listen_of(settings, s)): f"settings.{s}.listen" for s in ("api", "proxy")}
    first_use: dict[int, int] = {}
    for i, instance in enumerate(instances):
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


def _account_rules(doc: Located, accounts: Any) -> Iterator[Problem]:
    """Account names used once; each provider's own settings, and exactly one source of its secret."""
    names: dict[str, int] = {}
    for i, item in enumerate(accounts if isinstance(accounts, list) else []):
        account = _mapping(item)
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


def _edge_problems(doc: Located, settings: dict[str, Any], instances: list[Any]) -> Iterator[Problem]:
    """Host names claimed once each; nothing that would go round the edge or share its ports."""
    edge = settings.get("edge")
    if not isinstance(edge, dict):
        for i, instance in enumerate(instances):
            if _mapping(instance).get("hosts"):
                yield doc.problem(("instances", i, "hosts"), "host names need settings.edge (the entrance that "
                                  "serves them)")
        return
    domain = edge.get("domain")
    api_host = _listen_of(settings, "api").rsplit(":", 1)[0].strip("[]").lower()
    claimed: dict[str, str] = {api_host: "settings.api.listen"}
    for i, instance in enumerate(instances):
        instance = _mapping(instance)
        port = instance.get("port")
        own: list[tuple[YamlPath, str]] = []
        if isinstance(port, int) and isinstance(domain, str):
            own.append((("instances", i, "port"), f"st-instance-{port}.{domain}"))
        hosts = instance.get("hosts")
        own += [(("instances", i, "hosts", j), name) for j, name in enumerate(hosts if isinstance(hosts, list) else [])
                if isinstance(name, str)]
        for path, name in own:
            first = claimed.setdefault(name.lower(), format_path(path))
            if not first.startswith(f"instances[{i}]"):
                yield doc.problem(path, f"{name!r} is already claimed by {first}")
    ports = _mapping(settings.get("sillytavern")).get("listen_address", "127.0.0.1")
    if edge.get("ports", True) and isinstance(ports, str) and not is_loopback_host(ports):
        yield doc.problem(("settings", "sillytavern", "listen_address"),
                          f"{ports!r} would let anyone reach the instances' ports in plain HTTP around settings.edge: "
                          "keep it on loopback (127.0.0.1), or set settings.edge.ports: false")
    taken = {_listen_port(_listen_of(settings, s)): f"settings.{s}.listen" for s in ("api", "proxy")}
    for i, instance in enumerate(instances):
        port = _mapping(instance).get("port")
        if isinstance(port, int) and edge.get("ports", True):
            taken.setdefault(port, f"instances[{i}].port")
    for field in ("listen", "redirect_http"):
        listen = edge.get(field)
        if isinstance(listen, str) and listen_problem(listen) is None:
            holder = taken.setdefault(_listen_port(listen), f"settings.edge.{field}")
            if holder != f"settings.edge.{field}":
                yield doc.problem(("settings", "edge", field), f"port {_listen_port(listen)} is already taken by {holder}")


def _usage_problems(doc: Located, settings: dict[str, Any]) -> Iterator[Problem]:
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
        except (ValueError, OverflowError):   # not a duration at all: the schema says so
            too_short = False
        if too_short:
            yield doc.problem(("settings", "usage", "retention"), f"{shown.repr(retention)} is shorter than a day "
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
        _ = parts.port   # raises on a port that is not a number
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as exc:
        return f"{shown.repr(url)} is not a PostgreSQL URL ({exc})"
    if parts.password is not None or "password" in query:
        return ("the URL holds a password: put it in the environment (store_password_env) or a 0600 file "
                "(store_password_file), never in desired.yaml")
    if not parts.hostname and "host" not in query:
        return f"{shown.repr(url)} names no host (postgresql://user@host:5432/database)"
    if not parts.path.strip("/"):
        return f"{shown.repr(url)} names no database (postgresql://user@host:5432/database)"
    return None


def zone_problem(name: str) -> str | None:
    """Why ``name`` is not an IANA time zone this machine knows, or None."""
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        return f"{shown.repr(name)} is not a known time zone (an IANA name such as Asia/Shanghai or UTC)"
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


def _warnings(doc: Located) -> Iterator[Problem]:
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


def _exactly_one(doc: Located, path: YamlPath, item: dict[str, Any], a: str, b: str) -> Iterator[Problem]:
    if a in item and b in item:
        yield doc.problem((*path, b), f"give either {a} or {b}, not both")
    elif a not in item and b not in item:
        yield doc.problem(path, f"missing {a} (the name of an environment variable) or {b}")


def check(text: str, file: str = "desired.yaml", warnings: list[Problem] | None = None) -> dict[str, Any]:
    """Return the document as plain data with every default filled in, or raise InvalidDesiredState
    listing every problem. The warnings of a valid document are added to ``warnings`` if given."""
    size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_BYTES:
        raise too_big(size, file)
    doc = Located(text, file)
    if doc.problems and doc.data is None:
        raise InvalidDesiredState(doc.problems)
    if doc.data is None:
        raise InvalidDesiredState([Problem(file, 1, "", "the file is empty (expected at least 'version: 1')")])
    if not isinstance(doc.data, dict):
        raise InvalidDesiredState([Problem(file, 1, "", "the top level must be a mapping")])
    problems = doc.problems + list(schema_problems(doc)) + list(_rule_problems(doc)) + list(_value_problems(doc))
    if problems:
        problems.sort(key=lambda p: p.line)
        if len(problems) > MAX_PROBLEMS:
            rest = len(problems) - MAX_PROBLEMS
            problems = problems[:MAX_PROBLEMS] + [Problem(file, problems[MAX_PROBLEMS].line, "",
                                                          f"and {rest} more problems from this line on")]
        raise InvalidDesiredState(problems)
    if warnings is not None:
        warnings.extend(_warnings(doc))
    filled: dict[str, Any] = with_defaults(doc.data, schema())   # the document, a mapping (checked above)
    return filled
