"""End to end with the real SillyTavern release from the npm registry (marker: sillytavern)."""
import os
import signal
from pathlib import Path

import psutil
import pytest

from conftest import SANDBOXED, free_ports, http_status, wait_until
from reconciler.runtime import sandbox, sillytavern

pytestmark = pytest.mark.sillytavern


def gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_real_sillytavern_lifecycle(project):
    a, b = free_ports(2)
    ids = {a: f"st-instance-{a}", b: f"st-instance-{b}"}

    def write(ports):
        body = "".join(f"  - port: {p}\n" for p in ports)
        project.write("version: 1\nsettings:\n  sillytavern: {version: \"1.19.0\", start_timeout: 180}\n"
                      "instances:\n" + body)

    write([a, b])
    install = project.cst("st", "install", timeout=900)
    assert install.returncode == 0, install.stdout + install.stderr
    assert "sillytavern 1.19.0 at " in install.stdout

    first = project.cst("apply")
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.strip().splitlines()[-1] == "ok=0 changed=2 failed=0"
    passwords = {p: project.cst("password", ids[p]).stdout.strip() for p in (a, b)}
    for p in (a, b):
        assert http_status(p) == 401
        assert http_status(p, (ids[p], passwords[p])) == 200
        assert http_status(p, (ids[p], passwords[b if p == a else a])) == 401
    status = project.status()
    assert {status[ids[p]]["status"] for p in (a, b)} == {"running"}
    # the front end came prebuilt: inside a container SillyTavern reads the install's own build,
    # elsewhere cst copied that build into the new data root before the first start
    prebuilt = sillytavern.release_of("1.19.0", project.state_dir).prebuilt_webpack
    assert prebuilt.is_dir() and any(prebuilt.iterdir())
    prefilled = project.dir / "user-data" / str(a) / "_webpack"
    assert prefilled.is_dir() == (not SANDBOXED and not sillytavern.looks_like_container())

    again = project.cst("apply")
    assert again.stdout.strip().splitlines()[-1] == "ok=2 changed=0 failed=0"

    data_a = project.dir / "user-data" / str(a)
    cookie = (data_a / "cookie-secret.txt").read_text()
    killed = project.record(ids[a])["pid"]
    os.kill(killed, signal.SIGKILL)
    wait_until(lambda: project.status()[ids[a]]["status"] == "crashed")
    repaired = project.cst("apply")
    assert f"changed: {ids[a]} (restarted: process had exited)" in repaired.stdout
    assert http_status(a, (ids[a], passwords[a])) == 200
    assert (data_a / "cookie-secret.txt").read_text() == cookie
    status = project.status()
    assert status[ids[a]]["status"] == "running" and status[ids[a]]["restarts"] == 1
    assert status[ids[a]]["pid"] != killed

    pid_b = project.record(ids[b])["pid"]
    write([a])
    removed = project.cst("apply")
    assert f"changed: {ids[b]} (removed; data archived in " in removed.stdout
    wait_until(lambda: gone(pid_b))
    assert not (project.dir / "user-data" / str(b)).exists()
    [archived] = list((project.state_dir / "archive").iterdir())
    assert archived.name.startswith(ids[b]) and (archived / "cookie-secret.txt").exists()
    status = project.status()
    assert ids[b] not in status and status[ids[a]]["status"] == "running"


def test_seed_usage_example_over_http(project, serve):
    """The seed README's curl session (create, list, stop, delete) against `cst serve`."""
    import re
    from datetime import datetime, timezone

    import httpx

    api, proxy, port = free_ports(3)
    project.write(f'version: 1\nsettings:\n  sillytavern: {{version: "1.19.0", start_timeout: 180}}\n'
                  f'  api: {{listen: "127.0.0.1:{api}"}}\n  proxy: {{listen: "127.0.0.1:{proxy}"}}\ninstances: []\n')
    assert project.cst("st", "install", timeout=900).returncode == 0
    serve(api, admin_key="your-secret-admin-key")
    headers = {"X-ST-Admin-Key": "your-secret-admin-key", "Content-Type": "application/json"}
    url = f"http://localhost:{api}"
    id_ = f"st-instance-{port}"

    created = httpx.post(f"{url}/api/instances", headers=headers, json={"port": port}, timeout=300)
    assert created.status_code == 201, created.text
    body = created.json()
    assert set(body) == {"id", "port", "dataDir", "status", "startTime", "password"}
    assert body["id"] == id_
    assert body["port"] == port
    assert body["dataDir"] == str(project.dir / "user-data" / str(port))
    assert body["status"] == "running"
    started = datetime.fromisoformat(body["startTime"].replace("Z", "+00:00"))
    assert abs((datetime.now(timezone.utc) - started).total_seconds()) < 300
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", body["password"])
    assert http_status(port) == 401 and http_status(port, (id_, body["password"])) == 200
    assert f"port: {port}" in project.file.read_text()

    listed = httpx.get(f"{url}/api/instances", headers=headers)
    assert listed.status_code == 200
    [row] = listed.json()
    assert {k: row[k] for k in ("id", "port", "status", "startTime", "dataDir")} == {
        "id": id_, "port": port, "status": "online", "startTime": body["startTime"], "dataDir": body["dataDir"]}

    stopped = httpx.post(f"{url}/api/instances/{id_}/stop", headers=headers, timeout=120)
    assert stopped.status_code == 200
    assert stopped.json() == {"id": id_, "status": "stopped", "message": "实例已停止"}
    assert http_status(port) == 0
    assert httpx.get(f"{url}/api/instances/{id_}", headers=headers).json()["status"] == "stopped"

    deleted = httpx.delete(f"{url}/api/instances/{id_}", headers=headers, timeout=120)
    assert deleted.status_code == 200
    message = deleted.json()["message"]
    assert message.startswith("实例已删除")
    archive = deleted.json()["archive"]
    assert archive in message and (project.state_dir / "archive").resolve() == Path(archive).parent
    assert (Path(archive) / "cookie-secret.txt").exists(), "the data was archived, not deleted"
    assert httpx.get(f"{url}/api/instances", headers=headers).json() == []
    assert f"port: {port}" not in project.file.read_text()


