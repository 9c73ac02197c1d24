"""The ledger through `cst serve` and `cst usage`, as a host uses them: usage and budgets in the API,
the command line reading the same ledger, and counts that survive a restart and a `kill -9`."""
from __future__ import annotations

import csv
import io
import json
import os
import signal

import httpx

from conftest import fake_upstream, free_ports, http_status, standin_file, wait_until

GOOD = "sk-good-aaaaaaaaaaaa1111"
TOKENS = 3 + 5   # what the fake upstream reports for each answer: 3 prompt, 5 completion


def chat(proxy: int, key: str) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{proxy}/v1/chat/completions", timeout=30,
                      headers={"Authorization": f"Bearer {key}"},
                      json={"model": "gpt-fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})


def usage_of(project, id_: str) -> dict:
    answer = project.cst("usage", "-o", "json")
    assert answer.returncode == 0, answer.stderr
    return json.loads(answer.stdout)["instances"][id_]


def test_usage_and_budgets_through_serve_survive_a_restart_and_a_kill_9(project, serve):
    api, proxy, a, b = free_ports(4)
    ids = [f"st-instance-{a}", f"st-instance-{b}"]
    with fake_upstream() as upstream:
        project.write(standin_file(
            [(a, "running"), (b, "running")],
            settings=(f'resync: 1s\napi: {{listen: "127.0.0.1:{api}"}}\n'
                      f'proxy: {{listen: "127.0.0.1:{proxy}", upstream: "{upstream.url}/v1"}}\n'
                      f'usage: {{timezone: Asia/Shanghai}}\nbudget: {{tokens_per_day: {5 * TOKENS}}}'),
            extra_instance={b: {"budget": "null"}})
            + "accounts:\n  - {name: main, provider: static, keys_env: POOL_KEYS}\n")
        project.env["POOL_KEYS"] = GOOD
        served = serve(api)
        wait_until(lambda: http_status(a) == 401 and http_status(b) == 401, timeout=30)
        key = (project.state_dir / "secrets" / "proxy-keys" / ids[0]).read_text().strip()
        for _ in range(2):
            assert chat(proxy, key).status_code == 200

        listing = served.api("GET", "/api/usage").json()
        assert listing["window"]["timezone"] == "Asia/Shanghai"
        today = listing["window"]["day"]
        mine, other = listing["instances"][ids[0]], listing["instances"][ids[1]]
        assert (mine["today"]["requests"], mine["today"]["tokens"], mine["month"]["tokens"]) == (2, 2 * TOKENS, 2 * TOKENS)
        assert mine["budget"] == {"tokens_per_day": 5 * TOKENS, "tokens_per_month": None, "requests_per_minute": None}
        assert mine["left"]["tokens_per_day"] == 3 * TOKENS
        assert other["budget"] is None and other["today"]["requests"] == 0   # budget: null means no limit
        row = served.api("GET", f"/api/instances/{ids[0]}").json()
        assert row["usage"]["today"] == mine["today"] and row["left"] == mine["left"] and row["status"] == "online"

        def written(requests: int) -> bool:   # on disk, as `cst usage` (another process) reads it
            return usage_of(project, ids[0])["today"]["requests"] == requests
        wait_until(lambda: written(2))
        days = served.api("GET", f"/api/usage?from={today}&to={today}&instance={ids[0]}").json()["days"]
        assert days == [{"day": today, "instance": ids[0], "requests": 2, "errors": 0, "prompt_tokens": 6,
                         "completion_tokens": 10, "tokens": 2 * TOKENS, "estimated": 0}]
        exported = project.cst("usage", "-o", "csv", "--from", today, "--to", today)
        assert list(csv.DictReader(io.StringIO(exported.stdout))) == [
            {"day": today, "instance": ids[0], "requests": "2", "errors": "0", "prompt_tokens": "6",
             "completion_tokens": "10", "tokens": str(2 * TOKENS), "estimated": "0"}]
        text = project.cst("usage").stdout
        assert ids[0] in text and f"{3 * TOKENS}" in text
        for bad in ("from=2026-13-01", "from=yesterday", "to=2026-02-30", f"from={today}&to=2000-01-01",
                    "instance=../etc"):
            refused = served.api("GET", f"/api/usage?{bad}&lang=en")
            assert refused.status_code == 400 and "error" in refused.json(), (bad, refused.text)

        served.stop()   # SIGTERM: what is queued is written
        served = serve(api)
        assert served.api("GET", "/api/usage").json()["instances"][ids[0]] == mine
        assert chat(proxy, key).status_code == 200
        wait_until(lambda: written(3))
        os.kill(served.proc.pid, signal.SIGKILL)   # between requests: nothing in flight
        served.proc.wait()
        served = serve(api)
        after = served.api("GET", "/api/usage").json()["instances"][ids[0]]
        assert (after["today"]["requests"], after["left"]["tokens_per_day"]) == (3, 2 * TOKENS)

        for _ in range(2):
            assert chat(proxy, key).status_code == 200
        over = chat(proxy, key)   # 5 answers of TOKENS used the day's budget
        assert over.status_code == 429 and over.json()["error"]["code"] == "budget_exceeded"
        assert len([s for s in upstream.seen if s.path == "/v1/chat/completions"]) == 5
