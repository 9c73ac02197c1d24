"""Asking an instance whether it is up: readiness after a start, liveness while it runs.

Both ask the overlay's health route with the instance's basic-auth credentials. The checks share
one aiohttp session per event loop (a session belongs to the loop it was made on) rather than
opening one per check.
"""
from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path
from typing import Callable

import aiohttp

from .base import StartFailed
from .launch import HEALTH_PATH, LaunchSpec
from .listener import Address

POLL = 0.05            # readiness polling: a localhost connect, cheap
ATTEMPT_TIMEOUT = 5.0  # one readiness request
PROBE_TIMEOUT = 5.0    # the liveness probe: a healthy instance answers in milliseconds
HOLD_POLL = 0.5        # while an upgraded instance must stay healthy: asked twice a second


class HealthChecks:
    """The health checks made from one event loop, over one session; ``close`` it on that loop."""

    def __init__(self) -> None:
        self._sessions: dict[Path | None, aiohttp.ClientSession] = {}   # by socket; None: TCP

    def _client(self, address: Address) -> aiohttp.ClientSession:
        session = self._sessions.get(address.socket)
        if session is None or session.closed:
            # no keep-alive: checks are seconds apart, and a connection kept to a process that was
            # restarted meanwhile would fail the next check for nothing
            connector = (aiohttp.UnixConnector(str(address.socket), force_close=True) if address.socket is not None
                         else aiohttp.TCPConnector(force_close=True))
            session = self._sessions[address.socket] = aiohttp.ClientSession(connector=connector)
        return session

    async def close(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.close()

    async def wait_ready(self, launch: LaunchSpec, proc: subprocess.Popen[bytes], has_overlay: bool,
                         start_timeout: float, log_tail: Callable[[], str]) -> None:
        """Return once the started process answers its health route with its credentials; raises
        StartFailed when it exits first, refuses them, or stays silent for ``start_timeout``."""
        url = launch.address.url + HEALTH_PATH
        auth = _credentials(launch)
        deadline = time.monotonic() + start_timeout
        timeout = aiohttp.ClientTimeout(total=ATTEMPT_TIMEOUT)
        session = self._client(launch.address)
        while True:
            if proc.poll() is not None:
                raise StartFailed(f"exited with code {proc.returncode} before answering", log_tail())
            try:
                async with session.get(url, allow_redirects=False, timeout=timeout) as anon:
                    anonymous = anon.status
                if anonymous == 401:
                    async with session.get(url, headers=auth, allow_redirects=False, timeout=timeout) as authed:
                        if authed.status == 200:
                            return
                        if authed.status == 404 and not has_overlay:
                            # your own checkout without CST's plugin: its front page will do
                            async with session.get(url.removesuffix(HEALTH_PATH) + "/", headers=auth,
                                                   allow_redirects=False, timeout=timeout) as page:
                                if page.status == 200:
                                    return
                        raise StartFailed(f"its {launch.address} answers but refuses the instance's "
                                          f"credentials or has no health route ({HEALTH_PATH}: "
                                          f"HTTP {authed.status})")
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                pass
            if time.monotonic() >= deadline:
                raise StartFailed(f"its {launch.address} did not answer within {start_timeout:g}s", log_tail())
            await asyncio.sleep(POLL)

    async def probe(self, launch: LaunchSpec, has_overlay: bool) -> str | None:
        """The liveness probe: None when the running instance answers its health route, else why not."""
        url = launch.address.url + HEALTH_PATH
        try:
            async with self._client(launch.address).get(url, headers=_credentials(launch),
                                          allow_redirects=False,
                                          timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT)) as answer:
                if answer.status == 200 or (answer.status == 404 and not has_overlay):
                    return None
                return f"its health route answered HTTP {answer.status}"
        except asyncio.TimeoutError:
            return f"its health route did not answer within {PROBE_TIMEOUT:g}s"
        except (aiohttp.ClientError, OSError) as exc:
            return f"its health route could not be reached ({exc})"


    async def stays_healthy(self, launch: LaunchSpec, has_overlay: bool, seconds: float) -> str | None:
        """None when the instance answers its health route and its front page (SillyTavern's own
        page, with the instance's credentials) throughout ``seconds``; else the first failure."""
        deadline = time.monotonic() + seconds
        page = launch.address.url + "/"
        while True:
            failure = await self.probe(launch, has_overlay)
            if failure is None:
                try:
                    async with self._client(launch.address).get(page, headers=_credentials(launch), allow_redirects=False,
                                                  timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT)) as answer:
                        await answer.read()
                        if answer.status != 200:
                            failure = f"its front page answered HTTP {answer.status}"
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                    failure = f"its front page could not be loaded ({exc or type(exc).__name__})"
            if failure is not None:
                return failure
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(min(HOLD_POLL, max(0.0, deadline - time.monotonic())))


def _credentials(launch: LaunchSpec) -> dict[str, str]:
    return {"Authorization": aiohttp.encode_basic_auth(launch.id, launch.password)}
