"""The admin page at 500 instances (issue 19): how long the instances view takes to show them in a
real browser, how long one live update takes, and a search.

    .venv/bin/python bench/page500.py [--runs 5] [--instances 500] [--running 3] [--width 1280]

`cst serve` on a desired.yaml declaring --instances instances, all but --running of them
`state: stopped` (no process needed), the running ones on the stand-in server; the page in Debian's
chromium driven by Playwright (as tests/browser does) in a window --width px wide and 800 high
(1280: the table; under 1240 the rows are cards). Each run opens the page in a
fresh context and signs in, stops one running instance through the API and starts it again, then
searches for one port:

* first render: from the end of the GET /api/instances response to the first frame painted with
  every row in it (parsing the JSON, building the rows, style, layout, paint); and from the click on
  "Sign in" to that frame, the API's own time included.
* live update: from the end of the GET /api/instances response the page fetched on the events of a
  stop (and of a start) to the first frame painted with the row's new status.
* search: from a port typed in the search box to the frame painted with its row alone; and from the
  box cleared to the frame with every row again.

Times are the page's own performance.now(); a frame counts as painted at the first task after its
requestAnimationFrame. Medians of --runs runs (min, max). Every process started here is stopped.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import httpx
from playwright.sync_api import Page, sync_playwright

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT / "tests" / "browser")]
from serve import KEY, STANDIN, Daemon, answers, free_ports, wait  # noqa: E402  (bench/serve.py)

from conftest import CHROMIUM, CHROMIUM_ARGS  # noqa: E402  (tests/browser/conftest.py: Debian's chromium)

# Resolves at the first painted frame after the current task: rAF runs before style, layout and
# paint, a task queued from it after them.
PAINTED = "const painted = () => new Promise((done) => requestAnimationFrame(() => setTimeout(done)));"
# The last GET /api/instances that had ended by `at`: its responseEnd starts the page's own work.
FETCHED = """const fetchedBefore = (at) => performance.getEntriesByName(new URL('api/instances', location.href).href)
  .filter((entry) => entry.responseEnd <= at).at(-1);"""

SIGN_IN_AND_RENDER = f"""async ({{ key, rows }}) => {{
  {PAINTED} {FETCHED}
  const body = document.querySelector('#instances tbody');
  const filled = new Promise((done) => {{
    const observer = new MutationObserver(() => {{
      if (body.rows.length >= rows) {{ observer.disconnect(); done(performance.now()); }}
    }});
    observer.observe(body, {{ childList: true }});
  }});
  const clicked = performance.now();
  document.querySelector('#key').value = key;
  document.querySelector('#signin-submit').click();
  const shown = await filled;
  await painted();
  const end = performance.now();
  return {{ page: end - fetchedBefore(shown).responseEnd, total: end - clicked }};
}}"""

# Arms a watch for the row's status to read `text`; `window.liveUpdate` resolves with the time.
WATCH_ROW = f"""({{ id, text }}) => {{
  {PAINTED} {FETCHED}
  performance.clearResourceTimings();  // the buffer keeps 250 entries; the page fetches all day
  const body = document.querySelector('#instances tbody');
  const badge = body.querySelector(`tr[data-id="${{id}}"] .c-status .badge`);
  window.liveUpdate = new Promise((done) => {{
    const observer = new MutationObserver(async () => {{
      if (badge.textContent !== text) return;
      observer.disconnect();
      const changed = performance.now();
      await painted();
      done(performance.now() - fetchedBefore(changed).responseEnd);
    }});
    observer.observe(body, {{ subtree: true, childList: true, characterData: true }});
  }});
}}"""

SEARCH = f"""async (query) => {{
  {PAINTED}
  const box = document.querySelector('#instance-search');
  const began = performance.now();
  box.value = query;
  box.dispatchEvent(new Event('input', {{ bubbles: true }}));
  await painted();
  const shown = [...document.querySelectorAll('#instances tbody tr')].filter((row) => !row.hidden);
  return {{ ms: performance.now() - began, shown: shown.map((row) => row.dataset.id) }};
}}"""


def desired_file(api: int, proxy: int, running: list[int], stopped: list[int]) -> str:
    lines = ["version: 1", "settings:", "  resync: 60s", "  concurrency: 8",
             f"  sillytavern: {{server: {STANDIN}}}", f'  api: {{listen: "127.0.0.1:{api}"}}',
             f'  proxy: {{listen: "127.0.0.1:{proxy}"}}', "instances:"]
    for port in sorted(running + stopped):
        lines += [f"  - port: {port}", f"    state: {'running' if port in running else 'stopped'}"]
    return "\n".join(lines) + "\n"


def live_update(page: Page, daemon: Daemon, id_: str, action: str, shown: str) -> float:
    page.evaluate(WATCH_ROW, {"id": id_, "text": shown})
    answer = httpx.post(f"http://127.0.0.1:{daemon.api}/api/instances/{id_}/{action}",
                        headers={"X-ST-Admin-Key": KEY}, timeout=60)
    answer.raise_for_status()
    return page.evaluate("window.liveUpdate")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--running", type=int, default=3)
    parser.add_argument("--width", type=int, default=1280)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="cst-bench-page-"))
    os.chmod(folder, 0o755)  # as root each instance runs as a user of its own, which must reach its data dir
    api, proxy, *ports = free_ports(args.instances + 2)
    running = ports[:args.running]
    (folder / "desired.yaml").write_text(desired_file(api, proxy, running, ports[args.running:]))
    daemon = Daemon(folder, api)
    figures: dict[str, list[float]] = {}
    try:
        wait(lambda: all(answers(port) for port in running), timeout=60)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            for _ in range(args.runs):
                context = browser.new_context(viewport={"width": args.width, "height": 800}, locale="en-US")
                page = context.new_page()
                page.goto(f"http://127.0.0.1:{api}/")
                page.wait_for_selector("#key")
                first = page.evaluate(SIGN_IN_AND_RENDER, {"key": KEY, "rows": args.instances})
                figures.setdefault("first render (page)", []).append(first["page"])
                figures.setdefault("first render (sign-in to painted)", []).append(first["total"])
                page.wait_for_selector("#live.on")
                id_ = f"st-instance-{running[0]}"
                figures.setdefault("live update: stop", []).append(live_update(page, daemon, id_, "stop", "stopped"))
                figures.setdefault("live update: start", []).append(live_update(page, daemon, id_, "start", "running"))
                query = str(ports[-1])
                found = page.evaluate(SEARCH, query)
                assert found["shown"] == [f"st-instance-{query}"], found["shown"]
                figures.setdefault("search: one port typed", []).append(found["ms"])
                cleared = page.evaluate(SEARCH, "")
                assert len(cleared["shown"]) == args.instances
                figures.setdefault("search: cleared", []).append(cleared["ms"])
                context.close()
            browser.close()
    finally:
        daemon.stop()
        shutil.rmtree(folder, ignore_errors=True)
    print(f"{args.instances} instances ({args.running} running), chromium at {args.width} x 800, {args.runs} runs")
    print("| figure | median | min | max |\n|---|---|---|---|")
    for name, values in figures.items():
        print(f"| {name} | {statistics.median(values):.0f} ms | {min(values):.0f} ms | {max(values):.0f} ms |")


if __name__ == "__main__":
    main()
