"""desired.yaml in a git work tree: CST's edits become commits, and a branch is followed.

Everything here runs ``git`` as a child process (an argv list, never a shell, with CST's secrets
kept out of its environment and never a prompt) and blocks: the daemon calls it in a worker
thread, in turn with its own writes of the file (``DesiredFile.turn``), so that a merge and an
API edit never interleave.

Outcomes are typed (``GitOutcomeKind``): the daemon, the API and the page decide on the kind, and show
the message.
"""
from __future__ import annotations

import enum
import logging
import os
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..desired.model import GitSettings
from ..runtime.environment import child_environment

log = logging.getLogger("cst.git")

GIT_TIMEOUT = 120.0     # a fetch or push that hangs longer (a dead remote) fails
RECENT = 5              # commits of the file shown by the API and the page
# what git needs from CST's environment besides the usual: how to reach a remote
_GIT_ENV = ("SSH_AUTH_SOCK", "GIT_SSH", "GIT_SSH_COMMAND", "GIT_CONFIG_GLOBAL", "XDG_CONFIG_HOME",
            "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")


class GitOutcomeKind(enum.Enum):
    COMMITTED = "committed"
    FOREIGN_CHANGES = "foreign_changes"     # the file held someone else's uncommitted lines: not committed
    UNCHANGED = "unchanged"                 # nothing to do
    FETCHED = "fetched"                     # the branch's commit (in the message) is here
    MERGED = "merged"                       # the branch brought changes to the work tree
    PUSHED = "pushed"
    BAD_STATE = "bad_state"                 # mid-merge or rebase, detached HEAD: nothing done
    FETCH_FAILED = "fetch_failed"           # no such remote or branch, unreachable, refused
    CONFLICT = "conflict"                   # the branch conflicts with the work tree: merge undone
    PUSH_REFUSED = "push_refused"           # someone pushed first: the next round fetches and merges
    FAILED = "failed"                       # git failed otherwise

    @property
    def problem(self) -> bool:
        return self in (GitOutcomeKind.FOREIGN_CHANGES, GitOutcomeKind.BAD_STATE, GitOutcomeKind.FETCH_FAILED, GitOutcomeKind.CONFLICT, GitOutcomeKind.PUSH_REFUSED,
                        GitOutcomeKind.FAILED)


@dataclass(frozen=True)
class GitOutcome:
    kind: GitOutcomeKind
    message: str = ""

    def document(self) -> dict[str, str]:
        return {"kind": self.kind.value, "message": self.message}


@dataclass(frozen=True)
class Commit:
    hash: str
    author: str
    message: str
    when: str     # ISO 8601

    def document(self) -> dict[str, str]:
        return {"hash": self.hash, "short": self.hash[:10], "author": self.author, "message": self.message,
                "when": self.when}


# the shape of the API's document where nothing is known (no work tree, or git failing)
EMPTY: dict[str, Any] = {"root": None, "file": None, "clean": None, "head": None, "recent": [], "problem": None}


class GitError(Exception):
    def __init__(self, args: list[str], output: str):
        self.output = output.strip()
        super().__init__(f"git {' '.join(args[:2])}: {self.output.splitlines()[-1] if self.output else 'failed'}")


def identity() -> tuple[str, str]:
    """Who CST's commits are by: CST on this host."""
    return "CST", f"cst@{socket.gethostname() or 'localhost'}"


