"""The admin page with many instances (issue 19, "Operating 500"), against a real `cst serve`: 60
declared `state: stopped` and three running on the stand-in, one of them parking after 2 s idle and
one after an hour. The summary's counts equal the rows, the search (id or port) and the state filter
narrow them, memory shows beside the status (and "—" without a process), the disk each data dir uses
under it (and the total in the summary), a parked instance says so and is woken by its button, a
running one with park_after is parked by its. In English and Chinese and at phone width without
horizontal scroll; screenshots `fleet-*.png`."""
from __future__ import annotations

import os
import re

import pytest
from playwright.sync_api import Page, expect

from conftest import Project, free_ports, kill_all, serve_settings, standin_file, start_serve, wait_until

from .conftest import sign_in_to_admin_page

KEY = "fleet-page-admin-key"
STOPPED = 60
SIZE = re.compile(r"^\d+(\.\d)? (KiB|MiB|GiB)$")  # the page's size(): 182 MiB, 1.4 GiB
expect.set_options(timeout=30_000)  # a busy 2-core machine; every wait ends as soon as it holds


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory):
    """`cst serve` on 60 stopped instances and three running: `plain` without park_after, `parks`
    with park_after: 2s (parked from the first: nobody used it), `awake` with park_after: 1h, woken
    through the API."""
    folder = tmp_path_factory.mktemp("page-fleet")
    project = Project(folder, {k: v for k, v in os.environ.items() if not k.startswith("CST_")})
    (api,) = free_ports(1)
    settings = serve_settings(api)
    taken = {int(port) for port in re.findall(r":(\d+)\"", settings)}  # its ports, released for cst serve
    plain, parks, awake, *stopped = [port for port in free_ports(5 + STOPPED) if port not in taken][:3 + STOPPED]
    lines = [(port, "stopped") for port in stopped] + [(plain, "running"), (parks, "running"), (awake, "running")]
    project.write(standin_file(lines, settings=settings,
                               extra_instance={parks: {"park_after": "2s"}, awake: {"park_after": "1h"}}))
    served = start_serve(project, api, admin_key=KEY)
    try:
        rows = lambda: {row["id"]: row for row in served.api("GET", "/api/instances").json()}  # noqa: E731
        wait_until(lambda: rows()[f"st-instance-{parks}"]["observed"] == "parked", timeout=30)
        assert served.api("POST", f"/api/instances/st-instance-{awake}/wake").json()["observed"] == "running"
        wait_until(lambda: all(rows()[f"st-instance-{port}"]["observed"] == "running" for port in (plain, awake)),
                   timeout=30)
        yield served, {"plain": plain, "parks": parks, "awake": awake, "stopped": stopped}
    finally:
        served.stop()
        kill_all(project.state_dir.resolve())


def sign_in(new_page, served, width: int = 1280, locale: str = "en-US"):
    recorded = sign_in_to_admin_page(new_page, served.url, KEY, width, locale)
    expect(recorded.page.locator("#instances tbody tr")).to_have_count(STOPPED + 3)
    return recorded


def row(page: Page, port: int):
    return page.locator(f'#instances tr[data-id="st-instance-{port}"]')


def shown_ids(page: Page) -> list[str]:
    return page.eval_on_selector_all("#instances tbody tr:not([hidden])", "rows => rows.map((r) => r.dataset.id)")


def no_horizontal_scroll(page: Page) -> None:
    overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, f"{overflow}px of horizontal scroll"


