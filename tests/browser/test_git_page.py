"""The file view's git part in a real browser (Playwright driving Debian's chromium) against a real
`cst serve` whose desired.yaml is committed in a git repository that follows a local bare remote:
the commit that runs, the last commits, the branch followed, and a warning when something is wrong,
all kept current by the `git` event without a reload. Screenshots go to tests/artifacts/git-*.png."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml
from playwright.sync_api import Page, expect

from conftest import GIT_ENV, Project, free_ports, git, kill_all, serve_settings, standin_file, start_serve, wait_until

KEY = "git-page-test-admin-key"
SOON = 10_000  # ms: what the page must show "within a few seconds"
expect.set_options(timeout=30_000)  # a busy 2-core machine; every wait ends as soon as it holds


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory):
    """One `cst serve` on a folder that is a git repository (desired.yaml committed by Tester on
    main, pushed to the bare repository remote.git in the folder, followed every second with push)."""
    folder = tmp_path_factory.mktemp("git-page")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CST_")} | GIT_ENV
    project = Project(folder, env)
    (api,) = free_ports(1)
    text = standin_file([], settings=serve_settings(api, "2s") + "\ngit: {every: 1s, push: true}")
    assert yaml.safe_load(text)["settings"]["git"] == {"every": "1s", "push": True}  # indented under settings
    project.write(text)
    (folder / ".gitignore").write_text(".cst/\nuser-data/\nremote.git/\nserve.log\n")
    git(folder, "init", "-q", "-b", "main")
    git(folder, "add", ".gitignore", "desired.yaml")
    git(folder, "-c", "user.name=Tester", "-c", "user.email=t@example.com", "commit", "-q", "-m", "an empty fleet")
    git(folder, "init", "-q", "--bare", "remote.git")
    git(folder, "remote", "add", "origin", str(folder / "remote.git"))
    git(folder, "push", "-q", "-u", "origin", "main")
    served = start_serve(project, api, admin_key=KEY)
    try:
        yield served
    finally:
        served.stop()
        kill_all(project.state_dir.resolve())


def file_view(new_page, fleet, width: int = 1280, locale: str = "en-US", **options):
    """Signed in, on the file view, with a marker that a reload would lose."""
    recorded = new_page(width=width, locale=locale, **options)
    page = recorded.page
    page.goto(fleet.url + "/#file")
    page.fill("#key", KEY)
    page.press("#key", "Enter")
    expect(page.locator("#live")).to_have_class(re.compile(r"\bon\b"))
    expect(page.locator("#view-file")).to_be_visible()
    expect(page.locator("#git-box")).to_be_visible()
    page.evaluate("window.notReloaded = true")
    return recorded


def not_reloaded(page: Page) -> bool:
    return page.evaluate("window.notReloaded === true")


def create(fleet) -> tuple[int, str]:
    (port,) = free_ports(1)
    answer = fleet.api("POST", "/api/instances", json={"port": port})
    assert answer.status_code == 201, answer.text
    return port, answer.json()["id"]


def test_an_api_edit_shows_as_the_commit_that_runs(new_page, fleet):
    recorded = file_view(new_page, fleet)
    page = recorded.page
    head = page.locator("#git-head")
    expect(head).to_contain_text("an empty fleet")
    expect(head).to_contain_text("Tester <t@example.com>")
    expect(head.locator(".badge")).to_have_text("no uncommitted changes")
    expect(page.locator("#git-repo")).to_contain_text(f"{fleet.project.dir.resolve()} · desired.yaml")
    expect(page.locator("#git-following")).to_have_text("origin/main · fetched every 1s · CST's commits are pushed")
    expect(page.locator("#git-warnings .warning")).to_have_count(0)

    port, id_ = create(fleet)  # by the API, while the page stays open on the file view
    message = f"create {id_} (port {port})"
    expect(head.locator(".commit-message")).to_have_text(message, timeout=SOON)
    expect(head.locator(".commit-meta")).to_contain_text(re.compile(r"^CST <cst@[^>]+> · "))
    expect(head.locator(".badge")).to_have_text("no uncommitted changes")
    shown = head.locator("code").inner_text()
    full = git(fleet.project.dir, "rev-parse", "HEAD").strip()
    assert full.startswith(shown) and len(shown) == 10
    assert head.locator("code").get_attribute("title") == full
    when = head.locator("time").get_attribute("datetime")  # the commit's time, shown as a local time
    assert when == git(fleet.project.dir, "log", "-1", "--format=%cI").strip()
    recent = page.locator("#git-recent li .commit-message")
    expect(recent).to_have_text([message, "an empty fleet"])
    assert not_reloaded(page)
    recorded.screenshot("git-clean-en", page.locator("#view-file"))
    # pushed, as settings.git.push asks
    remote = fleet.project.dir / "remote.git"
    wait_until(lambda: git(remote, "log", "-1", "--format=%s", "main").strip() == message, timeout=SOON / 1000)
    assert recorded.outside_hosts() == []


def test_a_hand_edit_left_uncommitted_then_an_api_edit_warns_not_committed(new_page, fleet):
    port, id_ = create(fleet)
    recorded = file_view(new_page, fleet)
    page = recorded.page
    head = page.locator("#git-head")
    expect(head.locator(".commit-message")).to_have_text(f"create {id_} (port {port})")
    with fleet.project.file.open("a") as file:
        file.write("# a note by hand, not committed\n")
    expect(head.locator(".badge")).to_have_text("uncommitted changes", timeout=SOON)
    answer = fleet.api("POST", f"/api/instances/{id_}/stop")
    assert answer.status_code == 200, answer.text
    warning = page.locator("#git-warnings .warning")
    expect(warning).to_have_count(1, timeout=SOON)
    expect(warning.locator("strong")).to_have_text("Git: not committed")
    expect(warning).to_contain_text("had changes that were not committed before CST's edit")
    expect(head.locator(".commit-message")).to_have_text(f"create {id_} (port {port})")  # HEAD did not move
    expect(head.locator(".badge")).to_have_text("uncommitted changes")
    assert git(fleet.project.dir, "log", "-1", "--format=%s").strip() == f"create {id_} (port {port})"
    assert not_reloaded(page)
    recorded.screenshot("git-en", page.locator("#view-file"))

    page.select_option("#lang", "zh")
    expect(warning.locator("strong")).to_have_text("Git：未提交")
    expect(head.locator(".badge")).to_have_text("有未提交的修改")
    expect(page.locator("#git-following")).to_have_text("origin/main · 每 1s 拉取一次 · 推送 CST 的提交")
    recorded.screenshot("git-zh", page.locator("#view-file"))
    dark = file_view(new_page, fleet, color_scheme="dark")
    expect(dark.page.locator("#git-warnings .warning strong")).to_have_text("Git: not committed")
    dark.screenshot("git-dark-en", dark.page.locator("#view-file"))

    for locale, name, label in (("en-US", "git-360", "Git: not committed"), ("zh-CN", "git-360-zh", "Git：未提交")):
        phone = file_view(new_page, fleet, width=360, locale=locale)
        expect(phone.page.locator("#git-warnings .warning strong")).to_have_text(label)
        expect(phone.page.locator("#git-recent li")).not_to_have_count(0)
        overflow = phone.page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0, f"{overflow}px of horizontal scroll at 360 px ({locale})"
        wide = phone.page.evaluate("""[...document.querySelectorAll('#view-file *')]
            .filter((e) => e.getBoundingClientRect().right > document.documentElement.clientWidth + 0.5)
            .map((e) => e.id || e.className || e.tagName)""")
        assert wide == [], f"cut off at 360 px ({locale}): {wide}"
        phone.screenshot(name)
        assert phone.outside_hosts() == []
    assert recorded.outside_hosts() == []


def test_a_branch_that_cannot_be_fetched_warns_until_it_can(new_page, fleet):
    """No file change and no instance change: only the `git` event can bring this to the page."""
    recorded = file_view(new_page, fleet)
    page = recorded.page
    remote, away = fleet.project.dir / "remote.git", fleet.project.dir / "remote.away"
    fetch = page.locator("#git-warnings .warning", has_text="Git: fetch failed")
    expect(fetch).to_have_count(0)
    remote.rename(away)
    try:
        expect(fetch).to_have_count(1, timeout=SOON)
        expect(fetch).to_contain_text("fetching main from origin failed")
        expect(fetch).to_contain_text("last tried")
        expect(page.locator("#git-sync .git-fetch_failed")).to_have_text("fetch failed")
        recorded.screenshot("git-fetch-failed-en", page.locator("#view-file"))
    finally:
        away.rename(remote)
    expect(fetch).to_have_count(0, timeout=SOON)
    expect(page.locator("#git-sync")).not_to_contain_text("fetch failed")
    assert not_reloaded(page)
    assert recorded.outside_hosts() == []


def test_nothing_of_git_is_shown_when_the_file_is_not_in_git(new_page, fleet):
    """`git: null` (a file outside any work tree, no settings.git): the answer is the server's, with git
    set to null on its way to the page."""
    recorded = new_page()
    page = recorded.page

    def without_git(route):
        answer = route.fetch()
        body = answer.json()
        body["git"] = None
        route.fulfill(response=answer, body=json.dumps(body))

    page.route("**/api/desired", without_git)
    page.goto(fleet.url + "/#file")
    page.fill("#key", KEY)
    page.press("#key", "Enter")
    expect(page.locator("#file-valid")).to_have_text("valid")
    expect(page.locator("#file-text .line").first).to_be_visible()
    expect(page.locator("#git-box")).to_be_hidden()
    expect(page.locator("#git-warnings")).to_be_empty()
    assert recorded.outside_hosts() == []
