"""Schemathesis drives the API from its own OpenAPI document: no 500, no traceback in a body, and
status codes, content types and bodies as documented (the admin page's endpoints too). The daemon runs on the stand-in server, so
instances the fuzzer creates are cheap; all of them are killed afterwards."""
import os
import subprocess
import sys
from pathlib import Path

from conftest import free_ports, serve_settings, standin_file

ADMIN_KEY = "fuzz-admin-key"
CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "no_traceback"]


def test_api_fuzz(project, serve):
    (api,) = free_ports(1)
    project.write(standin_file([], settings=serve_settings(api, "1s")))
    served = serve(api, admin_key=ADMIN_KEY)
    cli = Path(sys.executable).with_name("schemathesis")
    result = subprocess.run(
        [str(cli), "run", f"{served.url}/api/openapi.json", "-H", f"X-ST-Admin-Key: {ADMIN_KEY}",
         "--checks", ",".join(CHECKS), "--max-examples", "30", "--workers", "1", "--seed", "1",
         "--phases", "examples,coverage,fuzzing", "--request-timeout", "60",
         # the event stream never ends by design (tests/test_page_api.py reads it); a followed
         # log is turned into a plain one by fuzz_hooks.before_call
         "--exclude-path", "/api/events"],
        env={**os.environ, "SCHEMATHESIS_HOOKS": "fuzz_hooks",
             "PYTHONPATH": str(Path(__file__).parent)},
        cwd=project.dir,  # its cache folder goes there, not into the repository
        capture_output=True, text=True, timeout=900)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-6000:]
    assert "No issues found" in report or "passed" in report.lower(), report[-3000:]
    assert served.proc.poll() is None, "the daemon survived the fuzzing"
