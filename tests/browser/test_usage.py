"""The admin page shows each instance's use of the key pool against its budget, and a chart of daily
tokens: a real `cst serve` with stand-in instances, its proxy pointed at the fake upstream, chats
sent with each instance's own proxy key, and every number on the page compared with the API's.
Screenshots go to tests/artifacts/usage-*.png."""
from __future__ import annotations

import json
import os
import re
from datetime import date, timedelta
from typing import Any

import httpx
import pytest
from playwright.sync_api import Page, expect

from conftest import Project, fake_upstream, free_ports, kill_all, standin_file, start_serve, wait_until

from .conftest import sign_in_to_admin_page

KEY = "usage-test-admin-key"
POOL_KEYS = "sk-good-usage11112222,sk-good-usage33334444"
expect.set_options(timeout=30_000)  # a busy 2-core machine; every wait ends as soon as it holds


class Fleet:
    def __init__(self, project: Project, served: Any, proxy_port: int, ports: list[int]):
        self.project, self.served, self.proxy_port, self.ports = project, served, proxy_port, ports
        self.url = served.url

    def id(self, port: int) -> str:
        return f"st-instance-{port}"

    def key(self, port: int) -> str:
        return (self.project.state_dir / "secrets" / "proxy-keys" / self.id(port)).read_text().strip()

    def chat(self, port: int, text: str = "hello") -> httpx.Response:
        return httpx.post(f"http://127.0.0.1:{self.proxy_port}/v1/chat/completions", timeout=30,
                          headers={"Authorization": f"Bearer {self.key(port)}"},
                          json={"model": "gpt-fake", "messages": [{"role": "user", "content": text}]})

    def usage(self, query: str = "") -> dict:
        answer = self.served.api("GET", "/api/usage" + query)
        assert answer.status_code == 200, answer.text
        return answer.json()

    def history(self) -> dict:
        day = self.usage()["window"]["day"]
        start = (date.fromisoformat(day) - timedelta(days=29)).isoformat()
        return self.usage(f"?from={start}&to={day}")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """`cst serve` with three stand-in instances: one with a budget of its own (which it uses up), one
    with the fleet's budget, one without any limit; its proxy relays to the fake upstream."""
    with fake_upstream() as upstream:
        yield from _serve(tmp_path_factory, upstream)


def _serve(tmp_path_factory: pytest.TempPathFactory, upstream: Any):
    folder = tmp_path_factory.mktemp("usage")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CST_")}
    env["USAGE_POOL_KEYS"] = POOL_KEYS
    project = Project(folder, env)
    api, proxy, a, b, c = free_ports(5)
    settings = (f'resync: 2s\napi: {{listen: "127.0.0.1:{api}"}}\n'
                f'proxy: {{listen: "127.0.0.1:{proxy}", upstream: "{upstream.url}/v1"}}\n'
                'usage: {timezone: Asia/Shanghai}\nbudget: {tokens_per_day: 1000}')
    extra = {a: {"budget": "{tokens_per_day: 20, tokens_per_month: 20000, requests_per_minute: 30}"},
             c: {"budget": "{}"}}
    project.write(standin_file([(a, "running"), (b, "running"), (c, "running")], extra, settings=settings)
                  + "accounts:\n  - {name: extra, provider: static, keys_env: USAGE_POOL_KEYS}\n")
    served = start_serve(project, api, admin_key=KEY)
    try:
        yield Fleet(project, served, proxy, [a, b, c])
    finally:
        served.stop()
        kill_all(project.state_dir.resolve())


@pytest.fixture(scope="module")
def fleet(served: Fleet) -> Fleet:
    """The same, after chats with each instance's own proxy key."""
    a, b, c = served.ports
    wait_until(lambda: all((served.project.state_dir / "secrets" / "proxy-keys" / served.id(p)).is_file()
                           for p in served.ports), timeout=60, interval=0.2)
    # the proxy knows a key once it has read its file: the first chat may need a moment
    wait_until(lambda: served.chat(b).status_code == 200, timeout=30, interval=0.2)
    for _ in range(10):  # a: until its 20 tokens a day are used up (each answer reports 8)
        if served.chat(a).status_code == 429:
            break
    else:
        raise AssertionError("the budget of 20 tokens a day never ran out")
    for _ in range(3):
        assert served.chat(c).status_code == 200
    return served


