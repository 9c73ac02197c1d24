"""The container images (images/build.py), proven without a container engine (marker: images).

Both images are built once into this module's folder; their layers are unpacked, in order, into a
root filesystem that bubblewrap shows as ``/``, read-only, with ``/data`` and ``/home/sillytavern``
(the SillyTavern image) or a state folder (the CST image) bound writable, and each process runs as
a uid of its own with no groups and no way to regain privileges: what a pod with
``readOnlyRootFilesystem``, volumes and ``runAsUser`` shows it. The network is the host's (loopback).
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psutil
import pytest

from conftest import AS_ROOT, ROOT, free_ports, wait_until
from reconciler import __version__
from reconciler.desired.model import load
from reconciler.runtime import sandbox
from reconciler.runtime.launch import HEALTH_PATH

pytestmark = [pytest.mark.images, pytest.mark.sillytavern,
              pytest.mark.skipif(not AS_ROOT, reason="a uid of the pod's own is set up as root (CI runs as root)")]
DESIRED = ROOT / "examples" / "desired.yaml"
RELEASE = next(iter(load(DESIRED).versions()))
POD_UID = 2_000_008_001   # any uid: the images name no user of their own
START = 90.0              # SillyTavern's start, its front end not compiled: a few seconds


def build(out: Path, *only: str) -> dict[str, str]:
    """Run images/build.py; each image it made ("sillytavern:1.19.0") and its manifest's digest."""
    done = subprocess.run([sys.executable, str(ROOT / "images" / "build.py"), "-f", str(DESIRED), "-o", str(out),
                           *(("--only", *only) if only else ())],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=900)
    assert done.returncode == 0, done.stderr
    return {line.split()[0]: line.split()[2] for line in done.stdout.splitlines()}


