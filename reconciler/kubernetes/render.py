"""The desired state as Kubernetes objects: a pure function of the file, the same bytes every time.

Per instance, as JupyterHub's KubeSpawner gives each user a pod and a volume:

* a **StatefulSet of one**, not a bare Pod, for its ``volumeClaimTemplates``: the claim it makes
  (``data-<id>-0``) outlives the StatefulSet (retention ``Retain``), so an instance removed from the
  file and pruned keeps its data, as archiving does on one machine. ``kubectl apply --prune`` only
  prunes what it applied (the claim carries no last-applied annotation), and the claim's
  annotations tell Argo CD and Flux to leave it alone too. A bare Pod would need a claim rendered
  beside it, which a prune deletes with the instance. ``state: stopped`` is zero replicas.
* a **Service**, and with ``settings.edge`` an **Ingress** for its names (``<id>.<domain>`` and
  ``hosts``), TLS from one Secret or from cert-manager.
* when it parks, KEDA's HTTP add-on (``HTTPScaledObject``) scales it to zero; its Ingress then
  leads to the add-on's interceptor, which holds the first request while the pod starts.

For the fleet: a **NetworkPolicy** (instances reach the pool, DNS and the internet, never each other
or the cluster's own addresses), and the **key pool** (``cst proxy``): a Deployment of replicas on
the PostgreSQL store, or with the SQLite ledger one replica on a volume of its own.

Secrets are named, never rendered: ``secrets.py`` makes them from the state dir.
"""
from __future__ import annotations

import enum
import hashlib
import math
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from .. import __version__
from ..desired.model import DesiredState, InstanceSpec
from ..desired.problems import YamlPath
from ..runtime import launch, overlay, sandbox, wiring
from .names import (
    FLEET_LABEL,
    INSTANCE_LABEL,
    PASSWORD_KEY,
    POOL,
    POOL_ENV_SECRET,
    POOL_FILE,
    POOL_FILES,
    POOL_FILES_SECRET,
    POOL_PORT,
    POOL_STATE,
    PROXY_KEY_KEY,
    ROLE_LABEL,
    tls_secret_of,
)
from .pool_file import pool_file

Manifest = dict[str, Any]

MANAGED = {"app.kubernetes.io/managed-by": "cst", "app.kubernetes.io/part-of": "cst"}
# on what must outlive its object (data volumes): Argo CD and Flux never prune or delete it
KEEP = {"argocd.argoproj.io/sync-options": "Prune=false,Delete=false",
        "kustomize.toolkit.fluxcd.io/prune": "disabled"}
SILLYTAVERN_PORT = 8000            # inside each instance's pod; its Service answers on 80
PROXY_KEY_DIR = "/run/cst"         # the instance's own proxy key, from its Secret
DEFAULTS_DIR = "/run/cst-defaults"  # the release's default settings, handed from one init step to the next
KEDA_API = "http.keda.sh/v1alpha1"
# Behind the ingress every request comes from the controller's address: SillyTavern's own limiter of
# wrong passwords (5 a minute per address) would shut every user out after one guesser's five. It
# counts by X-Real-IP instead, which ingress-nginx sets to the client's address; X-Forwarded-For,
# whose first entry a client writes itself, is not read. Only the controller reaches an instance
# (the NetworkPolicy), so nobody else can set the header.
BEHIND_INGRESS = {"SILLYTAVERN_RATELIMITING_PREFERREALIPHEADER": "true",
                  "SILLYTAVERN_FORWARDEDHEADERS_XFORWARDEDFOR": "false"}


class Note(enum.Enum):
    """What the render says beside its output: where the cluster differs from one machine."""

    NO_EDGE = "no settings.edge: no Ingress; instances are reached inside the cluster only"
    SQLITE_POOL = ("the ledger is SQLite (no settings.usage.store): one pool replica, on a volume of its "
                   "own; set a PostgreSQL store for more")
    PARKING = "instances park through KEDA's HTTP add-on (http.keda.sh), which must be installed"
    AWAKE = ("instances with park_after stay awake: in a cluster a parked instance is woken through its "
             "name at the edge (settings.edge)")


@dataclass(frozen=True)
class Rendering:
    objects: tuple[Manifest, ...]
    notes: tuple[Note, ...]


def problems(desired: DesiredState) -> list[tuple[YamlPath, str]]:
    """What of a valid file cannot run in a cluster, by YAML path (the CLI locates them)."""
    found: list[tuple[YamlPath, str]] = []
    if desired.settings.sillytavern.server is not None:
        found.append((("settings", "sillytavern", "server"),
                      "a checkout of one's own cannot become an image: a cluster runs npm releases only "
                      "(remove it, or render a file without it)"))
    return found


