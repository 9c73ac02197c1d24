"""What proxy replicas share through the PostgreSQL store, on the request path's event loop.

* Budgets: ``reserve`` asks the store's ``cst_reserve`` (one statement, atomic per caller) to hold
  tokens for a request; the ledger writer's batch that records the request ends its hold.
* Key health: a key that the upstream cooled down (429) or refused (401/402/403) here is written
  to ``cst_key_health`` and announced with NOTIFY; every replica LISTENs and benches it too. A
  replica that starts late, or whose listening connection was lost, reads the table afresh.
* Instance keys: ``cst serve`` publishes the SHA-256 digests of the instances' proxy keys; every
  replica learns them on NOTIFY, so a replica without the state dir accepts an instance's key and
  refuses a revoked one.
* Whether the store answers: the listening connection is the witness (libpq sees a store that
  shut down at once); a reservation that fails says so too. ``serving`` is what ``on_store_down``
  makes of it.

Notifications carry nothing secret: digests of keys, never keys.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, NamedTuple

import psycopg

from reconciler.desired.model import Budget

from .budget import Used
from .ledger import StoreUnavailable
from .postgres import REPLICA_ALIVE, shown

log = logging.getLogger("cst.proxy.shared")

KEY_HEALTH = "cst_key_health"        # NOTIFY channels
INSTANCE_KEYS = "cst_instance_keys"
BEAT = 5.0                           # seconds between a replica's heartbeats
FORGET_REPLICA = 600                 # seconds after its last beat: its row is removed
RECONNECT_CAP = 5.0                  # longest wait between two attempts to reach the store
RESERVE_TIMEOUT = 5.0                # connecting for longer than this counts as the store being away
STALE_HOLD = 60.0                    # seconds after which a hold of this replica's that no request
                                     # in flight owns is ended by its beat (nothing should leave one)


class _Ask(NamedTuple):
    """One request's budget question, waiting for the next batch."""

    caller: str
    rid: str
    want: int
    now: float
    day: str
    month: str
    day_limit: int | None
    month_limit: int | None
    minute_limit: int | None


@dataclass(frozen=True)
class KeyVerdict:
    """A key another replica benched: skip it until ``until`` (Unix time)."""

    digest: str
    until: float
    quarantined: bool
    reason: str


KeyListener = Callable[[KeyVerdict], None]
InstanceKeysListener = Callable[[Mapping[bytes, str]], None]   # digest -> instance id