def test_summary_search_filter_and_memory(new_page, fleet):
    served, ports = fleet
    recorded = sign_in(new_page, served)
    page = recorded.page
    badges = page.locator("#instances tbody .c-status .badge")
    expect(row(page, ports["parks"]).locator(".badge")).to_have_text("parked")
    expect(row(page, ports["plain"]).locator(".badge")).to_have_text("running")

    # the summary counts what the rows say, and the API
    said = badges.all_text_contents()
    api = [r["observed"] for r in served.api("GET", "/api/instances").json()]
    for label, shown, observed in (("running", "running", 2), ("parked", "parked", 1), ("stopped", "stopped", STOPPED),
                                   ("errored", "errored", 0)):
        expect(page.locator(f"#sum-{label}")).to_have_text(str(observed))
        assert said.count(shown) == observed == api.count(label)
    expect(page.locator("#sum-memory")).to_have_text(SIZE)

    # memory beside the status: a size for a process, "—" for none (stopped, parked)
    for name in ("plain", "awake"):
        expect(row(page, ports[name]).locator(".memory")).to_have_text(SIZE)
    for port in (ports["parks"], ports["stopped"][0]):
        expect(row(page, port).locator(".memory")).to_have_text("—")

    # search by id and by port narrows the rows as one types
    search = page.locator("#instance-search")
    search.fill(f"st-instance-{ports['plain']}")
    assert shown_ids(page) == [f"st-instance-{ports['plain']}"]
    expect(page.locator("#shown-count")).to_have_text(f"1 of {STOPPED + 3} shown")
    target = ports["stopped"][17]
    search.fill("")
    search.press_sequentially(str(target))  # key by key, as typed
    assert shown_ids(page) == [f"st-instance-{target}"]
    search.fill("no-such-instance")
    assert shown_ids(page) == []
    expect(page.locator("#no-match")).to_be_visible()
    search.fill("")
    expect(page.locator("#no-match")).to_be_hidden()
    expect(page.locator("#shown-count")).to_have_text("")
    assert len(shown_ids(page)) == STOPPED + 3

    # the state filter, alone and with a search
    state = page.locator("#state-filter")
    for group, ids in (("running", {ports["plain"], ports["awake"]}), ("parked", {ports["parks"]}),
                       ("stopped", set(ports["stopped"])), ("errored", set())):
        state.select_option(group)
        assert set(shown_ids(page)) == {f"st-instance-{port}" for port in ids}, group
    state.select_option("running")
    search.fill(str(ports["stopped"][0]))
    assert shown_ids(page) == []
    search.fill("")
    # screenshots of a few rows: one of every row would be mostly blank, as rows out of view are not drawn
    state.select_option("running")
    recorded.screenshot("fleet-running-en")
    assert recorded.outside_hosts() == []


def test_park_and_wake_buttons(new_page, fleet):
    served, ports = fleet
    recorded = sign_in(new_page, served)
    page = recorded.page
    awake, parks = row(page, ports["awake"]), row(page, ports["parks"])
    expect(awake.locator(".badge")).to_have_text("running")
    # only where parking is on: a running instance parks, a parked one wakes, the others have neither
    expect(row(page, ports["plain"]).locator("button.park")).to_be_hidden()
    expect(row(page, ports["stopped"][0]).locator("button.park")).to_be_hidden()
    expect(parks.locator("button.park")).to_have_text("Wake")
    expect(awake.locator("button.park")).to_have_text("Park")

    awake.locator("button.park").click()
    expect(page.locator(".toast", has_text="Instance parked")).to_have_count(1)
    expect(awake.locator(".badge")).to_have_text("parked")
    expect(awake.locator(".memory")).to_have_text("—")
    expect(awake.locator("button.park")).to_have_text("Wake")
    expect(page.locator("#sum-parked")).to_have_text("2")
    expect(page.locator("#activity li", has_text=f"st-instance-{ports['awake']} parked")).to_have_count(1)
    assert served.api("GET", f"/api/instances/st-instance-{ports['awake']}").json()["observed"] == "parked"
    page.locator("#state-filter").select_option("parked")
    assert set(shown_ids(page)) == {f"st-instance-{ports[name]}" for name in ("parks", "awake")}
    tops = [awake.locator(selector).bounding_box()["y"] for selector in ("button.toggle", "button.park", "summary")]
    assert tops[0] == tops[1] == tops[2], f"the five actions take more than a line: {tops}"
    recorded.screenshot("fleet-parked-en")

    awake.locator("button.park").click()
    expect(page.locator(".toast", has_text="Instance woken")).to_have_count(1)
    expect(awake.locator(".badge")).to_have_text("running")
    expect(awake.locator(".memory")).to_have_text(SIZE)
    expect(page.locator("#sum-parked")).to_have_text("1")
    expect(page.locator("#activity li", has_text=f"st-instance-{ports['awake']} woken")).to_have_count(1)
    assert served.api("GET", f"/api/instances/st-instance-{ports['awake']}").json()["observed"] == "running"
    assert recorded.outside_hosts() == []


