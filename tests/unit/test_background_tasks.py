"""BackgroundTasks on its own: a failing task is logged with its traceback and restarted with a
growing delay; one that keeps failing is given up on, once; stopping and closing end tasks quietly."""
from __future__ import annotations

import asyncio
import logging
import threading
import time

from conftest import eventually
from reconciler.tasks import BackgroundTasks, LoopThread

FAST = (0.01, 0.08)  # backoff: 10 ms doubling to 80 ms


async def test_a_failing_task_is_restarted_until_it_runs(caplog) -> None:
    caplog.set_level(logging.WARNING)
    starts: list[float] = []
    tasks = BackgroundTasks(logging.getLogger("t"), backoff=FAST)

    async def flaky() -> None:
        starts.append(asyncio.get_running_loop().time())
        if len(starts) <= 3:
            raise ValueError(f"failure {len(starts)}")
        await asyncio.Event().wait()  # the fourth start runs

    tasks.keep("flaky", flaky)
    await eventually(lambda: len(starts) == 4)
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert gaps[0] < gaps[1] < gaps[2], f"the delay grows: {gaps}"
    health = tasks.health["flaky"]
    assert (health.failures, health.total_failures, health.last_error) == (3, 3, "ValueError: failure 3")
    assert caplog.text.count("Traceback (most recent call last)") == 3 and "ValueError: failure 1" in caplog.text
    await tasks.close()
    assert caplog.text.count("failed") == 3, "cancelling on close is not a failure"


async def test_a_task_that_keeps_failing_is_given_up_once() -> None:
    given_up: list[tuple[str, str]] = []
    tasks = BackgroundTasks(logging.getLogger("t"), on_give_up=lambda *why: given_up.append(why), backoff=FAST)

    async def broken() -> None:
        raise RuntimeError("broken")

    tasks.keep("broken", broken)
    await eventually(lambda: given_up)
    await asyncio.sleep(0.2)  # time passing on purpose: several backoffs (at most 80 ms) in which nothing runs again
    assert given_up == [("broken", "broken failed 5 times in a row (last: RuntimeError: broken)")]
    assert tasks.health["broken"].total_failures == 5
    await tasks.close()


async def test_a_task_that_returns_is_a_failure_and_stop_ends_one_quietly() -> None:
    runs = 0
    tasks = BackgroundTasks(logging.getLogger("t"), give_up_after=None, backoff=FAST)

    async def returns() -> None:
        nonlocal runs
        runs += 1

    tasks.keep("returns", returns)
    await eventually(lambda: runs >= 3)
    assert tasks.health["returns"].last_error == "ended although it should run until cst stops"
    tasks.stop("returns")
    stopped_at = runs
    await asyncio.sleep(0.3)  # time passing on purpose: several backoffs (at most 80 ms) in which it never runs again
    assert runs == stopped_at and "returns" not in tasks.health
    await tasks.close()


async def test_a_loop_thread_runs_coroutines_and_closes_even_when_one_blocks() -> None:
    thread = LoopThread("test-worker")
    thread.start()
    assert await thread.run(asyncio.sleep(0, "there")) == "there"
    assert await thread.run(asyncio.to_thread(lambda: "from its executor")) == "from its executor"
    hanging = threading.Event()

    async def hang_there() -> None:
        hanging.set()
        await asyncio.sleep(3600)
    hang = asyncio.ensure_future(thread.run(hang_there()))
    await eventually(hanging.is_set)  # running in the thread
    hang.cancel()  # cancelling the caller cancels the coroutine in the thread
    assert await thread.close(timeout=5)
    stuck = LoopThread("test-stuck")
    stuck.start()
    blocking = threading.Event()
    blocked = asyncio.ensure_future(stuck.run(_block(blocking)))   # kept: a task nothing holds may be collected
    assert await asyncio.to_thread(blocking.wait, 10), "the blocking coroutine never started"
    assert await stuck.close(timeout=0.2) is False, "a blocked thread is left behind, not waited on for ever"
    del blocked


async def _block(started: threading.Event) -> None:
    started.set()
    time.sleep(1)  # blocks the thread's loop itself
