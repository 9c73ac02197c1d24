"""CI and the daemon agree on what runs: `cst apply` from a shell with another PATH and another
$CST_SILLYTAVERN_HOME (the same release elsewhere) changes nothing the daemon started; a new release
version in the file does restart."""
from __future__ import annotations

import json
import os
import shutil

from conftest import STANDIN, free_ports, front_end_for_the_sandbox, http_status, serve_settings, wait_until
from reconciler.runtime import overlay


def release_home(root, *versions: str):
    """An install home as `cst st install` leaves it (the release, CST's overlay laid over it), with
    the stand-in as each release's server."""
    for version in versions:
        package = root / version / "node_modules" / "sillytavern"
        package.mkdir(parents=True)
        shutil.copy(STANDIN, package / "server.js")
        (package / "package.json").write_text(json.dumps({"name": "sillytavern", "version": version}))
        overlay.lay(root / version, package)
        front_end_for_the_sandbox(root / version)
        (root / version / ".cst-ready").write_text(version + "\n")
    return root


def fleet(api: int, ports: list[int], version: str) -> str:
    body = "".join(f"  - port: {p}\n" for p in ports)
    settings = "".join(f"  {line}\n" for line in serve_settings(api, "0.5s").splitlines())
    return (f"version: 1\nsettings:\n  sillytavern: {{version: \"{version}\", start_timeout: 15, stop_timeout: 3, "
            "rollout: {pause: 0.2s}}\n"
            f"{settings}instances:\n{body}")


def recap(result) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_apply_from_another_shell_changes_nothing_the_daemon_started(project, serve, tmp_path):
    api, a, b = free_ports(3)
    home = release_home(tmp_path / "home", "1.19.0", "1.19.1")
    project.env["CST_SILLYTAVERN_HOME"] = str(home)
    project.write(fleet(api, [a, b], "1.19.0"))
    served = serve(api)
    wait_until(lambda: http_status(a) == 401 and http_status(b) == 401, timeout=30)
    pids = {p: served.api("GET", f"/api/instances/st-instance-{p}").json()["pid"] for p in (a, b)}

    # CI: node found somewhere else on PATH, the release installed in its own cache folder
    other_bin = tmp_path / "ci-bin"
    other_bin.mkdir()
    os.symlink(shutil.which("node"), other_bin / "node")
    ci_home = tmp_path / "ci-cache"
    shutil.copytree(home, ci_home, symlinks=True)
    ci_path = f"{other_bin}{os.pathsep}{project.env['PATH']}"
    for spelled in (f"{home}/./", str(ci_home)):
        result = project.cst("apply", env={"PATH": ci_path, "CST_SILLYTAVERN_HOME": spelled})
        assert recap(result) == "ok=2 changed=0 failed=0", result.stdout
    assert {p: served.api("GET", f"/api/instances/st-instance-{p}").json()["pid"] for p in (a, b)} == pids
    assert served.log.read_text().count("changed: ") == 2, "the daemon's two starts, nothing since: it did not fight back"
    served.stop()

    # what the file says does count: a new release version is rolled out to the instances, and the
    # release no instance runs any more is removed
    project.write(fleet(api, [a, b], "1.19.1"))
    result = project.cst("apply", env={"PATH": ci_path, "CST_SILLYTAVERN_HOME": str(ci_home)})
    assert recap(result) == "ok=0 changed=3 failed=0", result.stdout
    assert result.stdout.count("(upgraded: sillytavern@1.19.0 -> sillytavern@1.19.1") == 2, result.stdout
    assert "changed: sillytavern 1.19.0 (removed: no instance runs it any more)" in result.stdout