class SharedStore:
    def __init__(self, conninfo: str, connect: dict[str, Any], replica: str, serve_when_down: bool,
                 prepare: Callable[[], None], on_key: KeyListener, on_instance_keys: InstanceKeysListener):
        """``prepare`` (blocking: run in a thread) makes the schema ready before the store is used."""
        self.url = shown(conninfo)
        self.replica = replica
        self.serve_when_down = serve_when_down
        self._conninfo, self._connect = conninfo, connect
        self._on_key, self._on_instance_keys = on_key, on_instance_keys
        self._prepare = prepare
        # decisions go one batch at a time, so one connection serves them (and the rare publications)
        self._db: psycopg.AsyncConnection | None = None
        self._using = asyncio.Lock()
        self.up = False
        self.last_error: str | None = None
        self.down_since: float | None = time.time()
        self._listening: asyncio.Task[None] | None = None
        self._asking: list[tuple[_Ask, asyncio.Future[tuple[int | None, Used]]]] = []
        self._deciding: asyncio.Task[None] | None = None   # the batch on its way, if one is
        self._live: set[str] = set()   # ids of this replica's requests that may hold tokens now
        self._tasks: set[asyncio.Task[None]] = set()   # background work, referenced until it ends
        self._connected = asyncio.Event()

    @property
    def serving(self) -> bool:
        return self.up or self.serve_when_down

    async def start(self, wait: float) -> None:
        """Beat and listen; wait up to ``wait`` seconds for the store to answer (a store that does
        not is reported and tried again, and ``serving`` says what that means)."""
        self._listening = asyncio.get_running_loop().create_task(self._listen_forever())
        try:
            await asyncio.wait_for(self._connected.wait(), wait)
        except asyncio.TimeoutError:
            log.error("the usage store %s does not answer (%s); %s", self.url, self.last_error,
                      "serving on local budgets and spooling the ledger" if self.serve_when_down
                      else "refusing requests (503) until it does")

    async def close(self) -> None:
        if self._listening is not None:
            self._listening.cancel()
            await asyncio.gather(self._listening, return_exceptions=True)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._drop_connection()

    async def _drop_connection(self) -> None:
        async with self._using:
            if self._db is not None:
                await self._db.close()
                self._db = None

    def status(self) -> dict[str, Any]:
        return {"kind": "postgresql", "url": self.url, "state": "up" if self.up else "down",
                "on_store_down": "open" if self.serve_when_down else "closed",
                "serving": self.serving, "replica": self.replica,
                "down_since": None if self.up or self.down_since is None
                else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.down_since)),
                "last_error": self.last_error}

    def _went_down(self, exc: BaseException) -> None:
        self.last_error = str(exc).strip() or type(exc).__name__
        if self.up:
            self.up, self.down_since = False, time.time()
            log.error("the usage store %s cannot be reached (%s); %s", self.url, self.last_error,
                      "serving on local budgets and spooling the ledger" if self.serve_when_down
                      else "refusing requests (503) until it is back")

    # -- budgets ------------------------------------------------------------------------------

    async def reserve(self, caller: str, budget: Budget, want: int, now: float, day: str, month: str,
                      rid: str) -> tuple[int | None, Used]:
        """Requests that ask while a batch is on its way go together in the next one: one round
        trip for all of them (measured in bench/proxy/stores.py)."""
        answer: asyncio.Future[tuple[int | None, Used]] = asyncio.get_running_loop().create_future()
        self._asking.append((_Ask(caller, rid, want, now, day, month, budget.tokens_per_day, budget.tokens_per_month,
                                  budget.requests_per_minute), answer))
        self._live.add(rid)
        if self._deciding is None:
            self._deciding = asyncio.get_running_loop().create_task(self._decide())
        try:
            decided = await answer
        except asyncio.CancelledError:
            # cancelled after its batch granted it, before it resumed: nobody will settle that hold
            if answer.done() and not answer.cancelled() and answer.exception() is None and answer.result()[0]:
                self._background(self._end_holds([rid]), f"ending the hold of {rid}")
            self._live.discard(rid)
            raise
        except BaseException:
            self._live.discard(rid)
            raise
        if decided[0] is None:
            self._live.discard(rid)
        return decided

    def release(self, rid: str) -> None:
        """The request ``rid`` has ended: its hold ends with its row (or with this replica's sweep)."""
        self._live.discard(rid)

    async def _end_holds(self, rids: list[str]) -> None:
        async with self._connection() as db:
            await db.execute("SELECT cst_end_holds(%s, NULL)", (rids,))

    async def _decide(self) -> None:
        try:
            while self._asking:
                batch = [(ask, answer) for ask, answer in self._asking if not answer.cancelled()]
                self._asking = []
                if batch:
                    try:
                        await self._decide_batch(batch)
                    except Exception:   # a defect: its requests were answered with it; say so, go on
                        log.exception("deciding %d budgets in the usage store failed", len(batch))
        finally:
            self._deciding = None
            for _, answer in self._asking:   # only when cancelled: nobody waits for ever
                if not answer.done():
                    answer.set_exception(StoreUnavailable(self.url))
            self._asking = []

    async def _decide_batch(self, batch: list[tuple["_Ask", "asyncio.Future[tuple[int | None, Used]]"]]) -> None:
        asks = [ask for ask, _ in batch]
        try:
            async with self._connection() as db:
                if len(asks) == 1:   # alone: the plain function (measured: 0.12 ms less than a batch of one)
                    [a] = asks
                    cursor = await db.execute(
                        "SELECT 1, * FROM cst_reserve(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                        (a.caller, a.rid, self.replica, a.want, a.now, a.day, a.month, a.day_limit, a.month_limit,
                         a.minute_limit))
                else:
                    cursor = await db.execute(
                        "SELECT * FROM cst_reserve_many(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                        ([a.caller for a in asks], [a.rid for a in asks], self.replica, [a.want for a in asks],
                         [a.now for a in asks], [a.day for a in asks], [a.month for a in asks],
                         [a.day_limit for a in asks], [a.month_limit for a in asks], [a.minute_limit for a in asks]))
                found = await cursor.fetchall()
                # a request that went away while its batch was deciding: its hold ends now
                gone = [asks[i - 1].rid for i, granted, *_ in found if granted is not None and batch[i - 1][1].done()]
                if gone:
                    await db.execute("SELECT cst_end_holds(%s, NULL)", (gone,))
        except (psycopg.OperationalError, TimeoutError) as exc:
            self._went_down(exc)
            for _, answer in batch:
                if not answer.done():
                    answer.set_exception(StoreUnavailable(self.url))
            return
        except BaseException as exc:   # a defect (or cancellation): no request waits for ever
            for _, answer in batch:
                if not answer.done():
                    answer.set_exception(exc if isinstance(exc, Exception) else StoreUnavailable(self.url))
            raise
        for i, granted, today, month_used, held, recent, oldest in found:
            answer = batch[i - 1][1]
            if not answer.done():
                answer.set_result(((None if granted is None else int(granted)),
                                   Used(int(today), int(month_used), int(held), int(recent), oldest)))

    # -- key health ---------------------------------------------------------------------------

    def publish_key(self, verdict: KeyVerdict) -> None:
        """Tell the other replicas (in the background: the request that learnt it goes on)."""
        self._background(self._publish_key(verdict), f"publishing key {verdict.digest[:12]}")

    async def _publish_key(self, verdict: KeyVerdict) -> None:
        payload = json.dumps({"digest": verdict.digest, "until": verdict.until, "quarantined": verdict.quarantined,
                              "reason": verdict.reason, "replica": self.replica})
        async with self._connection() as db, db.transaction():
            await db.execute(
                "INSERT INTO cst_key_health VALUES (%s, %s, %s, %s, %s) ON CONFLICT (digest) DO UPDATE SET"
                " until = greatest(cst_key_health.until, excluded.until), quarantined = excluded.quarantined,"
                " reason = excluded.reason, replica = excluded.replica",
                (verdict.digest, verdict.until, verdict.quarantined, verdict.reason, self.replica))
            await db.execute("SELECT pg_notify(%s, %s)", (KEY_HEALTH, payload))

    # -- instance keys ------------------------------------------------------------------------

    def publish_instance_keys(self, digests: Mapping[str, bytes]) -> None:
        """Make the store's instance keys exactly ``digests`` (instance id -> digest); ``cst serve``
        calls this whenever the state dir's keys change."""
        self._background(self._publish_instance_keys(dict(digests)), "publishing the instances' keys")

    async def _publish_instance_keys(self, digests: dict[str, bytes]) -> None:
        async with self._connection() as db, db.transaction():
            await db.execute("LOCK TABLE cst_instance_keys IN EXCLUSIVE MODE")
            cursor = await db.execute("SELECT instance, digest FROM cst_instance_keys")
            stored = {instance: bytes(digest) for instance, digest in await cursor.fetchall()}
            if stored == digests:
                return
            await db.execute("DELETE FROM cst_instance_keys WHERE NOT (instance = ANY(%s))", (list(digests),))
            for instance, digest in digests.items():
                if stored.get(instance) != digest:
                    await db.execute("INSERT INTO cst_instance_keys VALUES (%s, %s) ON CONFLICT (instance)"
                                     " DO UPDATE SET digest = excluded.digest", (instance, digest))
            await db.execute("SELECT pg_notify(%s, '')", (INSTANCE_KEYS,))

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection]:
        """The one connection, for one use at a time; opened (again) when needed, dropped when
        the store went away, so that the next use opens it afresh."""
        async with self._using:
            db = self._db
            if db is None or db.closed or db.broken:
                db = await asyncio.wait_for(psycopg.AsyncConnection.connect(self._conninfo, **self._connect),
                                            RESERVE_TIMEOUT)
                self._db = db
            assert db is not None
            try:
                yield db
            except psycopg.OperationalError:
                await db.close()
                self._db = None
                raise

    def _background(self, work: Awaitable[None], what: str) -> None:
        async def run() -> None:
            try:
                await work
            except Exception as exc:   # the listener's next connect reads the tables afresh
                log.warning("%s in the usage store %s failed: %s", what, self.url, exc)
        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)   # the loop keeps only a weak reference to a task
        task.add_done_callback(self._tasks.discard)

    # -- listening and beating ----------------------------------------------------------------

    async def _listen_forever(self) -> None:
        wait = 0.5
        while True:
            try:
                await self._listen()
            except asyncio.CancelledError:
                raise
            except Exception as exc:   # the store went away, or answered nonsense: say so, try again
                self._went_down(exc)
                if not isinstance(exc, (psycopg.OperationalError, OSError, StoreUnavailable)):
                    log.exception("listening to the usage store %s failed", self.url)
            self._connected.clear()
            await asyncio.sleep(wait)
            wait = min(wait * 2, RECONNECT_CAP)

    async def _listen(self) -> None:
        await asyncio.to_thread(self._prepare)
        async with await psycopg.AsyncConnection.connect(self._conninfo, **self._connect) as db:
            await db.execute(f"LISTEN {KEY_HEALTH}")
            await db.execute(f"LISTEN {INSTANCE_KEYS}")
            await self._beat(db)
            await self._read_keys(db)
            await self._read_instance_keys(db)
            if not self.up:
                await self._drop_connection()   # it may be one the store dropped while it was away
                if self.down_since is not None and self.last_error is not None:
                    log.info("the usage store %s answers again", self.url)
                self.up, self.last_error, self.down_since = True, None, None
            self._connected.set()
            next_beat = time.monotonic() + BEAT
            while True:
                keys_changed = False
                async for note in db.notifies(timeout=max(next_beat - time.monotonic(), 0.01)):
                    if note.channel == KEY_HEALTH:
                        self._key_note(note.payload)
                    elif note.channel == INSTANCE_KEYS:
                        keys_changed = True   # read once out of the notifications' loop (no query inside it)
                        break
                if keys_changed:
                    await self._read_instance_keys(db)
                if time.monotonic() >= next_beat:
                    await self._beat(db)
                    next_beat = time.monotonic() + BEAT

    async def _beat(self, db: psycopg.AsyncConnection) -> None:
        """Say this replica is alive (its holds count), and forget replicas long gone with their holds."""
        await db.execute("INSERT INTO cst_replicas VALUES (%s, clock_timestamp(), %s) ON CONFLICT (id)"
                         " DO UPDATE SET seen = excluded.seen", (self.replica, socket.gethostname()))
        # the holds of a replica that stopped beating stop counting
        await db.execute("SELECT cst_end_holds('{}', make_interval(secs => %s))", (REPLICA_ALIVE,))
        # and this replica's own that no request in flight owns, however its request ended without
        # its row (nothing known does: this is the net under the others)
        await db.execute("SELECT cst_end_holds(array(SELECT h.id FROM cst_holds h WHERE h.replica = %s"
                         " AND h.started < %s AND NOT (h.id = ANY(%s))), NULL)",
                         (self.replica, time.time() - STALE_HOLD, list(self._live)))
        await db.execute("DELETE FROM cst_replicas WHERE seen < clock_timestamp() - make_interval(secs => %s)",
                         (FORGET_REPLICA,))
        await db.execute("DELETE FROM cst_key_health WHERE until < %s", (time.time() - REPLICA_ALIVE,))
        await db.execute("DELETE FROM cst_minute WHERE second < %s", (int(time.time()) - 120,))

    async def _read_keys(self, db: psycopg.AsyncConnection) -> None:
        cursor = await db.execute("SELECT digest, until, quarantined, reason FROM cst_key_health WHERE until > %s",
                                  (time.time(),))
        for digest, until, quarantined, reason in await cursor.fetchall():
            self._on_key(KeyVerdict(digest, until, quarantined, reason))

    def _key_note(self, payload: str) -> None:
        try:
            note = json.loads(payload)
            if note["replica"] == self.replica:
                return
            verdict = KeyVerdict(str(note["digest"]), float(note["until"]), bool(note["quarantined"]),
                                 str(note["reason"]))
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a key-health note that is not CST's: %.80r", payload)
            return
        self._on_key(verdict)

    async def _read_instance_keys(self, db: psycopg.AsyncConnection) -> None:
        cursor = await db.execute("SELECT digest, instance FROM cst_instance_keys")
        self._on_instance_keys({bytes(digest): instance for digest, instance in await cursor.fetchall()})
