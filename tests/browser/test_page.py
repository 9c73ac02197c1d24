"""The admin page in a real browser (Playwright driving Debian's chromium) against a real `cst serve`
on the stand-in server, with its key pool on a fake DaiDai platform. Every request the page makes
is recorded and must stay on 127.0.0.1; screenshots go to tests/artifacts/."""
from __future__ import annotations

import io
import os
import re
import signal
import uuid
import zipfile
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect

from conftest import (
    Project,
    daidai_account,
    fake_daidai,
    free_ports,
    http_status,
    kill_all,
    proxy_fakes,
    serve_settings,
    standin_file,
    start_serve,
)

from .conftest import sign_in_to_admin_page

KEY = "page-test-admin-key"
PASSWORD = "daidai-password"
# two keys of 12.50 and 10.00: the panel must show 22.50
KEYS = [("sk-good-page11112222", "12.50", "3.20"), ("sk-good-page33334444", "10.00", "0.50")]
expect.set_options(timeout=30_000)  # a busy 2-core machine; every wait ends as soon as it holds


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory):
    """One `cst serve` for the module, no instances to begin with, one DaiDai account."""
    folder = tmp_path_factory.mktemp("page")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CST_")}
    env["DAIDAI_PASSWORD"] = PASSWORD
    project = Project(folder, env)
    keys = [proxy_fakes().daidai_key(value, balance, used) for value, balance, used in KEYS]
    with fake_daidai({"ops@example.com": (PASSWORD, keys)}) as base:
        (api,) = free_ports(1)
        project.write(standin_file([], settings=serve_settings(api, "2s"))
                      + "accounts:\n" + daidai_account("main", "ops@example.com", base))
        served = start_serve(project, api, admin_key=KEY)
        try:
            yield served
        finally:
            served.stop()
            kill_all(project.state_dir.resolve())


def sign_in(new_page, fleet, width: int = 1280, locale: str = "en-US"):
    recorded = sign_in_to_admin_page(new_page, fleet.url, KEY, width, locale)
    expect(recorded.page.locator("#live")).to_have_class(re.compile(r"\bon\b"))
    return recorded


def row(page: Page, id_: str):
    return page.locator(f'#instances tr[data-id="{id_}"]')


def create_in_api(fleet) -> tuple[int, str]:
    (port,) = free_ports(1)
    answer = fleet.api("POST", "/api/instances", json={"port": port})
    assert answer.status_code == 201, answer.text
    return port, answer.json()["id"]


def say(fleet, id_: str, port: int, line: str) -> None:
    password = fleet.project.cst("password", id_).stdout.strip()
    assert httpx.get(f"http://127.0.0.1:{port}/standin/say", params={"line": line},
                     auth=(id_, password)).status_code == 204


