"""Every instance chats through the pool out of the box: the real SillyTavern release with CST's
overlay, in a real browser, against local fakes of the DaiDai platform and of the upstream.

One fleet (``cst serve`` with two instances, each with a budget) serves the whole module: a
SillyTavern start costs seconds of CPU. The tests run in file order; the last one deletes an instance.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import psutil
import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from conftest import ROOT, Project, free_ports, kill_all, start_serve, wait_until
from proxy.pool import mask

sys.path.insert(0, str(ROOT / "tests" / "proxy"))   # the fakes live beside the proxy's tests
from fakes import FakeDaiDai, FakeUpstream, daidai_key

pytestmark = pytest.mark.sillytavern

POOL = [daidai_key("sk-good-aaaaaaaaaaaa1111", "12.50", "3.20"),
        daidai_key("sk-good-bbbbbbbbbbbb2222", "10.00", "0.00"),
        daidai_key("sk-good-cccccccccccc3333", "0.00", "5.00", state="fail")]   # not usable: not in the pool
POOL_KEYS = [k["api_key"] for k in POOL]
USABLE = POOL_KEYS[:2]
BALANCE = "¥22.50"
BUDGET_A = {"tokens_per_day": 500, "tokens_per_month": 20000, "requests_per_minute": 30}
BUDGET_B = {"tokens_per_day": 10}   # used up by one or two chats (the fake upstream reports 8 tokens each)


class LoopThread:
    """The fakes are aiohttp servers; Playwright's sync API holds this thread, so they get their own."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class Fleet:
    project: Project
    served: Any
    upstream: FakeUpstream
    proxy_port: int
    ports: tuple[int, int]

    def id(self, port: int) -> str:
        return f"st-instance-{port}"

    def password(self, port: int) -> str:
        return self.project.cst("password", self.id(port)).stdout.strip()

    def key(self, port: int) -> str:
        return (self.project.state_dir / "secrets" / "proxy-keys" / self.id(port)).read_text().strip()

    def proxy(self, path: str, key: str) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.proxy_port}{path}", headers={"Authorization": f"Bearer {key}"},
                         timeout=30)

    def usage(self, port: int) -> dict:
        """The instance's use against its budget, as the proxy tells the instance itself."""
        return self.proxy("/status", self.key(port)).json()["usage"]

    def chat(self, port: int) -> httpx.Response:
        return httpx.post(f"http://127.0.0.1:{self.proxy_port}/v1/chat/completions", timeout=30,
                          headers={"Authorization": f"Bearer {self.key(port)}"},
                          json={"model": "gpt-fake", "messages": [{"role": "user", "content": "hello"}]})


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    loop = LoopThread()
    upstream = loop.run(FakeUpstream().start())
    platform = FakeDaiDai()
    platform.add_account("me@example.com", "platform-password", POOL)
    loop.run(platform.start())
    folder = tmp_path_factory.mktemp("fleet")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CST_")}
    if "CST_SILLYTAVERN_HOME" in os.environ:
        env["CST_SILLYTAVERN_HOME"] = os.environ["CST_SILLYTAVERN_HOME"]
    project = Project(folder, {**env, "DD_PASSWORD": "platform-password"})
    api, proxy, a, b = free_ports(4)
    project.write(f"""\
        version: 1
        settings:
          resync: 2s
          sillytavern: {{version: "1.19.0", start_timeout: 300}}
          usage: {{timezone: Asia/Shanghai}}
          api: {{listen: "127.0.0.1:{api}"}}
          proxy: {{listen: "127.0.0.1:{proxy}", upstream: "{upstream.url}/v1"}}
        accounts:
          - {{name: main, provider: daidai, email: me@example.com, password_env: DD_PASSWORD, api_base: "{platform.url}"}}
        instances:
          - port: {a}
            budget: {json.dumps(BUDGET_A)}
          - port: {b}
            budget: {json.dumps(BUDGET_B)}
        """)
    install = project.cst("st", "install", timeout=900)
    assert install.returncode == 0, install.stdout + install.stderr
    served = start_serve(project, api)
    try:
        fleet = Fleet(project, served, upstream, proxy, (a, b))

        def healthy(port: int) -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/api/plugins/cst/health", timeout=10,
                                 auth=(fleet.id(port), fleet.password(port))).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(lambda: healthy(a) and healthy(b), timeout=600, interval=1)
        yield fleet
    finally:
        served.stop()
        kill_all(project.state_dir.resolve())
        loop.run(platform.stop())
        loop.run(upstream.stop())
        loop.close()