def sign_in(new_page, fleet, width: int = 1280, locale: str = "en-US", lang: str = "en"):
    recorded = sign_in_to_admin_page(new_page, fleet.url, KEY, width, locale, lang)
    expect(recorded.page.locator("#live")).to_have_class(re.compile(r"\bon\b"))
    return recorded


def n(value: int) -> str:
    return f"{value:,}"


WORDS = {"en": {"used_up": "used up", "no_limit": "no limit", "tokens": "{} tokens", "rpm": "≤ {}/min",
                "tab": "Usage", "today": "Today", "month": "This month"},
         "zh": {"used_up": "已用完", "no_limit": "不限", "tokens": "{} tokens", "rpm": "≤ {} 次/分钟",
                "tab": "用量", "today": "今日", "month": "本月"}}


def check_rows(page: Page, fleet: Fleet, lang: str) -> None:
    """Each instance's cell in the instances table says what /api/usage says."""
    words = WORDS[lang]
    doc = fleet.usage()
    for port in fleet.ports:
        entry = doc["instances"][fleet.id(port)]
        cell = page.locator(f'#instances tr[data-id="{fleet.id(port)}"] .c-usage')
        day = cell.locator('.use-line[data-kind="day"] .use-num')
        budget, left = entry["budget"], entry["left"]
        if budget and budget["tokens_per_day"] is not None:
            expect(day).to_have_text(f"{n(entry['today']['tokens'])} / {n(budget['tokens_per_day'])}")
            expect(cell.locator('[role="meter"]').first).to_have_attribute(
                "aria-valuemax", str(budget["tokens_per_day"]))
        else:
            expect(day).to_have_text(words["tokens"].format(n(entry["today"]["tokens"])))
        if budget and budget["tokens_per_month"] is not None:
            expect(cell.locator('.use-line[data-kind="month"] .use-num')).to_have_text(
                f"{n(entry['month']['tokens'])} / {n(budget['tokens_per_month'])}")
        else:
            expect(cell.locator('.use-line[data-kind="month"]')).to_have_count(0)
        if budget is None:
            expect(cell.locator(".use-note")).to_have_text(words["no_limit"])
        elif budget["requests_per_minute"] is not None:
            expect(cell.locator(".use-note")).to_have_text(words["rpm"].format(budget["requests_per_minute"]))
        spent = bool(left) and left["tokens_per_day"] == 0
        expect(cell.locator(".use-flag")).to_have_count(1 if spent else 0)
        if spent:
            expect(cell.locator(".use-flag")).to_have_text(words["used_up"])


