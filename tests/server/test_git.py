"""desired.yaml in git, as a host keeps it: `cst serve` commits its API edits, follows a branch
that people and CI push to, pushes its own commits, and reports what it cannot do. A bare
repository plays the remote; the host is a clone of it; a second clone plays a colleague or CI.
Real git, real `cst serve` on the stand-in."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx

from conftest import CST, Project, free_ports, git, http_status, kill_all, standin_file, start_serve, wait_until
from reconciler.server.git_repo import GitOutcomeKind, GitRepo

KEY = "git-test-admin-key"


def host_repo(project: Project, api: int, ports: list[tuple[int, str]], git_settings: str,
              remote: bool = True) -> Path:
    """The project folder as a git work tree tracking desired.yaml (and a bare remote beside it)."""
    (project.dir / ".gitignore").write_text(".cst/\nuser-data/\nremote.git/\nother/\n*.log\n")
    project.write(standin_file(ports, settings=f'resync: 1s\napi: {{listen: "127.0.0.1:{api}"}}\n'
                                               f'proxy: {{listen: "127.0.0.1:{free_ports(1)[0]}"}}\n'
                                               + git_settings))
    git(project.dir, "init", "-q", "-b", "main")
    git(project.dir, "add", ".gitignore", "desired.yaml")
    git(project.dir, "commit", "-q", "-m", "the fleet as the team keeps it")
    bare = project.dir / "remote.git"
    if remote:
        git(project.dir, "init", "-q", "--bare", "-b", "main", str(bare))
        git(project.dir, "remote", "add", "origin", str(bare))
        git(project.dir, "push", "-q", "-u", "origin", "main")
    return bare


def clone(bare: Path, where: Path) -> Path:
    git(bare.parent, "clone", "-q", str(bare), str(where))
    return where


def api(served, method: str, path: str, **kwargs) -> httpx.Response:
    return served.api(method, path, **kwargs)


def git_state(served) -> dict:
    return api(served, "GET", "/api/status").json()["git"]


def test_an_api_edit_is_one_commit_of_desired_yaml_pushed_at_once_and_a_hand_edit_is_never_taken(
        project: Project, serve) -> None:
    api_port, port = free_ports(2)
    bare = host_repo(project, api_port, [], "git: {every: 1h, push: true}")
    initial = git(project.dir, "rev-parse", "HEAD")
    served = serve(api_port, admin_key=KEY)
    created = api(served, "POST", "/api/instances", json={"port": port})
    assert created.status_code == 201, created.text

    # one commit, only desired.yaml, by CST, saying what the call did and from where; pushed at once
    wait_until(lambda: git(bare, "rev-parse", "main") != initial, timeout=15)
    head = git(project.dir, "rev-parse", "HEAD")
    assert git(bare, "rev-parse", "main") == head
    assert git(project.dir, "rev-parse", "HEAD~1") == initial
    assert git(project.dir, "status", "--porcelain") == ""
    assert git(project.dir, "show", "--name-only", "--format=", "HEAD") == "desired.yaml"
    author, subject, body = git(project.dir, "log", "-1", "--format=%an%x00%s%x00%b").split("\x00")
    assert author == "CST" and subject == f"create st-instance-{port} (port {port})"
    assert "127.0.0.1" in body
    desired = api(served, "GET", "/api/desired").json()["git"]
    assert desired["clean"] and desired["head"]["hash"] == head and desired["head"]["message"] == subject
    assert [c["message"] for c in desired["recent"]] == [subject, "the fleet as the team keeps it"]
    assert desired["following"] == {"remote": "origin", "branch": "main", "every": 3600.0, "push": True}

    # someone's edit, left uncommitted: CST's next change is written, and not committed under its name
    with project.file.open("a") as f:
        f.write("# a note a colleague has not committed yet\n")
    stopped = api(served, "POST", f"/api/instances/st-instance-{port}/stop")
    assert stopped.status_code == 200, stopped.text
    assert git(project.dir, "rev-parse", "HEAD") == head
    assert "state: stopped" in project.file.read_text() and "a colleague" in project.file.read_text()
    state = git_state(served)
    assert state["lastCommit"]["kind"] == "foreign_changes" and not state["clean"]
    assert "not committed" in state["lastCommit"]["message"]
    assert git(bare, "rev-parse", "main") == head   # nothing pushed


def test_a_push_from_another_clone_is_merged_and_started_and_nothing_is_forced(project: Project, serve) -> None:
    api_port, kept, mine, theirs = free_ports(4)
    bare = host_repo(project, api_port, [(kept, "stopped")], "git: {every: 1s, push: true}")
    served = serve(api_port, admin_key=KEY)
    assert api(served, "POST", "/api/instances", json={"port": mine}).status_code == 201
    ours = git(project.dir, "rev-parse", "HEAD")
    wait_until(lambda: git(bare, "rev-parse", "main") == ours, timeout=15)

    # a colleague (or CI) clones what runs, adds an instance and pushes
    colleague = clone(bare, project.dir / "other")
    with (colleague / "desired.yaml").open("a") as f:
        f.write(f"  - port: {theirs}\n    state: running\n")
    git(colleague, "commit", "-q", "-am", f"add st-instance-{theirs}")
    git(colleague, "push", "-q", "origin", "main")

    wait_until(lambda: http_status(theirs) == 401, timeout=30)   # fetched, merged, started
    assert http_status(mine) == 401
    remote_head = git(bare, "rev-parse", "main")
    wait_until(lambda: git(project.dir, "rev-parse", "HEAD") == remote_head, timeout=10)
    # the remote holds both commits; nothing was forced: every earlier head is an ancestor
    log = git(bare, "log", "--format=%s", "main")
    assert f"create st-instance-{mine} (port {mine})" in log and f"add st-instance-{theirs}" in log
    git(bare, "merge-base", "--is-ancestor", ours, "main")
    assert git(project.dir, "status", "--porcelain") == ""


def test_a_conflicting_push_and_an_invalid_one_change_nothing_that_runs_and_the_next_fix_is_applied(
        project: Project, serve) -> None:
    api_port, port, spare, later = free_ports(4)
    # the spare keeps the lines changed below apart from the end of the file, where additions go
    bare = host_repo(project, api_port, [(port, "running"), (spare, "stopped")], "git: {every: 1s, push: false}")
    colleague = clone(bare, project.dir / "other")
    served = serve(api_port, admin_key=KEY)
    wait_until(lambda: http_status(port) == 401, timeout=30)

    # CST commits a stop (not pushed); the colleague pushes another change to the same line
    assert api(served, "POST", f"/api/instances/st-instance-{port}/stop").status_code == 200
    ours = git(project.dir, "rev-parse", "HEAD")
    text = (colleague / "desired.yaml").read_text()
    (colleague / "desired.yaml").write_text(text.replace("state: running", "state: running   # keep it up"))
    git(colleague, "commit", "-q", "-am", "keep it up")
    git(colleague, "push", "-q", "origin", "main")

    wait_until(lambda: ((git_state(served)["lastSync"] or {}).get("problem") or {}).get("kind") == "conflict",
               timeout=15)
    problem = git_state(served)["lastSync"]["problem"]["message"]
    assert "conflicts" in problem and "nothing was merged" in problem
    assert git(project.dir, "rev-parse", "HEAD") == ours and git(project.dir, "status", "--porcelain") == ""
    assert http_status(port) == 0 and "state: stopped" in project.file.read_text()   # CST's own change stands

    # the colleague takes their change back: the branch merges, CST's stop stays
    (colleague / "desired.yaml").write_text(text)
    git(colleague, "commit", "-q", "-am", "take it back")
    git(colleague, "push", "-q", "origin", "main")
    wait_until(lambda: (git_state(served)["lastSync"] or {}).get("problem") is None
               and git(project.dir, "rev-list", "--count", "HEAD..origin/main") == "0", timeout=15)
    assert "state: stopped" in project.file.read_text()
    git(project.dir, "merge-base", "--is-ancestor", ours, "HEAD")

    # an invalid file pushed: merged, reported, nothing that runs changes; the fix is applied
    git(colleague, "pull", "-q", "--no-rebase", "--no-edit", "origin", "main")
    good = (colleague / "desired.yaml").read_text()
    (colleague / "desired.yaml").write_text(good + "  - port: not-a-port\n")
    git(colleague, "commit", "-q", "-am", "a typo")
    git(colleague, "push", "-q", "origin", "main")
    wait_until(lambda: not api(served, "GET", "/api/status").json()["file"]["valid"], timeout=15)
    assert http_status(port) == 0 and api(served, "GET", f"/api/instances/st-instance-{port}").status_code == 200
    (colleague / "desired.yaml").write_text(good + f"  - port: {later}\n    state: running\n")
    git(colleague, "commit", "-q", "-am", "the typo fixed")
    git(colleague, "push", "-q", "origin", "main")
    wait_until(lambda: http_status(later) == 401, timeout=30)
    assert api(served, "GET", "/api/status").json()["file"]["valid"]


def test_what_cannot_be_followed_is_said_and_nothing_is_committed_pushed_or_stopped(
        project: Project, serve, tmp_path_factory) -> None:
    api_port, port = free_ports(2)
    bare = host_repo(project, api_port, [(port, "running")], "git: {remote: nowhere, every: 1s, push: true}")
    served = serve(api_port, admin_key=KEY)
    wait_until(lambda: http_status(port) == 401, timeout=30)

    def problem() -> dict:
        return (git_state(served)["lastSync"] or {}).get("problem") or {}

    wait_until(lambda: problem().get("kind") == "fetch_failed", timeout=15)
    assert "nowhere" in problem()["message"] and "does not appear to be a git repository" in problem()["message"]

    def follow(settings: str) -> None:   # a hand edit of settings.git (the API may not change it)
        text = project.file.read_text()
        start = text.index("  git:")
        end = text.index("\n", start)
        project.file.write_text(text[:start] + f"  {settings}" + text[end:])
        git(project.dir, "commit", "-q", "-am", settings)

    follow("git: {branch: no-such-branch, every: 1s}")
    wait_until(lambda: "no-such-branch" in problem().get("message", ""), timeout=15)
    assert "couldn't find remote ref" in problem()["message"]

    # a detached HEAD: nothing merged, committed or pushed, and it is said
    follow("git: {every: 1s, push: true}")
    git(project.dir, "push", "-q", "origin", "main")
    git(project.dir, "checkout", "-q", "--detach")
    wait_until(lambda: problem().get("kind") == "bad_state", timeout=15)
    assert "detached" in problem()["message"]
    head = git(project.dir, "rev-parse", "HEAD")
    assert api(served, "POST", f"/api/instances/st-instance-{port}/restart").status_code == 200
    assert git(project.dir, "rev-parse", "HEAD") == head and git(bare, "rev-parse", "main") == head
    git(project.dir, "checkout", "-q", "main")

    # in the middle of a merge: CST writes its edit, commits nothing, and says why
    git(project.dir, "checkout", "-q", "-b", "side")
    (project.dir / "side.txt").write_text("one\n")
    git(project.dir, "add", "side.txt")
    git(project.dir, "commit", "-q", "-m", "side")
    git(project.dir, "checkout", "-q", "main")
    (project.dir / "side.txt").write_text("two\n")
    git(project.dir, "add", "side.txt")
    git(project.dir, "commit", "-q", "-m", "main side")
    git(project.dir, "merge", "side", check=False)   # conflicts in side.txt: MERGE_HEAD stays
    head = git(project.dir, "rev-parse", "HEAD")
    assert api(served, "POST", f"/api/instances/st-instance-{port}/stop").status_code == 200
    state = git_state(served)
    assert state["lastCommit"]["kind"] == "bad_state" and "middle of a merge" in state["lastCommit"]["message"]
    assert git(project.dir, "rev-parse", "HEAD") == head
    assert api(served, "GET", f"/api/instances/st-instance-{port}").json()["status"] == "stopped"
    git(project.dir, "merge", "--abort")

    # a file outside any work tree, with settings.git: said, and everything else works
    outside = Project(tmp_path_factory.mktemp("no-repo"), project.env)
    other_api, other_port = free_ports(2)
    outside.write(standin_file([(other_port, "running")], settings=(
        f'resync: 1s\napi: {{listen: "127.0.0.1:{other_api}"}}\nproxy: {{listen: "127.0.0.1:{free_ports(1)[0]}"}}\n'
        "git: {every: 1s}")))
    lone = start_serve(outside, other_api, admin_key=KEY)
    try:
        wait_until(lambda: http_status(other_port) == 401, timeout=30)
        wait_until(lambda: ((git_state(lone) or {}).get("lastSync") or {}).get("problem") is not None, timeout=15)
        assert "not tracked in a git work tree" in git_state(lone)["lastSync"]["problem"]["message"]
    finally:
        lone.stop()
        kill_all(outside.state_dir.resolve())


def test_a_plan_shows_what_a_candidate_would_change_and_changes_nothing(project: Project, serve) -> None:
    api_port, port, new = free_ports(3)
    host_repo(project, api_port, [(port, "running")], "", remote=False)
    served = serve(api_port, admin_key=KEY)
    wait_until(lambda: http_status(port) == 401, timeout=30)
    before = project.file.read_text()
    candidate = project.dir / "candidate.yaml"
    candidate.write_text(before.replace(f"  - port: {port}\n    state: running\n",
                                        f"  - port: {port}\n    state: stopped\n  - port: {new}\n    state: running\n"))

    answer = api(served, "POST", "/api/plan", content=candidate.read_bytes())
    assert answer.status_code == 200, answer.text
    plan = answer.json()
    assert plan["recap"] == {"ok": 0, "changed": 2, "failed": 0}
    assert f"changed: st-instance-{port}" in plan["text"] and f"changed: st-instance-{new}" in plan["text"]
    assert "    - running\n    + stopped" in plan["text"] and plan["text"].endswith("check: ok=0 changed=2 failed=0\n")
    assert project.file.read_text() == before and http_status(port) == 401 and http_status(new) == 0
    assert git(project.dir, "status", "--porcelain") == "?? candidate.yaml"

    # the same through the command line, from "CI": the host's answer, printed as cst apply prints it
    remote = subprocess.run([*CST, "apply", "--check", "--remote", served.url, "-f", str(candidate)],
                            capture_output=True, text=True, env={**project.env, "CST_ADMIN_KEY": KEY}, timeout=120)
    assert remote.returncode == 0, remote.stderr
    assert remote.stdout == plan["text"]
    local = subprocess.run([*CST, "apply", "--check", "--diff", "-f", str(candidate)], capture_output=True,
                           text=True, env=project.env, timeout=120, cwd=project.dir)
    assert local.stdout == plan["text"]

    wrong = subprocess.run([*CST, "apply", "--check", "--remote", served.url, "-f", str(candidate)],
                           capture_output=True, text=True, env={**project.env, "CST_ADMIN_KEY": "wrong"}, timeout=60)
    assert wrong.returncode == 2 and "answered 401" in wrong.stderr   # the action failed
    bad = api(served, "POST", "/api/plan", content=b"version: 1\ninstances: [{port: 80}]\n")
    assert bad.status_code == 400 and "instances[0].port" in bad.text
    no_check = subprocess.run([*CST, "apply", "--remote", served.url, "-f", str(candidate)],
                              capture_output=True, text=True, env=project.env, timeout=60)
    assert no_check.returncode == 1 and "--check" in no_check.stderr   # invalid input
    assert project.file.read_text() == before
    assert json.loads(api(served, "GET", "/api/desired").text)["git"]["clean"]


def test_a_commit_holds_what_cst_wrote_not_a_save_that_landed_after_it(tmp_path: Path) -> None:
    git(tmp_path, "init", "-q", "-b", "main")
    path = tmp_path / "desired.yaml"
    path.write_text("version: 1\n")
    git(tmp_path, "add", "desired.yaml")
    git(tmp_path, "commit", "-q", "-m", "start")
    repo = GitRepo.locate(path)
    assert repo is not None
    ours = "version: 1\ninstances: [{port: 8001}]\n"
    path.write_text(ours + "# someone saved right after CST\n")   # between CST's write and its commit
    outcome = repo.commit("version: 1\n", ours, "create st-instance-8001 (port 8001)")
    assert outcome.kind is GitOutcomeKind.COMMITTED
    assert git(tmp_path, "show", "HEAD:desired.yaml") + "\n" == ours
    assert git(tmp_path, "status", "--porcelain") == "M desired.yaml"   # their line: in the work tree only
    assert git(tmp_path, "diff", "--cached") == ""                      # the index follows the commit
    assert git(tmp_path, "log", "-1", "--format=%an") == "CST"

    # a repository that breaks under CST: the API's document says so instead of failing
    (tmp_path / ".git").rename(tmp_path / "broken.git")
    document = repo.document()
    assert document["root"] == str(tmp_path) and "git fails here" in document["problem"]
    assert document["head"] is None and document["recent"] == []


def test_a_refused_push_is_said_and_pushed_again_once_the_remote_takes_it(project: Project, serve) -> None:
    api_port, port = free_ports(2)
    bare = host_repo(project, api_port, [], "git: {every: 1s, push: true}")
    hook = bare / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\necho 'main is frozen for the release' >&2\nexit 1\n")
    hook.chmod(0o755)
    served = serve(api_port, admin_key=KEY)
    assert api(served, "POST", "/api/instances", json={"port": port}).status_code == 201
    ours = git(project.dir, "rev-parse", "HEAD")

    def problem() -> dict:
        return (git_state(served)["lastSync"] or {}).get("problem") or {}

    wait_until(lambda: problem().get("kind") == "push_refused", timeout=15)
    assert "pushes again next round" in problem()["message"]
    assert git(bare, "rev-parse", "main") != ours and http_status(port) == 401   # what runs is unchanged

    hook.unlink()
    wait_until(lambda: git(bare, "rev-parse", "main") == ours, timeout=15)
    wait_until(lambda: not problem(), timeout=15)
