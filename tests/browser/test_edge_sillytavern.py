"""Two real SillyTavern 1.19.0 instances behind the edge, in one chromium, over TLS (settings.edge).

One `cst serve` puts A and B behind nginx at ``https://<id>.st.test:<port>`` (a trustme CA's
certificate for ``*.st.test``); chromium maps every ``*.st.test`` name to 127.0.0.1
(``--host-resolver-rules``). B parks when unused (``park_after``) and is parked when the browser
first visits it: that visit wakes it through cst serve's gate.

Chromium is made to accept the test certificate by pinning its key
(``--ignore-certificate-errors-spki-list``, the SHA-256 of the certificate's public key), not by
``ignore_https_errors``: any other certificate (a wrong name nginx would never serve, a key that
is not the test's) is still refused. Trusting the CA itself would take an NSS database
(``certutil``, not installed here) in a HOME of chromium's own.

Basic auth for two origins in one context: Playwright's ``http_credentials`` is one user and
password for the whole context (or for one ``origin``), and the instances' users and passwords
differ. Each page therefore sends its own ``Authorization`` header (``set_extra_http_headers``
of that page), with every request it makes: nginx never has to ask (no 401 round trip), and one
page's credentials never reach the other's host. Cookies stay the context's: one jar, kept per
host, which is what must keep the two instances' sessions and CSRF tokens apart.
"""
from __future__ import annotations

import base64
import hashlib
import os
import ssl
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from conftest import Project, fake_upstream, free_ports, kill_all, start_serve, wait_until

from .conftest import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS

pytestmark = pytest.mark.sillytavern

DOMAIN = "st.test"
POOL_KEY = "sk-good-edge-aaaa1111"
ANSWER = "w0 w1 w2 w3 w4"   # what the fake upstream streams back


def spki_pin(cert_pem: bytes) -> str:
    """What ``--ignore-certificate-errors-spki-list`` takes: base64 of the SHA-256 of the public key."""
    key = x509.load_pem_x509_certificate(cert_pem).public_key()
    return base64.b64encode(hashlib.sha256(key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).digest()).decode()


