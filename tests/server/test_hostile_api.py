"""`cst serve`'s REST API against hostile input: every bad request is a 4xx with {"error": ...}
and changes nothing; guessers are slowed down; the admin key cannot change what runs or is read."""
from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys

import httpx
import pytest

from conftest import Project, free_ports, http_status, serve_settings, standin_file, wait_until

KEY = "test-admin-key"


def raw(port: int, method: str, target: str, body: bytes | None = None, headers: dict | None = None,
        key: str | bytes | None = KEY) -> tuple[int, dict]:
    """One request sent exactly as written (no client-side normalisation of the path)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        if key is not None:
            conn.putheader("X-ST-Admin-Key", key)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        conn.putheader("Content-Length", str(len(body or b"")))
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def snapshot(project, served) -> tuple[str, list]:
    rows = served.api("GET", "/api/instances").json()
    return project.file.read_text(), [(r["id"], r["pid"], r["status"]) for r in rows]


BAD_IDS = ["..%2F..%2Fetc", "../../etc/passwd", "%2F", "st-instance-8001%00", "st-instance-1;rm%20-rf%20~",
           "st-instance-%24(id)", "st-instance-`id`", "st-instance-%EF%BC%98%EF%BC%90%EF%BC%90%EF%BC%91",  # ８００１
           "st-instance-" + "9" * 5000, "%ZZ", "st-instance-08001"]
BAD_PORTS = ["8001.0", "0x1f41", " 8001", "８００１", "", 8001.5, -8001, 0, 65536, 22, 1023, [8001], {"port": 8001},
             True, False, None, 1e308]
NOT_OBJECTS = [b"[8001]", b'"8001"', b"8001", b"null", b"true", b"{not json", b"\xff\xfe", b""]


def test_bad_input_is_a_4xx_with_an_error_and_changes_nothing(project, serve):
    api, port = free_ports(2)
    project.write(standin_file([(port, "running")], settings=serve_settings(api)))
    served = serve(api)
    wait_until(lambda: http_status(port) == 401, timeout=30)
    wait_until(lambda: served.api("GET", f"/api/instances/st-instance-{port}").json()["pid"], timeout=30)
    before = snapshot(project, served)
    seen: list[tuple[str, int]] = []

    def check(what: str, status: int, body: object) -> None:
        seen.append((what, status))
        assert 400 <= status < 500 and isinstance(body, dict) and isinstance(body.get("error"), str), (what, status, body)

    for bad in BAD_IDS:
        for method, suffix in (("GET", ""), ("DELETE", ""), ("POST", "/stop"), ("POST", "/start"),
                               ("POST", "/restart"), ("POST", "/reset-password"), ("GET", "/backup")):
            check(f"{method} {bad[:40]}{suffix}", *raw(api, method, f"/api/instances/{bad}{suffix}?lang=en"))
    for bad_port in BAD_PORTS:
        check(f"port {bad_port!r}", *raw(api, "POST", "/api/instances?lang=en", json.dumps({"port": bad_port}).encode(),
                                    {"Content-Type": "application/json"}))
    for not_object in NOT_OBJECTS:
        check(f"body {not_object!r}", *raw(api, "POST", "/api/instances", not_object,
                                           {"Content-Type": "application/json"}))
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        check(content_type, *raw(api, "POST", "/api/instances?lang=en", json.dumps({"port": port + 1}).encode(),
                                 {"Content-Type": content_type}))
    check("3 MiB body", *raw(api, "POST", "/api/instances", b"{" + b" " * (3 << 20) + b"}",
                             {"Content-Type": "application/json"}))
    check("3 MiB desired", *raw(api, "PUT", "/api/desired", b"#" * (3 << 20), {"If-Match": "x"}))
    status, body = raw(api, "POST", "/api/instances?lang=en", b'{"port": "x"}', {"Content-Type": "application/json"})
    assert body == {"error": "Invalid port x: it must be an integer from 1024 to 65535", "code": "invalid_port"}

    assert snapshot(project, served) == before, "the file and every instance are unchanged"
    assert len(seen) > 100
    assert "Traceback" not in served.log.read_text()


def test_wrong_keys_are_limited_per_address(project, serve):
    api, port = free_ports(2)
    project.write(standin_file([], settings=serve_settings(api)))
    served = serve(api)
    statuses, retry_after = [], None
    for _ in range(60):
        response = httpx.get(served.url + "/api/instances?lang=en", headers={"X-ST-Admin-Key": "guess"})
        statuses.append(response.status_code)
        if response.status_code == 429:
            retry_after = int(response.headers["Retry-After"])
            assert response.json()["error"].startswith("Too many wrong admin keys")
    assert statuses[0] == 401 and 429 in statuses
    assert statuses.count(401) <= 10, "a guesser gets at most a burst of tries"
    assert retry_after and retry_after >= 1
    # while limited, even the right key from that address is refused: a guess cannot be told right
    assert served.api("GET", "/api/instances").status_code == 429
    zh = httpx.get(served.url + "/api/instances", headers={"X-ST-Admin-Key": "guess"})
    assert zh.status_code == 429 and "错误管理员密钥过多" in zh.json()["error"]
    # the right key from another address is not affected
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2")) as other:
        assert other.get(served.url + "/api/instances", headers={"X-ST-Admin-Key": KEY}).status_code == 200
        assert other.get(served.url + "/api/instances", headers={"X-ST-Admin-Key": "nope"}).status_code == 401
    assert served.log.read_text().count("too many wrong admin keys from 127.0.0.1") == 1, "logged once per burst"


def test_an_admin_key_that_is_not_utf8_is_a_401_not_a_500(project, serve):
    (api,) = free_ports(1)
    project.write(standin_file([], settings=serve_settings(api)))
    served = serve(api)
    status, body = raw(api, "GET", "/api/instances?lang=en", key=b"\xff\xfe\x80")
    assert (status, body) == (401, {"error": "Invalid admin key", "code": "invalid_admin_key"})
    assert "Traceback" not in served.log.read_text()


@pytest.mark.parametrize("old, new, field", [
    ("sillytavern: {server: ", "sillytavern: {server: /tmp/evil.js, x: ", "settings.sillytavern.server"),
    ("proxy: {listen: ", "proxy: {upstream: 'https://attacker.example/v1', listen: ", "settings.proxy.upstream"),
    ("settings:\n", "settings:\n  data_root: /etc\n", "settings.data_root"),
    # what an instance sees of the machine, and as whom it runs
    ("stop_timeout: 3}", "stop_timeout: 3, sandbox: {enabled: false}}", "settings.sillytavern.sandbox"),
    ("stop_timeout: 3}", "stop_timeout: 3, users: {isolate: false}}", "settings.sillytavern.users"),
])
def test_the_api_cannot_change_what_runs_or_is_read(project, serve, old, new, field):
    (api,) = free_ports(1)
    project.write(standin_file([], settings=serve_settings(api)))
    served = serve(api)
    current = served.api("GET", "/api/desired").json()
    text = current["text"].replace(old, new, 1)
    if ", x: " in text:  # the stand-in's path is dropped: only the new one remains
        line = next(line for line in text.splitlines() if ", x: " in line)
        text = text.replace(line, line.split(", x: ")[0] + ", " + line.split(", ", 2)[2])
    assert text != current["text"]
    refused = served.api("PUT", "/api/desired?lang=en", content=text, headers={"If-Match": current["sha256"]})
    assert refused.status_code == 403, refused.text
    assert field in refused.json()["error"] and "through git" in refused.json()["error"]
    assert project.file.read_text() == current["text"]


def test_the_admin_key_is_printed_only_when_generated(project):
    (api,) = free_ports(1)
    project.write(standin_file([], settings=serve_settings(api)))
    for run in range(2):
        proc = subprocess.Popen([sys.executable, "-m", "reconciler", "serve", "-f", str(project.file)],
                                cwd=project.dir, env=project.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        out = ""
        try:
            for line in proc.stdout:  # until it serves
                out += line
                if "API on" in line:
                    break
            proc.send_signal(signal.SIGINT)
            out += proc.communicate(timeout=60)[0]
        finally:
            if proc.poll() is None:  # it did not stop: never leave it running
                proc.kill()
                proc.wait()
        key = (project.state_dir / "secrets" / "admin.key").read_text().strip()
        if run == 0:
            assert f"generated and kept in {project.state_dir.resolve() / 'secrets' / 'admin.key'}" in out
            assert key in out
        else:
            assert key not in out, "a kept key is not printed again"
            assert "using the admin key kept in" in out


def test_the_api_refuses_plain_http_beyond_loopback(project):
    (api,) = free_ports(1)
    project.write(standin_file([], settings=f'api: {{listen: "0.0.0.0:{api}"}}'))
    refused = project.cst("serve", timeout=60)
    assert refused.returncode == 1 and "without TLS" in refused.stderr and "insecure_http" in refused.stderr
    project.write(standin_file([], settings="proxy: {upstream: 'http://10.1.2.3/v1'}"))
    warned = project.cst("validate")
    assert warned.returncode == 0
    assert "warning:" in warned.stderr and "settings.proxy.upstream: 'http://10.1.2.3/v1' is plain http" in warned.stderr


def test_behind_a_trusted_reverse_proxy_one_guesser_locks_out_only_itself(project: Project, serve) -> None:
    api, = free_ports(1)
    settings = serve_settings(api).replace(f'api: {{listen: "127.0.0.1:{api}"}}',
                                           f'api: {{listen: "127.0.0.1:{api}", trusted_proxies: [127.0.0.1]}}')
    project.write(standin_file([], settings=settings))
    served = serve(api, admin_key=KEY)
    guesser, colleague = {"X-Forwarded-For": "203.0.113.7"}, {"X-Forwarded-For": "198.51.100.9, 203.0.113.8"}
    answers = [served.api("GET", "/api/status", headers={**guesser, "X-ST-Admin-Key": f"guess-{i}"}).status_code
               for i in range(30)]
    assert answers[-1] == 429 and answers.count(401) >= 10
    assert served.api("GET", "/api/status", headers=colleague).status_code == 200   # was 429 for everyone
    assert served.api("GET", "/api/status", headers=guesser).status_code == 429