@dataclass(frozen=True)
class Image:
    layout: Path
    tag: str
    config: dict
    layers: list[Path]

    @classmethod
    def read(cls, layout: Path, tag: str) -> Image:
        def blob(digest: str) -> Path:
            return layout / "blobs" / "sha256" / digest.removeprefix("sha256:")

        index = json.loads((layout / "index.json").read_text())
        entry = next(m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        manifest = json.loads(blob(entry["digest"]).read_text())
        config = json.loads(blob(manifest["config"]["digest"]).read_text())["config"]
        return cls(layout, tag, config, [blob(layer["digest"]) for layer in manifest["layers"]])

    def unpack(self, into: Path) -> Path:
        """The root filesystem: each layer over the ones before (as root: owners and modes as stored)."""
        into.mkdir()
        for layer in self.layers:
            subprocess.run(["tar", "-xf", str(layer), "-C", str(into)], check=True)
        return into

    @property
    def env(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.config["Env"])


def pod(rootfs: Path, binds: dict[str, Path], env: dict[str, str], workdir: str) -> list[str]:
    """The argv that runs a command in ``rootfs`` as a pod would: the image read-only, ``binds``
    writable, a /tmp of its own, ``POD_UID`` with no groups and no privileges to regain."""
    view = ["--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--die-with-parent",
            "--ro-bind", str(rootfs), "/", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    for inside, host in binds.items():
        view += ["--bind", str(host), inside]
    view += ["--chdir", workdir, "--clearenv"]
    for name, value in sorted(env.items()):
        view += ["--setenv", name, value]
    return ["setpriv", f"--reuid={POD_UID}", f"--regid={POD_UID}", "--clear-groups", "--no-new-privs",
            "--", "bwrap", *view, "--"]


def volume(folder: Path) -> Path:
    """A folder the pod's uid owns, as a volume with its fsGroup would be."""
    folder.mkdir()
    os.chown(folder, POD_UID, POD_UID)
    return folder


@dataclass
class Built:
    out: Path
    digests: dict[str, str]
    seconds: float


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    missing = [tool for tool in ("bwrap", "setpriv", "skopeo", "apt-get", "dpkg-deb") if shutil.which(tool) is None]
    assert not missing, f"{', '.join(missing)} missing: `make test` installs them (Makefile: images-test)"
    out = tmp_path_factory.mktemp("images")
    started = time.monotonic()
    digests = build(out)
    return Built(out, digests, time.monotonic() - started)


@pytest.fixture(scope="module")
def sillytavern_image(built: Built) -> Image:
    return Image.read(built.out / "sillytavern", RELEASE)


@pytest.fixture(scope="module")
def cst_image(built: Built) -> Image:
    return Image.read(built.out / "cst", __version__)


@pytest.fixture(scope="module")
def sillytavern_root(sillytavern_image: Image, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SillyTavern image unpacked once (shown read-only to every pod of this module)."""
    return sillytavern_image.unpack(tmp_path_factory.mktemp("sillytavern") / "rootfs")


@pytest.fixture(scope="module")
def cst_root(cst_image: Image, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cst_image.unpack(tmp_path_factory.mktemp("cst") / "rootfs")


@contextmanager
def running(argv: list[str], log: Path) -> Iterator[subprocess.Popen]:
    """``argv`` started with its output in ``log``; at the end its command (bwrap's child, the
    process the pod's runtime would signal) is sent SIGTERM by pid, then the sandbox is waited for."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        try:
            # bwrap (outer) → its init, pid 1 inside → the command, pid 2 inside
            command = psutil.Process(proc.pid).children(recursive=True)[-1:]
        except psutil.Error:
            command = []
        for child in command:
            child.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:   # --die-with-parent: the sandbox goes with the outer bwrap
            proc.kill()
            proc.wait()


def get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except (urllib.error.URLError, OSError):
        return 0, b""


def test_skopeo_reads_both_layouts(built: Built) -> None:
    for name, tag in (("sillytavern", RELEASE), ("cst", __version__)):
        said = subprocess.run(["skopeo", "inspect", f"oci:{built.out / name}:{tag}"],
                              capture_output=True, text=True, check=True)
        inspected = json.loads(said.stdout)
        assert inspected["Digest"] == built.digests[f"{name}:{tag}"]
        assert inspected["Labels"]["cst.version"] == __version__
    assert json.loads(said.stdout)["Os"] == "linux"


def test_the_same_inputs_give_the_same_digest(built: Built, tmp_path: Path) -> None:
    """The SillyTavern image again (the CST image's pip step costs too long to repeat here)."""
    again = build(tmp_path, "sillytavern")
    assert again[f"sillytavern:{RELEASE}"] == built.digests[f"sillytavern:{RELEASE}"]


def test_cst_runs_from_its_image(cst_image: Image, cst_root: Path, tmp_path: Path) -> None:
    """Its entrypoint, its certificates and time zones; `cst proxy` runs in the rendered pods' test."""
    image, rootfs = cst_image, cst_root
    state, config = volume(tmp_path / "state"), tmp_path / "config"
    config.mkdir()
    (config / "desired.yaml").write_text(textwrap.dedent("""\
        version: 1
        settings:
          state_dir: /var/lib/cst
          proxy: {listen: "127.0.0.1:5100", upstream: "http://127.0.0.1:9/v1"}
          usage: {timezone: Asia/Shanghai}
        accounts:
          - {name: pool, provider: static, keys_env: POOL_KEYS}
        instances: []
        """))
    env = {**image.env, "POOL_KEYS": "sk-image-test-key"}
    # the image's mount points: the desired file's folder (CST_FILE) and the state volume
    in_pod = pod(rootfs, {"/var/lib/cst": state, "/etc/cst": config}, env, "/")
    cst = image.config["Entrypoint"]

    def run(*argv: str) -> str:
        done = subprocess.run([*in_pod, *argv], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert run(*cst, "--version").strip() == f"cst {__version__}"
    assert "valid (0 instances, 1 accounts)" in run(*cst, "validate")
    # the certificates and time zones Debian's maintainer scripts would have set up
    checks = ("import ssl, zoneinfo; print(ssl.create_default_context().cert_store_stats()['x509_ca'],"
              " zoneinfo.ZoneInfo('Asia/Shanghai').key)")
    certificates, zone = run("/usr/bin/python3", "-c", checks).split()
    assert int(certificates) > 100 and zone == "Asia/Shanghai"



def _secret_volume(folder: Path, files: dict[str, str]) -> Path:
    """A folder laid out as the kubelet lays a Secret's volume: the files in a dated folder, ``..data``
    pointing at it, and each name a link through ``..data``."""
    dated = folder / "..2026_12_06_00_00_00.000000000"
    dated.mkdir(parents=True)
    for name, value in files.items():
        (dated / name).write_text(value)
        (folder / name).symlink_to(f"..data/{name}")
    (folder / "..data").symlink_to(dated.name)
    for path in (folder, dated, *dated.iterdir()):
        os.chmod(path, 0o755 if path.is_dir() else 0o444)
    return folder


def _with_port(args: list[str], port: int) -> list[str]:
    """A rendered container's arguments with its port in the pod (the Service's target) moved to a free
    one of this machine, listening on loopback: bubblewrap shares the host's network."""
    swapped = {"--port": str(port), "--listen": f"127.0.0.1:{port}", "--listenAddressIPv4": "127.0.0.1"}
    return [swapped.get(args[i - 1], arg) if i else arg for i, arg in enumerate(args)]


def test_the_rendered_pods_run_from_the_images(sillytavern_image: Image, cst_image: Image, sillytavern_root: Path,
                                                cst_root: Path, tmp_path: Path) -> None:
    """The objects `cst render kubernetes` makes, run from the images with the volumes they name: the
    instance's two init steps wire its new data dir, it starts with its rendered command, environment
    and mounts, and the pool (its ConfigMap's file, its Secrets' layout) takes the instance's key."""
    import yaml
    from click.testing import CliRunner

    from reconciler.cli import cli
    from reconciler.kubernetes import render as kubernetes

    desired = tmp_path / "desired.yaml"
    desired.write_text(textwrap.dedent(f"""\
        version: 1
        settings:
          sillytavern: {{version: "{RELEASE}"}}
          proxy: {{upstream: "http://127.0.0.1:9/v1"}}
        accounts:
          - {{name: pool, provider: static, keys_env: POOL_KEYS}}
        instances:
          - {{port: 8001}}
        """))
    rendered = CliRunner().invoke(cli, ["render", "kubernetes", "-f", str(desired)], catch_exceptions=False)
    objects = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(rendered.stdout) if o}
    pod_spec = objects[("StatefulSet", "st-instance-8001")]["spec"]["template"]["spec"]
    st_root = sillytavern_root
    roots = {sillytavern_image.tag: st_root, cst_image.tag: cst_root}
    key, password = "cst-rendered-pod-key", "rendered-pod-password"
    volumes = {"data": volume(tmp_path / "data"), "home": volume(tmp_path / "home"),
               "defaults": volume(tmp_path / "defaults"),
               "proxy-key": _secret_volume(tmp_path / "proxy-key", {kubernetes.PROXY_KEY_KEY: key})}

    def container_argv(container: dict) -> tuple[list[str], dict[str, str]]:
        root = roots[container["image"].rsplit(":", 1)[1]]
        binds = {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", []) if m["name"] != "tmp"}
        for path in binds:   # as a container runtime makes its mount points, before the root goes read-only
            (root / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
        env = {e["name"]: e.get("value", password) for e in container.get("env", [])}
        image = sillytavern_image if root is st_root else cst_image
        return pod(root, binds, {**image.env, **env}, container.get("workingDir", "/")), env

    for init in pod_spec["initContainers"]:
        argv, _ = container_argv(init)
        done = subprocess.run([*argv, *init["command"]], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (init["name"], done.stdout, done.stderr)
    settings = json.loads((volumes["data"] / "default-user" / "settings.json").read_text())
    assert settings["oai_settings"]["custom_url"] == "http://cst-pool:5100/v1"
    assert key in (volumes["data"] / "default-user" / "secrets.json").read_text()

    (port, pool_port) = free_ports(2)
    container = pod_spec["containers"][0]
    argv, env = container_argv(container)
    assert env["SILLYTAVERN_BASICAUTHUSER_USERNAME"] == "st-instance-8001"
    assert container["command"][0] == sillytavern_image.config["Entrypoint"][0] == str(sandbox.NODE)
    log = tmp_path / "st.log"
    started = time.monotonic()
    with running([*argv, *container["command"], *_with_port(container["args"], port)], log) as proc:
        health = f"http://127.0.0.1:{port}{HEALTH_PATH}"
        wait_until(lambda: get(health, ("st-instance-8001", password))[0] == 200 or proc.poll() is not None,
                   timeout=START, interval=0.1)
        assert proc.poll() is None, log.read_text()
        took = time.monotonic() - started
        assert get(health)[0] == 401   # basic auth is on
        said = re.sub(r"\x1b\[[0-9;]*m", "", log.read_text())   # webpack's colours
        # the prebuilt front end was read, not compiled again: nothing in the data dir, and webpack
        # found its cache (a compile takes ~18 s of CPU, and could not write into the read-only package)
        assert not (volumes["data"] / "_webpack").exists()
        compiled = re.search(r"compiled successfully in (\d+) ms", said)
        assert compiled and int(compiled[1]) < 5000, said
        assert took < 30, f"{took:.1f} s to answer: {said}"
    assert (volumes["home"] / "config.yaml").stat().st_uid == POD_UID   # written by the pod's uid in its volume

    pool = objects[("Deployment", "cst-pool")] if ("Deployment", "cst-pool") in objects \
        else objects[("StatefulSet", "cst-pool")]
    proxy = pool["spec"]["template"]["spec"]["containers"][0]
    config = tmp_path / "pool-config"
    config.mkdir()
    (config / "desired.yaml").write_text(objects[("ConfigMap", "cst-pool")]["data"]["desired.yaml"])
    state = volume(tmp_path / "pool-state")
    keys = _secret_volume(tmp_path / "instance-keys", {"st-instance-8001": key})
    mounts = {m["name"]: m["mountPath"] for m in proxy["volumeMounts"]}
    binds = {"/etc/cst": config, mounts["state"]: state, mounts["instance-keys"]: keys}
    for path in binds:
        (cst_root / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
    in_pod = pod(cst_root, binds, {**cst_image.env, "POOL_KEYS": "sk-pool", "CST_CLIENT_KEYS": "cst-client"}, "/")
    with running([*in_pod, *_with_port(proxy["command"], pool_port)], tmp_path / "pool.log") as proc:
        base = f"http://127.0.0.1:{pool_port}"
        wait_until(lambda: get(f"{base}/health")[0] == 200 or proc.poll() is not None, timeout=30)
        assert proc.poll() is None, (tmp_path / "pool.log").read_text()

        def models(bearer: str) -> int:
            request = urllib.request.Request(f"{base}/v1/models", headers={"Authorization": f"Bearer {bearer}"})
            try:
                with urllib.request.urlopen(request, timeout=10) as answer:
                    return answer.status
            except urllib.error.HTTPError as exc:
                return exc.code

        status, body = get(f"{base}/health")
        assert (status, json.loads(body)["status"]) == (200, "ok")
        assert models("cst-not-a-key") == 401
        assert models(key) != 401   # the instance's key, read from its Secret's layout (the upstream is away)
    assert (state / "proxy").is_dir()   # its ledger, written by the pod's uid
