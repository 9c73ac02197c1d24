"""The desired state: what desired.yaml asks for, as typed, immutable values.

``load()`` reads and validates the file (see ``validation``) and resolves every
relative path against the file's own folder, so the same file means the same
thing whichever directory ``cst`` runs from.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Union

from .problems import Problem
from .safe_yaml import read_text
from .schema import schema_default
from .validation import check, parse_duration, parse_size

INSTANCE_ID_PREFIX = "st-instance-"


def instance_id(port: int) -> str:
    return f"{INSTANCE_ID_PREFIX}{port}"


def port_of(instance_id_: str) -> int | None:
    """The port named by an instance id, or None when the id is not one of ours."""
    if not instance_id_.startswith(INSTANCE_ID_PREFIX):
        return None
    digits = instance_id_[len(INSTANCE_ID_PREFIX):]
    if not (digits.isascii() and digits.isdigit()) or len(digits) > 5 or digits.startswith("0"):
        return None
    port = int(digits)
    return port if 1024 <= port <= 65535 else None


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    @classmethod
    def parse(cls, value: str) -> "Listen":
        host, port = value.rsplit(":", 1)
        return cls(host.strip("[]"), int(port))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _default(*path: str) -> Any:
    return schema_default(*path)


@dataclass(frozen=True)
class UserSettings:
    """Under which user each instance runs when cst runs as root (see runtime/instance_users.py)."""

    isolate: bool = _default("settings", "sillytavern", "users", "isolate")
    uid_from: int = _default("settings", "sillytavern", "users", "uid_from")

    def uid_of(self, port: int) -> int:
        """The uid (and gid) of the instance on ``port``, when instances run as users of their own."""
        return self.uid_from + port


@dataclass(frozen=True)
class SandboxSettings:
    """Whether each instance runs in a sandbox of its own (see runtime/sandbox.py)."""

    enabled: bool = _default("settings", "sillytavern", "sandbox", "enabled")
    tmp_size: int = parse_size(_default("settings", "sillytavern", "sandbox", "tmp_size"))


@dataclass(frozen=True)
class RolloutSettings:
    """How a change of release goes through the fleet (``settings.sillytavern.rollout``)."""

    canary: int = _default("settings", "sillytavern", "rollout", "canary")
    batch: int = _default("settings", "sillytavern", "rollout", "batch")
    pause: float = parse_duration(_default("settings", "sillytavern", "rollout", "pause"))


@dataclass(frozen=True)
class SillyTavernSettings:
    version: str = _default("settings", "sillytavern", "version")
    server: Path | None = None
    listen_address: str = _default("settings", "sillytavern", "listen_address")
    start_timeout: float = parse_duration(_default("settings", "sillytavern", "start_timeout"))
    stop_timeout: float = parse_duration(_default("settings", "sillytavern", "stop_timeout"))
    users: UserSettings = UserSettings()
    sandbox: SandboxSettings = SandboxSettings()
    rollout: RolloutSettings = RolloutSettings()
    park_after: float | None = None   # seconds; None: instances are not parked unless they say so
    lean: bool = _default("settings", "sillytavern", "lean")


@dataclass(frozen=True)
class TlsSettings:
    cert: Path
    key: Path


IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

@dataclass(frozen=True)
class ApiSettings:
    listen: Listen = Listen.parse(_default("settings", "api", "listen"))
    admin_key_env: str = _default("settings", "api", "admin_key_env")
    tls: TlsSettings | None = None
    insecure_http: bool = _default("settings", "api", "insecure_http")
    timeout: float = parse_duration(_default("settings", "api", "timeout"))   # a change waits this long, then 504
    trusted_proxies: tuple[IPNetwork, ...] = ()   # whose X-Forwarded-For is believed


@dataclass(frozen=True)
class MeteringSettings:
    """What a request costs where its answer reports no tokens, and what is refused
    (``settings.proxy.metering``)."""

    per_request: int = _default("settings", "proxy", "metering", "per_request")
    # (glob, tokens charged, or None: refused), in the file's order
    paths: tuple[tuple[str, int | None], ...] = ()
    allow_deferred: bool = _default("settings", "proxy", "metering", "deferred") == "allow"

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> "MeteringSettings":
        return cls(data["per_request"],
                   tuple((glob, None if charge == "refuse" else charge) for glob, charge in data["paths"].items()),
                   data["deferred"] == "allow")


@dataclass(frozen=True)
class ProxySettings:
    listen: Listen = Listen.parse(_default("settings", "proxy", "listen"))
    upstream: str = _default("settings", "proxy", "upstream")
    client_keys_env: str | None = None
    max_attempts: int = _default("settings", "proxy", "max_attempts")
    failure_threshold: int = _default("settings", "proxy", "failure_threshold")
    timeout: float = parse_duration(_default("settings", "proxy", "timeout"))
    max_body: int = parse_size(_default("settings", "proxy", "max_body"))
    max_concurrent: int = _default("settings", "proxy", "max_concurrent")
    anonymous: bool = _default("settings", "proxy", "anonymous")
    metering: MeteringSettings = MeteringSettings()

    @property
    def local_url(self) -> str:
        """Where a process on this machine reaches the proxy (a wildcard listen answers on loopback)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.listen.host, self.listen.host)
        return f"http://{Listen(host, self.listen.port)}"


