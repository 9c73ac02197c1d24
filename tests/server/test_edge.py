"""The edge (issue 26), on the stand-in: every instance at https://<id>.<domain> through nginx.

One `cst serve` with ``settings.edge`` on loopback and a certificate from a test CA: host names
reach their instance over TLS (and a name nobody declared reaches none), credentials are checked
at the edge (without them a 401, and a parked instance stays parked), wrong passwords are limited
per client address *and* instance, ``X-Forwarded-For`` counts only from a trusted proxy, and a
cookie an instance sets for the parent domain is narrowed to its own host. Then `cst serve` is
stopped and started again while pages load through the edge and a chat streams at the pool: not
one request fails. Then thousands of idle and header-drip connections: users still get in, and
the edge closes them. Then an attacker under another uid cannot take an instance's address.
"""
from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import trustme

from conftest import Project, fake_upstream, free_ports, standin_file, wait_until
from reconciler.desired.model import Listen
from reconciler.runtime import edge
from reconciler.runtime.edge_config import Entrance, Layout, Route, render

DOMAIN = "st.test"
POOL_KEY = "sk-good-edge-0000000001"


def password(project, port: int) -> str:
    """The instance's password, once its first pass generated it."""
    path = project.state_dir / "secrets" / f"st-instance-{port}.password"
    wait_until(path.exists, timeout=30)
    return path.read_text().strip()


def starts(project, port: int) -> list[str]:
    path = project.dir / "user-data" / str(port) / "default-user" / "starts.txt"
    return path.read_text().split() if path.exists() else []


class Edge:
    """Requests to host names at the edge's address, without DNS: SNI and Host say the name."""

    def __init__(self, port: int, ca: Path):
        self.port = port
        # a connection per request: each says its own name in its TLS handshake
        self.client = httpx.Client(verify=ssl.create_default_context(cafile=str(ca)), timeout=30,
                                   limits=httpx.Limits(max_keepalive_connections=0))

    def get(self, name: str, path: str = "/", auth: tuple[str, str] | None = None, **headers: str) -> httpx.Response:
        return self.client.get(f"https://127.0.0.1:{self.port}{path}", auth=auth,
                               headers={"Host": f"{name}:{self.port}", **headers},
                               extensions={"sni_hostname": name})

    def answers(self, name: str, auth: tuple[str, str]) -> bool:
        """Whether the instance at ``name`` answers 200 (the edge may not listen yet)."""
        try:
            return self.get(name, auth=auth).status_code == 200
        except httpx.HTTPError:
            return False


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path, Path]:
    ca = trustme.CA()
    issued = ca.issue_cert(f"*.{DOMAIN}", "alice.example.org")
    cert, key, ca_file = tmp_path / "edge.pem", tmp_path / "edge.key", tmp_path / "ca.pem"
    issued.private_key_pem.write_to_path(str(key))
    cert.write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
    ca.cert_pem.write_to_path(str(ca_file))
    return cert, key, ca_file


@dataclass
class EdgeFleet:
    """Instances a (also at alice.example.org) and b (``park_after: 2s``) behind an edge on loopback,
    a key pool on a fake upstream beside them; ``ready`` once cst serve runs."""

    project: Project
    certificate: tuple[Path, Path, Path]
    upstream: str

    def __post_init__(self) -> None:
        self.api, self.proxy, self.edge_port, self.a, self.b = free_ports(5)
        self.name_a, self.name_b = f"st-instance-{self.a}.{DOMAIN}", f"st-instance-{self.b}.{DOMAIN}"
        self.at = Edge(self.edge_port, self.certificate[2])
        self.project.env["POOL_KEYS"] = POOL_KEY
        self.write()

    def write(self, trusted: str = "[]") -> None:
        cert, key, _ = self.certificate
        self.project.write(standin_file(
            [(self.a, "running"), (self.b, "running")],
            settings=(f'resync: 1s\napi: {{listen: "127.0.0.1:{self.api}", trusted_proxies: {trusted}}}\n'
                      f'proxy: {{listen: "127.0.0.1:{self.proxy}", upstream: "{self.upstream}/v1"}}\n'
                      f'edge: {{listen: "127.0.0.1:{self.edge_port}", domain: {DOMAIN}, '
                      f'tls: {{cert: {cert}, key: {key}}}}}'),
            extra_instance={self.a: {"hosts": "[alice.example.org]"}, self.b: {"park_after": "2s"}}) +
            "accounts:\n  - {name: main, provider: static, keys_env: POOL_KEYS}\n")

    def ready(self) -> None:
        """The instances' credentials (made by the first pass), and a answering through the edge."""
        self.auth_a = (f"st-instance-{self.a}", password(self.project, self.a))
        self.auth_b = (f"st-instance-{self.b}", password(self.project, self.b))
        wait_until(lambda: self.at.answers(self.name_a, self.auth_a), timeout=30)


