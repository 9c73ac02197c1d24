"""`cst render kubernetes`: every object valid against the Kubernetes API's own schemas (strict: an
unknown field is an error), the same bytes every run, data volumes that outlive their instance, no
secret in the output, and a bad file refused with the errors `cst validate` gives, nothing written."""
from __future__ import annotations

import base64
import os
import stat
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from reconciler.cli import cli
from reconciler.desired.model import load, parse
from reconciler.desired.restricted import restricted_changes

ROOT = Path(__file__).resolve().parents[3]
KUBERNETES = "1.37.0"   # the API version rendered objects are checked against (kubernetes-validate's newest)
KEDA_CRD = Path(__file__).with_name("http.keda.sh_httpscaledobjects.yaml")

SECRETS = {"DAIDAI_PASSWORD": "daidai-secret-Q7", "CST_STORE_PASSWORD": "store-secret-Z3",
           "EXTRA_KEYS": "sk-extra-secret-K9", "ALICE_PASSWORD": "alice-own-secret-P2"}
FILE_SECRET = "static-key-in-a-file-W4"

EVERYTHING = """\
version: 1
settings:
  state_dir: .cst
  data_root: user-data
  sillytavern: {version: "1.19.0", park_after: 30m}
  proxy: {upstream: "https://api.example.com/v1"}
  usage:
    store: "postgresql://cst@db.internal:5432/cst?sslmode=verify-full"
    store_password_env: CST_STORE_PASSWORD
  budget: {tokens_per_day: 200000, requests_per_minute: 30}
  edge: {listen: "0.0.0.0:443", domain: chat.example.com, tls: {cert: edge.crt, key: edge.key}}
  kubernetes:
    images: {sillytavern: registry.example/cst/sillytavern, cst: registry.example/cst/cst}
    storage: {class: fast-ssd, size: 5GiB}
    pool: {replicas: 3}
accounts:
  - {name: main, provider: daidai, email: host@example.com, password_env: DAIDAI_PASSWORD}
  - {name: extra, provider: static, keys_env: EXTRA_KEYS}
  - {name: filed, provider: static, keys_file: static.keys}
instances:
  - {port: 8001, hosts: [alice.example.org], password_env: ALICE_PASSWORD, max_memory: 768MiB}
  - {port: 8002, park_after: false, budget: {tokens_per_day: 5000}}
  - {port: 8003, state: stopped}
  - {port: 8004, sillytavern_version: "1.18.0", proxy: false}
"""


def _strict(schema: Any) -> Any:
    """A CRD's schema as the API server reads it with field validation on: unknown fields refused."""
    if isinstance(schema, dict):
        schema = {key: _strict(value) for key, value in schema.items()}
        if schema.get("type") == "object" and "properties" in schema:
            schema.setdefault("additionalProperties", False)
        return schema
    return [_strict(item) for item in schema] if isinstance(schema, list) else schema


def _crd_validators() -> dict[tuple[str, str], jsonschema.Draft7Validator]:
    found = {}
    for crd in yaml.safe_load_all(KEDA_CRD.read_text()):
        if not crd:
            continue
        for version in crd["spec"]["versions"]:
            api = f"{crd['spec']['group']}/{version['name']}"
            found[(api, crd["spec"]["names"]["kind"])] = jsonschema.Draft7Validator(
                _strict(version["schema"]["openAPIV3Schema"]))
    return found


CRDS = _crd_validators()


def validate(obj: dict[str, Any]) -> None:
    """Raise unless ``obj`` is valid, strictly: core kinds by the API's schemas, others by a pinned CRD."""
    crd = CRDS.get((obj["apiVersion"], obj["kind"]))
    if crd is None:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)
        return
    crd.validate(obj)
    # what a CRD's schema leaves open, its metadata, is the API's ObjectMeta
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]},
                                 KUBERNETES, strict=True)


def _everything(folder: Path, text: str = EVERYTHING) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "edge.crt").write_text("-----BEGIN CERTIFICATE-----\nedge-cert\n-----END CERTIFICATE-----\n")
    (folder / "edge.key").write_text("-----BEGIN PRIVATE KEY-----\nedge-key-secret-T5\n-----END PRIVATE KEY-----\n")
    (folder / "static.keys").write_text(FILE_SECRET + "\n")
    os.chmod(folder / "static.keys", 0o600)
    path = folder / "desired.yaml"
    path.write_text(text)
    return path


def _run(*args: str, env: dict[str, str] | None = None) -> Any:
    result = CliRunner().invoke(cli, list(args), env={**SECRETS, **(env or {})}, catch_exceptions=False)
    return result