@dataclass(frozen=True)
class GitSettings:
    """The branch ``cst serve`` follows (``settings.git``)."""

    remote: str = _default("settings", "git", "remote")
    branch: str = _default("settings", "git", "branch")
    every: float = parse_duration(_default("settings", "git", "every"))
    push: bool = _default("settings", "git", "push")


@dataclass(frozen=True)
class BackupSettings:
    """Scheduled snapshots of each running instance's data dir (``settings.backups``)."""

    every: float = parse_duration(_default("settings", "backups", "every"))
    keep: int = _default("settings", "backups", "keep")


@dataclass(frozen=True)
class LogSettings:
    max_size: int = parse_size(_default("settings", "logs", "max_size"))
    keep: int = _default("settings", "logs", "keep")


@dataclass(frozen=True)
class Budget:
    """What one instance may use of the pool; None: no limit of that kind."""

    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    requests_per_minute: int | None = None

    @property
    def limited(self) -> bool:
        return any(v is not None for v in (self.tokens_per_day, self.tokens_per_month, self.requests_per_minute))

    @classmethod
    def from_data(cls, data: dict[str, Any] | None) -> "Budget":
        data = data or {}
        return cls(data.get("tokens_per_day"), data.get("tokens_per_month"), data.get("requests_per_minute"))


NO_LIMIT = Budget()


@dataclass(frozen=True)
class UsageSettings:
    timezone: str | None = None   # an IANA name; None: the machine's zone
    retention: float = parse_duration(_default("settings", "usage", "retention"))
    store: str | None = None      # postgresql://…: shared by proxy replicas; None: SQLite in the state dir
    store_password_env: str | None = None
    store_password_file: Path | None = None
    on_store_down: Literal["closed", "open"] = _default("settings", "usage", "on_store_down")


@dataclass(frozen=True)
class EdgeSettings:
    """The one entrance (``settings.edge``): nginx at ``listen`` with TLS, instance ``<id>`` at
    ``<id>.<domain>`` and at its own ``hosts``."""

    listen: Listen
    domain: str
    tls: TlsSettings
    redirect_http: Listen | None = None
    ports: bool = _default("settings", "edge", "ports")   # each instance's own port kept too

    def url_of(self, spec: "InstanceSpec") -> str:
        port = "" if self.listen.port == 443 else f":{self.listen.port}"
        return f"https://{self.names_of(spec)[0]}{port}"

    def names_of(self, spec: "InstanceSpec") -> tuple[str, ...]:
        """The host names ``spec`` answers at: ``<id>.<domain>`` first, then its own."""
        return (f"{spec.id}.{self.domain}", *spec.hosts)


