"""An instance that exits at once on every start: its restarts back off, it shows `errored` with the
reason, and the other instances are not disturbed."""
from __future__ import annotations

import time

from conftest import Project, free_ports, http_status, serve_settings, standin_file, wait_until
from reconciler.desired.model import load


def test_a_crash_loop_backs_off_shows_why_and_leaves_the_others_alone(project, serve):
    api, bad, good1, good2 = free_ports(4)
    project.standin_knobs(bad, {"exitCode": 7})
    project.write(standin_file([(bad, "running"), (good1, "running"), (good2, "running")],
                               settings=serve_settings(api, "0.3s")))
    served = serve(api)
    wait_until(lambda: http_status(good1) == 401 and http_status(good2) == 401, timeout=30)
    pids = {p: served.api("GET", f"/api/instances/st-instance-{p}").json()["pid"] for p in (good1, good2)}
    began = time.monotonic()
    row = wait_until(lambda: (r := served.api("GET", f"/api/instances/st-instance-{bad}?lang=en").json())
                     ["status"] == "errored" and r["detail"] and r, timeout=20)
    assert row["detail"].startswith("errored: failed ") and "(exited with code 7 before answering)" in row["detail"]
    log = project.state_dir / "logs" / f"st-instance-{bad}.log"
    wait_until(lambda: time.monotonic() - began > 7, timeout=10, interval=0.5)
    starts = log.read_text().count("--- cst: starting")
    # passes every 0.3 s for 7 s: about 23 chances; backing off 2 s, 4 s, 8 s leaves at most 5 starts
    assert 2 <= starts <= 5, starts
    assert "stand-in: exiting with 7 as asked" in log.read_text()
    for port, pid in pids.items():
        row = served.api("GET", f"/api/instances/st-instance-{port}").json()
        assert (row["status"], row["pid"], row["restarts"]) == ("online", pid, 0)
        assert http_status(port) == 401
    status = served.api("GET", "/api/status?lang=en").json()
    assert any(r["id"] == f"st-instance-{bad}" and r["outcome"] == "failed" for r in status["reconcile"]["results"])


def test_backoff_follows_the_kind_of_a_result_not_its_wording(project: Project) -> None:
    from reconciler.engine.results import Happened, Result
    from reconciler.engine.supervision import Supervisor
    from reconciler.runtime.base import Observed
    (port,) = free_ports(1)
    project.write(standin_file([(port, "running")]))
    now = [1000.0]
    supervisor = Supervisor(load(project.file), clock=lambda: now[0])
    id_ = f"st-instance-{port}"
    observed = {id_: Observed(id_, port, "stopped")}
    # reworded: neither starts with "did not start"
    supervisor.learn(observed, [Result(id_, "failed", "never came up", happened=Happened.START_FAILED,
                                       cause="exit 7")])
    held = supervisor.errored(id_)
    assert held is not None and "(exit 7)" in held
    supervisor.learn(observed, [Result(id_, "failed", "did not start: but this is a taken port",
                                       happened=Happened.IMPOSSIBLE)])
    assert supervisor.crashes[id_].count == 1   # not a failed start, whatever it says