@pytest.fixture(scope="module")
def edge_project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    with fake_upstream() as upstream:
        folder = tmp_path_factory.mktemp("edge")
        ca = trustme.CA()
        leaf = ca.issue_cert(f"*.{DOMAIN}")
        ca.cert_pem.write_to_path(str(folder / "ca.pem"))
        leaf.private_key_pem.write_to_path(str(folder / "key.pem"))
        for blob in leaf.cert_chain_pems:
            blob.write_to_path(str(folder / "cert.pem"), append=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CST_")}
        if "CST_SILLYTAVERN_HOME" in os.environ:
            env["CST_SILLYTAVERN_HOME"] = os.environ["CST_SILLYTAVERN_HOME"]
        project = Project(folder, {**env, "POOL_KEYS": POOL_KEY})
        api, proxy, edge, a, b = free_ports(5)
        project.write(f"""\
            version: 1
            settings:
              resync: 2s
              sillytavern: {{version: "1.19.0", start_timeout: 300}}
              api: {{listen: "127.0.0.1:{api}"}}
              proxy: {{listen: "127.0.0.1:{proxy}", upstream: "{upstream.url}/v1"}}
              edge: {{listen: "127.0.0.1:{edge}", domain: {DOMAIN}, tls: {{cert: cert.pem, key: key.pem}}}}
            accounts:
              - {{name: main, provider: static, keys_env: POOL_KEYS}}
            instances:
              - port: {a}
              - {{port: {b}, park_after: 6s}}
            """)
        served = start_serve(project, api)
        try:
            yield {"project": project, "served": served, "edge": edge, "a": f"st-instance-{a}",
                   "b": f"st-instance-{b}", "ca": folder / "ca.pem",
                   "pin": spki_pin(leaf.cert_chain_pems[0].bytes())}
        finally:
            served.stop()
            kill_all(project.state_dir.resolve())


@pytest.fixture(scope="module")
def edge_browser(edge_project):
    """Chromium resolving every *.st.test to loopback and accepting the test certificate's key."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            *CHROMIUM_ARGS, f"--host-resolver-rules=MAP *.{DOMAIN} 127.0.0.1",
            f"--ignore-certificate-errors-spki-list={edge_project['pin']}"])
        yield launched
        launched.close()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_two_instances_behind_the_edge_in_one_browser(edge_project, edge_browser) -> None:
    project: Project = edge_project["project"]
    served, port, a, b = edge_project["served"], edge_project["edge"], edge_project["a"], edge_project["b"]

    def observed(id_: str) -> str:
        return served.api("GET", f"/api/instances/{id_}").json()["observed"]

    def url(id_: str) -> str:
        return f"https://{id_}.{DOMAIN}:{port}/"

    wait_until(lambda: observed(a) == "running", timeout=120, interval=0.5)
    wait_until(lambda: observed(b) == "parked", timeout=60, interval=0.5)   # never used: parked at once

    # without credentials: nginx's 401, and B stays parked
    with httpx.Client(verify=ssl.create_default_context(cafile=edge_project["ca"]), timeout=10) as client:
        for id_ in (a, b):
            answer = client.get(f"https://127.0.0.1:{port}/", headers={"Host": f"{id_}.{DOMAIN}"},
                                extensions={"sni_hostname": f"{id_}.{DOMAIN}"})
            assert answer.status_code == 401, (id_, answer.status_code, answer.text)
    assert observed(b) == "parked", "a request without credentials wakes nothing"

    context = edge_browser.new_context(viewport={"width": 1280, "height": 800}, locale="en-US")
    forbidden: list[str] = []
    said: list[str] = []
    context.on("response", lambda r: forbidden.append(f"{r.status} {r.request.method} {r.url}")
               if r.status in (401, 403) else None)

    def open_page(id_: str):
        page = context.new_page()
        page.set_extra_http_headers({"Authorization": basic(id_, project.cst("password", id_).stdout.strip())})
        page.on("console", lambda m: said.append(f"{id_} {m.type}: {m.text}"))
        return page

    def ready(page, timeout: float = 120_000) -> None:
        greeting = page.locator(".popup-button-ok:visible")   # a new user names their persona first
        connected = page.locator("#send_but:not(.displayNone)")   # shown once SillyTavern reached its API
        greeting.or_(connected).first.wait_for(timeout=timeout)
        if greeting.count():
            greeting.first.click()
        connected.wait_for(timeout=60_000)

    def chat(page, message: str) -> None:
        page.fill("#send_textarea", message)
        page.click("#send_but")
        page.locator('#chat .mes[is_user="true"] .mes_text', has_text=message).wait_for(timeout=30_000)
        page.locator('#chat .mes[is_user="false"] .mes_text', has_text=ANSWER).last.wait_for(timeout=60_000)

    try:
        # A: sign in, chat through the pool, reload, the chat is still there
        page_a = open_page(a)
        page_a.goto(url(a), timeout=120_000)
        ready(page_a)
        chat(page_a, "Hello A, from the edge")
        # SillyTavern saves the chat again once the answer has streamed in: reloaded before that, the
        # page would rightly show the message without its answer
        data_a = project.dir / "user-data" / a.rsplit("-", 1)[1]
        wait_until(lambda: any("Hello A, from the edge" in text and ANSWER in text
                               for text in (p.read_text() for p in data_a.rglob("*.jsonl"))), timeout=30)
        page_a.reload(timeout=120_000)
        ready(page_a)
        recent = page_a.locator(".recentChat")   # the welcome screen lists the chat just written
        said_before = page_a.locator('#chat .mes[is_user="true"] .mes_text', has_text="Hello A, from the edge")
        recent.or_(said_before).first.wait_for(timeout=60_000)
        if not said_before.count():
            recent.first.click()
        said_before.wait_for(timeout=30_000)
        page_a.locator('#chat .mes[is_user="false"] .mes_text', has_text=ANSWER).first.wait_for(timeout=30_000)

        # B, in a second page of the same context: the visit wakes it
        assert observed(b) == "parked"
        page_b = open_page(b)
        page_b.goto(url(b), timeout=120_000)
        assert observed(b) == "running", "woken by the visit"
        ready(page_b)
        chat(page_b, "Hello B, just woken")
        ARTIFACTS.mkdir(exist_ok=True)
        page_b.locator("#toast-container .toast").first.wait_for(state="detached", timeout=30_000)   # not over the chat
        page_b.screenshot(path=str(ARTIFACTS / "edge-b.png"))

        # back to A: its session and CSRF token are its own still
        page_a.bring_to_front()
        chat(page_a, "Back to A")
        page_a.screenshot(path=str(ARTIFACTS / "edge-a.png"))

        # the session cookie and its signature (``.sig``) per host
        sessions = [c for c in context.cookies() if c["name"].startswith("session-") and not c["name"].endswith(".sig")]
        assert sorted(c["domain"] for c in sessions) == sorted(f"{id_}.{DOMAIN}" for id_ in (a, b)), sessions
        # 1.19.0 names it after the machine (``os.hostname()`` in src/users.js), so both instances use
        # one name: only the browser's keeping cookies per host (no leading dot: host-only) keeps them apart
        assert all(not c["domain"].startswith(".") for c in sessions), sessions
        assert len({c["value"] for c in sessions}) == 2, "a session of its own on each host"
        assert forbidden == [], forbidden
        assert not [line for line in said if "csrf" in line.lower() or "403" in line], said
        for page in (page_a, page_b):
            assert "csrf" not in page.locator("#toast-container").all_inner_texts().__str__().lower()
    finally:
        context.close()