@dataclass(frozen=True)
class KubernetesSettings:
    """What only a cluster has (``settings.kubernetes``): read by ``cst render kubernetes`` alone."""

    namespace: str = _default("settings", "kubernetes", "namespace")
    fleet: str = _default("settings", "kubernetes", "fleet")           # the cst/fleet label's value
    sillytavern_image: str = _default("settings", "kubernetes", "images", "sillytavern")
    cst_image: str = _default("settings", "kubernetes", "images", "cst")
    pull_policy: str = _default("settings", "kubernetes", "images", "pull_policy")
    storage_class: str | None = None   # None: the cluster's default class
    volume_size: int = parse_size(_default("settings", "kubernetes", "storage", "size"))
    memory_request: int = parse_size(_default("settings", "kubernetes", "memory_request"))
    ingress_class: str = _default("settings", "kubernetes", "ingress", "class")
    ingress_namespace: str = _default("settings", "kubernetes", "ingress", "namespace")
    tls_secret: str = _default("settings", "kubernetes", "ingress", "tls_secret")
    cert_manager_issuer: str | None = None
    pool_replicas: int = _default("settings", "kubernetes", "pool", "replicas")
    interceptor: str = _default("settings", "kubernetes", "parking", "interceptor")
    interceptor_port: int = _default("settings", "kubernetes", "parking", "interceptor_port")
    interceptor_namespace: str = _default("settings", "kubernetes", "parking", "namespace")
    internal_networks: tuple[str, ...] = tuple(_default("settings", "kubernetes", "internal_networks"))

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> "KubernetesSettings":
        images, storage, ingress, parking = data["images"], data["storage"], data["ingress"], data["parking"]
        return cls(data["namespace"], data["fleet"], images["sillytavern"], images["cst"], images["pull_policy"],
                   storage.get("class"), parse_size(storage["size"]), parse_size(data["memory_request"]),
                   ingress["class"], ingress["namespace"], ingress["tls_secret"], ingress.get("cert_manager_issuer"),
                   data["pool"]["replicas"], parking["interceptor"], parking["interceptor_port"],
                   parking["namespace"], tuple(data["internal_networks"]))


@dataclass(frozen=True)
class Settings:
    state_dir: Path
    data_root: Path
    concurrency: int = _default("settings", "concurrency")
    resync: float = parse_duration(_default("settings", "resync"))
    logs: LogSettings = LogSettings()
    sillytavern: SillyTavernSettings = SillyTavernSettings()
    api: ApiSettings = ApiSettings()
    proxy: ProxySettings = ProxySettings()
    usage: UsageSettings = UsageSettings()
    git: GitSettings | None = None     # None: the file is not followed from a remote
    backups: BackupSettings | None = None   # None: no scheduled snapshots
    edge: EdgeSettings | None = None        # None: instances are reached on their own ports only
    kubernetes: KubernetesSettings = KubernetesSettings()


@dataclass(frozen=True)
class Account:
    """A source of upstream API keys for the proxy."""

    name: str
    provider: Literal["daidai", "static"]
    email: str | None = None
    password_env: str | None = None
    password_file: Path | None = None
    api_base: str = _default("accounts", "api_base")
    refresh: float = parse_duration(_default("accounts", "refresh"))
    keys_env: str | None = None
    keys_file: Path | None = None


@dataclass(frozen=True)
class InstanceSpec:
    port: int
    state: Literal["running", "stopped"] = _default("instances", "state")
    password_env: str | None = None
    max_memory: int | None = None      # bytes
    proxy: bool = _default("instances", "proxy")   # wired to the key pool, with a proxy key of its own
    budget: Budget = NO_LIMIT   # its own, or settings.budget when it names none
    # its own npm release of SillyTavern; None: the fleet's settings.sillytavern.version
    # (resolved by DesiredState.version_of, the one place that applies the default)
    sillytavern_version: str | None = None
    # seconds without use before it is parked (its own, else settings.sillytavern.park_after); None: never
    park_after: float | None = None
    hosts: tuple[str, ...] = ()        # its names at the edge besides <id>.<domain>

    @property
    def id(self) -> str:
        return instance_id(self.port)