def render(desired: DesiredState, document: dict[str, Any], namespace: str | None = None) -> Rendering:
    """Every object of ``desired`` (``document``: the file as written, which the pool's copy keeps)
    in ``namespace`` (default ``settings.kubernetes.namespace``), in a fixed order. ``desired``
    must have no ``problems``."""
    r = _Renderer(desired, document, namespace or desired.settings.kubernetes.namespace)
    objects: list[Manifest] = []
    for spec in desired.instances:
        objects.extend(r.instance(spec))
    objects.extend(r.network_policies())
    objects.extend(r.pool())
    notes = [Note.NO_EDGE] if desired.settings.edge is None else []
    if desired.settings.usage.store is None:
        notes.append(Note.SQLITE_POOL)
    if any(_idles(spec) for spec in desired.instances):
        notes.append(Note.PARKING if desired.settings.edge is not None else Note.AWAKE)
    return Rendering(tuple(objects), tuple(notes))


def _idles(spec: InstanceSpec) -> bool:
    """Whether ``spec`` would park when idle: it has ``park_after`` and runs."""
    return spec.park_after is not None and spec.state == "running"


def _quantity(size: int) -> str:
    """Bytes as Kubernetes writes them: Mi when whole, else plain bytes."""
    return f"{size >> 20}Mi" if size % (1 << 20) == 0 else str(size)


