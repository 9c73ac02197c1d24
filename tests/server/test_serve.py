"""`cst serve`: the daemon and its REST API, on the fast stand-in server."""
import asyncio
import hashlib
import io
import json
import os
import re
import signal
import ssl
import subprocess
import zipfile

import httpx
import psutil
import pytest

from conftest import Project, eventually, free_ports, http_status, serve_settings, standin_file, wait_until
from reconciler.desired.model import load
from reconciler.files import conditional_replace
from reconciler.runtime.statedir import StateDir

KEY = "review-admin-key"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def fleet_file(api_port: int, instances: list[tuple[int, str]], resync: str = "1s", header: str = "") -> str:
    return header + standin_file(instances, settings=serve_settings(api_port, resync))


def pid_of(served, id_: str) -> int | None:
    return served.api("GET", f"/api/instances/{id_}").json()["pid"]


def wait_answering(served, *ports: int) -> dict[int, int]:
    """Wait until the daemon's first pass is done and these instances answer; their pids."""
    wait_until(lambda: served.api("GET", "/api/status").json()["reconcile"]["lastRun"] is not None, timeout=30)
    wait_until(lambda: all(http_status(p) == 401 for p in ports), timeout=30)
    return {p: pid_of(served, f"st-instance-{p}") for p in ports}


def test_auth_is_required_and_messages_follow_the_language(project, serve):
    api, a = free_ports(2)
    project.write(fleet_file(api, [(a, "running")]))
    served = serve(api)
    assert httpx.get(served.url + "/health").json()["status"] == "ok"
    missing = httpx.get(served.url + "/api/instances")
    assert missing.status_code == 401 and missing.json() == {"error": "缺少管理员密钥", "code": "missing_admin_key"}
    wrong = httpx.get(served.url + "/api/instances?lang=en", headers={"X-ST-Admin-Key": "nope"})
    assert wrong.status_code == 401 and wrong.json() == {"error": "Invalid admin key", "code": "invalid_admin_key"}
    english = served.api("GET", "/api/instances/st-instance-1", headers={"Accept-Language": "en-GB,en;q=0.9"})
    assert english.status_code == 404 and english.json() == {"error": "Instance st-instance-1 not found", "code": "not_found"}
    chinese = served.api("GET", "/api/instances/st-instance-1?lang=zh", headers={"Accept-Language": "en"})
    assert chinese.json() == {"error": "实例不存在：st-instance-1", "code": "not_found"}
    assert served.api("GET", "/api/nothing").status_code == 404