@dataclass(frozen=True)
class DesiredState:
    path: Path
    settings: Settings
    accounts: tuple[Account, ...] = ()
    instances: tuple[InstanceSpec, ...] = field(default_factory=tuple)
    warnings: tuple[Problem, ...] = ()   # valid, but worth a word (see validation)

    def instance(self, id_: str) -> InstanceSpec | None:
        return next((i for i in self.instances if i.id == id_), None)

    def data_dir(self, port: int) -> Path:
        return self.settings.data_root / str(port)

    def url_of(self, spec: InstanceSpec) -> str | None:
        """Where a user opens ``spec``: its name at the edge, else its own port (None when that
        listens on every address: which name reaches this machine is the operator's to say)."""
        if self.settings.edge is not None:
            return self.settings.edge.url_of(spec)
        host = self.settings.sillytavern.listen_address
        if host in ("0.0.0.0", "::"):
            return None
        return f"http://{'[' + host + ']' if ':' in host else host}:{spec.port}"

    def behind_edge(self, spec: InstanceSpec) -> bool:
        """Whether ``spec`` is reached through the edge (nginx checks its credentials, cst serve
        wakes it): every instance with ``settings.edge``, else those that park when idle."""
        return self.settings.edge is not None or spec.park_after is not None

    def version_of(self, spec: InstanceSpec) -> str:
        """The npm release of SillyTavern ``spec`` runs: its own, else the fleet's. (With
        ``settings.sillytavern.server`` no instance names its own: validation refuses it.)"""
        return spec.sillytavern_version or self.settings.sillytavern.version

    def versions(self) -> dict[str, list[str]]:
        """Every npm release the file uses, each with the fields that ask for it, in file order:
        the fleet's version always (what a new instance gets), then each instance's own."""
        used: dict[str, list[str]] = {self.settings.sillytavern.version: ["settings.sillytavern.version"]}
        for i, spec in enumerate(self.instances):
            if spec.sillytavern_version is not None:
                used.setdefault(spec.sillytavern_version, []).append(f"instances[{i}].sillytavern_version")
        return used


def _path(base: Path, value: str) -> Path:
    return (base / Path(value).expanduser()).resolve()


def _optional_path(base: Path, value: str | None) -> Path | None:
    return None if value is None else _path(base, value)


