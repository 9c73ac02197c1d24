"""A halted rollout on the admin page's file view, in English and Chinese and at phone width
(issue 15): what `/api/status` says (`reconcile.rollout`) is shown without a reload."""
from __future__ import annotations

import json
import os

import pytest
from playwright.sync_api import expect

from conftest import (
    STANDIN,
    Project,
    free_ports,
    http_status,
    kill_all,
    serve_settings,
    standin_file,
    start_serve,
    wait_until,
)

KEY = "rollout-page-admin-key"
expect.set_options(timeout=30_000)


@pytest.fixture(scope="module")
def halted(tmp_path_factory: pytest.TempPathFactory):
    """`cst serve` on two stand-in instances, with a halt recorded for the releases they run."""
    folder = tmp_path_factory.mktemp("rollout-page")
    project = Project(folder, {k: v for k, v in os.environ.items() if not k.startswith("CST_")})
    api, a, b = free_ports(3)
    project.write(standin_file([(a, "running"), (b, "running")], settings=serve_settings(api)))
    project.state_dir.mkdir(parents=True, exist_ok=True)
    ids = [f"st-instance-{a}", f"st-instance-{b}"]
    (project.state_dir / "rollout-halt.json").write_text(json.dumps({
        "at": ids[0], "reason": "exited with code 1 before answering", "when": "2026-12-01T05:00:00.000Z",
        "wanted": {id_: f"server {STANDIN}" for id_ in ids}}))
    served = start_serve(project, api, admin_key=KEY)
    try:
        wait_until(lambda: http_status(a) == 401 and http_status(b) == 401, timeout=30)
        # the instances answer before the pass that started them has reported
        wait_until(lambda: served.api("GET", "/api/status").json()["reconcile"]["rollout"], timeout=30)
        yield served, ids
    finally:
        served.stop()
        kill_all(project.state_dir.resolve())


@pytest.mark.parametrize("locale, width, said", [
    ("en-US", 1280, "rollout halted at {at}: exited with code 1 before answering, rolled back"),
    ("zh-CN", 1280, "升级已在 {at} 中止：exited with code 1 before answering，已回滚"),
    ("en-US", 360, "rollout halted at {at}: exited with code 1 before answering, rolled back"),
])
def test_the_file_view_says_the_rollout_halted(new_page, halted, locale: str, width: int, said: str) -> None:
    served, ids = halted
    assert served.api("GET", "/api/status").json()["reconcile"]["rollout"]["at"] == ids[0]
    recorded = new_page(width=width, locale=locale)
    page = recorded.page
    page.goto(served.url + "/#file")
    page.fill("#key", KEY)
    page.press("#key", "Enter")
    line = page.locator("#file-results li").first
    expect(line).to_have_text(said.format(at=ids[0]))
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), "no horizontal scroll"
    recorded.screenshot(f"rollout-halted-{locale[:2]}-{width}")
    assert recorded.outside_hosts() == []
