"""``cst proxy``: the key-pool proxy on its own, following desired.yaml.

The file is watched (its folder, so editors that save by rename are seen too);
each valid change is applied in place. An invalid edit is reported with
file:line and the proxy keeps the last valid state: bad input never tears
anything down.

With ``--control PATH`` it is ``cst serve``'s pool (``reconciler/server/pool_process.py``): it
also serves the control endpoint (``proxy.control``) on that Unix socket, publishes the
instances' key digests to a shared store, and keeps the settings that wait for a restart of
cst serve (its state dir, the ledger's store) as it started with, as cst serve does.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from pathlib import Path

import click
import uvloop

from reconciler.desired.model import DesiredState, Listen, load
from reconciler.desired.problems import InvalidDesiredState
from reconciler.desired.restart_settings import keep_restart_settings
from reconciler.desired.secret_source import SecretUnavailable
from reconciler.desired.validation import listen_problem, proxy_listen_problems
from reconciler.desired.watch import changes_of

from .control import ControlServer
from .service import ProxyService

log = logging.getLogger("cst.proxy")


def _report(exc: InvalidDesiredState) -> None:
    for problem in exc.problems:
        log.error("%s", problem)


class StartFailed(Exception):
    """The proxy could not start (its address taken, the store's password unavailable): the words
    ``cst proxy`` exits with, and the ones cst serve reads back from its log."""


async def reload(path: Path, service: ProxyService, started: DesiredState | None = None) -> bool:
    """Apply the file if it is valid; otherwise log why and keep the current state. ``started``:
    the state the proxy started with, whose restart settings stay in force (cst serve's pool)."""
    try:
        desired = await asyncio.to_thread(load, path)   # not on the loop that relays chat streams
    except InvalidDesiredState as exc:
        _report(exc)
        log.error("%s is invalid: the proxy keeps its last valid accounts and settings", path)
        return False
    if started is not None:
        desired, waiting = keep_restart_settings(desired, started)
        for name in waiting:
            log.warning("%s changed: the proxy keeps the value it started with until it is restarted", name)
    try:
        await service.apply(desired)
    except OSError as exc:  # e.g. the new listen address is taken; the rest was applied
        log.error("%s: could not apply everything: %s", path, exc)
        return False
    log.info("applied %s", path)
    return True


async def follow(path: Path, service: ProxyService, stop: asyncio.Event,
                 started: DesiredState | None = None) -> None:
    """Apply every change of ``path`` until ``stop`` is set."""
    async for _ in changes_of(path, stop):
        if await asyncio.to_thread(path.exists):  # mid-rename or deleted: wait for the next event
            await reload(path, service, started)


async def run(path: Path, desired: DesiredState, stop: asyncio.Event | None = None,
              listen: Listen | None = None, control: Path | None = None) -> None:
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
            loop.add_signal_handler(sig, stop.set)
    service = ProxyService(desired, listen=listen, publishes_keys=control is not None)
    try:
        await service.start()
    except OSError as exc:
        address, setting = (listen, "--listen") if listen else (desired.settings.proxy.listen, "settings.proxy.listen")
        raise StartFailed(f"cannot start the key-pool proxy on {address} ({setting}): {exc.strerror or exc}") from None
    except SecretUnavailable as exc:
        raise StartFailed(f"cannot start the key-pool proxy: settings.usage.store's password: {exc}") from None
    server = ControlServer(service, control) if control is not None else None
    try:
        if server is not None:
            await server.start()
        await follow(path, service, stop, desired if control is not None else None)
    finally:
        log.info("stopping the proxy")
        if server is not None:
            await server.stop()
        await service.stop()


@click.command("proxy")
@click.option("-f", "--file", "file", envvar="CST_FILE", default="desired.yaml", show_default=True,
              type=click.Path(path_type=Path, dir_okay=False), help="The desired-state file to follow.")
@click.option("--listen", "listen", default=None, metavar="HOST:PORT",
              help="Listen here instead of settings.proxy.listen: several replicas share one desired.yaml.")
@click.option("--control", "control", default=None, type=click.Path(path_type=Path, dir_okay=False),
              help="Serve cst serve's control endpoint on this Unix socket (cst serve starts its pool so).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]), help="Logging verbosity.")
def proxy_command(file: Path, listen: str | None, control: Path | None, log_level: str) -> None:
    """Run only the OpenAI-compatible key-pool proxy, following FILE's accounts."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        desired = load(file)
    except InvalidDesiredState as exc:   # exit 1: invalid input, as every cst command
        raise click.ClickException("\n".join(str(problem) for problem in exc.problems)) from None
    address = None
    if listen is not None:
        malformed = listen_problem(listen)
        proxy = desired.settings.proxy
        problems = [malformed] if malformed else [
            f"{why} (settings.proxy.{field} in {file})"
            for field, why in proxy_listen_problems(listen, proxy.anonymous, bool(proxy.client_keys_env))]
        if problems:
            raise click.BadParameter("; ".join(problems), param_hint="--listen")
        address = Listen.parse(listen)
    # What the imports made lives as long as the process: out of the collector's sight, a full
    # collection walks only what requests leave behind (measured: the collector's share of a
    # request's CPU, 6.5 us, mostly full collections over the imported modules' objects)
    gc.freeze()
    try:
        # a faster event loop: ~20 % less CPU per proxied request
        uvloop.run(run(file, desired, listen=address, control=control))
    except StartFailed as exc:   # the last line of its log: what cst serve reports when it started this proxy
        raise click.ClickException(str(exc)) from None


if __name__ == "__main__":  # python -m proxy.cli -f desired.yaml
    proxy_command()
