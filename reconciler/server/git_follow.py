"""``cst serve`` and git: the commits of CST's own edits, and the branch the file follows.

``GitFollower`` is the daemon's collaborator for both. It records every change CST writes (the
file's ``recorder``) as a commit, follows ``settings.git`` (fetch, merge, push, every ``every``,
and at once after a commit when it pushes), and keeps what happened for ``/api/status``,
``GET /api/desired`` and the page: the last outcome of each kind of work and the problem, if
one stands, with what to do about it.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Awaitable, Callable

from ..desired.model import GitSettings
from ..desired.shared_file import DesiredFile
from .git_repo import EMPTY, GitError, GitOutcome, GitOutcomeKind, GitRepo

log = logging.getLogger("cst.git")

IDLE = 30.0   # how often to look again at settings.git while it is unset


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class GitFollower:
    def __init__(self, file: DesiredFile, settings: Callable[[], GitSettings | None],
                 merged: Callable[[], Awaitable[None]], announce: Callable[[dict[str, Any]], object]):
        """``settings``: the settings in force now; ``merged``: re-read the file after a merge;
        ``announce``: an event for the page."""
        self.file = file
        self._settings = settings
        self._merged = merged
        self._announce = announce
        self.repo: GitRepo | None = None
        self.last_commit: dict[str, str] | None = None   # the outcome of CST's last edit, with when
        self.last_sync: dict[str, Any] | None = None     # the outcomes of the last round, with when
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Find the work tree (blocking: run in a thread) and record CST's edits in it."""
        self._loop = asyncio.get_running_loop()
        self.repo = await asyncio.to_thread(GitRepo.locate, self.file.path)
        if self.repo is not None:
            self.file.recorder = self.commit
            log.info("%s is tracked in git (%s): CST's changes to it are committed", self.file.path, self.repo.top)

    # -- CST's edits --------------------------------------------------------------------------------

    def commit(self, before: str, after: str, note: str) -> None:
        """The file's recorder (in a worker thread, in turn with the writes)."""
        assert self.repo is not None and self._loop is not None
        try:
            outcome = self.repo.commit(before, after, note)
        except (GitError, OSError) as exc:   # the edit is written; it must not fail for want of a commit
            outcome = GitOutcome(GitOutcomeKind.FAILED, f"committing {self.repo.relative} failed: {exc}")
        last = self.last_commit = {**outcome.document(), "at": _now()}
        if outcome.kind is GitOutcomeKind.COMMITTED:
            log.info("committed %s: %s (%s)", self.repo.relative, note.splitlines()[0], outcome.message[:10])
            settings = self._settings()
            if settings is not None and settings.push:
                self._loop.call_soon_threadsafe(self._wake.set)   # pushed now rather than at the next round
        else:
            log.warning("%s", outcome.message)
        self._loop.call_soon_threadsafe(self._announce, {"commit": last})

    # -- following a branch -----------------------------------------------------------------------------

    async def follow(self) -> None:
        """Until cancelled: a round of fetch, merge and push every ``settings.git.every``."""
        while True:
            settings = self._settings()
            if settings is None:
                await self._pause(IDLE)
                continue
            if self.repo is None:
                self._record([GitOutcome(GitOutcomeKind.BAD_STATE, f"{self.file.path} is not tracked in a git work tree: "
                                                      "settings.git has nothing to follow (git add and commit it)")])
                await self._pause(settings.every)
                continue
            try:
                outcomes = await self._round(self.repo, settings)
            except (GitError, OSError) as exc:   # the repository broke under CST: said, tried again
                outcomes = [GitOutcome(GitOutcomeKind.FAILED, f"following the branch failed: {exc}")]
            self._record(outcomes)
            if any(o.kind is GitOutcomeKind.MERGED for o in outcomes):
                await self._merged()
            await self._pause(settings.every)

    async def _round(self, repo: GitRepo, settings: GitSettings) -> list[GitOutcome]:
        """Fetch, merge, push: what happened, in order, up to the first problem. Only the merge
        holds the file's writers' turn (a fetch or a push may wait on the network)."""
        fetched = await asyncio.to_thread(repo.fetch, settings)
        if fetched.kind is not GitOutcomeKind.FETCHED:
            return [fetched]
        async with self.file.turn():   # no edit of CST's lands in the middle of a merge
            merged = await asyncio.to_thread(repo.merge, settings, fetched.message)
        outcomes = [merged]
        if settings.push and not merged.kind.problem:
            outcomes.append(await asyncio.to_thread(repo.push, settings, fetched.message))
        return [o for o in outcomes if o.kind is not GitOutcomeKind.UNCHANGED] or [GitOutcome(GitOutcomeKind.UNCHANGED)]

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    def _record(self, outcomes: list[GitOutcome]) -> None:
        problems = [o for o in outcomes if o.kind.problem]
        previous = (self.last_sync or {}).get("problem")
        problem = problems[-1].document() if problems else None
        self.last_sync = {"at": _now(), "outcomes": [o.document() for o in outcomes], "problem": problem}
        for outcome in outcomes:
            if outcome.kind is GitOutcomeKind.MERGED:
                log.info("merged the followed branch into the work tree (now %s)", outcome.message[:10])
            elif outcome.kind is GitOutcomeKind.PUSHED:
                log.info("pushed CST's commits (now %s)", outcome.message[:10])
        if problem is not None and problem != previous:
            log.error("following the branch: %s", problem["message"])
        elif problem is None and previous is not None:
            log.info("following the branch works again")
        # an event when something happened or the problem changed, not every round a problem stands
        if problem != previous or any(o.kind in (GitOutcomeKind.MERGED, GitOutcomeKind.PUSHED) for o in outcomes):
            self._announce({"sync": self.last_sync})

    # -- what the API shows ---------------------------------------------------------------------------

    def document(self) -> dict[str, Any] | None:
        """The file's place in git (blocking: runs git); None outside a work tree and not following."""
        settings = self._settings()
        if self.repo is None and settings is None:
            return None
        document: dict[str, Any] = self.repo.document() if self.repo is not None else dict(EMPTY)
        document["following"] = None if settings is None else {
            "remote": settings.remote, "branch": settings.branch, "every": settings.every, "push": settings.push}
        # CST's last edit that could not be committed stops mattering once the file is committed
        # again (the operator committed or discarded what stood in the way)
        stale = document["clean"] and self.last_commit is not None and self.last_commit["kind"] != GitOutcomeKind.COMMITTED.value
        document["lastCommit"] = None if stale else self.last_commit
        document["lastSync"] = self.last_sync
        return document