def _non_root(uid: int) -> Manifest:
    """A container that cannot become anyone else: its own uid, nothing to escalate, no capabilities,
    the root filesystem read-only (only its volumes are writable)."""
    return {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid, "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}


def _env(values: dict[str, str]) -> list[Manifest]:
    return [{"name": name, "value": value} for name, value in sorted(values.items())]


class _Renderer:
    def __init__(self, desired: DesiredState, document: dict[str, Any], namespace: str):
        self.desired = desired
        self.document = document
        self.settings = desired.settings
        self.k8s = desired.settings.kubernetes
        self.namespace = namespace

    def _parks(self, spec: InstanceSpec) -> bool:
        """Whether ``spec`` scales to zero when idle: it parks, runs, and has names at the edge that wake it."""
        return _idles(spec) and self.settings.edge is not None

    # -- shared shapes

    def _selector(self, role: str, instance: str | None = None) -> dict[str, str]:
        """The labels that pick out a role's pods (an instance's, with its id)."""
        labels = {FLEET_LABEL: self.k8s.fleet, ROLE_LABEL: role}
        if instance is not None:
            labels[INSTANCE_LABEL] = instance
        return labels

    def _labels(self, role: str, instance: str | None = None) -> dict[str, str]:
        return {**MANAGED, **self._selector(role, instance)}

    def _meta(self, name: str, labels: dict[str, str], annotations: dict[str, str] | None = None) -> Manifest:
        meta: Manifest = {"name": name, "namespace": self.namespace, "labels": labels}
        if annotations:
            meta["annotations"] = annotations
        return meta

    def _claim(self, name: str, labels: dict[str, str]) -> Manifest:
        spec: Manifest = {"accessModes": ["ReadWriteOnce"],
                          "resources": {"requests": {"storage": _quantity(self.k8s.volume_size)}}}
        if self.k8s.storage_class is not None:
            spec["storageClassName"] = self.k8s.storage_class
        return {"metadata": {"name": name, "labels": labels, "annotations": KEEP}, "spec": spec}

    def _image(self, name: str, tag: str) -> str:
        return f"{name}:{tag}"

    # -- one instance

    def instance(self, spec: InstanceSpec) -> list[Manifest]:
        labels = self._labels("instance", spec.id)
        objects = [self._statefulset(spec, labels), self._service(spec.id, labels, self._selector("instance", spec.id),
                                                                   80, "http")]
        if self._parks(spec):   # its Ingress leads to the interceptor, in the add-on's namespace
            objects.append(self._scaler(spec, labels))
            objects.append({"apiVersion": "v1", "kind": "Service", "metadata": self._meta(f"{spec.id}-wake", labels),
                            "spec": {"type": "ExternalName", "externalName": self.k8s.interceptor,
                                     "ports": [{"name": "http", "port": self.k8s.interceptor_port}]}})
        if self.settings.edge is not None:
            objects.append(self._ingress(spec, labels))
        return objects

    def _statefulset(self, spec: InstanceSpec, labels: dict[str, str]) -> Manifest:
        uid = self.settings.sillytavern.users.uid_of(spec.port)
        version = self.desired.version_of(spec)
        image = self._image(self.k8s.sillytavern_image, version)
        package = sandbox.RELEASE / "node_modules" / "sillytavern"
        flags = launch.server_flags(SILLYTAVERN_PORT, str(sandbox.DATA), str(sandbox.HOME / "config.yaml"), "0.0.0.0")
        st = self.settings.sillytavern
        env = {**overlay.environ_flags(), "HOME": str(sandbox.HOME), "SILLYTAVERN_BASICAUTHUSER_USERNAME": spec.id}
        if st.lean:
            env.update(launch.LEAN_ENV)
        if self.settings.edge is not None:
            env.update(launch.host_guard(self.settings.edge.names_of(spec)))
            env.update(BEHIND_INGRESS)
        volumes: list[Manifest] = [
            {"name": "home", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {"sizeLimit": _quantity(st.sandbox.tmp_size)}},
        ]
        mounts: list[Manifest] = [{"name": "data", "mountPath": str(sandbox.DATA)},
                                  {"name": "home", "mountPath": str(sandbox.HOME)},
                                  {"name": "tmp", "mountPath": "/tmp"}]
        init: list[Manifest] = []
        if spec.proxy:
            env[launch.ENV_PROXY_URL] = self._pool_url()
            env[launch.ENV_PROXY_KEY_FILE] = f"{PROXY_KEY_DIR}/{PROXY_KEY_KEY}"
            volumes.append({"name": "proxy-key", "secret": {"secretName": spec.id, "defaultMode": 0o440,
                                                            "items": [{"key": PROXY_KEY_KEY, "path": PROXY_KEY_KEY}]}})
            volumes.append({"name": "defaults", "emptyDir": {"sizeLimit": "1Mi"}})
            mounts.append({"name": "proxy-key", "mountPath": PROXY_KEY_DIR, "readOnly": True})
            init = self._wiring(uid, image, package)
        password = {"name": "SILLYTAVERN_BASICAUTHUSER_PASSWORD",
                    "valueFrom": {"secretKeyRef": {"name": spec.id, "key": PASSWORD_KEY}}}
        memory: Manifest = {"requests": {"memory": _quantity(min(self.k8s.memory_request,
                                                                 spec.max_memory or self.k8s.memory_request))}}
        if spec.max_memory is not None:
            memory["limits"] = {"memory": _quantity(spec.max_memory)}
        probe = {"tcpSocket": {"port": "http"}, "periodSeconds": 10}
        container = {
            "name": "sillytavern", "image": image, "imagePullPolicy": self.k8s.pull_policy,
            "command": [str(sandbox.NODE), *(launch.LEAN_NODE_FLAGS if st.lean else ()), str(package / "server.js")],
            "args": list(flags), "workingDir": str(sandbox.HOME),
            "env": [*_env(env), password],
            "ports": [{"name": "http", "containerPort": SILLYTAVERN_PORT}],
            "resources": memory, "securityContext": _non_root(uid), "volumeMounts": mounts,
            "startupProbe": {**probe, "periodSeconds": 2, "failureThreshold": max(1, math.ceil(st.start_timeout / 2))},
            "readinessProbe": probe, "livenessProbe": {**probe, "failureThreshold": 6},
        }
        pod: Manifest = {
            "automountServiceAccountToken": False, "enableServiceLinks": False,
            "terminationGracePeriodSeconds": math.ceil(st.stop_timeout),
            "securityContext": {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid, "fsGroup": uid,
                                "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}},
            **({"initContainers": init} if init else {}),
            "containers": [container], "volumes": volumes,
        }
        selector = self._selector("instance", spec.id)
        set_spec: Manifest = {
            "serviceName": spec.id, "selector": {"matchLabels": selector},
            "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Retain", "whenScaled": "Retain"},
            "template": {"metadata": {"labels": labels, "annotations": {"cst/release": f"sillytavern@{version}"}},
                         "spec": pod},
            "volumeClaimTemplates": [self._claim("data", labels)],
        }
        if not self._parks(spec):   # a parking instance's replicas are the scaler's: applying never wakes it
            set_spec["replicas"] = 1 if spec.state == "running" else 0
        return {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": self._meta(spec.id, labels),
                "spec": set_spec}

    def _wiring(self, uid: int, image: str, package: PurePosixPath) -> list[Manifest]:
        """The first-start wiring to the pool, as on one machine (``cst wire``, runtime/wiring.py): the
        release's image hands its default settings to CST's image, which writes them into a new data
        dir with the pool's URL and the instance's key, once; later starts follow CST's own values."""
        handed = PurePosixPath(DEFAULTS_DIR) / wiring.DEFAULTS
        copy = (f"const fs = require('fs'); fs.mkdirSync({str(handed.parent)!r}, {{recursive: true}}); "
                f"fs.copyFileSync({str(package / wiring.DEFAULTS)!r}, {str(handed)!r})")
        mount = {"name": "defaults", "mountPath": DEFAULTS_DIR}
        return [
            {"name": "release-defaults", "image": image, "imagePullPolicy": self.k8s.pull_policy,
             "command": [str(sandbox.NODE), "-e", copy], "securityContext": _non_root(uid),
             "volumeMounts": [mount]},
            {"name": "wire", "image": self._image(self.k8s.cst_image, __version__),
             "imagePullPolicy": self.k8s.pull_policy,
             "command": ["cst", "wire", "--data-dir", str(sandbox.DATA), "--package", DEFAULTS_DIR,
                         "--proxy-url", self._pool_url(), "--key-file", f"{PROXY_KEY_DIR}/{PROXY_KEY_KEY}"],
             "securityContext": _non_root(uid),
             "volumeMounts": [{"name": "data", "mountPath": str(sandbox.DATA)}, {**mount, "readOnly": True},
                              {"name": "proxy-key", "mountPath": PROXY_KEY_DIR, "readOnly": True}]},
        ]

    def _service(self, name: str, labels: dict[str, str], selector: dict[str, str], port: int,
                 target: str) -> Manifest:
        return {"apiVersion": "v1", "kind": "Service", "metadata": self._meta(name, labels),
                "spec": {"selector": selector, "ports": [{"name": target, "port": port, "targetPort": target}]}}

    def _ingress(self, spec: InstanceSpec, labels: dict[str, str]) -> Manifest:
        edge = self.settings.edge
        assert edge is not None
        names = list(edge.names_of(spec))
        backend = ({"name": f"{spec.id}-wake", "port": {"number": self.k8s.interceptor_port}} if self._parks(spec)
                   else {"name": spec.id, "port": {"name": "http"}})
        annotations: dict[str, str] = {}
        if self.k8s.cert_manager_issuer is not None:
            annotations["cert-manager.io/cluster-issuer"] = self.k8s.cert_manager_issuer
        # credentials checked at the edge, as on one machine (ingress-nginx's basic auth, from the
        # instance's Secret): a guess never reaches SillyTavern, and a parked instance is never woken
        # by one. Other controllers ignore these; SillyTavern still checks every request.
        annotations.update({"nginx.ingress.kubernetes.io/auth-type": "basic",
                            "nginx.ingress.kubernetes.io/auth-secret": spec.id,
                            "nginx.ingress.kubernetes.io/auth-realm": spec.id})
        secret = tls_secret_of(spec.id) if self.k8s.cert_manager_issuer is not None else self.k8s.tls_secret
        rules = [{"host": name, "http": {"paths": [{"path": "/", "pathType": "Prefix",
                                                    "backend": {"service": backend}}]}} for name in names]
        return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
                "metadata": self._meta(spec.id, labels, annotations),
                "spec": {"ingressClassName": self.k8s.ingress_class,
                         "tls": [{"hosts": names, "secretName": secret}], "rules": rules}}

    def _scaler(self, spec: InstanceSpec, labels: dict[str, str]) -> Manifest:
        """KEDA's HTTP add-on: the interceptor counts requests to the instance's names, scales it to zero
        after ``park_after`` without one, and holds the first while it starts again."""
        assert spec.park_after is not None and self.settings.edge is not None
        return {"apiVersion": KEDA_API, "kind": "HTTPScaledObject", "metadata": self._meta(spec.id, labels),
                "spec": {"hosts": list(self.settings.edge.names_of(spec)),
                         "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": spec.id,
                                            "service": spec.id, "port": 80},
                         "replicas": {"min": 0, "max": 1},
                         "scaledownPeriod": max(1, math.ceil(spec.park_after))}}

    # -- the fleet

    def network_policies(self) -> list[Manifest]:
        """Instances: reached only by the ingress controller (and the parking interceptor); reaching
        only the pool, DNS and addresses outside ``internal_networks``. The pool: reached by
        instances only."""
        v4 = [net for net in self.k8s.internal_networks if ":" not in net]
        v6 = [net for net in self.k8s.internal_networks if ":" in net]
        dns_ports = [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]
        callers = [self.k8s.ingress_namespace]
        if any(self._parks(spec) for spec in self.desired.instances):
            callers.append(self.k8s.interceptor_namespace)
        from_namespaces = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}
                           for ns in callers]
        instances = {
            "podSelector": {"matchLabels": self._selector("instance")},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": from_namespaces, "ports": [{"protocol": "TCP", "port": "http"}]}],
            "egress": [
                {"to": [{"podSelector": {"matchLabels": self._selector("pool")}}],
                 "ports": [{"protocol": "TCP", "port": POOL_PORT}]},
                {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                         "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}], "ports": dns_ports},
                {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": v4}},
                        {"ipBlock": {"cidr": "::/0", "except": v6}}]},
            ],
        }
        pool = {
            "podSelector": {"matchLabels": self._selector("pool")},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": self._selector("instance")}}],
                         "ports": [{"protocol": "TCP", "port": POOL_PORT}]}],
        }
        return [{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                 "metadata": self._meta(f"{self.k8s.fleet}-{role}s" if role == "instance" else POOL,
                                        self._labels(role)),
                 "spec": spec} for role, spec in (("instance", instances), ("pool", pool))]

    def _pool_url(self) -> str:
        return f"http://{POOL}:{POOL_PORT}"

    def pool(self) -> list[Manifest]:
        labels = self._labels("pool")
        selector = self._selector("pool")
        uid = self.settings.sillytavern.users.uid_from   # no instance's: their ports are 1024 and up
        sqlite = self.settings.usage.store is None
        text = pool_file(self.document)
        config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": self._meta(POOL, labels),
                  "data": {"desired.yaml": text}}
        keys = [{"secret": {"name": spec.id, "optional": True,
                            "items": [{"key": PROXY_KEY_KEY, "path": spec.id}]}}
                for spec in self.desired.instances if spec.proxy]
        volumes: list[Manifest] = [
            {"name": "desired", "configMap": {"name": POOL}},
            {"name": "files", "secret": {"secretName": POOL_FILES_SECRET, "optional": True, "defaultMode": 0o400}},
            {"name": "instance-keys", "projected": {"sources": keys, "defaultMode": 0o400}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
        ]
        if not sqlite:
            volumes.append({"name": "state", "emptyDir": {}})
        container = {
            "name": "proxy", "image": self._image(self.k8s.cst_image, __version__),
            "imagePullPolicy": self.k8s.pull_policy,
            "command": ["cst", "proxy", "-f", POOL_FILE, "--listen", f"0.0.0.0:{POOL_PORT}"],
            "envFrom": [{"secretRef": {"name": POOL_ENV_SECRET, "optional": True}}],
            "ports": [{"name": "proxy", "containerPort": POOL_PORT}],
            "securityContext": _non_root(uid),
            "volumeMounts": [
                {"name": "desired", "mountPath": "/etc/cst/desired.yaml", "subPath": "desired.yaml", "readOnly": True},
                {"name": "files", "mountPath": POOL_FILES, "readOnly": True},
                {"name": "state", "mountPath": POOL_STATE},
                {"name": "instance-keys", "mountPath": f"{POOL_STATE}/secrets/proxy-keys", "readOnly": True},
                {"name": "tmp", "mountPath": "/tmp"},
            ],
            "readinessProbe": {"httpGet": {"path": "/health", "port": "proxy"}, "periodSeconds": 5},
            "livenessProbe": {"tcpSocket": {"port": "proxy"}, "periodSeconds": 10},
        }
        # a file mounted by subPath is never updated in a running pod: a change of it (a budget, an
        # account) changes this annotation instead, and the pods are replaced with the new file
        pod = {"metadata": {"labels": labels,
                            "annotations": {"cst/pool-file-sha256": hashlib.sha256(text.encode()).hexdigest()}},
               "spec": {"automountServiceAccountToken": False, "enableServiceLinks": False,
                        "securityContext": {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid, "fsGroup": uid,
                                            "seccompProfile": {"type": "RuntimeDefault"}},
                        "containers": [container], "volumes": volumes}}
        if sqlite:   # one writer of one SQLite file, whose volume outlives the pool
            workload: Manifest = {
                "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": self._meta(POOL, labels),
                "spec": {"replicas": 1, "serviceName": POOL, "selector": {"matchLabels": selector},
                         "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Retain", "whenScaled": "Retain"},
                         "template": pod, "volumeClaimTemplates": [self._claim("state", labels)]}}
        else:
            workload = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": self._meta(POOL, labels),
                        "spec": {"replicas": self.k8s.pool_replicas, "selector": {"matchLabels": selector},
                                 "template": pod}}
        return [config, self._service(POOL, labels, selector, POOL_PORT, "proxy"), workload]