def from_data(data: dict[str, Any], path: Path, warnings: tuple[Problem, ...] = ()) -> DesiredState:
    """Build the model from a document that ``validation.check`` accepted (defaults filled in)."""
    base = path.resolve().parent
    raw = data["settings"]
    st, api, proxy, logs, usage = raw["sillytavern"], raw["api"], raw["proxy"], raw["logs"], raw["usage"]
    tls = api.get("tls")
    settings = Settings(
        state_dir=_path(base, raw["state_dir"]),
        data_root=_path(base, raw["data_root"]),
        concurrency=raw["concurrency"],
        resync=parse_duration(raw["resync"]),
        logs=LogSettings(max_size=parse_size(logs["max_size"]), keep=logs["keep"]),
        sillytavern=SillyTavernSettings(
            version=st["version"],
            server=_optional_path(base, st.get("server")),
            listen_address=st["listen_address"],
            start_timeout=parse_duration(st["start_timeout"]),
            stop_timeout=parse_duration(st["stop_timeout"]),
            users=UserSettings(isolate=st["users"]["isolate"], uid_from=st["users"]["uid_from"]),
            sandbox=SandboxSettings(enabled=st["sandbox"]["enabled"], tmp_size=parse_size(st["sandbox"]["tmp_size"])),
            rollout=RolloutSettings(canary=st["rollout"]["canary"], batch=st["rollout"]["batch"],
                                    pause=parse_duration(st["rollout"]["pause"])),
            park_after=parse_duration(st["park_after"]) if "park_after" in st else None,
            lean=st["lean"],
        ),
        api=ApiSettings(
            listen=Listen.parse(api["listen"]),
            admin_key_env=api["admin_key_env"],
            tls=TlsSettings(_path(base, tls["cert"]), _path(base, tls["key"])) if tls else None,
            insecure_http=api["insecure_http"],
            timeout=parse_duration(api["timeout"]),
            trusted_proxies=tuple(ipaddress.ip_network(p, strict=False) for p in api["trusted_proxies"]),
        ),
        proxy=ProxySettings(
            listen=Listen.parse(proxy["listen"]),
            upstream=proxy["upstream"].rstrip("/"),
            client_keys_env=proxy.get("client_keys_env"),
            max_attempts=proxy["max_attempts"],
            failure_threshold=proxy["failure_threshold"],
            timeout=parse_duration(proxy["timeout"]),
            max_body=parse_size(proxy["max_body"]),
            max_concurrent=proxy["max_concurrent"],
            anonymous=proxy["anonymous"],
            metering=MeteringSettings.from_data(proxy["metering"]),
        ),
        usage=UsageSettings(timezone=usage.get("timezone"), retention=parse_duration(usage["retention"]),
                            store=usage.get("store"), store_password_env=usage.get("store_password_env"),
                            store_password_file=_optional_path(base, usage.get("store_password_file")),
                            on_store_down=usage["on_store_down"]),
        kubernetes=KubernetesSettings.from_data(raw["kubernetes"]),
    )
    git = raw.get("git")
    if git is not None:
        settings = replace(settings, git=GitSettings(git["remote"], git["branch"], parse_duration(git["every"]),
                                                     git["push"]))
    edge = raw.get("edge")
    if edge is not None:
        settings = replace(settings, edge=EdgeSettings(
            Listen.parse(edge["listen"]), edge["domain"],
            TlsSettings(_path(base, edge["tls"]["cert"]), _path(base, edge["tls"]["key"])),
            Listen.parse(edge["redirect_http"]) if "redirect_http" in edge else None, edge["ports"]))
    backups = raw.get("backups")
    if backups is not None:
        settings = replace(settings, backups=BackupSettings(parse_duration(backups["every"]), backups["keep"]))
    fleet_budget = Budget.from_data(raw.get("budget"))
    accounts = tuple(
        Account(
            name=a["name"],
            provider=a["provider"],
            email=a.get("email"),
            password_env=a.get("password_env"),
            password_file=_optional_path(base, a.get("password_file")),
            api_base=a["api_base"].rstrip("/"),
            refresh=parse_duration(a["refresh"]),
            keys_env=a.get("keys_env"),
            keys_file=_optional_path(base, a.get("keys_file")),
        )
        for a in data["accounts"]
    )
    instances = tuple(
        InstanceSpec(port=i["port"], state=i["state"], password_env=i.get("password_env"),
                     max_memory=parse_size(i["max_memory"]) if "max_memory" in i else None,
                     proxy=i["proxy"], sillytavern_version=i.get("sillytavern_version"),
                     park_after=_park_after(i.get("park_after"), settings.sillytavern.park_after),
                     budget=NO_LIMIT if not i["proxy"] else Budget.from_data(i["budget"]) if "budget" in i
                     else fleet_budget, hosts=tuple(i["hosts"]))
        for i in data["instances"]
    )
    return DesiredState(path=path.resolve(), settings=settings, accounts=accounts, instances=instances,
                        warnings=warnings)


def _park_after(own: Any, default: float | None) -> float | None:
    """An instance's park_after: its own (false: never), else the fleet's."""
    if own is False:
        return None
    return default if own is None else parse_duration(own)


def parse(text: str, path: Path) -> DesiredState:
    """Validate ``text`` (the content of ``path``) and build the model; raises InvalidDesiredState."""
    warnings: list[Problem] = []
    data = check(text, str(path), warnings)
    return from_data(data, path, tuple(warnings))


def load(path: Path) -> DesiredState:
    """Read, validate and build the desired state in ``path``; raises InvalidDesiredState."""
    return parse(read_text(path), path)