def test_host_names_credentials_and_limits_at_the_edge(project, serve, certificate):
    with fake_upstream() as upstream:
        fleet = EdgeFleet(project, certificate, upstream.url)
        served = serve(fleet.api)
        fleet.ready()
        at, a, b, edge_port = fleet.at, fleet.a, fleet.b, fleet.edge_port
        name_a, name_b, auth_a, auth_b = fleet.name_a, fleet.name_b, fleet.auth_a, fleet.auth_b

        # each name reaches its instance over TLS; its own port too, through the same checks
        assert f"stand-in SillyTavern on {a}" in at.get(name_a, auth=auth_a).text
        assert f"stand-in SillyTavern on {a}" in at.get("alice.example.org", auth=auth_a).text
        assert httpx.get(f"http://127.0.0.1:{a}/", auth=auth_a, timeout=10).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{a}/", timeout=10).status_code == 401
        # an absolute-form target and Expect: 100-continue are answered as HTTP says (the edge's parser)
        login = base64.b64encode(f"{auth_a[0]}:{auth_a[1]}".encode()).decode()
        with socket.create_connection(("127.0.0.1", a), timeout=10) as raw:
            raw.sendall(f"GET http://127.0.0.1:{a}/ HTTP/1.1\r\nHost: 127.0.0.1:{a}\r\nAuthorization: Basic {login}\r\n"
                        "Connection: close\r\n\r\n".encode())
            assert raw.recv(64).startswith(b"HTTP/1.1 200")
        with socket.create_connection(("127.0.0.1", a), timeout=10) as raw:
            raw.sendall(f"POST /standin/say HTTP/1.1\r\nHost: 127.0.0.1:{a}\r\nAuthorization: Basic {login}\r\n"
                        "Expect: 100-continue\r\nContent-Length: 5\r\nConnection: close\r\n\r\n".encode())
            said = raw.recv(25)
            assert said.startswith(b"HTTP/1.1 100 Continue")   # before the body is sent
            raw.sendall(b"hello")
            while chunk := raw.recv(4096):
                said += chunk
            assert b"\r\n\r\nHTTP/1.1 204" in said
        # a name nobody declared reaches no instance: no certificate, no answer
        with pytest.raises(httpx.ConnectError):
            at.get(f"nobody.{DOMAIN}")
        # one instance's credentials do not open another
        assert at.get(name_b, auth=auth_a).status_code == 401

        # b is parked: without credentials a 401 from the edge, and it is not woken
        wait_until(lambda: served.api("GET", f"/api/instances/st-instance-{b}").json()["observed"] == "parked",
                   timeout=15)
        bare = at.get(name_b)
        assert bare.status_code == 401 and bare.headers["WWW-Authenticate"].startswith("Basic")
        assert starts(project, b) == []
        woken = at.get(name_b, auth=auth_b)
        assert woken.status_code == 200 and f"stand-in SillyTavern on {b}" in woken.text
        assert len(starts(project, b)) == 1

        # the rows, cst status and the page's data name each instance's URL
        rows = {row["id"]: row for row in served.api("GET", "/api/instances").json()}
        assert rows[f"st-instance-{a}"]["url"] == f"https://{name_a}:{edge_port}"
        assert f"https://{name_b}:{edge_port}" in project.cst("status").stdout

        # SillyTavern's own DNS-rebinding guard is on, with the instance's names
        record = project.record(f"st-instance-{a}")
        environ = psutil.Process(record["pid"]).environ()
        assert environ["SILLYTAVERN_HOSTWHITELIST_ENABLED"] == "true"
        assert json.loads(environ["SILLYTAVERN_HOSTWHITELIST_HOSTS"]) == [name_a, "alice.example.org"]

        # a cookie for the parent domain is narrowed to the instance's own host
        tossed = at.get(name_a, f"/standin/cookie?domain={DOMAIN}", auth=auth_a)
        assert tossed.headers["Set-Cookie"] == f"tossed=1; Domain={name_a}; Path=/"

        # wrong passwords: limited per address and instance; the right one from that address still passes
        wrong = [at.get(name_a, auth=(auth_a[0], f"guess-{i}")).status_code for i in range(14)]
        assert wrong[:10] == [401] * 10 and wrong[-1] == 429
        assert at.get(name_a, auth=auth_a).status_code == 200
        assert at.get(name_b, auth=(auth_b[0], "guess")).status_code == 401, "another instance is not affected"

        # X-Forwarded-For is believed only from a trusted proxy: here loopback is not one, so the
        # header changes nothing; once it is, each client behind it has a limit of its own
        assert at.get(name_a, auth=(auth_a[0], "guess"), **{"X-Forwarded-For": "10.0.0.9"}).status_code == 429
        fleet.write(trusted='["127.0.0.1"]')
        wait_until(lambda: at.get(name_a, auth=(auth_a[0], "guess"), **{"X-Forwarded-For": "10.0.0.9"}).status_code
                   == 401, timeout=15)
        limited = [at.get(name_a, auth=(auth_a[0], "guess"), **{"X-Forwarded-For": "10.0.0.8"}).status_code
                   for _ in range(12)]
        assert limited[-1] == 429
        assert at.get(name_a, auth=(auth_a[0], "guess"), **{"X-Forwarded-For": "10.0.0.7"}).status_code == 401