def test_sign_in_with_a_wrong_key_then_the_right_one(new_page, fleet):
    recorded = new_page()
    page = recorded.page
    page.goto(fleet.url + "/")
    expect(page.locator("#signin")).to_be_visible()
    page.fill("#key", "not-the-key")
    page.click("#signin-submit")
    expect(page.locator("#signin-error")).to_have_text("Invalid admin key")  # the API's own message
    expect(page.locator("#tabs")).to_be_hidden()
    page.fill("#key", KEY)
    page.click("#signin-submit")
    expect(page.locator("#live")).to_have_text("Live")
    expect(page.locator("#view-instances")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('cst-admin-key')") == KEY
    assert page.evaluate("Object.keys(localStorage).every(k => !localStorage.getItem(k).includes('page-test'))")
    page.reload()  # the same tab keeps its session
    expect(page.locator("#live")).to_have_text("Live")
    page.click("#signout")
    expect(page.locator("#signin")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('cst-admin-key')") is None
    assert any(url.endswith("/page/app.js") for url in recorded.requests)
    assert recorded.outside_hosts() == []


def test_the_brute_force_limit_shows_as_a_wait(new_page, fleet):
    """The API answers a guesser 429 with Retry-After; the page counts down and lets the button work
    again. (The limit itself is the auth middleware's; here the browser is handed its answer.)"""
    recorded = new_page()
    page = recorded.page
    page.route("**/api/status", lambda route: route.fulfill(
        status=429, headers={"Retry-After": "3", "Content-Type": "application/json"},
        body='{"error": "Too many wrong admin keys from your address"}'))
    page.goto(fleet.url + "/")
    page.fill("#key", "guess")
    page.click("#signin-submit")
    expect(page.locator("#signin-error")).to_contain_text("Too many wrong admin keys from your address")
    expect(page.locator("#signin-error")).to_contain_text(re.compile(r"Try again in [1-3] s"))
    expect(page.locator("#signin-submit")).to_be_disabled()
    expect(page.locator("#signin-submit")).to_be_enabled()  # once the wait is over
    expect(page.locator("#signin-error")).to_have_text("")
    assert recorded.outside_hosts() == []


def test_an_instance_from_creation_to_deletion(new_page, fleet):
    recorded = sign_in(new_page, fleet)
    page = recorded.page
    suggested = page.locator("#new-port")
    expect(suggested).not_to_have_value("")
    assert int(suggested.input_value()) == fleet.api("GET", "/api/free-port").json()["port"]
    (port,) = free_ports(1)
    id_ = f"st-instance-{port}"
    suggested.fill(str(port))
    page.click("#create-submit")
    dialog = page.locator("#dialog")
    expect(dialog).to_be_visible()
    expect(page.locator("#dialog-title")).to_have_text(f"{id_} is running")
    created_password = page.locator("#dialog-secret-value").input_value()
    assert http_status(port, (id_, created_password)) == 200
    page.click("#dialog-ok")
    expect(dialog).to_be_hidden()
    expect(page.locator("#dialog-secret-value")).to_have_value("")  # shown once (cleared on the close event)
    badge = row(page, id_).locator(".c-status .badge")
    expect(badge).to_have_text("running")  # without a reload
    expect(row(page, id_).locator(".c-id a.file-link")).to_have_text(re.compile(r"desired\.yaml:\d+"))

    box = row(page, id_).bounding_box()
    row(page, id_).get_by_role("button", name="Stop", exact=True).click()
    expect(badge).to_have_text("stopped")
    expect(row(page, id_).locator(".c-desired")).to_have_text("stopped")
    assert http_status(port) == 0
    moved = row(page, id_).bounding_box()
    assert (moved["y"], moved["height"], moved["width"]) == (box["y"], box["height"], box["width"]), "the row jumped"
    row(page, id_).get_by_role("button", name="Start", exact=True).click()
    expect(badge).to_have_text("running")
    assert http_status(port) == 401
    restarts = int(row(page, id_).locator(".c-restarts").inner_text())
    row(page, id_).get_by_role("button", name="Restart", exact=True).click()
    expect(page.locator(".toast", has_text="Instance restarted")).to_have_count(1)
    expect(row(page, id_).locator(".c-restarts")).to_have_text(str(restarts + 1))

    row(page, id_).locator("summary").click()
    row(page, id_).get_by_role("button", name="Reset password", exact=True).click()
    expect(page.locator("#dialog-title")).to_have_text(f"Reset the password of {id_}?")
    page.click("#dialog-ok")
    expect(page.locator("#dialog-title")).to_have_text(f"New password of {id_}")
    new_password = page.locator("#dialog-secret-value").input_value()
    assert new_password and new_password != created_password
    assert http_status(port, (id_, new_password)) == 200 and http_status(port, (id_, created_password)) == 401
    recorded.screenshot("password-en")
    page.click("#dialog-ok")

    row(page, id_).locator("summary").click()
    with page.expect_download() as download:
        row(page, id_).get_by_role("button", name="Download backup", exact=True).click()
    assert download.value.suggested_filename.startswith(id_) and download.value.suggested_filename.endswith(".zip")
    with zipfile.ZipFile(io.BytesIO(Path(download.value.path()).read_bytes())) as archive:
        assert "default-user/starts.txt" in archive.namelist()

    row(page, id_).locator(".c-actions").get_by_role("link", name="Logs", exact=True).click()
    expect(page.locator("#log-state")).to_have_text("following")
    expect(page.locator("#log-text")).to_contain_text("stand-in SillyTavern is listening")
    line = f"written after the page opened {uuid.uuid4().hex[:8]}"
    say(fleet, id_, port, line)
    expect(page.locator("#log-text")).to_contain_text(line)
    recorded.screenshot("logs-en")

    page.click('a[data-view="instances"]')
    recorded.screenshot("instances-en")
    row(page, id_).locator("summary").click()
    row(page, id_).get_by_role("button", name="Delete", exact=True).click()
    archive_dir = fleet.project.state_dir / "archive"
    expect(page.locator("#dialog-text")).to_contain_text(f"{fleet.project.dir}/user-data/{port}")
    expect(page.locator("#dialog-text")).to_contain_text(f"archive, {archive_dir}/{id_}-<UTC time>")
    expect(page.locator("#dialog-cancel")).to_be_focused()  # the safe choice is the default
    recorded.screenshot("delete-en")
    page.click("#dialog-ok")
    toast = page.locator(".toast", has_text="Instance deleted")
    expect(toast).to_contain_text(f"its data was archived in {archive_dir}/{id_}-")
    archived = re.search(r"archived in (\S+)", toast.inner_text()).group(1)
    assert (Path(archived) / "default-user" / "starts.txt").is_file()
    expect(row(page, id_)).to_have_count(0)
    expect(page.locator("#activity")).to_contain_text(f"{id_} removed")
    assert recorded.outside_hosts() == []


def test_a_killed_instance_shows_the_crash_and_the_recovery(new_page, fleet):
    port, id_ = create_in_api(fleet)
    recorded = sign_in(new_page, fleet)
    page = recorded.page
    expect(row(page, id_).locator(".c-restarts")).to_have_text("0")
    pid = fleet.api("GET", f"/api/instances/{id_}").json()["pid"]
    os.kill(pid, signal.SIGKILL)
    expect(page.locator("#activity li", has_text=f"{id_} crashed")).to_contain_text(f"process {pid} exited")
    expect(page.locator("#activity li", has_text=f"{id_} restarted")).to_have_count(1)
    expect(row(page, id_).locator(".c-failure")).to_contain_text(f"process {pid} exited while it should be running")
    expect(row(page, id_).locator(".c-restarts")).to_have_text("1")
    expect(row(page, id_).locator(".c-status .badge")).to_have_text("running")
    assert fleet.api("GET", f"/api/instances/{id_}").json()["pid"] != pid
    assert http_status(port) == 401
    fleet.api("DELETE", f"/api/instances/{id_}")


def test_chinese_labels_and_api_errors_and_the_choice_is_remembered(new_page, fleet):
    port, id_ = create_in_api(fleet)
    recorded = sign_in(new_page, fleet)
    page = recorded.page
    page.select_option("#lang", "zh")
    expect(page.locator('a[data-view="instances"]')).to_have_text("实例")
    expect(page.locator("#create-submit")).to_have_text("创建实例")
    expect(page.locator("#instances th").first).to_have_text("ID")
    expect(row(page, id_).locator(".c-status .badge")).to_have_text("运行中")
    expect(page.locator("#live")).to_have_text("实时")
    page.fill("#new-port", str(port))  # taken: the API says so, in Chinese
    page.click("#create-submit")
    expect(page.locator(".toast.error")).to_have_text(re.compile(f"端口 {port} 已被占用（{id_}）"))
    page.reload()
    expect(page.locator('a[data-view="logs"]')).to_have_text("日志")
    assert page.evaluate("localStorage.getItem('cst-lang')") == "zh"
    recorded.screenshot("instances-zh")
    page.click('a[data-view="logs"]')
    page.select_option("#log-instance", id_)
    expect(page.locator("#log-state")).to_have_text("跟踪中")
    expect(page.locator("#log-text")).to_contain_text("stand-in SillyTavern is listening")
    recorded.screenshot("logs-zh")
    page.click('a[data-view="pool"]')
    expect(page.locator("#pool-balance")).to_have_text("¥22.50")
    expect(page.locator("#accounts .badge")).to_have_text("已登录")
    recorded.screenshot("pool-zh")
    page.click('a[data-view="file"]')
    expect(page.locator("#file-valid")).to_have_text("有效")
    assert recorded.outside_hosts() == []
    fleet.api("DELETE", f"/api/instances/{id_}")


def test_the_pool_panel_shows_the_platform_balance(new_page, fleet):
    recorded = sign_in(new_page, fleet)
    page = recorded.page
    page.click('a[data-view="pool"]')
    expect(page.locator("#pool-balance")).to_have_text("¥22.50")
    expect(page.locator("#pool-keys")).to_have_text("2 / 2")
    expect(page.locator("#accounts tbody tr")).to_have_text(re.compile(r"main.*daidai.*logged in.*¥22\.50"))
    keys = page.locator("#keys tbody tr")
    expect(keys).to_have_count(2)
    expect(keys.first).to_contain_text("sk-go…2222")
    expect(keys.first).to_contain_text("¥12.50")
    expect(keys.first).to_contain_text("¥3.20")
    proxy = fleet.api("GET", "/api/pool").json()["url"]
    expect(page.locator("#pool-url")).to_have_text(proxy)
    recorded.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.click("#pool-copy")
    expect(page.locator("#pool-copy")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == proxy
    content = page.content()
    assert all(value not in content for value, _, _ in KEYS), "a whole key reached the page"
    recorded.screenshot("pool-en")
    assert recorded.outside_hosts() == []


def test_the_desired_file_view_and_an_instance_lines(new_page, fleet):
    port, id_ = create_in_api(fleet)
    recorded = sign_in(new_page, fleet)
    page = recorded.page
    row(page, id_).locator(".c-id a.file-link").click()
    expect(page.locator("#view-file")).to_be_visible()
    expect(page.locator("#file-valid")).to_have_text("valid")
    span = fleet.api("GET", "/api/desired").json()["instances"][id_]
    focused = page.locator("#file-text .line.focus")
    expect(focused).to_have_count(span["to"] - span["from"] + 1)
    expect(focused.first).to_contain_text(f"port: {port}")
    expect(focused.first.locator(".ln")).to_have_text(str(span["from"]))
    expect(page.locator("#file-run")).to_contain_text("ok")
    text = fleet.project.file.read_text()
    fleet.project.file.write_text(text + "settings: {resync: soon}\n")  # broken by hand
    try:
        expect(page.locator("#file-valid")).to_have_text("invalid: the last valid version stays in force")
        problem = page.locator("#file-problems li").first
        expect(problem).to_contain_text("line")
        line = int(re.search(r"line (\d+)", problem.inner_text()).group(1))
        expect(page.locator(f"#L{line}")).to_have_class(re.compile(r"\bbad\b"))
        expect(page.locator("#activity li", has_text="desired.yaml is invalid")).to_have_count(1)
        recorded.screenshot("file-en")
    finally:
        fleet.project.file.write_text(text)
    expect(page.locator("#file-valid")).to_have_text("valid")
    fleet.api("DELETE", f"/api/instances/{id_}")


def test_phone_width_has_no_horizontal_scroll(new_page, fleet):
    port, id_ = create_in_api(fleet)
    recorded = sign_in(new_page, fleet, width=360, locale="zh-CN")
    page = recorded.page
    expect(row(page, id_).locator(".c-status .badge")).to_be_visible()
    shown = {"instances": (f'#instances tr[data-id="{id_}"] .badge', "运行中"),
             "logs": ("#log-state", "跟踪中"), "pool": ("#pool-balance", "¥22.50"), "file": ("#file-valid", "有效")}
    for view, (selector, text) in shown.items():
        page.click(f'a[data-view="{view}"]')
        expect(page.locator(selector)).to_have_text(text)
        overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0, f"{view}: {overflow}px of horizontal scroll at 360 px"
        recorded.screenshot(f"{view}-360")
    assert recorded.outside_hosts() == []
    fleet.api("DELETE", f"/api/instances/{id_}")


def test_usable_with_the_keyboard_alone(new_page, fleet):
    port, id_ = create_in_api(fleet)
    recorded = new_page()
    page = recorded.page
    page.goto(fleet.url + "/")
    expect(page.locator("#key")).to_be_focused()
    page.keyboard.type(KEY)
    page.keyboard.press("Enter")
    expect(page.locator("#live")).to_have_text("Live")

    def tab_to(locator, limit: int = 60) -> None:
        for _ in range(limit):
            page.keyboard.press("Tab")
            if locator.evaluate("el => el === document.activeElement"):
                return
        raise AssertionError(f"Tab never reached {locator}")

    tab_to(page.locator('a[data-view="pool"]'))
    page.keyboard.press("Enter")
    expect(page.locator("#view-pool")).to_be_visible()
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Enter")  # back on "Instances"
    expect(page.locator("#view-instances")).to_be_visible()
    menu = row(page, id_).locator("summary")
    tab_to(menu)
    page.keyboard.press("Enter")
    expect(row(page, id_).locator(".menu-items")).to_be_visible()
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")  # Reset password, Download backup, Show in file, Delete
    page.keyboard.press("Enter")
    expect(page.locator("#dialog-title")).to_have_text(f"Delete {id_}?")
    page.keyboard.press("Escape")  # cancelled: nothing deleted
    expect(page.locator("#dialog")).to_be_hidden()
    assert fleet.api("GET", f"/api/instances/{id_}").status_code == 200
    menu.focus()
    page.keyboard.press("Enter")
    page.keyboard.press("Escape")
    expect(row(page, id_).locator(".menu-items")).to_be_hidden()
    fleet.api("DELETE", f"/api/instances/{id_}")


def test_the_page_reconnects_to_a_restarted_daemon(new_page, project, serve):
    """The stream ends with cst serve; the page says so, reconnects to the next one (whose event ids
    are new, so it is told to reload) and goes on updating without a reload of its own."""
    (api,) = free_ports(1)
    project.write(standin_file([], settings=serve_settings(api)))
    first = serve(api, admin_key=KEY)
    recorded = sign_in(new_page, first)
    page = recorded.page
    expect(page.locator("#no-instances")).to_be_visible()
    first.stop()
    expect(page.locator("#live")).to_have_text("Reconnecting…")
    second = serve(api, admin_key=KEY, log_name="serve-again.log")
    expect(page.locator("#live")).to_have_text("Live")
    (port,) = free_ports(1)
    assert second.api("POST", "/api/instances", json={"port": port}).status_code == 201
    expect(row(page, f"st-instance-{port}").locator(".c-status .badge")).to_have_text("running")
    assert recorded.outside_hosts() == []
