"""ProxyService: the proxy as a start/apply/stop component.

``cst proxy`` (alone, or as the process ``cst serve`` starts) builds one from a DesiredState and
calls ``apply()`` on every valid change of desired.yaml. ``apply`` changes things in
place: accounts through the AccountManager, forwarding settings by swapping the
forwarder's config (a request in flight keeps the config it started with), the
listening address by binding the new one before closing the old one.
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import Mapping

import aiohttp

from reconciler.desired.model import Budget, DesiredState, Listen, ProxySettings, UsageSettings
from reconciler.desired.watch import changes_in
from reconciler.runtime.instance_keys import InstanceKeys
from reconciler.runtime.statedir import StateDir

from .accounts import AccountManager
from .budget import MINUTE, UsageBook
from .calendar import Calendar
from .callers import Callers
from .forward import ForwardConfig, Forwarder
from .front import Front
from .ledger import LedgerStore, LedgerWriter, SqliteStore, Standing, StoreUnavailable
from .metering import MeteringPolicy
from .pool import Key, KeyPool
from .postgres import PostgresStore, connection_settings
from .server import build_front
from .shared import KeyVerdict, SharedStore
from .state import ProxyState
from .upstream import UpstreamClient

log = logging.getLogger("cst.proxy")

SHUTDOWN_GRACE = 5.0


def _forward_config(settings: ProxySettings) -> ForwardConfig:
    return ForwardConfig(settings.upstream, settings.max_attempts, settings.timeout)


SHARED_REFRESH = 2.0   # seconds between two readings of every replica's use from a shared store
STORE_WAIT = 3.0       # how long a starting proxy waits for a shared store before serving without it


def ledger_path(state_dir: Path) -> Path:
    return state_dir / "proxy" / "ledger.sqlite3"


def spool_path(state_dir: Path, listen: Listen) -> Path:
    """Where rows wait while a shared store is away: one file per replica (by its address, so that
    a replica started again replays what it left)."""
    return state_dir / "proxy" / f"spool-{listen.host}-{listen.port}.sqlite3"


def set_aside_path(state_dir: Path) -> Path:
    """Where rows a store refused are kept for the operator (JSON lines)."""
    return state_dir / "proxy" / "ledger-set-aside.jsonl"


def open_store(usage: UsageSettings, state_dir: Path, application: str, readonly: bool = False) -> LedgerStore | None:
    """The declared store: PostgreSQL when ``usage.store`` names one, else the state dir's SQLite
    file (None when reading one that was never written). Raises ``SecretUnavailable``."""
    if usage.store:
        conninfo, connect = connection_settings(usage, application)
        store = PostgresStore(conninfo, connect, migrates=not readonly)
        if readonly and not store.exists():
            store.close()
            return None
        return store
    path = ledger_path(state_dir)
    if readonly and not path.exists():
        return None
    return SqliteStore(path, readonly=readonly)


def read_usage(desired: DesiredState) -> tuple[UsageBook, LedgerStore | None]:
    """The declared ledger opened for reading (None when nothing was written yet), and a book of
    the current windows read from it: what ``cst usage`` shows without a proxy. Blocking."""
    book = UsageBook(Calendar(desired.settings.usage.timezone))
    book.budgets = budgets(desired)
    store = open_store(desired.settings.usage, desired.settings.state_dir, "cst usage", readonly=True)
    if store is not None:
        book.load(_standing(book, store))
    return book, store


def _standing(book: UsageBook, store: LedgerStore) -> Mapping[str, Standing]:
    """What ``store`` holds for ``book``'s current windows (blocking: a query)."""
    now = book.clock()
    day, month = book.calendar.window(now)
    return store.standing(day, month, now - MINUTE)


def _store_of(desired: DesiredState) -> tuple[object, ...]:
    usage = desired.settings.usage
    return usage.store, usage.store_password_env, usage.store_password_file


def budgets(desired: DesiredState) -> dict[str, Budget]:
    """Each instance's budget (its own or the fleet's), for the instances that use the pool."""
    return {spec.id: spec.budget for spec in desired.instances if spec.proxy and spec.budget.limited}


def _client_keys(settings: ProxySettings) -> tuple[str, ...]:
    if not settings.client_keys_env:
        return ()
    raw = os.environ.get(settings.client_keys_env, "")
    keys = tuple(k.strip() for k in raw.split(",") if k.strip())
    if not keys:
        # Fail closed: a configured but empty key list must not mean "no authentication".
        log.error("%s is empty or unset: every proxy request will be refused", settings.client_keys_env)
        return (os.urandom(32).hex(),)
    return keys


