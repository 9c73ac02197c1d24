"""Parking the real SillyTavern release and waking it from a browser (issue 19).

A user chats, closes the tab and goes away; the instance is parked (no process, its port held by
cst serve). When they come back, the browser's first request with their credentials wakes it,
they log in and find the chat they wrote, and the data dir is as they left it but for what
SillyTavern itself writes when it starts.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from conftest import Project, fake_upstream, free_ports, kill_all, start_serve, wait_until
from reconciler.runtime.processes import port_is_free

pytestmark = pytest.mark.sillytavern

MESSAGE = "Remember the lighthouse at Dunmore"
POOL_KEY = "sk-good-parked-aaaa1111"


def contents(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the digest of its content."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


# what SillyTavern writes into its data dir when it starts or a page is loaded: its logs, its
# caches, the stats it collects, the settings the page saves, and the compiled front end
_ITS_OWN = ("access.log", "content.log", "_cache/", "_webpack/", "_storage/", "default-user/stats.json",
            "default-user/settings.json", "default-user/backups/", "cookie-secret.txt")


@pytest.fixture(scope="module")
def parked_project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Project, int, int, object]]:
    with fake_upstream() as upstream:
        folder = tmp_path_factory.mktemp("parked")
        env = {k: v for k, v in os.environ.items() if not k.startswith("CST_")}
        if "CST_SILLYTAVERN_HOME" in os.environ:
            env["CST_SILLYTAVERN_HOME"] = os.environ["CST_SILLYTAVERN_HOME"]
        project = Project(folder, {**env, "POOL_KEYS": POOL_KEY})
        api, proxy, port = free_ports(3)
        project.write(f"""\
            version: 1
            settings:
              resync: 2s
              sillytavern: {{version: "1.19.0", start_timeout: 300, park_after: 4s}}
              api: {{listen: "127.0.0.1:{api}"}}
              proxy: {{listen: "127.0.0.1:{proxy}", upstream: "{upstream.url}/v1"}}
            accounts:
              - {{name: main, provider: static, keys_env: POOL_KEYS}}
            instances:
              - port: {port}
            """)
        install = project.cst("st", "install", timeout=900)
        assert install.returncode == 0, install.stdout + install.stderr
        served = start_serve(project, api)
        try:
            yield project, port, api, served
        finally:
            served.stop()
            kill_all(project.state_dir.resolve())


def test_a_parked_instance_wakes_for_its_user_with_their_chat(parked_project, new_page) -> None:
    project, port, _, served = parked_project
    id_ = f"st-instance-{port}"
    credentials = {"username": id_, "password": project.cst("password", id_).stdout.strip()}

    def observed() -> str:
        return served.api("GET", f"/api/instances/{id_}").json()["observed"]

    # a user chats, then closes the tab
    recorded = new_page(http_credentials=credentials)
    page = recorded.page
    page.goto(f"http://127.0.0.1:{port}/", timeout=300_000)
    greeting = page.locator(".popup-button-ok:visible")   # a new user names their persona first
    connected = page.locator("#send_but:not(.displayNone)")   # shown once SillyTavern reached its API
    greeting.or_(connected).first.wait_for(timeout=120_000)
    if greeting.count():
        greeting.first.click()
    connected.wait_for(timeout=60_000)
    page.fill("#send_textarea", MESSAGE)
    page.click("#send_but")
    page.locator('#chat .mes[is_user="false"] .mes_text', has_text="w0 w1 w2 w3 w4").last.wait_for(timeout=60_000)
    data_dir = project.dir / "user-data" / str(port)
    # the chat saved with its answer (SillyTavern saves it again once the answer has streamed in)
    chat = wait_until(lambda: next((p for p in data_dir.rglob("*.jsonl")
                                    if MESSAGE in p.read_text() and "w0 w1 w2 w3 w4" in p.read_text()), None),
                      timeout=30)
    # the page saves its settings (the persona just named among them) 1 s after a change, and never
    # when the tab closes first: saved now, and answered, as a user's tab left open a second would
    with page.expect_response(lambda answer: answer.url.endswith("/api/settings/save") and answer.ok):
        page.evaluate("async () => (await import('/script.js')).saveSettings()")
    recorded.context.close()

    # parked: no process, the port held by cst serve
    wait_until(lambda: observed() == "parked", timeout=60, interval=0.5)
    row = served.api("GET", f"/api/instances/{id_}").json()
    assert row["pid"] is None and row["status"] == "online"
    assert not port_is_free("127.0.0.1", port)
    before = contents(data_dir)
    assert httpx.get(f"http://127.0.0.1:{port}/", timeout=10).status_code == 401
    assert observed() == "parked", "a request without credentials wakes nothing"

    # they come back: the browser's first request wakes it, and their chat is there
    recorded = new_page(http_credentials=credentials)
    page = recorded.page
    page.goto(f"http://127.0.0.1:{port}/", timeout=120_000)
    assert served.api("GET", f"/api/instances/{id_}").json()["pid"] is not None, "woken by the page"
    recent = page.locator(".recentChat")   # the welcome screen's recent chats: the one written before
    recent.first.wait_for(timeout=60_000)
    recent.first.click()   # parked again meanwhile (park_after: 4s), this request wakes it again
    page.locator('#chat .mes[is_user="true"] .mes_text', has_text=MESSAGE).wait_for(timeout=30_000)
    page.locator('#chat .mes[is_user="false"] .mes_text', has_text="w0 w1 w2 w3 w4").last.wait_for(timeout=30_000)
    recorded.screenshot("parked-woken-chat-en")

    after = contents(data_dir)
    changed = sorted(name for name in before if after.get(name) != before[name]
                     and not name.startswith(_ITS_OWN))
    assert changed == [], f"files changed by the park and wake: {changed}"
    assert after[str(chat.relative_to(data_dir))] == before[str(chat.relative_to(data_dir))]