def test_the_overlay_in_the_real_release(project, tmp_path):
    """The plugin's health route through basic auth; verify and apply refuse an altered overlay file."""
    import json
    import shutil

    import httpx

    from reconciler.runtime import overlay

    a, b, proxy = free_ports(3)   # nothing listens on the proxy's port
    id_ = f"st-instance-{a}"
    head = ('version: 1\nsettings:\n  sillytavern: {version: "1.19.0", start_timeout: 300}\n'
            f'  proxy: {{listen: "127.0.0.1:{proxy}"}}\n')
    project.write(head + f"instances:\n  - port: {a}\n")
    install = project.cst("st", "install", timeout=900)
    assert install.returncode == 0, install.stdout + install.stderr
    assert project.cst("st", "verify").returncode == 0
    applied = project.cst("apply")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    password = project.cst("password", id_).stdout.strip()
    url = f"http://127.0.0.1:{a}/api/plugins/cst/health"
    assert httpx.get(url).status_code == 401
    health = httpx.get(url, auth=(id_, password))
    assert health.status_code == 200, health.text
    body = health.json()
    assert body["version"] == "1.19.0" and body["instance"] == id_ and body["status"] == "ok"
    assert body["dataRoot"] == str(sandbox.DATA if SANDBOXED else project.dir / "user-data" / str(a))
    assert body["memory"]["rss"] > 50 * 2**20 and body["uptime"] > 0
    # the relay answers even with no proxy running, and says so
    pool = httpx.get(f"http://127.0.0.1:{a}/api/plugins/cst/pool", auth=(id_, password)).json()
    assert pool["proxy"] == {"state": "down", "url": f"http://127.0.0.1:{proxy}/v1", "message": "ECONNREFUSED"}
    # wired on its first start, with its own key
    user = project.dir / "user-data" / str(a) / "default-user"
    settings = json.loads((user / "settings.json").read_text())
    assert (settings["main_api"], settings["oai_settings"]["chat_completion_source"],
            settings["oai_settings"]["custom_url"]) == ("openai", "custom", f"http://127.0.0.1:{proxy}/v1")
    key = (project.state_dir / "secrets" / "proxy-keys" / id_).read_text().strip()
    assert [s["value"] for s in json.loads((user / "secrets.json").read_text())["api_key_custom"]] == [key]

    # alter one overlay file, in a copy of the install (hard links: only the replaced file is new)
    shared = sillytavern.install_home(project.state_dir)
    copy = tmp_path / "home"
    shutil.copytree(shared / "1.19.0", copy / "1.19.0", symlinks=True, copy_function=os.link)
    altered = copy / "1.19.0" / "node_modules" / "sillytavern" / "plugins" / "cst" / "index.mjs"
    altered.unlink()   # never write through the link into the shared install
    altered.write_text(overlay.overlay_files()["plugins/cst/index.mjs"].decode() + "\n// altered\n")
    env = {"CST_SILLYTAVERN_HOME": str(copy)}
    verify = project.cst("st", "verify", env=env)
    assert verify.returncode == 2
    assert "failed: plugins/cst/index.mjs: changed since it was laid (sha256 " in verify.stderr
    project.write(head + f"instances:\n  - port: {a}\n  - port: {b}\n")
    refused = project.cst("apply", env=env)
    assert refused.returncode == 2
    reason = "sillytavern 1.19.0 fails verification: plugins/cst/index.mjs: changed since it was laid"
    assert f"failed: sillytavern 1.19.0 ({reason}" in refused.stdout
    assert f"failed: st-instance-{b} (sillytavern 1.19.0 is not ready: {reason}" in refused.stdout
    assert http_status(b) == 0, "nothing was started from the altered package"
    assert http_status(a, (id_, password)) == 200, "and what ran keeps running"
    assert project.cst("st", "verify").returncode == 0, "the shared install was not touched"