class ProxyService:
    def __init__(self, desired: DesiredState, listen: Listen | None = None, publishes_keys: bool = False):
        """``listen`` overrides ``settings.proxy.listen`` (replicas sharing one file);
        ``publishes_keys``: this is ``cst serve``'s proxy, which owns the state dir and publishes
        the instances' key digests to a shared store."""
        self.desired = desired
        self._listen_override = listen
        self._publishes_keys = publishes_keys
        self.shared: SharedStore | None = None
        self._refreshing: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._upstream: UpstreamClient | None = None
        self._front: Front | None = None
        self._site: asyncio.base_events.Server | None = None   # the listening socket(s) of the front
        self._listen: Listen | None = None
        self.state: ProxyState | None = None
        self._applying = asyncio.Lock()  # one apply at a time: binding a new address awaits
        self._following: tuple[asyncio.Task[None], asyncio.Event] | None = None   # the instance key folder

    @property
    def port(self) -> int:
        """The port actually bound (useful with port 0)."""
        assert self._site is not None
        return int(self._site.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        assert self._listen is not None
        host = self._listen.host
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}"

    async def start(self) -> None:
        settings = self.desired.settings
        # Forwarded requests go through the lean keep-alive client (see upstream.py); the
        # account platforms, called a few times an hour, through an ordinary aiohttp session.
        self._upstream = UpstreamClient()
        self._session = aiohttp.ClientSession()
        pool = KeyPool(settings.proxy.failure_threshold)
        forwarder = Forwarder(self._upstream, pool, _forward_config(settings.proxy))
        accounts = AccountManager(pool, self._session, settings.state_dir)
        callers = Callers(_client_keys(settings.proxy), anonymous=settings.proxy.anonymous)
        usage = await self._open_usage(self.desired)
        self.state = ProxyState(pool, forwarder, accounts, callers, usage,
                                max_body=settings.proxy.max_body, max_concurrent=settings.proxy.max_concurrent,
                                metering=MeteringPolicy(settings.proxy.metering))
        if settings.usage.store:
            await self._share(usage)
        accounts.update(self.desired.accounts)
        await self.reload_instance_keys()
        # a client that hangs up cancels its handler, and with it the upstream request, instead
        # of letting it run until the next write fails (see front)
        self._front = build_front(self.state)
        try:
            await self._bind(self._listen_override or settings.proxy.listen)
        except BaseException:
            await self.stop()  # e.g. the port is taken: leave nothing running behind
            raise
        await self._follow_instance_keys()
        log.info("proxy listening on %s, forwarding to %s", self.url, settings.proxy.upstream)

    async def _open_usage(self, desired: DesiredState) -> UsageBook:
        """The declared ledger and the book of current use, started where the ledger left off."""
        settings = desired.settings
        store = await asyncio.to_thread(open_store, settings.usage, settings.state_dir, "cst proxy")
        assert store is not None
        spool = None
        if settings.usage.store:
            listen = self._listen_override or settings.proxy.listen
            spool = await asyncio.to_thread(SqliteStore, spool_path(settings.state_dir, listen))
        writer = LedgerWriter(store, settings.usage.retention, spool=spool, set_aside=set_aside_path(settings.state_dir))
        book = UsageBook(Calendar(settings.usage.timezone), writer)
        book.budgets = budgets(desired)
        await self._load_usage(book)
        return book

    async def _load_usage(self, book: UsageBook) -> None:
        assert book.ledger is not None
        try:
            book.load(await asyncio.to_thread(_standing, book, book.ledger.store))
        except StoreUnavailable as exc:   # a shared store away: its refresh reads it when it is back
            log.error("could not read the current use from the usage store: %s", exc)

    async def _share(self, book: UsageBook) -> None:
        """Budgets, key health and instance keys through the shared store, and its current use read
        every ``SHARED_REFRESH``."""
        assert self.state is not None and book.ledger is not None
        state, usage = self.state, self.desired.settings.usage
        store = book.ledger.store
        assert isinstance(store, PostgresStore)
        conninfo, connect = connection_settings(usage, "cst proxy")
        clock = state.pool.clock

        def on_key(verdict: KeyVerdict) -> None:
            state.pool.apply_verdict(verdict.digest, clock() + verdict.until - time.time(), verdict.reason)

        shared = SharedStore(conninfo, connect, f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}",
                             usage.on_store_down == "open", store.ensure_schema, on_key,
                             state.callers.set_published_keys)
        state.pool.on_verdict = self._publish_verdict
        book.shared = self.shared = shared
        await shared.start(STORE_WAIT)
        self._refreshing = asyncio.get_running_loop().create_task(self._refresh_forever(book, store))

    def _publish_verdict(self, key: Key, quarantined: bool, until: float) -> None:
        """Tell the other replicas of a key benched here: a 429 until its cooldown ends, a refusal
        until the account's next refresh (when this replica tries the key again)."""
        assert self.shared is not None and self.state is not None
        now_mono, now = self.state.pool.clock(), time.time()
        if quarantined:
            refresh = next((a.refresh for a in self.desired.accounts if a.name == key.account), 300.0)
            wall_until, reason = now + refresh, f"refused by the upstream ({key.last_error})"
        else:
            wall_until, reason = now + until - now_mono, f"rate-limited ({key.last_error})"
        self.shared.publish_key(KeyVerdict(key.digest, wall_until, quarantined, f"another replica: {reason}"))

    async def _refresh_forever(self, book: UsageBook, store: LedgerStore) -> None:
        while True:
            await asyncio.sleep(SHARED_REFRESH)
            if self.shared is None or not self.shared.up:
                continue
            try:
                now = book.clock()
                day, month = book.calendar.window(now)
                standing = await asyncio.to_thread(store.standing, day, month, now - MINUTE)
                book.refresh(standing, day, month)
            except StoreUnavailable as exc:
                log.warning("could not read the current use from the usage store: %s", exc)
            except Exception:   # a defect: never silently, and the next round tries again
                log.exception("reading the current use from the usage store failed")

    async def _bind(self, listen: Listen) -> None:
        front = self._front
        assert front is not None
        try:
            site = await front.listen(listen.host, listen.port)
        except OSError:
            if self._site is None:
                raise
            # Same port on an overlapping address (127.0.0.1 -> 0.0.0.0): free it first.
            await front.unlisten(self._site)
            self._site = None
            site = await front.listen(listen.host, listen.port)
        old, self._site, self._listen = self._site, site, listen
        if old is not None:
            await front.unlisten(old)

    async def apply(self, desired: DesiredState) -> None:
        """Make the running proxy match ``desired`` (already validated)."""
        async with self._applying:
            await self._apply(desired)

    async def _apply(self, desired: DesiredState) -> None:
        assert self.state is not None
        old, new = self.desired.settings.proxy, desired.settings.proxy
        if _store_of(desired) != _store_of(self.desired):
            log.warning("settings.usage.store changed: the proxy keeps the store it started with until it "
                        "is restarted")
            desired = replace(desired, settings=replace(desired.settings, usage=replace(
                desired.settings.usage, store=self.desired.settings.usage.store,
                store_password_env=self.desired.settings.usage.store_password_env,
                store_password_file=self.desired.settings.usage.store_password_file)))
        self.desired = desired
        if self.shared is not None:
            self.shared.serve_when_down = desired.settings.usage.on_store_down == "open"
        state = self.state
        if (old.upstream, old.max_attempts, old.timeout) != (new.upstream, new.max_attempts, new.timeout):
            state.forwarder.config = _forward_config(new)
        state.pool.failure_threshold = new.failure_threshold
        state.callers.set_client_keys(_client_keys(new), new.anonymous)
        state.max_body, state.max_concurrent = new.max_body, new.max_concurrent
        if self._front is not None:
            self._front.max_body = new.max_body
        if new.metering != old.metering:
            state.metering = MeteringPolicy(new.metering)
        state.usage.budgets = budgets(desired)
        assert state.usage.ledger is not None
        state.usage.ledger.retention = desired.settings.usage.retention
        if desired.settings.usage.timezone != state.usage.calendar.declared:
            state.usage.reset(Calendar(desired.settings.usage.timezone))
            await self._load_usage(state.usage)
        if desired.settings.state_dir != state.accounts.cache_dir.parent:
            state.accounts.cache_dir = desired.settings.state_dir / "proxy"
            await self.reload_instance_keys()
            await self._follow_instance_keys()
        state.accounts.update(desired.accounts)
        if self._listen_override is None and new.listen != self._listen:
            await self._bind(new.listen)
            log.info("proxy now listening on %s", self.url)

    def _instance_keys(self) -> InstanceKeys:
        return InstanceKeys(StateDir(self.desired.settings.state_dir))

    async def reload_instance_keys(self) -> None:
        """Read the instances' proxy keys again: a key minted, rotated or revoked counts from now."""
        assert self.state is not None
        self.state.callers.set_instance_keys(await asyncio.to_thread(self._instance_keys().all))
        if self._publishes_keys and self.shared is not None:
            self.shared.publish_instance_keys(self.state.callers.instance_digests())

    async def _follow_instance_keys(self) -> None:
        """(Re)start following the key folder of the current state dir, so keys that ``cst apply``
        or ``cst rotate-key`` change in another process count at once here too."""
        await self._stop_following()
        stop = asyncio.Event()
        folder = self._instance_keys().folder
        task = asyncio.get_running_loop().create_task(self._follow(folder, stop))
        self._following = (task, stop)

    async def _follow(self, folder: Path, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.to_thread(folder.mkdir, 0o700, True, True)
                async for _ in changes_in(folder, stop):
                    await self.reload_instance_keys()
            except Exception:   # never silently: log, and follow again after a pause
                log.exception("following the instance keys in %s failed; trying again in 1 s", folder)
                await asyncio.sleep(1)

    async def _stop_following(self) -> None:
        if self._following is not None:
            task, stop = self._following
            self._following = None
            stop.set()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def stop(self) -> None:
        await self._stop_following()
        if self._front is not None:
            # first: no new request, and those in flight end (and settle) within the grace
            await self._front.close(SHUTDOWN_GRACE)
            self._front = self._site = None
        if self._refreshing is not None:
            self._refreshing.cancel()
            await asyncio.gather(self._refreshing, return_exceptions=True)
        if self.shared is not None:
            await self.shared.close()
        if self.state is not None:
            await self.state.accounts.close()
            if self.state.usage.ledger is not None:
                await asyncio.to_thread(self.state.usage.ledger.close)   # what is queued is written
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._upstream is not None:
            await self._upstream.close()
            self._upstream = None
