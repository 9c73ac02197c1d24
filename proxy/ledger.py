"""The ledger: one row per request that reached the proxy with a known key, kept in a store.

The store is an interface (``LedgerStore``) so that a shared one can stand beside the default
SQLite file for several proxy replicas. Rows are handed to a ``LedgerWriter``, which writes them
on a thread of its own in batches at most ``FLUSH_DELAY`` after the first of them arrived: the
event loop gathers a batch and hands it over whole, so the two threads meet once a batch, not once
a row (a wake-up a row cost the loop ~2 futex calls and a GIL hand-off each); the
event loop that relays chat streams never waits for a disk, and a ``kill -9`` loses at most the
rows of the last ``FLUSH_DELAY`` (and of a write under way).

Each batch also adds to the daily totals per caller (the ``daily`` table, keyed by the day in the
declared time zone when the row was written). Rows are pruned after ``settings.usage.retention``;
daily totals stay, so billing exports and budgets do not depend on the rows.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections import deque
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Protocol, Sequence

log = logging.getLogger("cst.proxy.ledger")

FLUSH_DELAY = 0.05      # a row is on disk at most this long (plus the write) after its request ended
MAX_TEXT = 200          # characters of a row's model or path kept
MAX_TOKENS = 10_000_000   # a row's figure of tokens at most (see usage.MAX_REPORTED_TOKENS)
PRUNE_EVERY = 3600.0
MAX_BACKLOG = 1_000_000   # rows kept in memory while the store cannot be written
REPLAY_BATCH = 5000       # spooled rows written to the store a transaction


class Row(NamedTuple):
    """A ledger row's fields, in the order every store takes them. The request path hands a plain
    tuple in this order to the writer (a NamedTuple a request cost more); this names the fields."""

    caller: str
    model: str
    path: str
    status: int                 # what the client got; 0: the client hung up first
    prompt_tokens: int
    completion_tokens: int
    estimated: bool             # tokens estimated by the proxy, not reported by the upstream
    started: float              # Unix time
    ended: float
    key: str                    # the pool key, masked ("" when none was used)
    day: str                    # the window the row counts in (YYYY-MM-DD in the declared zone)
    rid: str                    # unique per request: a row replayed from a spool is written once


RowValues = tuple[object, ...]   # a Row's fields in order, as the writer queues them

def clamp_statements(requests: str, daily: str) -> str:
    """SQL (SQLite's and PostgreSQL's alike) that brings the figures of a store's ``requests`` and
    ``daily`` tables within ``MAX_TOKENS`` a request: what older versions let an upstream write."""
    def capped(column: str, cap: str) -> str:
        return f"{column} = CASE WHEN {column} > {cap} THEN {cap} ELSE {column} END"

    row, day = str(MAX_TOKENS), f"{MAX_TOKENS} * requests"
    return f"""
    UPDATE {requests} SET {capped("prompt_tokens", row)}, {capped("completion_tokens", row)}
    WHERE prompt_tokens > {row} OR completion_tokens > {row};
    UPDATE {daily} SET {capped("prompt_tokens", day)}, {capped("completion_tokens", day)}
    WHERE prompt_tokens > {day} OR completion_tokens > {day};
    """


_CONTROLS = dict.fromkeys([*range(0x20), 0x7F], "\ufffd")   # NUL among them: PostgreSQL refuses it in text


def clean_text(value: str, limit: int = MAX_TEXT) -> str:
    """``value`` as every store takes it: no control characters (NUL above all), no lone
    surrogates, at most ``limit`` characters. A string that is printable ASCII costs one check."""
    if not (value.isascii() and value.isprintable()):
        value = value.translate(_CONTROLS).encode("utf-8", "replace").decode("utf-8")
    return value[:limit]


def _clamped(value: object) -> int:
    number = int(value) if isinstance(value, (int, float)) and value == value else 0   # NaN: 0
    return min(max(number, 0), MAX_TOKENS)


def sanitised(row: RowValues) -> RowValues:
    """A row read back from a spool (written by any version) as every store takes it."""
    caller, model, path, status, prompt, completion, *rest = row
    return (clean_text(str(caller)), clean_text(str(model)), clean_text(str(path)), status, _clamped(prompt),
            _clamped(completion), *rest)


@dataclass
class Tally:
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: int = 0          # requests whose tokens were estimated

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, failed: bool, prompt_tokens: int, completion_tokens: int, estimated: bool) -> None:
        """One request's figures."""
        self.requests += 1
        self.errors += failed
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.estimated += estimated

    def merge(self, other: "Tally") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def document(self) -> dict[str, int]:
        return {"requests": self.requests, "errors": self.errors, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "tokens": self.tokens, "estimated": self.estimated}


