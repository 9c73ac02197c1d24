"""Schemathesis drives the API from its own OpenAPI document: no 500, no traceback in a body, and
status codes, content types and bodies as documented (the admin page's endpoints too). The daemon runs on the stand-in server, so
instances the fuzzer creates are cheap; all of them are killed afterwards.

The event stream is fuzzed too, with hostile ``Last-Event-ID`` values (tests/server/fuzz_hooks.py): each
answer is one clean 200 stream or a 4xx JSON error, never a second response inside a started one,
and the daemon stays healthy after."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

import httpx

from conftest import Project, Served, free_ports, serve_settings, standin_file

ADMIN_KEY = "fuzz-admin-key"
CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "no_traceback", "one_clean_answer"]
# the stream never ends by design: schemathesis reads it up to its first event (a new stream starts
# with reset, or with the events after its Last-Event-ID), bounded in time should none come
CONFIG = """
[[operations]]
include-path = "/api/events"
max-stream-events = 1
request-timeout = 10
generation.max-examples = 100   # the listed hostile values (fuzz_hooks.HOSTILE) first, then generated ones
"""


def _run_id(url: str) -> str:
    """This cst serve's run, the first part of its event ids."""
    with httpx.stream("GET", url + "/api/events", headers={"X-ST-Admin-Key": ADMIN_KEY}, timeout=10) as stream:
        ids = (line for line in stream.iter_lines() if line.startswith("id:"))
        return next(ids).split(":", 1)[1].strip().rpartition("-")[0]


def test_api_fuzz(project: Project, serve: Callable[..., Served]) -> None:
    (api,) = free_ports(1)
    project.write(standin_file([], settings=serve_settings(api, "1s")))
    served = serve(api, admin_key=ADMIN_KEY)
    config, events_log = project.dir / "schemathesis.toml", project.dir / "events.jsonl"
    config.write_text(CONFIG)
    cli = Path(sys.executable).with_name("schemathesis")
    result = subprocess.run(
        [str(cli), "--config-file", str(config), "run", f"{served.url}/api/openapi.json",
         "-H", f"X-ST-Admin-Key: {ADMIN_KEY}",
         "--checks", ",".join(CHECKS), "--max-examples", "30", "--workers", "1", "--seed", "1",
         "--phases", "examples,coverage,fuzzing", "--request-timeout", "60"],
        # fuzz_hooks: the hostile Last-Event-ID values, the stream's check; a followed log is
        # turned into a plain one by its before_call
        env={**os.environ, "SCHEMATHESIS_HOOKS": "fuzz_hooks", "PYTHONPATH": str(Path(__file__).parent),
             "FUZZ_EVENTS_RUN": _run_id(served.url), "FUZZ_EVENTS_LOG": str(events_log)},
        cwd=project.dir,  # its cache folder goes there, not into the repository
        capture_output=True, text=True, timeout=900)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-6000:]
    assert "No issues found" in report or "passed" in report.lower(), report[-3000:]
    assert served.proc.poll() is None, "the daemon survived the fuzzing"

    # every listed hostile Last-Event-ID reached the stream and was answered with one; generated ones too
    calls = [json.loads(line) for line in events_log.read_text(encoding="utf-8").splitlines()]
    streamed = [call for call in calls if call["status"] == 200 and "text/event-stream" in call["type"]]
    listed = {call["sent"] for call in streamed if call["listed"]}
    assert calls and len(listed) == calls[0]["hostile"], f"{len(listed)} of {calls[0]['hostile']} answered"
    assert any(not call["listed"] and call["sent"] is not None for call in streamed), "none generated"
    # healthy after: liveness, a fresh stream, and nothing unexpected in the daemon's log
    assert httpx.get(served.url + "/health", timeout=10).status_code == 200
    assert _run_id(served.url)
    log = served.log.read_text(errors="replace")
    assert "unexpected error" not in log, log[-3000:]
    # aiohttp's parser refusing a request schemathesis sent (a NUL in a header) is logged with its
    # traceback; any other exception is one of CST's
    raised = re.findall(r"^Traceback \(most recent call last\):\n(?:[ \t].*\n|.*\^.*\n)*(\S.*)", log, re.MULTILINE)
    assert all(line.startswith("aiohttp.http_exceptions.BadHttpMessage") for line in raised), raised