def open_sillytavern(new_page, fleet: Fleet, port: int, **options) -> Any:
    """A page logged in with the instance's basic-auth credentials, past the first-run greeting."""
    recorded = new_page(http_credentials={"username": fleet.id(port), "password": fleet.password(port)}, **options)
    page = recorded.page
    page.goto(f"http://127.0.0.1:{port}/")
    greeting = page.locator(".popup-button-ok:visible")
    connected = page.locator("#send_but:not(.displayNone)")   # shown once SillyTavern reached its API
    greeting.or_(connected).first.wait_for(timeout=120_000)
    if greeting.count():   # a new user names their persona first; SillyTavern connects after that
        greeting.first.click()
    connected.wait_for(timeout=60_000)
    return recorded


def open_pool_panel(page: Any) -> Any:
    """The extensions drawer open, then the pool's own drawer in it, each checked open before the
    next step. SillyTavern opens a drawer at the end of an animation and closes open drawers on a
    click that lands outside them, so a click is repeated only while its drawer is still closed
    (once, a fresh run ended with the panel filled in and its drawer shut)."""
    drawer = page.locator("#rm_extensions_block.openDrawer")
    content = page.locator("#cst_keypool .inline-drawer-content")
    for _ in range(3):
        if not drawer.is_visible():
            page.click("#extensions-settings-button .drawer-toggle")
            drawer.wait_for(timeout=30_000)
        if not content.is_visible():
            page.click("#cst_keypool .inline-drawer-toggle")
        try:
            content.wait_for(state="visible", timeout=5_000)
            return page.locator("#cst_keypool")
        except PlaywrightTimeout:
            continue
    raise AssertionError("the pool's panel never opened")


def test_a_new_user_chats_through_the_pool_from_the_chat_box(fleet: Fleet, new_page) -> None:
    a = fleet.ports[0]
    recorded = open_sillytavern(new_page, fleet, a)
    page = recorded.page
    page.fill("#send_textarea", "Hello through the pool")
    page.click("#send_but")
    answer = page.locator('#chat .mes[is_user="false"] .mes_text', has_text="w0 w1 w2 w3 w4")
    answer.last.wait_for(timeout=60_000)
    page.locator("#toast-container .toast").first.wait_for(state="detached", timeout=30_000)   # "Persona changed"
    recorded.screenshot("keypool-chat-en")

    chats = [s for s in fleet.upstream.seen if s.path == "/v1/chat/completions"
             and b"Hello through the pool" in s.body]
    assert chats, "the message reached the upstream"
    assert {s.key for s in chats} <= set(USABLE), "with a pool key, never the instance's own"
    today = fleet.usage(a)["today"]
    assert today["requests"] >= 1 and today["errors"] == 0
    assert today["completion_tokens"] >= 5, "the streamed answer's usage was counted"
    proxy_origin = f"127.0.0.1:{fleet.proxy_port}"
    assert not [u for u in recorded.requests if proxy_origin in u], "the page never talks to the proxy itself"


