"""Background work that is never lost silently, and a loop of its own for work that blocks.

``BackgroundTasks`` keeps long-lived asyncio tasks alive: each has a done-callback, so a task
that raises (or ends when it should not) is logged with its traceback and started again after a
backoff (0.5 s doubling to 30 s). A task that keeps failing is given up on: ``on_give_up`` is
called, and ``cst serve`` then exits non-zero so that a service manager restarts the process.

``LoopThread`` is an event loop in a thread of its own. ``cst serve`` runs its reconcile passes
there: they observe processes (psutil, /proc), probe ports, fsync records, copy caches and move
data dirs, and none of that may stall the loop that relays every proxied chat request.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Coroutine, TypeVar

T = TypeVar("T")

BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
GIVE_UP_AFTER = 5         # failures in a row; a task that ran STABLE_AFTER seconds starts a new count
STABLE_AFTER = 60.0


@dataclass
class TaskHealth:
    """What /api/status shows of one background task."""

    failures: int = 0         # in a row
    total_failures: int = 0
    last_error: str | None = None
    started_at: float = 0.0   # monotonic


class BackgroundTasks:
    def __init__(self, log: logging.Logger, on_give_up: Callable[[str, str], None] | None = None,
                 give_up_after: int | None = GIVE_UP_AFTER, clock: Callable[[], float] = time.monotonic,
                 backoff: tuple[float, float] = (BACKOFF_BASE, BACKOFF_CAP)):
        self.log = log
        self.on_give_up = on_give_up
        self.give_up_after = give_up_after   # None: never (keep retrying at the capped backoff)
        self.clock = clock
        self.backoff = backoff               # first delay, longest delay
        self.health: dict[str, TaskHealth] = {}
        self._factories: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._retries: dict[str, asyncio.TimerHandle] = {}
        self._closing = False

    def keep(self, name: str, factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``factory()`` as a task named ``name`` until ``close``, restarting it when it fails."""
        self._factories[name] = factory
        self.health.setdefault(name, TaskHealth())
        self._spawn(name)

    def stop(self, name: str) -> None:
        """Stop keeping ``name`` (an account removed from the file, say)."""
        self._factories.pop(name, None)
        self.health.pop(name, None)
        retry = self._retries.pop(name, None)
        if retry is not None:
            retry.cancel()
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()

    def _spawn(self, name: str) -> None:
        self._retries.pop(name, None)
        factory = self._factories.get(name)
        if factory is None or self._closing:
            return
        task = asyncio.get_running_loop().create_task(factory(), name=name)
        self._tasks[name] = task
        self.health[name].started_at = self.clock()
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        name = task.get_name()
        if self._tasks.get(name) is not task:
            return  # replaced or stopped: its end is expected
        del self._tasks[name]
        if self._closing or task.cancelled():
            return
        error = task.exception()
        health = self.health[name]
        if self.clock() - health.started_at > STABLE_AFTER:
            health.failures = 0
        health.failures += 1
        health.total_failures += 1
        if error is None:
            health.last_error = "ended although it should run until cst stops"
            self.log.error("background task %s ended on its own", name)
        else:
            health.last_error = f"{type(error).__name__}: {error}"
            self.log.error("background task %s failed", name, exc_info=error)
        if self.give_up_after is not None and health.failures >= self.give_up_after:
            self.log.critical("background task %s failed %d times in a row; giving up", name, health.failures)
            if self.on_give_up is not None:
                self.on_give_up(name, f"{name} failed {health.failures} times in a row "
                                      f"(last: {health.last_error})")
            return
        delay = min(self.backoff[0] * 2 ** (health.failures - 1), self.backoff[1])
        self.log.warning("restarting background task %s in %.1fs", name, delay)
        self._retries[name] = asyncio.get_running_loop().call_later(delay, self._spawn, name)

    async def close(self) -> None:
        """Cancel every task and wait for them to end."""
        self._closing = True
        for retry in self._retries.values():
            retry.cancel()
        self._retries.clear()
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()


class LoopThread:
    """An asyncio event loop running in its own thread; ``await run(coro)`` runs ``coro`` there."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on this thread's loop and wait for it; cancelling the caller cancels it."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    async def close(self, timeout: float = 10.0,
                    cleanup: Callable[[], Coroutine[Any, Any, None]] | None = None) -> bool:
        """Cancel what still runs there, wait for it to unwind, run ``cleanup`` there (what belongs
        to that loop, such as a client session), stop the loop and the thread.

        False when that took longer than ``timeout`` (a call blocked in the thread): the thread is
        then left to end with the process, which must not hang on it."""
        if not self._thread.is_alive():
            self.loop.close()
            return True
        try:
            async with asyncio.timeout(timeout):
                await self.run(_cancel_others())
                if cleanup is not None:
                    await self.run(cleanup())
                await self.run(self.loop.shutdown_default_executor())
        except TimeoutError:
            return False
        self.loop.call_soon_threadsafe(self.loop.stop)
        await asyncio.to_thread(self._thread.join)
        self.loop.close()
        return True


async def _cancel_others() -> None:
    others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)