@dataclass
class Standing:
    """What the store says a caller used in the current windows (read when the proxy starts)."""

    today: Tally = field(default_factory=Tally)
    month: Tally = field(default_factory=Tally)
    recent: list[float] = field(default_factory=list)   # start times of requests in the last minute


@dataclass(frozen=True)
class DayTotal:
    day: str
    caller: str
    tally: Tally

    def document(self) -> dict[str, object]:
        return {"day": self.day, "instance": self.caller, **self.tally.document()}


def standings(day: str, totals: Iterable[Sequence[Any]], recent: Iterable[tuple[str, float]]) -> dict[str, Standing]:
    """A store's answer as standings: ``totals`` are daily rows of a month (day, caller, Tally's
    fields), ``recent`` the start times of the last minute's requests by caller."""
    result: dict[str, Standing] = {}
    for row_day, caller, *counts in totals:
        standing = result.setdefault(caller, Standing())
        tally = Tally(*(int(c) for c in counts))
        standing.month.merge(tally)
        if row_day == day:
            standing.today.merge(tally)
    for caller, started in recent:
        result.setdefault(caller, Standing()).recent.append(started)
    return result


def daily_query(table: str, mark: str, first: str, last: str, caller: str | None) -> tuple[str, tuple[str, ...]]:
    """The query of a store's daily totals (``table``, parameters written ``mark``) from ``first``
    to ``last``, of one caller or all, and its parameters."""
    query = (f"SELECT day, caller, requests, errors, prompt_tokens, completion_tokens, estimated FROM {table}"
             f" WHERE day >= {mark} AND day <= {mark}")
    params: tuple[str, ...] = (first, last)
    if caller is not None:
        query += f" AND caller = {mark}"
        params += (caller,)
    return query + " ORDER BY day, caller", params


def day_totals(found: Iterable[Sequence[Any]]) -> list[DayTotal]:
    """Daily rows (day, caller, Tally's fields) as DayTotals."""
    return [DayTotal(day, who, Tally(*(int(c) for c in counts))) for day, who, *counts in found]


class StoreUnavailable(Exception):
    """A store across the network cannot be reached now; the message names it and says why."""


class RowsRefused(Exception):
    """A store refused a batch for what it holds (a value it cannot take), not for being away:
    writing it again as it is would fail for ever."""


class LedgerStore(Protocol):
    """Where rows and daily totals are kept. Methods block: call them off the event loop."""

    def write(self, rows: Sequence[RowValues]) -> None:
        """Rows (as Row's fields, in order) and their daily totals, in one transaction. Raises
        ``RowsRefused`` when a row holds what the store cannot take."""

    def end_holds(self, rids: Sequence[str]) -> None:
        """End the budget holds of requests whose rows will never be written (set aside)."""

    def standing(self, day: str, month: str, since: float) -> dict[str, Standing]:
        """Per caller: the totals of ``day`` and ``month`` (``YYYY-MM``), and the requests since ``since``."""

    def daily(self, first: str, last: str, caller: str | None = None) -> list[DayTotal]:
        """Daily totals from day ``first`` to ``last`` (inclusive), by day then caller."""

    def prune(self, before: float) -> int:
        """Remove rows that ended before ``before``; the number removed."""

    def close(self) -> None: ...


_SCHEMA = (
    # version 1
    """
    CREATE TABLE requests (
        id INTEGER PRIMARY KEY,
        caller TEXT NOT NULL, model TEXT NOT NULL, path TEXT NOT NULL, status INTEGER NOT NULL,
        prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, estimated INTEGER NOT NULL,
        started REAL NOT NULL, ended REAL NOT NULL, key TEXT NOT NULL, day TEXT NOT NULL
    );
    CREATE TABLE daily (
        day TEXT NOT NULL, caller TEXT NOT NULL,
        requests INTEGER NOT NULL, errors INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL, estimated INTEGER NOT NULL,
        PRIMARY KEY (day, caller)
    ) WITHOUT ROWID;
    """,
    # version 2: rows carry their request's id (no index: only a spool's rows are read back by it)
    """
    ALTER TABLE requests ADD COLUMN rid TEXT NOT NULL DEFAULT '';
    """,
    # version 3: figures an upstream claimed beyond belief (2^71 tokens) as a row holds at most,
    # daily totals at most that a request (figures past 2^63 never made it to the file)
    clamp_statements("requests", "daily"),
)