def test_a_restart_of_cst_serve_is_invisible_to_users(project, serve, certificate):
    """SIGTERM to cst serve and a new one, while a page is asked for again and again through the
    edge and a chat streams at the pool: every request answered, the stream whole, and the edge
    and the pool the same processes before and after."""
    with fake_upstream(chunks=150, slow_gap=0.1) as upstream:
        fleet = EdgeFleet(project, certificate, upstream.url)
        api, proxy, a, b = fleet.api, fleet.proxy, fleet.a, fleet.b
        served = serve(api)
        fleet.ready()
        at, name_a, name_b, auth_a, auth_b = fleet.at, fleet.name_a, fleet.name_b, fleet.auth_a, fleet.auth_b
        wait_until(lambda: served.api("GET", f"/api/instances/st-instance-{b}").json()["observed"] == "parked",
                   timeout=15)
        nginx = edge.master_pid(edge.Paths(project.state_dir.resolve()))
        key_a = (project.state_dir / "secrets" / "proxy-keys" / f"st-instance-{a}").read_text().strip()

        answers: list[int] = []
        stop = threading.Event()

        def pages() -> None:
            while not stop.is_set():
                answers.append(at.get(name_a, auth=auth_a).status_code)

        chunks: list[str] = []

        def chat() -> None:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{proxy}/v1", api_key=key_a, max_retries=0, timeout=120)
            for chunk in client.chat.completions.create(model="slow-stream", stream=True,
                                                        messages=[{"role": "user", "content": "go on"}]):
                chunks.extend(choice.delta.content or "" for choice in chunk.choices)

        loader, streamer = threading.Thread(target=pages), threading.Thread(target=chat)
        loader.start()
        streamer.start()
        try:
            wait_until(lambda: len(chunks) >= 10 and len(answers) >= 10, timeout=30)
            served.proc.send_signal(signal.SIGTERM)
            assert served.proc.wait(timeout=60) == 0
            during = len(answers)
            # the gap: a parked instance cannot be woken; its user gets a 503 with Retry-After
            away = at.get(name_b, auth=auth_b)
            assert away.status_code == 503 and int(away.headers["Retry-After"]) >= 1
            wait_until(lambda: len(answers) >= during + 10, timeout=30)   # pages go on meanwhile
            served = serve(api)
            wait_until(lambda: at.get(name_b, auth=auth_b).status_code == 200, timeout=30)
            streamer.join(timeout=60)
            assert not streamer.is_alive()
        finally:
            stop.set()
            loader.join(timeout=30)
        assert len(chunks) >= 150, f"the stream was cut after {len(chunks)} pieces"
        assert answers and set(answers) == {200}, f"{len(answers)} requests: {sorted(set(answers))}"
        assert edge.master_pid(edge.Paths(project.state_dir.resolve())) == nginx