@pytest.mark.parametrize("locale, width", [("en-US", 1280), ("zh-CN", 1280), ("en-US", 360), ("zh-CN", 360)])
def test_the_panel_shows_the_platform_balance_and_this_instance_s_use(fleet: Fleet, new_page, locale: str,
                                                                      width: int) -> None:
    a = fleet.ports[0]
    recorded = open_sillytavern(new_page, fleet, a, width=width, locale=locale)
    page = recorded.page
    panel = open_pool_panel(page)
    panel.locator('[data-cst="balance"]', has_text=BALANCE).wait_for(timeout=30_000)
    chinese = locale.startswith("zh")
    assert panel.locator("b").first.inner_text() == ("CST 密钥池" if chinese else "CST key pool")
    assert ("总余额" if chinese else "Total balance") in panel.inner_text()
    assert panel.locator('[data-cst="usable"]').inner_text() == "2 / 2"
    assert panel.locator('[data-cst="state-text"]').inner_text() == ("运行中" if chinese else "Running")
    assert panel.locator('[data-cst="url"]').inner_text() == f"http://127.0.0.1:{fleet.proxy_port}/v1"
    rows = panel.locator('[data-cst="keys"] tr')
    assert [rows.nth(i).locator("code").inner_text() for i in range(rows.count())] == [mask(k) for k in USABLE]
    assert [rows.nth(i).locator("td").nth(1).inner_text() for i in range(2)] == ["¥12.50", "¥10.00"]
    usage = fleet.usage(a)
    today, month = usage["today"], usage["month"]
    assert today["requests"] >= 1 and today["tokens"] >= 5, "the chat of the first test was counted"
    assert panel.locator('[data-cst="requests"]').inner_text() == f"{today['requests']:,}"
    assert panel.locator('[data-cst="tokens"]').inner_text() == f"{today['tokens']:,}"
    assert panel.locator('[data-cst="day-limit"]').inner_text() == f" / {BUDGET_A['tokens_per_day']:,}"
    assert panel.locator('[data-cst="month-tokens"]').inner_text() == f"{month['tokens']:,}"
    assert panel.locator('[data-cst="month-limit"]').inner_text() == f" / {BUDGET_A['tokens_per_month']:,}"
    assert panel.locator('[data-cst="day-meter"]').get_attribute("aria-valuemax") == str(BUDGET_A["tokens_per_day"])
    assert panel.locator('[data-cst="day-meter"]').get_attribute("aria-valuenow") == str(today["tokens"])
    assert panel.locator('[data-cst="limits"]').inner_text() == (
        "每分钟最多 30 次请求" if chinese else "At most 30 requests a minute")
    assert ("今日" if chinese else "Today") in panel.locator('[data-cst="day"]').inner_text()
    assert ("本月" if chinese else "This month") in panel.locator('[data-cst="month"]').inner_text()
    assert panel.locator('[data-cst="zone"]').inner_text() == (
        "按 Asia/Shanghai 计日" if chinese else "Days in Asia/Shanghai")
    assert not panel.locator('[data-cst="spent"]').is_visible()
    html = page.content()
    assert not [k for k in POOL_KEYS + [fleet.key(a)] if k in html], "no whole key in the page"
    box = panel.bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width, "the panel fits the screen"
    name = f"keypool-usage-{locale[:2]}-{width}"
    recorded.screenshot(name)
    recorded.screenshot(name + "-panel", element=panel)