ROWS_PER_INSERT = 64   # 768 parameters a statement; the rest of a batch one row a statement
COLUMNS = Row._fields
_INSERT_ONE = (f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_INSERT_MANY = _INSERT_ONE + ", (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)" * (ROWS_PER_INSERT - 1)


_ADD_DAYS = """
    INSERT INTO daily (day, caller, requests, errors, prompt_tokens, completion_tokens, estimated)
    SELECT day, caller, count(*), sum(status >= 400), sum(prompt_tokens), sum(completion_tokens), sum(estimated)
    FROM requests WHERE id > ? GROUP BY day, caller
    ON CONFLICT (day, caller) DO UPDATE SET
        requests = requests + excluded.requests, errors = errors + excluded.errors,
        prompt_tokens = prompt_tokens + excluded.prompt_tokens,
        completion_tokens = completion_tokens + excluded.completion_tokens,
        estimated = estimated + excluded.estimated
"""


class SqliteStore:
    """The default store: a SQLite file in the state dir (WAL: readers such as ``cst usage`` never
    block the writer; ``synchronous=NORMAL``: a committed batch survives a crash of the process)."""

    def __init__(self, path: Path, readonly: bool = False):
        self.path = path
        if readonly:
            self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False, timeout=10)
        else:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)   # owner-only before SQLite writes to it
            os.close(fd)
            self._db = sqlite3.connect(path, check_same_thread=False, timeout=10, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        self._lock = threading.Lock()   # one statement at a time on the shared connection

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        for number, script in enumerate(_SCHEMA[version:], start=version + 1):
            # each migration is one transaction, its version bumped inside it
            statements = [s for s in script.split(";") if s.strip()]
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for statement in statements:
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {int(number)}")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def write(self, rows: Sequence[RowValues]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                # many rows a statement: sqlite3 lets go of the GIL for every statement it runs, and each
                # time the event loop's thread must hand it back (executemany did so once a row). One
                # size of statement, so it is prepared once and kept in sqlite3's statement cache.
                whole = len(rows) - len(rows) % ROWS_PER_INSERT
                for start in range(0, whole, ROWS_PER_INSERT):
                    self._db.execute(_INSERT_MANY, [v for row in rows[start:start + ROWS_PER_INSERT] for v in row])
                self._db.executemany(_INSERT_ONE, rows[whole:])
                # the batch's rows are the last ones: SQLite adds them up into the daily totals
                last = self._db.execute("SELECT last_insert_rowid()").fetchone()[0]
                self._db.execute(_ADD_DAYS, (last - len(rows),))
                self._db.execute("COMMIT")
            except BaseException as exc:
                self._db.execute("ROLLBACK")
                if isinstance(exc, (OverflowError, sqlite3.DataError, sqlite3.IntegrityError)):
                    raise RowsRefused(f"{self.path}: {exc}") from exc
                raise

    def end_holds(self, rids: Sequence[str]) -> None:
        pass   # one process decides on its own counts: nothing is held in the file

    def standing(self, day: str, month: str, since: float) -> dict[str, Standing]:
        with self._lock:
            totals = self._db.execute(
                "SELECT day, caller, requests, errors, prompt_tokens, completion_tokens, estimated FROM daily"
                " WHERE day >= ? AND day < ?", (f"{month}-01", f"{month}-32")).fetchall()
            recent = self._db.execute("SELECT caller, started FROM requests WHERE id >= ? AND started >= ?",
                                      (self._first_ended_after(since), since)).fetchall()
        return standings(day, totals, recent)

    def daily(self, first: str, last: str, caller: str | None = None) -> list[DayTotal]:
        query, params = daily_query("daily", "?", first, last, caller)
        with self._lock:
            found = self._db.execute(query, params).fetchall()
        return day_totals(found)

    def _first_ended_after(self, t: float) -> int:
        """The id of the first row that ended at ``t`` or later. Rows are appended as their requests
        end, so ids follow ``ended``: a binary search over ids finds it without an index on time
        (an index would double the cost of every insert)."""
        bounds: tuple[int, int] = self._db.execute(
            "SELECT coalesce(min(id), 0), coalesce(max(id), 0) + 1 FROM requests").fetchone()
        low, high = bounds
        while low < high:
            middle = (low + high) // 2
            found = self._db.execute("SELECT ended FROM requests WHERE id >= ? ORDER BY id LIMIT 1",
                                     (middle,)).fetchone()
            if found is None or found[0] >= t:
                high = middle
            else:
                low = middle + 1
        return low

    def prune(self, before: float) -> int:
        with self._lock:
            return self._db.execute("DELETE FROM requests WHERE id < ?", (self._first_ended_after(before),)).rowcount

    def rows(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM requests").fetchone()[0])

    # a spool's side: rows read back in order and forgotten once another store took them

    def oldest(self, limit: int) -> tuple[int, list[RowValues]]:
        """(the id of the last, the rows) of the ``limit`` oldest rows."""
        with self._lock:
            found = self._db.execute(f"SELECT id, {', '.join(COLUMNS)} FROM requests ORDER BY id LIMIT ?",
                                     (limit,)).fetchall()
        rows = [(*r[1:7], bool(r[7]), *r[8:]) for r in found]
        return (found[-1][0] if found else 0), rows

    def forget(self, last: int) -> None:
        """Remove the rows up to id ``last`` (their daily totals go too: a spool's are not read)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM requests WHERE id <= ?", (last,))
            self._db.execute("DELETE FROM daily")
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()


class LedgerWriter:
    """Rows in, batches out on a thread of its own. ``append`` never blocks. A batch the store cannot
    take is logged with its traceback and tried again; with a ``spool`` (a local SQLite file, for a
    shared store across the network) it is kept there meanwhile, so that a proxy stopped or killed
    while the store is away loses nothing, and written to the store once it answers: rows carry
    their request's id, and the store takes each id once.

    A row the store refuses for what it holds (not for being away) is found by halving its batch,
    appended to ``set_aside`` (JSON lines, 0600) for the operator, counted, and its budget hold
    ended: it never blocks the rows behind it."""

    def __init__(self, store: LedgerStore, retention: float, clock: Callable[[], float] = time.time,
                 spool: "SqliteStore | None" = None, set_aside: Path | None = None):
        self.store = store
        self.spool = spool
        self.set_aside_path = set_aside
        self.set_aside = 0         # rows the store refused, kept in set_aside_path
        self.retention = retention
        self._clock = clock
        self._queue: queue.SimpleQueue[list[RowValues] | None] = queue.SimpleQueue()
        self._gathering: list[RowValues] = []   # rows of the batch the event loop is gathering
        self._handing = threading.Lock()         # append (the loop) and close (another thread) swap it
        self._backlog: list[RowValues] = []   # taken from the queue, not yet committed
        self.spooled = spool.rows() if spool is not None else 0   # rows in the spool, not yet in the store
        self.failures = 0          # writes that failed (their rows were kept and tried again)
        self.written = 0
        self._thread = threading.Thread(target=self._run_forever, name="cst-ledger", daemon=True)
        self._thread.start()

    def append(self, row: RowValues) -> None:
        """Queue ``row``: on an event loop, into the batch handed over ``FLUSH_DELAY`` after its
        first row; elsewhere (a script, a test), at once."""
        # kept as a plain tuple: the collector stops tracking a tuple of strings and numbers at its
        # first pass, while a tuple subclass stays tracked and, waiting here, would age into the
        # oldest generation and make full collections frequent (measured: ~8 us a request)
        with self._handing:
            self._gathering.append(tuple(row))
            first = len(self._gathering) == 1
        if first:
            try:
                asyncio.get_running_loop().call_later(FLUSH_DELAY, self._hand_over)
            except RuntimeError:
                self._hand_over()

    def _hand_over(self) -> None:
        with self._handing:
            batch, self._gathering = self._gathering, []
        if batch:
            self._queue.put(batch)

    def close(self) -> None:
        """Write what is queued and stop the thread."""
        self._hand_over()
        self._queue.put(None)
        self._thread.join()
        self.store.close()
        if self.spool is not None:
            self.spool.close()

    def status(self) -> dict[str, int]:
        return {"written": self.written, "failures": self.failures, "unwritten": len(self._backlog),
                "spooled": self.spooled, "set_aside": self.set_aside}

    def _take(self, wait: float | None) -> bool:
        """Move what is queued into the backlog, waiting up to ``wait`` for a first item;
        False once ``close`` asked the thread to stop."""
        try:
            item = self._queue.get(timeout=wait)
        except queue.Empty:
            return True
        going = True
        while True:
            if item is None:
                going = False
            else:
                self._backlog += item
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return going

    def _run_forever(self) -> None:
        while True:
            try:
                self._run()
                return
            except Exception:   # a defect, not the store: the rows stay, the thread goes on
                log.exception("the ledger writer failed; starting it again in 1 s")
                time.sleep(1.0)

    def _run(self) -> None:
        going = True
        next_prune = 0.0
        retry_at, backoff = 0.0, 1.0
        while going or self._backlog:
            if going:
                # idle: wait for a row; with rows waiting for the store: wait for the retry, gathering rows
                waiting = retry_at - time.monotonic()
                going = self._take(None if not (self._backlog or self.spooled) else max(waiting, 0.0))
                if going and time.monotonic() < retry_at:
                    continue
            wrote = False
            try:
                if self.spooled and time.monotonic() >= retry_at:
                    wrote = self._replay()
                if self._backlog:
                    self._write(self._backlog, self._backlog_done)
                    wrote = True
            except Exception as exc:
                self.failures += 1
                waiting = len(self._backlog) + self.spooled
                if isinstance(exc, StoreUnavailable):   # expected while a store is away: no traceback
                    log.error("could not write %d ledger rows (%s); keeping them and trying again in %g s",
                              waiting, exc, backoff)
                else:
                    log.exception("could not write %d ledger rows; keeping them and trying again in %g s",
                                  waiting, backoff)
                self._keep_backlog()
                if not going:
                    if self._backlog:
                        log.error("stopping with %d ledger rows unwritten", len(self._backlog))
                    return
                retry_at, backoff = time.monotonic() + backoff, min(backoff * 2, 30.0)
                continue
            retry_at, backoff = 0.0, 1.0
            now = self._clock()
            if wrote and now >= next_prune:
                next_prune = now + PRUNE_EVERY
                try:
                    pruned = self.store.prune(now - self.retention)
                    if pruned:
                        log.info("pruned %d ledger rows older than the retention", pruned)
                except Exception:
                    log.exception("pruning the ledger failed; trying again in an hour")

    def _backlog_done(self, count: int) -> None:
        del self._backlog[:count]

    def _write(self, rows: list[RowValues], done: Callable[[int], None]) -> None:
        """Write ``rows`` in order; ``done(n)`` after each n of them left (written or set aside), so
        that what is left is known when the store fails for another reason (which is raised)."""
        parts: deque[list[RowValues]] = deque([rows[:]])
        while parts:
            part = parts.popleft()
            try:
                self.store.write(part)
                self.written += len(part)
            except RowsRefused as exc:
                if len(part) > 1:
                    half = len(part) // 2
                    parts.extendleft((part[half:], part[:half]))
                    continue
                self._put_aside(part[0], exc)
            done(len(part))

    def _put_aside(self, row: RowValues, why: RowsRefused) -> None:
        self.set_aside += 1
        log.error("the ledger store refused a row (%s); it is set aside%s and the rows behind it go on",
                  why, f" in {self.set_aside_path}" if self.set_aside_path else "")
        if self.set_aside_path is not None:
            try:
                self.set_aside_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd = os.open(self.set_aside_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                with os.fdopen(fd, "a", encoding="utf-8") as out:
                    out.write(json.dumps({"row": dict(zip(Row._fields, row, strict=True)), "refused": str(why)}) + "\n")
            except OSError:
                log.exception("could not keep the refused row in %s", self.set_aside_path)
        try:
            self.store.end_holds([str(row[-1])])
        except Exception as exc:   # its replica's sweep ends it later
            log.warning("could not end the hold of a refused row now: %s", exc)

    def _keep_backlog(self) -> None:
        """The store refused the backlog: into the spool if there is one, else held in memory."""
        if self.spool is not None and self._backlog:
            try:
                self.spool.write(self._backlog)
            except Exception:
                log.exception("could not keep %d ledger rows in the spool %s either", len(self._backlog),
                              self.spool.path)
            else:
                self.spooled += len(self._backlog)
                self._backlog = []
                return
        if len(self._backlog) > MAX_BACKLOG:
            log.error("dropping the %d oldest ledger rows: the store has been failing too long",
                      len(self._backlog) - MAX_BACKLOG)
            del self._backlog[:-MAX_BACKLOG]

    def _replay(self) -> bool:
        """Write the spool's rows to the store, oldest first, and forget each batch once it is
        committed there (a crash in between replays it again; the store takes each row once)."""
        assert self.spool is not None
        while True:
            last, rows = self.spool.oldest(REPLAY_BATCH)
            if not rows:
                self.spooled = 0
                return True
            # rows any version spooled, cleaned as this one writes them (a NUL once stalled the spool)
            self._write([sanitised(row) for row in rows], lambda _: None)
            self.spool.forget(last)
            self.spooled = max(self.spooled - len(rows), 0)
            log.info("wrote %d ledger rows from the spool to the store (%d left)", len(rows), self.spooled)