def test_idle_and_dripping_connections_do_not_keep_users_out(project, serve, certificate):
    """2,000 connections that send nothing and 500 that drip a header a byte at a time: a user's
    page still loads through the edge, the API and the pool still answer, and the edge closes them."""
    with fake_upstream() as upstream:
        fleet = EdgeFleet(project, certificate, upstream.url)
        served = serve(fleet.api)
        fleet.ready()
        at, a, proxy, edge_port = fleet.at, fleet.a, fleet.proxy, fleet.edge_port
        name_a, auth_a = fleet.name_a, fleet.auth_a

        idle = [socket.create_connection(("127.0.0.1", edge_port)) for _ in range(2000)]
        drips = [socket.create_connection(("127.0.0.1", a)) for _ in range(500)]
        try:
            for sock in drips:
                sock.sendall(b"GET / HTTP/1.1\r\n")
            for sock in idle + drips:
                sock.setblocking(False)
            stop = threading.Event()

            def drip() -> None:
                while not stop.wait(1.0):
                    for sock in drips:
                        with contextlib.suppress(OSError):
                            sock.send(b"X")

            dripper = threading.Thread(target=drip)
            dripper.start()
            try:
                assert at.get(name_a, auth=auth_a).status_code == 200
                assert httpx.get(f"http://127.0.0.1:{a}/", auth=auth_a, timeout=10).status_code == 200
                assert served.api("GET", "/health").status_code == 200
                models = httpx.get(f"http://127.0.0.1:{proxy}/v1/models", timeout=10,
                                   headers={"Authorization": f"Bearer {POOL_KEY}"})
                assert models.status_code in (200, 401)   # the pool answers (a pool key is no caller's key)

                def closed(sock: socket.socket) -> bool:
                    try:
                        return sock.recv(1) == b""
                    except BlockingIOError:
                        return False
                    except OSError:
                        return True
                wait_until(lambda: all(closed(sock) for sock in idle), timeout=30, interval=0.5)
                wait_until(lambda: all(closed(sock) for sock in drips), timeout=30, interval=0.5)
            finally:
                stop.set()
                dripper.join(timeout=10)
        finally:
            for sock in idle + drips:
                sock.close()