def _objects(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def _render(path: Path, *extra: str) -> tuple[str, list[dict[str, Any]]]:
    result = _run("render", "kubernetes", "-f", str(path), *extra)
    assert result.exit_code == 0, result.output
    return result.stdout, _objects(result.stdout)


def _by(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} objects"
    return found[0]


@pytest.mark.parametrize("example", ["examples/desired.yaml", "everything"])
def test_every_object_validates_strictly(tmp_path: Path, example: str) -> None:
    path = ROOT / example if example != "everything" else _everything(tmp_path)
    _, objects = _render(path)
    assert {o["kind"] for o in objects} >= {"StatefulSet", "Service", "NetworkPolicy", "ConfigMap"}
    for obj in objects:
        validate(obj)
    if example == "everything":
        assert {o["kind"] for o in objects} >= {"Ingress", "HTTPScaledObject", "Deployment"}


def test_the_checks_refuse_an_unknown_field(tmp_path: Path) -> None:
    """The strict checks above can fail: a field the API does not have is refused, core and CRD."""
    _, objects = _render(_everything(tmp_path))
    statefulset = _by(objects, "StatefulSet", "st-instance-8002")
    statefulset["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(statefulset)
    scaler = _by(objects, "HTTPScaledObject", "st-instance-8001")
    scaler["spec"]["scaleTargetRef"]["nmae"] = "x"
    with pytest.raises(jsonschema.ValidationError):
        validate(scaler)


def test_the_same_file_gives_the_same_bytes(tmp_path: Path) -> None:
    """Across runs, and from a copy of the file elsewhere: nothing of this machine's paths or time."""
    first = _everything(tmp_path / "a")
    second = _everything(tmp_path / "elsewhere" / "b")
    text, _ = _render(first)
    assert _render(first)[0] == text
    assert _render(second)[0] == text
    for run in ("one", "two"):
        assert _run("render", "kubernetes", "-f", str(first), "-o", str(tmp_path / run)).exit_code == 0
    one = {p.name: p.read_bytes() for p in (tmp_path / "one").iterdir()}
    assert one == {p.name: p.read_bytes() for p in (tmp_path / "two").iterdir()}
    assert len(one) == len(_objects(text))   # one document per object, one file each
    example, _ = _render(ROOT / "examples" / "desired.yaml")
    assert _render(ROOT / "examples" / "desired.yaml")[0] == example


def test_instances_become_what_the_file_says(tmp_path: Path) -> None:
    _, objects = _render(_everything(tmp_path))
    alice = _by(objects, "StatefulSet", "st-instance-8001")
    pod = alice["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "registry.example/cst/sillytavern:1.19.0"
    assert _by(objects, "StatefulSet", "st-instance-8004")["spec"]["template"]["spec"]["containers"][0]["image"] \
        == "registry.example/cst/sillytavern:1.18.0"
    assert container["resources"]["limits"] == {"memory": "768Mi"}
    # the one-machine promises: its own uid, nothing to escalate, a read-only root
    assert pod["securityContext"]["runAsUser"] == 2000008001 and pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["automountServiceAccountToken"] is False
    # parking: the scaler owns the replicas; stopped: zero; others one
    assert "replicas" not in alice["spec"]
    assert _by(objects, "StatefulSet", "st-instance-8002")["spec"]["replicas"] == 1
    assert _by(objects, "StatefulSet", "st-instance-8003")["spec"]["replicas"] == 0
    scaler = _by(objects, "HTTPScaledObject", "st-instance-8001")["spec"]
    assert scaler["hosts"] == ["st-instance-8001.chat.example.com", "alice.example.org"]
    assert scaler["scaledownPeriod"] == 1800 and scaler["replicas"] == {"min": 0, "max": 1}
    # 8002 never parks (park_after: false), 8003 is stopped: no scaler wakes it
    assert [o["metadata"]["name"] for o in objects if o["kind"] == "HTTPScaledObject"] == \
        ["st-instance-8001", "st-instance-8004"]
    ingress = _by(objects, "Ingress", "st-instance-8001")
    assert [rule["host"] for rule in ingress["spec"]["rules"]] == scaler["hosts"]
    assert ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] == "st-instance-8001-wake"
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/auth-secret"] == "st-instance-8001"
    # SillyTavern's own limiter counts each client behind the ingress, by the header the controller sets
    env_values = {e["name"]: e.get("value") for e in container["env"]}
    assert env_values["SILLYTAVERN_RATELIMITING_PREFERREALIPHEADER"] == "true"
    assert env_values["SILLYTAVERN_FORWARDEDHEADERS_XFORWARDEDFOR"] == "false"
    assert ingress["spec"]["tls"] == [{"hosts": scaler["hosts"], "secretName": "cst-edge-tls"}]
    # the password and the key are references, never values
    env = {e["name"]: e for e in container["env"]}
    assert env["SILLYTAVERN_BASICAUTHUSER_PASSWORD"]["valueFrom"] == {
        "secretKeyRef": {"name": "st-instance-8001", "key": "password"}}
    assert "CST_PROXY_URL" not in {e["name"] for e in _by(objects, "StatefulSet", "st-instance-8004")[
        "spec"]["template"]["spec"]["containers"][0]["env"]}   # proxy: false: not wired, no key


def test_a_dropped_instance_keeps_its_volume(tmp_path: Path) -> None:
    """Data volumes are claim templates, kept when their StatefulSet goes (Retain) and marked for Argo CD
    and Flux; no claim is rendered on its own, where a prune of the file's objects would delete it."""
    path = _everything(tmp_path)
    _, before = _render(path)
    for obj in before:
        assert obj["kind"] != "PersistentVolumeClaim"
        if obj["kind"] == "StatefulSet":
            assert obj["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain",
                                                                            "whenScaled": "Retain"}
            claim = obj["spec"]["volumeClaimTemplates"][0]
            assert claim["metadata"]["annotations"]["argocd.argoproj.io/sync-options"] == "Prune=false,Delete=false"
            assert claim["metadata"]["annotations"]["kustomize.toolkit.fluxcd.io/prune"] == "disabled"
    path.write_text(EVERYTHING.replace("  - {port: 8003, state: stopped}\n", ""))
    _, after = _render(path)
    assert not [o for o in after if o["metadata"].get("labels", {}).get("cst/instance") == "st-instance-8003"]
    gone = {(o["kind"], o["metadata"]["name"]) for o in before} - {(o["kind"], o["metadata"]["name"]) for o in after}
    assert gone == {("StatefulSet", "st-instance-8003"), ("Service", "st-instance-8003"),
                    ("Ingress", "st-instance-8003")}


def test_labels_say_which_file_and_instance(tmp_path: Path) -> None:
    _, objects = _render(_everything(tmp_path), "--namespace", "tenants")
    for obj in objects:
        assert obj["metadata"]["namespace"] == "tenants"
        assert obj["metadata"]["labels"]["cst/fleet"] == "cst"
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "cst"
    for obj in objects:
        if obj["metadata"]["name"].startswith("st-instance-800"):
            assert obj["metadata"]["labels"]["cst/instance"] == obj["metadata"]["name"].removesuffix("-wake")


def test_the_pool_reads_the_same_file_moved_into_its_pod(tmp_path: Path) -> None:
    _, objects = _render(_everything(tmp_path))
    deployment = _by(objects, "Deployment", "cst-pool")
    assert deployment["spec"]["replicas"] == 3
    pool_file = _by(objects, "ConfigMap", "cst-pool")["data"]["desired.yaml"]
    desired = parse(pool_file, Path("/etc/cst/desired.yaml"))   # a valid desired file
    assert desired.settings.state_dir == Path("/var/lib/cst")
    assert desired.settings.usage.store == "postgresql://cst@db.internal:5432/cst?sslmode=verify-full"
    assert [i.budget.tokens_per_day for i in desired.instances] == [200000, 5000, 200000, None]
    assert desired.accounts[2].keys_file == Path("/etc/cst/files/account-filed.keys")
    keys = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "instance-keys")
    assert [s["secret"]["name"] for s in keys["projected"]["sources"]] == \
        ["st-instance-8001", "st-instance-8002", "st-instance-8003"]   # 8004 has no key
    # a change of the pool's file replaces its pods (a subPath mount is never updated in place)
    path = tmp_path / "desired.yaml"
    path.write_text(EVERYTHING.replace("tokens_per_day: 5000", "tokens_per_day: 6000"))
    _, changed = _render(path)
    annotation = "cst/pool-file-sha256"
    assert _by(changed, "Deployment", "cst-pool")["spec"]["template"]["metadata"]["annotations"][annotation] != \
        deployment["spec"]["template"]["metadata"]["annotations"][annotation]
    # the default ledger: one replica, on a claim of its own
    _, example = _render(ROOT / "examples" / "desired.yaml")
    pool = _by(example, "StatefulSet", "cst-pool")
    assert pool["spec"]["replicas"] == 1 and pool["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "state"


def test_no_secret_reaches_the_render(tmp_path: Path) -> None:
    path = _everything(tmp_path)
    secrets_file = tmp_path / "secrets.yaml"
    made = _run("render", "kubernetes-secrets", "-f", str(path), "-o", str(secrets_file))
    assert made.exit_code == 0, made.output
    assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
    secrets = _objects(secrets_file.read_text())
    for obj in secrets:
        validate(obj)
    values = {name: {k: base64.b64decode(v).decode() for k, v in obj["data"].items()}
              for name, obj in ((o["metadata"]["name"], o) for o in secrets)}
    assert values["st-instance-8001"]["password"] == SECRETS["ALICE_PASSWORD"]
    assert values["cst-pool"]["DAIDAI_PASSWORD"] == SECRETS["DAIDAI_PASSWORD"]
    assert values["cst-pool-files"]["account-filed.keys"].strip() == FILE_SECRET
    assert "proxy-key" not in values["st-instance-8004"]
    # the same keys again: minted once, kept in the state dir as on one machine
    again = _run("render", "kubernetes-secrets", "-f", str(path), "-o", "-")
    assert {o["metadata"]["name"]: o["data"].get("proxy-key") for o in _objects(again.stdout)} == \
        {o["metadata"]["name"]: o["data"].get("proxy-key") for o in secrets}
    every = [v for secret in values.values() for v in secret.values()]
    every += [line for v in list(every) for line in v.splitlines() if len(line) > 8]
    assert len(every) > 15
    rendered, _ = _render(path)
    _run("render", "kubernetes", "-f", str(path), "-o", str(tmp_path / "out"))
    written = "".join(p.read_text() for p in (tmp_path / "out").iterdir())
    for value in every:
        if value.startswith("-----") or value in ("", "\n"):
            continue
        assert value not in rendered and value not in written


def test_a_bad_file_gets_the_errors_of_validate_and_nothing_is_written(tmp_path: Path) -> None:
    path = _everything(tmp_path, EVERYTHING.replace("size: 5GiB", "size: lots").replace("port: 8002", "port: 80"))
    validated = _run("validate", "-f", str(path))
    assert validated.exit_code == 1
    out = tmp_path / "out"
    rendered = _run("render", "kubernetes", "-f", str(path), "-o", str(out))
    assert rendered.exit_code == 1
    assert rendered.stderr == validated.stderr and f"{path}:14: settings.kubernetes.storage.size" in rendered.stderr
    assert not out.exists()
    # what only a cluster refuses: a checkout of one's own, located
    own = _everything(tmp_path / "own", EVERYTHING.replace('version: "1.19.0",', 'server: ../st/server.js,')
                      .replace(', sillytavern_version: "1.18.0"', ""))
    refused = _run("render", "kubernetes", "-f", str(own))
    assert refused.exit_code == 1 and f"{own}:5: settings.sillytavern.server: a checkout" in refused.stderr
    assert refused.stdout == ""
    # a folder of someone's own is never emptied; an earlier render is replaced whole
    good = _everything(tmp_path / "good")
    assert _run("render", "kubernetes", "-f", str(good), "-o", str(out)).exit_code == 0
    (out / "mine.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert _run("render", "kubernetes", "-f", str(good), "-o", str(out)).exit_code == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (out / "mine.txt").unlink()
    (out / "statefulset-st-instance-9999.yaml").write_bytes(before["statefulset-st-instance-8001.yaml"])
    assert _run("render", "kubernetes", "-f", str(good), "-o", str(out)).exit_code == 0
    assert "statefulset-st-instance-9999.yaml" not in {p.name for p in out.iterdir()}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out.")]   # no temporary folder left
    bad_namespace = _run("render", "kubernetes", "-f", str(good), "--namespace", "Not_A_Name")
    assert bad_namespace.exit_code == 1 and "--namespace" in bad_namespace.stderr


def test_the_api_cannot_change_the_cluster_settings(tmp_path: Path) -> None:
    path = _everything(tmp_path)
    old = load(path)
    path.write_text(EVERYTHING.replace("registry.example/cst/sillytavern", "evil.example/st"))
    assert "settings.kubernetes" in restricted_changes(old, load(path))


def test_wire_points_a_new_data_dir_at_the_pool(tmp_path: Path) -> None:
    """`cst wire`, a cluster instance's init step: the first-start wiring of one machine."""
    package = tmp_path / "package"
    (package / "default" / "content").mkdir(parents=True)
    (package / "default" / "content" / "settings.json").write_text('{"main_api": "kobold", "oai_settings": {}}')
    key = tmp_path / "key"
    key.write_text("cst-KEY\n")
    args = ["wire", "--data-dir", str(tmp_path / "data"), "--package", str(package),
            "--proxy-url", "http://cst-pool:5100", "--key-file", str(key)]
    first = _run(*args)
    assert first.exit_code == 0 and first.stdout.startswith("changed: ")
    settings = yaml.safe_load((tmp_path / "data" / "default-user" / "settings.json").read_text())
    assert settings["oai_settings"]["custom_url"] == "http://cst-pool:5100/v1"
    assert "cst-KEY" in (tmp_path / "data" / "default-user" / "secrets.json").read_text()
    assert _run(*args).stdout.startswith("ok: ")   # once: a later start changes nothing


def test_a_key_rotated_here_reaches_the_cluster_instance(tmp_path: Path) -> None:
    """`cst rotate-key` for an instance that runs in a cluster (no data dir here), the Secrets made
    again, and its init step replacing the old key in its data dir at the next start."""
    path = _everything(tmp_path)
    first = tmp_path / "first.yaml"
    assert _run("render", "kubernetes-secrets", "-f", str(path), "-o", str(first)).exit_code == 0
    rotated = _run("rotate-key", "-f", str(path), "st-instance-8002")
    assert rotated.exit_code == 0, rotated.output
    second = tmp_path / "second.yaml"
    assert _run("render", "kubernetes-secrets", "-f", str(path), "-o", str(second)).exit_code == 0

    def key(file: Path) -> str:
        secret = next(o for o in _objects(file.read_text()) if o["metadata"]["name"] == "st-instance-8002")
        return base64.b64decode(secret["data"]["proxy-key"]).decode()

    old, new = key(first), key(second)
    assert old != new
    package = tmp_path / "package"
    (package / "default" / "content").mkdir(parents=True)
    (package / "default" / "content" / "settings.json").write_text("{}")
    data = tmp_path / "pod-data"
    for value, said in ((old, "changed: chat completion wired"), (new, "changed: proxy key rotated")):
        (tmp_path / "key").write_text(value)
        wired = _run("wire", "--data-dir", str(data), "--package", str(package), "--proxy-url", "http://cst-pool:5100",
                     "--key-file", str(tmp_path / "key"))
        assert wired.stdout.startswith(said), wired.output
    assert new in (data / "default-user" / "secrets.json").read_text()
    assert old not in (data / "default-user" / "secrets.json").read_text()


def test_cert_manager_and_parking_without_an_edge(tmp_path: Path) -> None:
    issued = _everything(tmp_path / "issued", EVERYTHING.replace("    pool: {replicas: 3}\n",
                                                                 "    pool: {replicas: 3}\n"
                                                                 "    ingress: {cert_manager_issuer: letsencrypt}\n"))
    _, objects = _render(issued)
    ingress = _by(objects, "Ingress", "st-instance-8002")
    assert ingress["metadata"]["annotations"]["cert-manager.io/cluster-issuer"] == "letsencrypt"
    assert ingress["spec"]["tls"][0]["secretName"] == "st-instance-8002-tls"
    made = _run("render", "kubernetes-secrets", "-f", str(issued), "-o", "-")
    assert "cst-edge-tls" not in {o["metadata"]["name"] for o in _objects(made.stdout)}   # cert-manager's to make
    # the example parks st-instance-8001 but has no edge: nothing could wake it, so it stays awake
    result = _run("render", "kubernetes", "-f", str(ROOT / "examples" / "desired.yaml"))
    example = _objects(result.stdout)
    assert _by(example, "StatefulSet", "st-instance-8001")["spec"]["replicas"] == 1
    assert not [o for o in example if o["kind"] in ("HTTPScaledObject", "Ingress")]
    assert "note: instances with park_after stay awake" in result.stderr
    assert "note: no settings.edge: no Ingress" in result.stderr


def test_every_pod_meets_the_restricted_pod_security_standard(tmp_path: Path) -> None:
    """What `pod-security.kubernetes.io/enforce=restricted` checks, on every pod the render makes."""
    allowed_volumes = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                       "projected", "secret"}
    _, objects = _render(_everything(tmp_path))
    _, example = _render(ROOT / "examples" / "desired.yaml")
    pods = [o["spec"]["template"]["spec"] for o in objects + example if o["kind"] in ("StatefulSet", "Deployment")]
    assert len(pods) == 4 + 1 + 2 + 1
    for pod in pods:
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
        for container in pod.get("initContainers", []) + pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["capabilities"] == {"drop": ["ALL"]}
            assert context["runAsNonRoot"] is True and context["readOnlyRootFilesystem"] is True
        for volume in pod["volumes"]:
            assert set(volume) - {"name"} <= allowed_volumes, volume
        assert not {"hostNetwork", "hostPID", "hostIPC"} & set(pod)