class GitRepo:
    """The work tree that tracks ``path`` (found with ``locate``)."""

    def __init__(self, top: Path, path: Path):
        self.top = top
        self.path = path
        self.relative = path.relative_to(top).as_posix()

    @classmethod
    def locate(cls, path: Path) -> "GitRepo | None":
        """The work tree that tracks ``path``; None when it is in none, or git does not track it
        (then CST commits nothing, as before)."""
        folder = path.parent
        try:
            top = _git(folder, "rev-parse", "--show-toplevel").strip()
            if not top:
                return None
            _git(folder, "ls-files", "--error-unmatch", "--", path.name)
        except (GitError, OSError):
            return None
        return cls(Path(top).resolve(), path.resolve())

    def run(self, *args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> str:
        return _git(self.top, *args, stdin=stdin, env=env)

    # -- what the API shows -----------------------------------------------------------------------

    def state_problem(self) -> str | None:
        """Why the work tree cannot take a commit or a merge now, or None."""
        git_dir = Path(self.run("rev-parse", "--absolute-git-dir").strip())
        if (git_dir / "MERGE_HEAD").exists():
            return "the work tree is in the middle of a merge: finish it (git commit) or undo it (git merge --abort)"
        if (git_dir / "rebase-merge").exists() or (git_dir / "rebase-apply").exists():
            return "the work tree is in the middle of a rebase: finish it (git rebase --continue) or undo it " \
                   "(git rebase --abort)"
        try:
            self.run("symbolic-ref", "-q", "HEAD")
        except GitError:
            return "HEAD is detached: check out a branch (git switch main)"
        return None

    def committed_text(self) -> str | None:
        """The file as HEAD has it (None: not in HEAD yet)."""
        try:
            return self.run("show", f"HEAD:{self.relative}")
        except GitError:
            return None

    def clean(self) -> bool:
        """Whether the file in the work tree is the one HEAD has."""
        return self.run("status", "--porcelain", "--", self.relative).strip() == ""

    def recent(self, count: int = RECENT) -> list[Commit]:
        """The last commits that changed the file, newest first."""
        try:
            out = self.run("log", f"-n{count}", "--format=%H%x1f%an <%ae>%x1f%s%x1f%cI", "--", self.relative)
        except GitError:
            return []   # no commit yet
        return [Commit(*line.split("\x1f", 3)) for line in out.splitlines() if line.count("\x1f") == 3]

    def document(self) -> dict[str, Any]:
        """The file's place in git, for the API (a git that fails says so in ``problem``)."""
        try:
            commits = self.recent()
            return {"root": str(self.top), "file": self.relative, "clean": self.clean(),
                    "head": commits[0].document() if commits else None,
                    "recent": [c.document() for c in commits], "problem": self.state_problem()}
        except GitError as exc:   # the repository moved or broke under CST: the API still answers
            return {**EMPTY, "root": str(self.top), "file": self.relative, "problem": f"git fails here: {exc}"}

    # -- CST's edits as commits ----------------------------------------------------------------------

    def commit(self, before: str, after: str, message: str) -> GitOutcome:
        """Commit ``after`` (the file as CST just wrote it) with ``message``, unless the file held
        changes that were not committed before CST's edit (``before`` is what CST built on): those
        lines are someone else's, and are not committed under CST's name.

        The commit is made of CST's text, not of whatever the work tree holds by then: a hand save
        that lands after CST's write stays in the work tree, uncommitted, as it should."""
        problem = self.state_problem()
        if problem is not None:
            return GitOutcome(GitOutcomeKind.BAD_STATE, f"{problem}; CST's change to {self.relative} is written, not committed")
        if self.committed_text() != before:
            return GitOutcome(GitOutcomeKind.FOREIGN_CHANGES,
                           f"{self.relative} had changes that were not committed before CST's edit: CST's change "
                           "is written but not committed (commit or discard those changes, and CST's next edit "
                           "is committed again)")
        name, email = identity()
        try:
            parent = self.run("rev-parse", "HEAD").strip()
            entry = self.run("ls-tree", "HEAD", "--", self.relative).split()
            mode = entry[0] if entry else "100644"
            blob = self.run("hash-object", "-w", "--stdin", f"--path={self.relative}", stdin=after).strip()
            with tempfile.TemporaryDirectory(prefix="cst-git-") as scratch:   # an index of its own
                index = {"GIT_INDEX_FILE": os.path.join(scratch, "index")}
                self.run("read-tree", "HEAD", env=index)
                self.run("update-index", "--add", "--cacheinfo", f"{mode},{blob},{self.relative}", env=index)
                tree = self.run("write-tree", env=index).strip()
            who = {"GIT_AUTHOR_NAME": name, "GIT_AUTHOR_EMAIL": email, "GIT_COMMITTER_NAME": name,
                   "GIT_COMMITTER_EMAIL": email}
            commit = self.run("commit-tree", tree, "-p", parent, "-m", message, env=who).strip()
            # only if HEAD is still the parent: a commit made meanwhile is never overwritten
            self.run("update-ref", "-m", f"cst: {message.splitlines()[0]}", "HEAD", commit, parent)
        except GitError as exc:
            return GitOutcome(GitOutcomeKind.FAILED, f"committing {self.relative} failed: {_last_line(exc.output)}")
        try:   # the index follows, so that git status compares the work tree with the new commit
            self.run("update-index", "--cacheinfo", f"{mode},{blob},{self.relative}")
        except GitError as exc:
            log.warning("committed %s, but updating git's index failed (git status may show it as changed "
                        "until `git reset -- %s`): %s", commit[:10], self.relative, _last_line(exc.output))
        return GitOutcome(GitOutcomeKind.COMMITTED, commit)

    # -- following a branch ----------------------------------------------------------------------------

    def fetch(self, settings: GitSettings) -> GitOutcome:
        """Fetch the branch (network: no turn of the file's writers is held): FETCHED with the
        commit it points at, or why not."""
        problem = self.state_problem()
        if problem is not None:
            return GitOutcome(GitOutcomeKind.BAD_STATE, problem)
        remote, branch = settings.remote, settings.branch
        try:
            self.run("fetch", "--quiet", "--no-tags", remote, f"refs/heads/{branch}")
            return GitOutcome(GitOutcomeKind.FETCHED, self.run("rev-parse", "FETCH_HEAD").strip())
        except GitError as exc:
            return GitOutcome(GitOutcomeKind.FETCH_FAILED, f"fetching {branch} from {remote} failed: {_last_line(exc.output)}")

    def merge(self, settings: GitSettings, fetched: str) -> GitOutcome:
        """Merge the fetched commit as git would (a fast-forward, or a merge commit on top of the
        work tree's own commits; never a force, never a reset). A conflict undoes the merge."""
        problem = self.state_problem()   # again: someone may have started a merge meanwhile
        if problem is not None:
            return GitOutcome(GitOutcomeKind.BAD_STATE, problem)
        where = f"{settings.remote}/{settings.branch}"
        if not int(self.run("rev-list", "--count", f"HEAD..{fetched}").strip() or 0):
            return GitOutcome(GitOutcomeKind.UNCHANGED)
        name, email = identity()
        try:
            self.run("-c", f"user.name={name}", "-c", f"user.email={email}", "-c", "commit.gpgsign=false",
                     "merge", "--quiet", "--no-edit", "--no-verify", fetched)
        except GitError as exc:
            if not (Path(self.run("rev-parse", "--absolute-git-dir").strip()) / "MERGE_HEAD").exists():
                return GitOutcome(GitOutcomeKind.FAILED, f"merging {where} failed, nothing was merged: {_last_line(exc.output)}")
            try:
                self.run("merge", "--abort")
            except GitError as stuck:
                return GitOutcome(GitOutcomeKind.FAILED, f"merging {where} conflicted, and undoing the merge failed: "
                                            f"{_last_line(stuck.output)}; run git merge --abort")
            return GitOutcome(GitOutcomeKind.CONFLICT, f"{where} conflicts with this work tree's commits: nothing was merged "
                                          f"({_last_line(exc.output)}); resolve it in the repository, and CST "
                                          "merges the fix")
        return GitOutcome(GitOutcomeKind.MERGED, self.run("rev-parse", "HEAD").strip())

    def push(self, settings: GitSettings, fetched: str) -> GitOutcome:
        """Push the commits the branch lacks (CST's, and its merges); refused when someone pushed
        first, and the next round fetches, merges and pushes again."""
        if not int(self.run("rev-list", "--count", f"{fetched}..HEAD").strip() or 0):
            return GitOutcome(GitOutcomeKind.UNCHANGED)
        remote, branch = settings.remote, settings.branch
        try:
            self.run("push", "--quiet", remote, f"HEAD:refs/heads/{branch}")
        except GitError as exc:
            return GitOutcome(GitOutcomeKind.PUSH_REFUSED, f"pushing to {remote}/{branch} was refused ({_last_line(exc.output)}); "
                                              "CST fetches, merges and pushes again next round")
        return GitOutcome(GitOutcomeKind.PUSHED, self.run("rev-parse", "HEAD").strip())


def _last_line(text: str) -> str:
    """What git said, in a line: its first fatal or error line, else its last."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    said = [line for line in lines if line.startswith(("fatal:", "error:", "CONFLICT"))]
    return (said or lines or ["no reason given"])[0 if said else -1]


def _git(cwd: Path, *args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> str:
    # no prompt ever; and no optional locks: a `git status` for the API must never hold the index
    # while a merge or a commit needs it
    environment = child_environment({"GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "", "SSH_ASKPASS": "",
                                     "LC_ALL": "C", "GIT_EDITOR": "true", "GIT_OPTIONAL_LOCKS": "0"})
    environment.update({name: os.environ[name] for name in _GIT_ENV if name in os.environ})
    environment.update(env or {})
    try:
        done = subprocess.run(["git", *args], cwd=cwd, env=environment, capture_output=True,
                              input=stdin if stdin is not None else "", encoding="utf-8",
                              errors="surrogateescape", timeout=GIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise GitError(list(args), f"no answer within {GIT_TIMEOUT:g} s") from None
    if done.returncode != 0:
        raise GitError(list(args), done.stderr or done.stdout)
    return done.stdout