ATTACKER = """
import select, socket, sys, time
paths, ports, until = sys.argv[1].split(","), [int(p) for p in sys.argv[2].split(",")], time.time() + float(sys.argv[3])
taken, heard, held = [], [], []
while time.time() < until:
    for path in paths:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.bind(path); s.listen(); taken.append(path); held.append(s)
        except OSError:
            s.close()
    for port in ports:
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port)); s.listen(); taken.append(port); held.append(s)
        except OSError:
            s.close()
    for s in select.select(held, [], [], 0.01)[0]:
        conn, _ = s.accept(); conn.settimeout(1); heard.append(conn.recv(4096).decode(errors="replace"))
print(repr((taken, heard)))
"""
ATTACKER_PYTHON = "/usr/bin/python3"   # the test's own may lie in a folder closed to nobody


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists(ATTACKER_PYTHON), reason="another uid needs root")
def test_another_uid_cannot_take_an_instance_address(project, serve):
    """An attacker running as nobody tries, a hundred times a second, to bind the socket a parked
    instance answers on behind the edge, that instance's port, and the port of an instance on its
    own while that one starts (slowly: the stand-in waits 2 s before it listens); then the parked
    one is woken, just as slowly. The attacker takes nothing and hears no request or credential:
    CST opened each address before node started, and the edge's folder is closed to it."""
    api, parked, direct = free_ports(3)
    project.write(standin_file([(parked, "running"), (direct, "running")], settings=f'resync: 1s\napi: {{listen: '
                               f'"127.0.0.1:{api}"}}', extra_instance={parked: {"park_after": "2s"}}))
    project.standin_knobs(direct, {"startDelayMs": 2000})
    project.standin_knobs(parked, {"startDelayMs": 2000})
    socket_path = edge.Paths(project.state_dir.resolve()).socket(f"st-instance-{parked}")
    served = serve(api, wait=False)
    # the direct one spawned (its record names node) but not listening yet: the attack begins
    wait_until(lambda: (project.state_dir / "instances" / f"st-instance-{direct}.json").exists()
               and project.record(f"st-instance-{direct}")["pid"], timeout=30)
    attacker = subprocess.Popen([ATTACKER_PYTHON, "-c", ATTACKER, str(socket_path), f"{parked},{direct}", "8"],
                                user="nobody", group="nogroup", stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        wait_until(lambda: served.api("GET", "/health").status_code == 200, timeout=30)
        direct_auth = (f"st-instance-{direct}", password(project, direct))
        assert httpx.get(f"http://127.0.0.1:{direct}/", auth=direct_auth, timeout=30).status_code == 200
        wait_until(lambda: served.api("GET", f"/api/instances/st-instance-{parked}").json()["observed"] == "parked",
                   timeout=15)
        auth = (f"st-instance-{parked}", password(project, parked))
        answer = httpx.get(f"http://127.0.0.1:{parked}/", auth=auth, timeout=30)
        assert answer.status_code == 200 and f"stand-in SillyTavern on {parked}" in answer.text
        said, _ = attacker.communicate(timeout=30)
    finally:
        attacker.kill()
        attacker.wait()
    assert said.strip() == "([], [])", f"the attacker took or heard {said}"
    # nor can it ask node directly: the sockets' folder is root's and the edge's alone
    probe = subprocess.run([ATTACKER_PYTHON, "-c", f"import socket; socket.socket(socket.AF_UNIX).connect("
                            f"{str(socket_path)!r})"], user="nobody", group="nogroup", capture_output=True, text=True,
                           cwd="/")
    assert probe.returncode != 0 and "PermissionError" in probe.stderr


def route(port: int, password: str = "pw", names: tuple[str, ...] = (), own_port: bool = True) -> Route:
    """An instance's route at the edge, as tests/unit/test_edge_config.py makes them."""
    id_ = f"st-instance-{port}"
    return Route(id_, names, Listen("127.0.0.1", port) if own_port else None, f"{id_}:{password}",
                 Path(f"/run/cst/x/sockets/{id_}.sock"))


@pytest.mark.skipif(shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(), reason="no nginx")
def test_nginx_accepts_what_is_rendered(tmp_path):
    """nginx -t on a rendered configuration with TLS, names, ports and trusted proxies."""
    import trustme
    issued = trustme.CA().issue_cert("*.st.test")
    issued.private_key_pem.write_to_path(str(tmp_path / "k.pem"))
    issued.cert_chain_pems[0].write_to_path(str(tmp_path / "c.pem"))
    layout = Layout(tmp_path / "tmp", tmp_path / "gate.sock", tmp_path / "use.sock", tmp_path / "nobody", None)
    (tmp_path / "tmp").mkdir()
    config = render([route(port, names=(f"st-instance-{port}.st.test",)) for port in range(8001, 8201)], layout,
                    Entrance(Listen("127.0.0.1", 8443), tmp_path / "c.pem", tmp_path / "k.pem", Listen("127.0.0.1", 8080)),
                    (ipaddress.ip_network("127.0.0.1/32"),), 20000)
    (tmp_path / "nginx.conf").write_text(config)
    done = subprocess.run(["/usr/sbin/nginx", "-t", "-q", "-p", f"{tmp_path}/", "-c", str(tmp_path / "nginx.conf"),
                           "-e", str(tmp_path / "error.log")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