def check_usage_view(page: Page, fleet: Fleet, lang: str) -> None:
    """The usage view's table and chart say what /api/usage and its history say."""
    words = WORDS[lang]
    page.click('a[data-view="usage"]')
    expect(page.locator('a[data-view="usage"]')).to_have_text(words["tab"])
    doc, history = fleet.usage(), fleet.history()
    for id_, entry in doc["instances"].items():
        tr = page.locator(f'#usage-table tr[data-id="{id_}"]')
        expect(tr.locator("td").nth(3)).to_have_text(
            f"{n(entry['today']['requests'])} / {n(entry['month']['requests'])}")
        expect(tr.locator("td").nth(4)).to_have_text(f"{n(entry['today']['errors'])} / {n(entry['month']['errors'])}")
        limit = (entry["budget"] or {}).get("tokens_per_month")
        month = f"{n(entry['month']['tokens'])} / {n(limit)}" if limit is not None \
            else words["tokens"].format(n(entry["month"]["tokens"]))
        expect(tr.locator("td").nth(2).locator(".use-num")).to_have_text(month)
    totals: dict[str, int] = {}
    for row in history["days"]:
        totals[row["instance"]] = totals.get(row["instance"], 0) + row["tokens"]
    used = {id_: total for id_, total in totals.items() if total > 0}
    legend = page.locator("#chart-legend li")
    expect(legend).to_have_count(len(used))
    for id_, total in used.items():
        expect(page.locator(f'#chart-legend li[data-id="{id_}"]')).to_have_attribute("data-total", str(total))
        expect(page.locator(f'#chart-legend li[data-id="{id_}"]')).to_contain_text(
            words["tokens"].format(n(total)))
    bars = [row for row in history["days"] if row["tokens"] > 0]
    expect(page.locator("#chart-plot svg rect")).to_have_count(len(bars))
    for row in bars:
        rect = page.locator(f'#chart-plot rect[data-id="{row["instance"]}"][data-day="{row["day"]}"]')
        expect(rect.locator("title")).to_contain_text(n(row["tokens"]))
    label = page.locator("#chart-plot svg").get_attribute("aria-label")
    assert all(f"{id_}" in label and n(total) in label for id_, total in used.items()), label
    page.locator("#chart-data summary").click()
    header = page.locator("#chart-table thead th")
    ids = [header.nth(i).inner_text() for i in range(1, header.count() - 1)]
    assert sorted(ids) == sorted(used)
    for row in bars:
        cells = page.locator(f'#chart-table tr[data-day="{row["day"]}"] td')
        expect(cells.nth(ids.index(row["instance"]))).to_have_text(n(row["tokens"]))
    assert page.locator("#usage-window").inner_text().count(doc["window"]["timezone"]) == 1


def no_horizontal_scroll(page: Page, what: str) -> None:
    overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, f"{what}: {overflow}px of horizontal scroll"


@pytest.mark.parametrize("lang, locale, width", [("en", "en-US", 1280), ("zh", "zh-CN", 1280),
                                                 ("en", "en-US", 360), ("zh", "zh-CN", 360)])
def test_the_page_shows_each_instance_s_use_against_its_budget(new_page, fleet, lang, locale, width):
    recorded = sign_in(new_page, fleet, width=width, locale=locale, lang=lang)
    page = recorded.page
    check_rows(page, fleet, lang)
    no_horizontal_scroll(page, "instances")
    recorded.screenshot(f"usage-instances-{lang}-{width}")
    check_usage_view(page, fleet, lang)
    no_horizontal_scroll(page, "usage")
    recorded.screenshot(f"usage-{lang}-{width}")
    recorded.screenshot(f"usage-{lang}-{width}-chart", element=page.locator("#chart"))
    assert recorded.outside_hosts() == []


def test_a_new_request_shows_without_a_reload(new_page, fleet):
    """No event is sent per request: the page polls /api/usage (every 15 s) and updates in place."""
    recorded = sign_in(new_page, fleet)
    page = recorded.page
    b = fleet.ports[1]
    day = page.locator(f'#instances tr[data-id="{fleet.id(b)}"] .c-usage .use-line[data-kind="day"] .use-num')
    before = fleet.usage()["instances"][fleet.id(b)]["today"]["tokens"]
    expect(day).to_have_text(f"{n(before)} / 1,000")
    assert fleet.chat(b).status_code == 200
    after = fleet.usage()["instances"][fleet.id(b)]["today"]["tokens"]
    assert after > before
    expect(day).to_have_text(f"{n(after)} / 1,000")
    assert recorded.outside_hosts() == []


# -- the chart's edge cases, with the usage documents handed to the browser