@pytest.mark.parametrize("locale, width", [("en-US", 1280), ("zh-CN", 360)])
def test_the_panel_says_when_the_budget_is_used_up(fleet: Fleet, new_page, locale: str, width: int) -> None:
    b = fleet.ports[1]
    for _ in range(10):   # until the proxy refuses: 10 tokens a day, 8 an answer
        answer = fleet.chat(b)
        if answer.status_code == 429:
            break
        assert answer.status_code == 200, answer.text
    else:
        raise AssertionError("the budget of 10 tokens a day never ran out")
    assert answer.json()["error"]["code"] == "budget_exceeded"
    usage = fleet.usage(b)
    assert usage["left"]["tokens_per_day"] == 0
    recorded = open_sillytavern(new_page, fleet, b, width=width, locale=locale)
    page = recorded.page
    panel = open_pool_panel(page)
    spent = panel.locator('[data-cst="spent"]')
    spent.wait_for(state="visible", timeout=30_000)
    resets = usage["window"]["resets"]["day"][:16].replace("T", " ")
    chinese = locale.startswith("zh")
    assert spent.inner_text() == (f"今日 tokens 额度已用完：{resets} 起恢复对话。" if chinese
                                  else f"Today's token budget is used up: chats resume on {resets}.")
    assert panel.locator('[data-cst="tokens"]').inner_text() == f"{usage['today']['tokens']:,}"
    assert panel.locator('[data-cst="day-limit"]').inner_text() == " / 10"
    assert panel.locator('[data-cst="day-meter"]').get_attribute("data-level") == "spent"
    assert not panel.locator('[data-cst="month-meter"]').is_visible(), "no monthly limit: no bar"
    box = panel.bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width, "the panel fits the screen"
    name = f"keypool-usage-spent-{locale[:2]}-{width}"
    recorded.screenshot(name)
    recorded.screenshot(name + "-panel", element=panel)


def test_no_pool_key_on_a_sillytavern_disk_or_in_its_environment(fleet: Fleet) -> None:
    for port in fleet.ports:
        data = fleet.project.dir / "user-data" / str(port)
        contents = [p.read_bytes() for p in data.rglob("*") if p.is_file()]
        own = fleet.key(port).encode()
        assert any(own in c for c in contents), "the search does find a key: the instance's own"
        assert not [k for k in POOL_KEYS if any(k.encode() in c for c in contents)]
        pid = fleet.served.api("GET", f"/api/instances/{fleet.id(port)}").json()["pid"]
        for proc in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
            environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
            assert b"CST_PROXY_KEY_FILE=" in environ
            assert not [k for k in POOL_KEYS + [fleet.key(port)] if k.encode() in environ]


def test_api_settings_changed_in_the_page_survive_a_restart(fleet: Fleet, new_page) -> None:
    a = fleet.ports[0]
    mine = f"http://localhost:{fleet.proxy_port}/v1"   # the user's own choice, not what CST wrote
    settings_file = fleet.project.dir / "user-data" / str(a) / "default-user" / "settings.json"
    page = open_sillytavern(new_page, fleet, a).page
    page.click("#sys-settings-button .drawer-toggle")
    page.fill("#custom_api_url_text", mine)
    page.fill("#custom_model_id", "my-own-model")
    wait_until(lambda: json.loads(settings_file.read_text())["oai_settings"].get("custom_model") == "my-own-model",
               timeout=30)
    before = fleet.served.api("GET", f"/api/instances/{fleet.id(a)}").json()["pid"]
    restarted = fleet.served.api("POST", f"/api/instances/{fleet.id(a)}/restart")
    assert restarted.status_code == 200, restarted.text
    assert fleet.served.api("GET", f"/api/instances/{fleet.id(a)}").json()["pid"] != before
    oai = json.loads(settings_file.read_text())["oai_settings"]
    assert (oai["custom_url"], oai["custom_model"]) == (mine, "my-own-model")
    page = open_sillytavern(new_page, fleet, a).page
    page.click("#sys-settings-button .drawer-toggle")
    assert page.input_value("#custom_api_url_text") == mine
    assert page.input_value("#custom_model_id") == "my-own-model"


def test_deleting_an_instance_revokes_its_key_at_once(fleet: Fleet) -> None:
    a, b = fleet.ports
    key_a, key_b = fleet.key(a), fleet.key(b)
    assert fleet.proxy("/v1/models", key_b).status_code == 200
    deleted = fleet.served.api("DELETE", f"/api/instances/{fleet.id(b)}")
    assert deleted.status_code == 200, deleted.text
    denied = fleet.proxy("/v1/models", key_b)
    assert denied.status_code == 401
    assert denied.json() == {"error": {"message": "a valid proxy key is required (Authorization: Bearer ...)",
                                       "type": "invalid_request_error", "code": "invalid_api_key"}}
    assert fleet.proxy("/v1/models", key_a).status_code == 200