def test_chinese_and_phone_width(new_page, fleet):
    served, ports = fleet
    recorded = sign_in(new_page, served, locale="zh-CN")
    page = recorded.page
    page.select_option("#lang", "zh")
    expect(page.locator("#summary")).to_contain_text("已休眠")
    expect(row(page, ports["parks"]).locator(".badge")).to_have_text("已休眠")
    expect(row(page, ports["parks"]).locator("button.park")).to_have_text("唤醒")
    expect(row(page, ports["awake"]).locator("button.park")).to_have_text("休眠")
    expect(page.locator("#instance-search")).to_have_attribute("placeholder", "按 ID 或端口搜索")
    page.locator("#state-filter").select_option("stopped")
    expect(page.locator("#shown-count")).to_have_text(f"显示 {STOPPED} / {STOPPED + 3} 个")
    page.locator("#state-filter").select_option("running")
    recorded.screenshot("fleet-running-zh")

    phone = sign_in(new_page, served, width=360, locale="zh-CN")
    page = phone.page
    expect(row(page, ports["plain"]).locator(".memory")).to_have_text(SIZE)
    no_horizontal_scroll(page)
    page.locator("#instance-search").fill(str(ports["parks"]))
    assert shown_ids(page) == [f"st-instance-{ports['parks']}"]
    no_horizontal_scroll(page)
    phone.screenshot("fleet-360-search")
    page.locator("#instance-search").fill("")
    page.locator("#state-filter").select_option("running")
    no_horizontal_scroll(page)
    phone.screenshot("fleet-360-running")
    assert recorded.outside_hosts() == [] and phone.outside_hosts() == []


def test_disk_use_per_data_dir_and_in_total(new_page, fleet):
    served, ports = fleet
    rows = {row["id"]: row for row in served.api("GET", "/api/instances").json()}
    never_started = ports["stopped"][0]
    assert rows[f"st-instance-{never_started}"]["disk"] is None, "no data dir yet"
    recorded = sign_in(new_page, served)
    page = recorded.page
    # cst serve walks the data dirs in the background: the rows get their figure when a walk ends
    for name in ("plain", "awake"):   # started, so they have a data dir ("parks" started parked: none yet)
        expect(row(page, ports[name]).locator(".c-dataDir .disk")).to_have_text(SIZE)
    expect(row(page, never_started).locator(".c-dataDir .disk")).to_have_text("—")
    expect(page.locator("#sum-disk")).to_have_text(SIZE)
    expect(page.locator("#summary")).to_contain_text("Disk")
    data_dir = row(page, ports["plain"]).locator(".c-dataDir")
    expect(data_dir.locator(".path")).to_have_text(rows[f"st-instance-{ports['plain']}"]["dataDir"])
    expect(data_dir.locator(".disk")).to_have_attribute("title", re.compile("Disk its data dir uses"))
    page.locator("#state-filter").select_option("running")
    recorded.screenshot("fleet-disk-en")

    page.select_option("#lang", "zh")
    expect(page.locator("#summary")).to_contain_text("磁盘")
    expect(data_dir.locator(".disk")).to_have_attribute("title", re.compile("数据目录占用的磁盘空间"))
    expect(data_dir).to_have_attribute("data-label", "数据目录")
    recorded.screenshot("fleet-disk-zh")

    phone = sign_in(new_page, served, width=360, locale="zh-CN")
    page = phone.page
    expect(page.locator("#sum-disk")).to_have_text(SIZE)
    page.locator("#state-filter").select_option("running")
    expect(row(page, ports["plain"]).locator(".c-dataDir .disk")).to_be_visible()
    no_horizontal_scroll(page)
    phone.screenshot("fleet-disk-360")
    assert recorded.outside_hosts() == [] and phone.outside_hosts() == []