def documents(ids: list[str], days: int = 30) -> tuple[dict, dict]:
    """A usage document and a 30-day history for ``ids``, with made-up but varied numbers."""
    window = {"timezone": "Asia/Shanghai", "day": "2026-11-30", "month": "2026-11",
              "resets": {"day": "2026-12-01T00:00:00+08:00", "month": "2026-12-01T00:00:00+08:00"}}
    rows: list[dict[str, Any]] = []
    instances: dict[str, Any] = {}
    for i, id_ in enumerate(ids):
        for d in range(days):
            tokens = ((i + 3) * (d + 7) * 37) % 900 if (i + d) % 4 else 0
            if tokens:
                rows.append({"day": f"2026-11-{d + 1:02d}", "instance": id_, "requests": tokens // 50 + 1,
                             "errors": 0, "prompt_tokens": tokens // 3, "completion_tokens": tokens - tokens // 3,
                             "tokens": tokens, "estimated": 0})
        today = next((r for r in rows if r["instance"] == id_ and r["day"] == "2026-11-30"), None)
        tally = {k: (today or {}).get(k, 0) for k in ("requests", "errors", "prompt_tokens", "completion_tokens",
                                                     "tokens", "estimated")}
        month = {k: sum(r[k] for r in rows if r["instance"] == id_) for k in tally}
        budget = {"tokens_per_day": 1000, "tokens_per_month": None, "requests_per_minute": None} if i % 2 else None
        left = {"tokens_per_day": max(0, 1000 - tally["tokens"]), "tokens_per_month": None,
                "requests_per_minute": None} if budget else None
        instances[id_] = {"today": tally, "month": month, "budget": budget, "left": left}
    rows.sort(key=lambda r: (r["day"], r["instance"]))
    return ({"window": window, "instances": instances},
            {"window": window, "from": "2026-11-01", "to": "2026-11-30", "days": rows})


def hand_over(page: Page, current: dict, history: dict) -> None:
    def answer(route):
        body = history if "from=" in route.request.url else current
        route.fulfill(status=200, content_type="application/json", body=json.dumps(body))
    page.route("**/api/usage*", answer)


@pytest.mark.parametrize("count, lang, width", [(0, "en", 1280), (1, "zh", 360), (12, "en", 1280), (12, "zh", 360)])
def test_the_chart_reads_with_none_one_or_many_instances(new_page, served, count, lang, width):
    ids = [f"st-instance-{9000 + i}" for i in range(count)]
    current, history = documents(ids)
    recorded = new_page(width=width, locale="zh-CN" if lang == "zh" else "en-US")
    page = recorded.page
    page.add_init_script(f"localStorage.setItem('cst-lang', '{lang}')")
    hand_over(page, current, history)
    page.goto(served.url + "/#usage")
    page.fill("#key", KEY)
    page.press("#key", "Enter")
    expect(page.locator("#view-usage")).to_be_visible()
    expect(page.locator("#usage-table tbody tr")).to_have_count(count)
    expect(page.locator("#chart-legend li")).to_have_count(count)
    expect(page.locator("#chart-plot svg rect")).to_have_count(len(history["days"]))
    if not count:
        expect(page.locator("#chart-plot svg .empty-text")).to_have_text("No tokens used in these 30 days.")
        expect(page.locator("#no-usage")).to_be_visible()
    svg = page.locator("#chart-plot svg")
    assert svg.get_attribute("role") == "img"
    box = svg.bounding_box()
    assert box and box["x"] >= 0 and box["x"] + box["width"] <= width, "the chart fits the screen"
    labels = page.locator("#chart-plot svg text.tick")
    spans = sorted((labels.nth(i).bounding_box() for i in range(labels.count())), key=lambda b: (b["y"], b["x"]))
    for one, two in zip(spans, spans[1:]):  # no label drawn over another
        assert one["y"] != two["y"] or one["x"] + one["width"] <= two["x"], (one, two)
    for span in spans:  # nor cut by the edge
        assert box["x"] <= span["x"] and span["x"] + span["width"] <= box["x"] + box["width"], (span, box)
    no_horizontal_scroll(page, "usage")
    page.locator("#chart-data summary").click()
    no_horizontal_scroll(page, "usage, with the table open")
    recorded.screenshot(f"usage-chart-{count}-{lang}-{width}")
    recorded.screenshot(f"usage-chart-{count}-{lang}-{width}-chart", element=page.locator("#chart"))
    assert recorded.outside_hosts() == []