def test_create_validation(project, serve):
    api, a, b = free_ports(3)
    project.write(fleet_file(api, [(a, "running")]))
    served = serve(api)
    before = project.file.read_text()
    cases = [({}, 400, "missing_port", "Missing port"), ({"port": None}, 400, "missing_port", "Missing port"),
             ({"port": 80}, 400, "invalid_port", "Invalid port 80: it must be an integer from 1024 to 65535"),
             ({"port": "x"}, 400, "invalid_port", "Invalid port x: it must be an integer from 1024 to 65535"),
             ({"port": True}, 400, "invalid_port", "Invalid port True: it must be an integer from 1024 to 65535"),
             ({"port": a}, 400, "port_declared", f"Port {a} is already used by st-instance-{a}"),
             ({"port": api}, 400, "reserved_port", f"Port {api} is already taken by settings.api.listen")]
    for body, status, code, error in cases:   # a client tells the four kinds of 400 apart by the code
        response = served.api("POST", "/api/instances?lang=en", json=body)
        assert (response.status_code, response.json()) == (status, {"error": error, "code": code}), body
    garbage = served.api("POST", "/api/instances?lang=en", content=b"{not json", headers={"Content-Type": "application/json"})
    assert garbage.status_code == 400 and garbage.json() == {"error": "The request body must be a JSON object", "code": "bad_body"}
    squatter = psutil.Popen(["python3", "-m", "http.server", str(b), "--bind", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: http_status(b) == 200)
        taken = served.api("POST", "/api/instances?lang=en", json={"port": b})
        assert (taken.status_code, taken.json()) == (400, {"error": f"Port {b} is already in use by another process",
                                                                "code": "port_in_use"})
    finally:
        squatter.kill()
        squatter.wait()
    assert project.file.read_text() == before


def test_reset_password_restarts_with_the_new_one(project, serve):
    api, a = free_ports(2)
    project.write(fleet_file(api, [(a, "running")]))
    served = serve(api)
    id_ = f"st-instance-{a}"
    wait_answering(served, a)
    old = project.cst("password", id_).stdout.strip()
    assert http_status(a, (id_, old)) == 200
    reset = served.api("POST", f"/api/instances/{id_}/reset-password")
    assert reset.status_code == 200 and set(reset.json()) == {"id", "password"}
    new = reset.json()["password"]
    assert new != old and len(new) == 36
    assert http_status(a, (id_, new)) == 200
    assert http_status(a, (id_, old)) == 401
    assert project.cst("password", id_).stdout.strip() == new


def test_restart_start_stop_and_backup(project, serve):
    api, a = free_ports(2)
    project.write(fleet_file(api, [(a, "running")]))
    served = serve(api)
    id_ = f"st-instance-{a}"
    first = wait_answering(served, a)[a]
    restarted = served.api("POST", f"/api/instances/{id_}/restart?lang=en")
    assert restarted.json() == {"id": id_, "status": "online", "message": "Instance restarted"}
    assert pid_of(served, id_) not in (None, first)
    stopped = served.api("POST", f"/api/instances/{id_}/stop?lang=en")
    assert stopped.json() == {"id": id_, "status": "stopped", "message": "Instance stopped"}
    assert "state: stopped" in project.file.read_text()
    assert served.api("POST", f"/api/instances/{id_}/restart?lang=en").status_code == 409
    started = served.api("POST", f"/api/instances/{id_}/start")
    assert started.json() == {"id": id_, "status": "online", "message": "实例已启动"}
    assert http_status(a) == 401

    marker = project.dir / "user-data" / str(a) / "default-user" / "chats" / "note.txt"
    marker.parent.mkdir(parents=True)
    marker.write_text("hello from a chat\n" * 1000)
    backup = served.api("GET", f"/api/instances/{id_}/backup")
    assert backup.status_code == 200 and backup.headers["Content-Type"] == "application/zip"
    assert backup.headers.get("Transfer-Encoding") == "chunked"
    names = zipfile.ZipFile(io.BytesIO(backup.content)).namelist()
    assert "default-user/chats/note.txt" in names and "default-user/starts.txt" in names
    assert zipfile.ZipFile(io.BytesIO(backup.content)).read("default-user/chats/note.txt") == marker.read_bytes()
    assert served.api("GET", "/api/instances/st-instance-1234/backup").status_code == 404


def test_twenty_concurrent_creates_and_a_hand_edit(project, serve):
    api, *ports = free_ports(21)
    project.write(fleet_file(api, [], header="# fleet managed through the API\n"))
    served = serve(api)

    async def create_all():
        async with httpx.AsyncClient(base_url=served.url, timeout=120,
                                     headers={"X-ST-Admin-Key": served.admin_key}) as client:
            async def hand_edit():
                # as a careful editor saves: atomically, and only over the version it opened
                # (vim warns "the file has been changed since reading it"), so it loses no change
                # of CST's either; the test is that CST loses none of the editor's
                # once the creates have begun to land in the file
                await eventually(lambda: any(f"port: {p}" in project.file.read_text() for p in ports), timeout=60)
                while True:
                    opened = project.file.read_bytes()
                    edited = opened.replace(b"# fleet managed through the API\n",
                                            b"# fleet managed through the API\n# edited by hand\n")
                    if conditional_replace(project.file, edited, expected=opened, mode=0o644):
                        return
            results = await asyncio.gather(*(client.post("/api/instances", json={"port": p}) for p in ports),
                                           hand_edit())
            return results[:-1]

    responses = asyncio.run(create_all())
    assert [r.status_code for r in responses] == [201] * 20, [r.text for r in responses if r.status_code != 201]
    assert {r.json()["id"] for r in responses} == {f"st-instance-{p}" for p in ports}
    text = project.file.read_text()
    for p in ports:
        assert len(re.findall(rf"port: {p}\b", text)) == 1
    assert "# edited by hand" in text, "a concurrent hand edit must not be lost"
    rows = served.api("GET", "/api/instances").json()
    assert sorted(r["port"] for r in rows) == sorted(ports) and {r["status"] for r in rows} == {"online"}
    assert all(http_status(p) == 401 for p in ports)


def test_garbage_in_the_file_changes_nothing_until_fixed(project, serve):
    api, a, b = free_ports(3)
    project.write(fleet_file(api, [(a, "running")]))
    served = serve(api)
    id_ = f"st-instance-{a}"
    pid = wait_answering(served, a)[a]
    good = project.file.read_text()
    project.file.write_text(good.replace("instances:", "instances:\n  - port: [oops\n"))
    status = wait_until(lambda: (s := served.api("GET", "/api/status").json())["file"]["valid"] is False and s)
    problem = status["file"]["problems"][0]
    assert problem["line"] >= 6 and problem["file"] == str(project.file) and "YAML syntax error" in problem["message"]
    refused = served.api("POST", "/api/instances?lang=en", json={"port": b})
    assert refused.status_code == 409 and refused.json()["error"].startswith("desired.yaml is invalid")
    assert "desired.yaml is invalid, keeping the last valid state" in served.log.read_text()
    # several resync periods later the instance still runs, untouched
    wait_until(lambda: served.api("GET", "/api/status").json()["reconcile"]["lastRun"] > status["reconcile"]["lastRun"])
    assert pid_of(served, id_) == pid and psutil.pid_exists(pid)
    project.file.write_text(good.replace("instances:\n", f"instances:\n  - port: {b}\n"))
    wait_until(lambda: http_status(b) == 401, timeout=20)
    assert served.api("GET", "/api/status").json()["file"]["valid"] is True
    assert pid_of(served, id_) == pid


def test_drift_is_repaired_and_a_restarted_daemon_adopts(project, serve):
    api, a, b = free_ports(3)
    # a resync period far longer than the test: the repair must come from watching the process exit
    project.write(fleet_file(api, [(a, "running"), (b, "running")], resync="60s"))
    served = serve(api)
    ids = [f"st-instance-{a}", f"st-instance-{b}"]
    killed = wait_answering(served, a, b)[a]
    os.kill(killed, signal.SIGKILL)
    wait_until(lambda: pid_of(served, ids[0]) not in (None, killed), timeout=15)
    wait_until(lambda: http_status(a) == 401)
    assert served.api("GET", f"/api/instances/{ids[0]}").json()["restarts"] == 1

    pids = {i: pid_of(served, i) for i in ids}
    served.proc.send_signal(signal.SIGKILL)
    served.proc.wait()
    again = serve(api, log_name="serve2.log")
    wait_until(lambda: again.api("GET", "/api/status").json()["reconcile"]["lastRun"] is not None)
    assert {i: pid_of(again, i) for i in ids} == pids, "instances are adopted, not restarted"
    assert "changed:" not in again.log.read_text()


def test_sigterm_leaves_instances_running_and_a_second_daemon_is_refused(project, serve):
    api, a = free_ports(2)
    project.write(fleet_file(api, [(a, "running")]))
    served = serve(api)
    wait_answering(served, a)
    second = serve(api, wait=False, log_name="second.log")
    assert second.proc.wait(20) == 2
    assert f"daemon.lock is held by pid {served.proc.pid}" in second.log.read_text()
    assert served.stop() == 0
    assert http_status(a) == 401, "instances outlive the daemon"


def test_a_crash_loop_backs_off_and_shows_errored(project, serve):
    api, a = free_ports(2)
    project.standin_knobs(a, {"exitCode": 7})
    project.write(fleet_file(api, [(a, "running")], resync="0.5s"))
    served = serve(api)
    row = wait_until(lambda: (r := served.api("GET", f"/api/instances/st-instance-{a}").json())["detail"] and r,
                     timeout=20)
    assert row["status"] == "errored"
    assert row["detail"].startswith("errored: failed ") and "next restart in" in row["detail"]
    starts_then = served.log.read_text().count("did not start")
    # held back: over the next two passes (resync 0.5s) at most one more attempt, not one per pass
    def last_pass() -> str:
        return served.api("GET", "/api/status").json()["reconcile"]["lastRun"]
    for _ in range(2):
        before = last_pass()
        wait_until(lambda: last_pass() != before, timeout=10)
    assert served.log.read_text().count("did not start") <= starts_then + 1


def test_max_memory_restarts_an_instance_that_grows(project, serve):
    api, a = free_ports(2)
    project.write(fleet_file(api, [(a, "running")], resync="0.3s").replace(
        f"  - port: {a}\n    state: running\n", f"  - port: {a}\n    state: running\n    max_memory: 1MiB\n"))
    served = serve(api)
    first = wait_answering(served, a)[a]
    wait_until(lambda: "stayed above max_memory 1 MiB" in served.log.read_text(), timeout=20)
    assert pid_of(served, f"st-instance-{a}") != first


def test_desired_can_be_replaced_with_if_match(project, serve):
    api, a = free_ports(2)
    project.write(fleet_file(api, []))
    served = serve(api)
    current = served.api("GET", "/api/desired").json()
    assert current["text"] == project.file.read_text() and current["valid"] is True
    new_text = current["text"].replace("instances: []", f"instances:\n  - port: {a}  # via PUT")
    assert served.api("PUT", "/api/desired", content=new_text).status_code == 428
    stale = served.api("PUT", "/api/desired?lang=en", content=new_text, headers={"If-Match": "0" * 64})
    assert stale.status_code == 412 and current["sha256"] in stale.json()["error"]
    invalid = served.api("PUT", "/api/desired?lang=en", content="version: 7\n", headers={"If-Match": current["sha256"]})
    assert invalid.status_code == 400 and "version: 7 is not supported" in invalid.json()["error"]
    ok = served.api("PUT", "/api/desired", content=new_text, headers={"If-Match": current["sha256"]})
    assert ok.status_code == 200 and project.file.read_text() == new_text
    assert http_status(a) == 401


def test_https_with_the_seed_flags(project, serve, tmp_path):
    trustme = pytest.importorskip("trustme")
    authority = trustme.CA()
    cert = authority.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    authority.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    (api,) = free_ports(1)
    project.write(fleet_file(api, []))
    serve(api, args=("--ssl=true", "--certPath", str(tmp_path / "cert.pem"), "--keyPath", str(tmp_path / "key.pem")),
          scheme="https")
    trusted = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    response = httpx.get(f"https://127.0.0.1:{api}/api/instances", headers={"X-ST-Admin-Key": "test-admin-key"},
                         verify=trusted)
    assert response.status_code == 200 and response.json() == []


def test_the_proxy_in_serve_follows_the_accounts_in_the_file(project, serve):
    api, proxy = free_ports(2)
    settings = (f'resync: 1s\napi: {{listen: "127.0.0.1:{api}"}}\n'
                f'proxy: {{listen: "127.0.0.1:{proxy}", client_keys_env: CLIENT_KEYS}}')
    base = standin_file([], settings=settings)
    project.write(base + "accounts:\n  - {name: first, provider: static, keys_env: FIRST_KEYS}\n")
    project.env["FIRST_KEYS"] = "sk-first-aaaaaaaaaaaa,sk-first-bbbbbbbbbbbb"
    project.env["SECOND_KEYS"] = "sk-second-cccccccccccc"
    project.env["CLIENT_KEYS"] = "client-key-1"
    serve(api)
    assert httpx.get(f"http://127.0.0.1:{proxy}/status").status_code == 401   # closed: no instance key yet

    def pool_status() -> dict:
        return httpx.get(f"http://127.0.0.1:{proxy}/status", headers={"Authorization": "Bearer client-key-1"}).json()
    status = pool_status()
    assert set(status["accounts"]) == {"first"} and status["keys"]["total"] == 2
    assert "sk-first-aaaaaaaaaaaa" not in json.dumps(status), "keys are shown masked"
    project.write(base + "accounts:\n  - {name: first, provider: static, keys_env: FIRST_KEYS}\n"
                         "  - {name: second, provider: static, keys_env: SECOND_KEYS}\n")
    wait_until(lambda: set(pool_status()["accounts"]) == {"first", "second"})
    assert pool_status()["keys"]["total"] == 3


def test_https_from_settings_and_apply_beside_the_daemon(project, serve, tmp_path):
    trustme = pytest.importorskip("trustme")
    authority = trustme.CA()
    issued = authority.issue_cert("127.0.0.1")
    issued.private_key_and_cert_chain_pem.write_to_path(str(project.dir / "api.pem"))
    issued.private_key_pem.write_to_path(str(project.dir / "api.key"))
    authority.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    api, a, b = free_ports(3)
    text = fleet_file(api, [(a, "running")]).replace(
        f'api: {{listen: "127.0.0.1:{api}"}}', f'api: {{listen: "127.0.0.1:{api}", tls: {{cert: api.pem, key: api.key}}}}')
    project.write(text)
    serve(api, scheme="https")
    trusted = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    rows = httpx.get(f"https://127.0.0.1:{api}/api/instances", headers={"X-ST-Admin-Key": "test-admin-key"},
                     verify=trusted).json()
    assert [r["id"] for r in rows] == [f"st-instance-{a}"]
    # CI runs `cst apply` while the daemon runs: they take turns on the state dir and agree
    wait_until(lambda: http_status(a) == 401)
    project.write(text.replace(f"  - port: {a}\n    state: running\n",
                               f"  - port: {a}\n    state: running\n  - port: {b}\n    state: running\n"))
    applied = project.cst("apply")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    wait_until(lambda: http_status(b) == 401)
    assert project.cst("apply").stdout.strip().splitlines()[-1] == "ok=2 changed=0 failed=0"


def proxy_status(port: int, key: str) -> int:
    return httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code


def test_rotating_and_deleting_take_a_key_away_at_once(project, serve):
    api, proxy, a, b, c = free_ports(5)
    settings = f'resync: 1s\napi: {{listen: "127.0.0.1:{api}"}}\nproxy: {{listen: "127.0.0.1:{proxy}"}}'
    project.write(standin_file([(a, "running"), (b, "running"), (c, "running")], settings=settings,
                               extra_instance={c: {"proxy": "false"}})
                  + "accounts:\n  - {name: main, provider: static, keys_env: POOL_KEYS}\n")
    project.env["POOL_KEYS"] = "sk-pool-aaaaaaaaaaaa"   # no upstream answers: 502 is "the key was accepted"
    served = serve(api)
    wait_answering(served, a, b, c)
    keys = project.state_dir / "secrets" / "proxy-keys"
    key_a, key_b = ((keys / f"st-instance-{p}").read_text().strip() for p in (a, b))
    assert proxy_status(proxy, key_a) == 502 and proxy_status(proxy, "cst-made-up") == 401

    rotated = served.api("POST", f"/api/instances/st-instance-{a}/rotate-key?lang=en")
    assert rotated.status_code == 200, rotated.text
    body = rotated.json()
    new = (keys / f"st-instance-{a}").read_text().strip()
    assert body == {"id": f"st-instance-{a}", "key": new[:5] + "…" + new[-4:],
                    "message": f"st-instance-{a} has a new proxy key; the old one no longer works"}
    assert proxy_status(proxy, key_a) == 401 and proxy_status(proxy, new) == 502
    off = served.api("POST", f"/api/instances/st-instance-{c}/rotate-key?lang=en")
    assert off.status_code == 409 and off.json() == {"error": f"st-instance-{c} has proxy: false, so it has no proxy key",
                                                      "code": "proxy_off"}
    assert served.api("POST", "/api/instances/st-instance-1/rotate-key").status_code == 404

    deleted = served.api("DELETE", f"/api/instances/st-instance-{a}")
    assert deleted.status_code == 200
    denied = httpx.get(f"http://127.0.0.1:{proxy}/v1/models", headers={"Authorization": f"Bearer {new}"})
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    assert proxy_status(proxy, key_b) == 502
    # the last instance with a key deleted (c has proxy: false): the key table is empty, still closed
    assert served.api("DELETE", f"/api/instances/st-instance-{b}").status_code == 200
    assert proxy_status(proxy, key_b) == 401
    assert httpx.get(f"http://127.0.0.1:{proxy}/v1/models").status_code == 401


def test_an_instance_that_stops_answering_its_health_check_is_restarted(project, serve):
    api, a = free_ports(2)
    project.write(fleet_file(api, [(a, "running")], resync="0.3s"))
    served = serve(api)
    wait_answering(served, a)
    sick = wait_until(lambda: pid_of(served, f"st-instance-{a}"))
    started = (project.dir / "user-data" / str(a) / "default-user" / "starts.txt").read_text().split()
    # alive, listening, but its health route answers 503
    project.standin_knobs(a, {"sickStart": started[-1]})
    wait_until(lambda: "restarted: not answering its health check (3 in a row: its health route answered "
                       "HTTP 503)" in served.log.read_text(), timeout=30)
    assert pid_of(served, f"st-instance-{a}") not in (None, sick)
    assert served.api("GET", f"/api/instances/st-instance-{a}").json()["restarts"] == 1


def test_put_repairs_a_broken_file_judged_against_the_last_valid_state(project: Project, serve) -> None:
    api, port = free_ports(2)
    project.write(standin_file([(port, "running")], settings=serve_settings(api)))
    served = serve(api, admin_key=KEY)
    wait_until(lambda: http_status(port) == 401, timeout=30)
    good = project.file.read_text()
    broken = good + "instances: [\n"
    project.file.write_text(broken)
    wait_until(lambda: not served.api("GET", "/api/status").json()["file"]["valid"], timeout=10)

    # a restricted change is still refused, judged against the last valid state
    sneaky = good.replace("settings:\n", "settings:\n  data_root: /etc\n", 1)
    refused = served.api("PUT", "/api/desired?lang=en", content=sneaky, headers={"If-Match": sha(broken)})
    assert refused.status_code == 403 and "settings.data_root" in refused.text
    assert project.file.read_text() == broken

    # the repair itself goes through (it was a 500 with a traceback)
    repaired = served.api("PUT", "/api/desired", content=good, headers={"If-Match": sha(broken)})
    assert repaired.status_code == 200, repaired.text
    assert project.file.read_text() == good and served.api("GET", "/api/status").json()["file"]["valid"]
    assert http_status(port) == 401


def test_if_match_compares_strongly_and_star_matches_the_current_file(project: Project, serve) -> None:
    api, = free_ports(1)
    project.write(standin_file([], settings=serve_settings(api)))
    served = serve(api, admin_key=KEY)
    text = project.file.read_text()
    changed = text + "# one\n"

    weak = served.api("PUT", "/api/desired", content=changed, headers={"If-Match": f'W/"{sha(text)}"'})
    assert weak.status_code == 412 and project.file.read_text() == text   # a weak tag never matches
    listed = served.api("PUT", "/api/desired", content=changed, headers={"If-Match": f'"{"0" * 64}", "{sha(text)}"'})
    assert listed.status_code == 200 and project.file.read_text() == changed
    star = served.api("PUT", "/api/desired", content=changed + "# two\n", headers={"If-Match": "*"})
    assert star.status_code == 200 and project.file.read_text().endswith("# two\n")


def test_rotate_key_while_another_cst_holds_the_state_dir_is_a_504_naming_it(project: Project, serve) -> None:
    api, port = free_ports(2)
    settings = serve_settings(api).replace(f'api: {{listen: "127.0.0.1:{api}"}}',
                                           f'api: {{listen: "127.0.0.1:{api}", timeout: 2s}}')
    project.write(standin_file([(port, "running")], settings=settings))
    served = serve(api, admin_key=KEY)
    wait_until(lambda: http_status(port) == 401, timeout=30)
    key_file = project.state_dir / "secrets" / "proxy-keys" / f"st-instance-{port}"
    before = key_file.read_text()
    with StateDir(project.state_dir).lock(timeout=5):   # as a long `cst apply` would
        answer = served.api("POST", f"/api/instances/st-instance-{port}/rotate-key?lang=en")
    assert answer.status_code == 504, answer.text   # was a 500: LockHeld escaped
    assert "not rotated" in answer.json()["error"] and f"pid {os.getpid()}" in answer.json()["error"]
    assert key_file.read_text() == before
    assert served.api("POST", f"/api/instances/st-instance-{port}/rotate-key").status_code == 200


def test_get_desired_answers_for_a_deeply_nested_file(project: Project, serve) -> None:
    api, = free_ports(1)
    project.write(standin_file([], settings=serve_settings(api)))
    served = serve(api, admin_key=KEY)
    deep = project.file.read_text() + "extra: " + "[" * 5000 + "]" * 5000 + "\n"
    project.file.write_text(deep)
    wait_until(lambda: not served.api("GET", "/api/status").json()["file"]["valid"], timeout=10)
    answer = served.api("GET", "/api/desired")
    assert answer.status_code == 200, answer.text   # was a 500: RecursionError in the plain YAML parser
    assert answer.json()["valid"] is False and answer.json()["instances"] == {}
    assert any("nest" in p for p in answer.json()["problems"]), answer.json()["problems"]


def test_a_hand_edit_of_the_state_dir_waits_for_a_restart_and_status_says_so(project: Project, serve) -> None:
    api, port = free_ports(2)
    text = standin_file([(port, "running")], settings=serve_settings(api))
    project.write(text)
    served = serve(api, admin_key=KEY)
    id_ = f"st-instance-{port}"
    wait_until(lambda: http_status(port) == 401, timeout=30)
    elsewhere = project.dir / "elsewhere"
    project.write(text.replace("settings:\n", f"settings:\n  state_dir: {elsewhere}\n", 1))

    def restart_noted() -> bool:
        return served.api("GET", "/api/status").json()["daemon"]["restartNeeded"] == ["settings.state_dir"]
    wait_until(restart_noted, timeout=15)
    before = served.api("GET", "/api/status").json()["reconcile"]["lastRun"]
    wait_until(lambda: served.api("GET", "/api/status").json()["reconcile"]["lastRun"] != before, timeout=15)
    # the passes keep the state dir cst serve started with: the instance is still its own, not
    # "port taken by another process", and nothing was written to the new one
    assert served.api("GET", f"/api/instances/{id_}").json()["status"] == "online"
    status = served.api("GET", "/api/status").json()
    assert status["reconcile"]["recap"]["failed"] == 0, status["reconcile"]
    assert not elsewhere.exists()
    project.write(text)   # put back: nothing waits for a restart any more
    wait_until(lambda: served.api("GET", "/api/status").json()["daemon"]["restartNeeded"] == [], timeout=15)


async def test_liveness_resolves_launch_specs_off_the_loop(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from reconciler.engine.results import Report, Result
    from reconciler.runtime.base import Observed
    from reconciler.runtime.health import HealthChecks
    from reconciler.runtime.local import LocalRuntime
    from reconciler.server import liveness
    (port,) = free_ports(1)
    project.write(standin_file([(port, "running")]))
    desired = load(project.file)
    me = os.getpid()
    import psutil
    seen = Observed(f"st-instance-{port}", port, "running", me, create_time=psutil.Process(me).create_time())
    report = Report(results=[Result(seen.id, "ok")], observed={seen.id: seen})
    threads = []
    real = LocalRuntime.launch_spec

    def launch_spec(self, spec):
        threads.append(threading.current_thread())
        return real(self, spec)
    monkeypatch.setattr(LocalRuntime, "launch_spec", launch_spec)
    checks = HealthChecks()
    try:
        answers = await liveness.check(LocalRuntime(desired, readonly=True, checks=checks), desired, report)
    finally:
        await checks.close()
    assert answers[seen.id] and "could not be reached" in answers[seen.id]   # nobody listens there
    assert threads and threading.main_thread() not in threads
