"""The ledger in PostgreSQL, shared by several proxy replicas (``settings.usage.store``).

The same ``LedgerStore`` as the SQLite file, plus what replicas must agree on: the requests in
flight that hold part of a budget (``cst_holds``), the keys the upstream cooled down or refused
(``cst_key_health``), the instances' proxy keys as digests (``cst_instance_keys``), and the
replicas alive (``cst_replicas``: a replica's holds count while it beats). The asynchronous side
that the request path uses is in ``shared``; this module is the schema, its migrations and the
blocking calls the ledger's writer thread makes.

Every row carries its request's id, unique in ``cst_requests``: a batch written twice (a commit
whose answer was lost, a spool replayed after a crash) adds its rows and daily totals once.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Sequence

import psycopg

from reconciler.desired.model import UsageSettings
from reconciler.desired.secret_source import read_secret

from .ledger import (
    DayTotal,
    RowsRefused,
    RowValues,
    Standing,
    StoreUnavailable,
    clamp_statements,
    daily_query,
    day_totals,
    standings,
)

log = logging.getLogger("cst.proxy.postgres")

CONNECT_TIMEOUT = 3      # seconds; a store that does not answer in that time is down for now
REPLICA_ALIVE = 30       # seconds without a beat after which a replica's holds no longer count
_MIGRATION_LOCK = 0x6373_7431   # pg_advisory_xact_lock key: replicas starting together migrate once

_MIGRATIONS = (
    # version 1
    """
    CREATE TABLE cst_requests (
        id bigserial PRIMARY KEY,
        rid text NOT NULL UNIQUE,
        caller text NOT NULL, model text NOT NULL, path text NOT NULL, status integer NOT NULL,
        prompt_tokens bigint NOT NULL, completion_tokens bigint NOT NULL, estimated boolean NOT NULL,
        started double precision NOT NULL, ended double precision NOT NULL, key text NOT NULL, day text NOT NULL
    );
    CREATE INDEX cst_requests_ended ON cst_requests (ended);
    CREATE TABLE cst_daily (
        day text NOT NULL, caller text NOT NULL,
        requests bigint NOT NULL, errors bigint NOT NULL, prompt_tokens bigint NOT NULL,
        completion_tokens bigint NOT NULL, estimated bigint NOT NULL,
        PRIMARY KEY (caller, day)
    );
    -- What replicas agree on while they run is kept out of the write-ahead log (UNLOGGED): a
    -- reservation then commits without waiting for a disk, and a store that crashes loses only
    -- holds and cooldowns that were about to end anyway. The ledger itself is logged.
    CREATE UNLOGGED TABLE cst_replicas (id text PRIMARY KEY, seen timestamptz NOT NULL, host text NOT NULL);
    -- one row per caller with a budget: the lock its decisions take, and what its requests in
    -- flight hold (the sum of its holds, kept here so a decision reads one row, however busy)
    CREATE UNLOGGED TABLE cst_callers (caller text PRIMARY KEY, holding bigint NOT NULL);
    CREATE UNLOGGED TABLE cst_holds (
        id text PRIMARY KEY, caller text NOT NULL, tokens bigint NOT NULL,
        started double precision NOT NULL, replica text NOT NULL
    );
    CREATE INDEX cst_holds_replica ON cst_holds (replica);
    -- requests admitted per caller and second: a minute's count is at most 60 rows, however busy
    CREATE UNLOGGED TABLE cst_minute (
        caller text NOT NULL, second bigint NOT NULL, requests integer NOT NULL, PRIMARY KEY (caller, second)
    );
    CREATE UNLOGGED TABLE cst_key_health (
        digest text PRIMARY KEY, until double precision NOT NULL, quarantined boolean NOT NULL,
        reason text NOT NULL, replica text NOT NULL
    );
    CREATE TABLE cst_instance_keys (instance text PRIMARY KEY, digest bytea NOT NULL);

    -- A budget's decision, atomic: the caller's row is locked, what every replica settled, holds
    -- and admitted in the last minute is read, and the hold is written only if no limit is used
    -- up. Returns the tokens held (NULL: refused) and the counts it read.
    CREATE FUNCTION cst_reserve(p_caller text, p_hold text, p_replica text, p_want bigint, p_now double precision,
                                p_day text, p_month text, p_day_limit bigint, p_month_limit bigint,
                                p_minute_limit integer,
                                OUT granted bigint, OUT today bigint, OUT month bigint, OUT held bigint,
                                OUT recent integer, OUT oldest_recent double precision)
    LANGUAGE plpgsql AS $$
    BEGIN
        SELECT c.holding INTO held FROM cst_callers c WHERE c.caller = p_caller FOR UPDATE;
        IF NOT FOUND THEN   -- the caller's first request: its row is made once
            INSERT INTO cst_callers VALUES (p_caller, 0) ON CONFLICT DO NOTHING;
            SELECT c.holding INTO held FROM cst_callers c WHERE c.caller = p_caller FOR UPDATE;
        END IF;
        WITH minute AS (
            SELECT m.second, m.requests FROM cst_minute m
            WHERE p_minute_limit IS NOT NULL AND m.caller = p_caller AND m.second > floor(p_now) - 60
        )
        SELECT coalesce((SELECT sum(d.prompt_tokens + d.completion_tokens) FROM cst_daily d
                         WHERE d.caller = p_caller AND d.day = p_day), 0),
               coalesce((SELECT sum(d.prompt_tokens + d.completion_tokens) FROM cst_daily d
                         WHERE d.caller = p_caller AND d.day >= p_month || '-01' AND d.day <= p_month || '-31'), 0),
               coalesce((SELECT sum(minute.requests) FROM minute), 0), (SELECT min(minute.second) FROM minute)
        INTO today, month, recent, oldest_recent;
        IF (p_minute_limit IS NOT NULL AND recent >= p_minute_limit)
           OR (p_day_limit IS NOT NULL AND today + held >= p_day_limit)
           OR (p_month_limit IS NOT NULL AND month + held >= p_month_limit) THEN
            granted := NULL;
            RETURN;
        END IF;
        granted := least(p_want, coalesce(p_day_limit - today - held, p_want),
                         coalesce(p_month_limit - month - held, p_want));
        IF granted > 0 THEN
            INSERT INTO cst_holds VALUES (p_hold, p_caller, granted, p_now, p_replica);
            UPDATE cst_callers c SET holding = c.holding + granted WHERE c.caller = p_caller;
        END IF;
        IF p_minute_limit IS NOT NULL THEN
            INSERT INTO cst_minute VALUES (p_caller, floor(p_now), 1)
            ON CONFLICT (caller, second) DO UPDATE SET requests = cst_minute.requests + 1;
        END IF;
    END $$;

    -- Holds end, their request recorded (p_ids) or their replica silent for p_dead_replicas: taken
    -- off their callers' sums. The callers' rows are locked in order first, as decisions lock them.
    CREATE FUNCTION cst_end_holds(p_ids text[], p_dead_replicas interval) RETURNS void
    LANGUAGE plpgsql AS $$
    DECLARE
        ending text[];
    BEGIN
        IF p_dead_replicas IS NULL THEN   -- two queries, so that each finds its holds by an index
            SELECT array_agg(h.id) INTO ending FROM cst_holds h WHERE h.id = ANY(p_ids);
        ELSE
            SELECT array_agg(h.id) INTO ending FROM cst_holds h WHERE h.replica IN (
                SELECT r.id FROM cst_replicas r WHERE r.seen < clock_timestamp() - p_dead_replicas);
        END IF;
        IF ending IS NULL THEN
            RETURN;
        END IF;
        PERFORM 1 FROM cst_callers c
        WHERE c.caller IN (SELECT h.caller FROM cst_holds h WHERE h.id = ANY(ending))
        ORDER BY c.caller FOR UPDATE;
        WITH ended AS (
            DELETE FROM cst_holds h WHERE h.id = ANY(ending) RETURNING h.caller, h.tokens
        )
        UPDATE cst_callers c SET holding = greatest(c.holding - e.tokens, 0)
        FROM (SELECT ended.caller, sum(ended.tokens) AS tokens FROM ended GROUP BY ended.caller) e
        WHERE c.caller = e.caller;
    END $$;

    -- Several decisions in one round trip (a replica's requests that arrived together), in the
    -- order of their callers: every batch takes its callers' locks in the same order, so two
    -- replicas' batches never wait on each other in a circle.
    CREATE FUNCTION cst_reserve_many(p_callers text[], p_holds text[], p_replica text, p_wants bigint[],
                                     p_nows double precision[], p_days text[], p_months text[],
                                     p_day_limits bigint[], p_month_limits bigint[], p_minute_limits integer[])
    RETURNS TABLE (i integer, granted bigint, today bigint, month bigint, held bigint, recent integer,
                   oldest_recent double precision)
    LANGUAGE plpgsql AS $$
    DECLARE
        k integer;
    BEGIN
        FOR k IN SELECT o FROM unnest(p_callers) WITH ORDINALITY AS t(c, o) ORDER BY c, o LOOP
            i := k;
            SELECT r.granted, r.today, r.month, r.held, r.recent, r.oldest_recent
            INTO granted, today, month, held, recent, oldest_recent
            FROM cst_reserve(p_callers[k], p_holds[k], p_replica, p_wants[k], p_nows[k], p_days[k], p_months[k],
                             p_day_limits[k], p_month_limits[k], p_minute_limits[k]) r;
            RETURN NEXT;
        END LOOP;
    END $$;
    """,
)

# A batch's rows not yet in the store and their daily totals (in the order of their callers, as
# every replica's batch locks them), in one statement: arrays, one per column, one round trip
# whatever the batch's size.
_WRITE = """
    WITH incoming AS (
        SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::integer[], %s::bigint[], %s::bigint[],
                             %s::boolean[], %s::float8[], %s::float8[], %s::text[], %s::text[], %s::text[])
            AS t(caller, model, path, status, prompt_tokens, completion_tokens, estimated, started, ended, key,
                 day, rid)
    ), added AS (
        INSERT INTO cst_requests (caller, model, path, status, prompt_tokens, completion_tokens, estimated,
                                  started, ended, key, day, rid)
        SELECT * FROM incoming ON CONFLICT (rid) DO NOTHING
        RETURNING day, caller, status, prompt_tokens, completion_tokens, estimated
    )
    INSERT INTO cst_daily AS d (day, caller, requests, errors, prompt_tokens, completion_tokens, estimated)
    SELECT day, caller, count(*), count(*) FILTER (WHERE status >= 400), sum(prompt_tokens),
           sum(completion_tokens), count(*) FILTER (WHERE estimated)
    FROM added GROUP BY day, caller ORDER BY caller, day
    ON CONFLICT (caller, day) DO UPDATE SET
        requests = d.requests + excluded.requests, errors = d.errors + excluded.errors,
        prompt_tokens = d.prompt_tokens + excluded.prompt_tokens,
        completion_tokens = d.completion_tokens + excluded.completion_tokens,
        estimated = d.estimated + excluded.estimated
"""


def connection_settings(usage: UsageSettings, application: str) -> tuple[str, dict[str, Any]]:
    """(conninfo, keyword arguments) for psycopg: the URL as declared (TLS options and all), the
    password from the environment or a 0600 file when one is named (else libpq's own sources,
    such as PGPASSFILE), a bounded connect time. Raises ``SecretUnavailable``."""
    assert usage.store is not None
    extra: dict[str, Any] = {"application_name": application, "autocommit": True}
    if "connect_timeout" not in usage.store:
        extra["connect_timeout"] = CONNECT_TIMEOUT
    if usage.store_password_env or usage.store_password_file:
        extra["password"] = read_secret(usage.store_password_env, usage.store_password_file,
                                        "settings.usage.store's password")
    return usage.store, extra


def shown(url: str) -> str:
    """The store as people may see it: scheme, host, port and database (the URL holds no password,
    but its query may hold paths of TLS files that tell nobody anything useful)."""
    return url.split("?", 1)[0]


def migrate(db: psycopg.Connection) -> int:
    """Bring the schema to this version of CST, each migration one transaction; the version."""
    while True:
        with db.transaction():
            db.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            db.execute("CREATE TABLE IF NOT EXISTS cst_schema (version integer NOT NULL)")
            row = db.execute("SELECT max(version) FROM cst_schema").fetchone()
            version = int(row[0] or 0) if row else 0
            if version > len(_MIGRATIONS):
                raise RuntimeError(f"the store's schema is version {version}, newer than this cst knows "
                                   f"({len(_MIGRATIONS)}): upgrade cst")
            if version == len(_MIGRATIONS):
                _repair(db)
                return version
            db.execute(_MIGRATIONS[version])
            db.execute("INSERT INTO cst_schema VALUES (%s)", (version + 1,))
            log.info("the usage store's schema is now version %d", version + 1)


# Repairs of what older versions let in, each run once (named in cst_repairs). They change no
# table's shape, so replicas of the version before run beside these during a rolling upgrade (a
# new schema version would stop them: a replica refuses a schema newer than it knows).
_REPAIRS = {
    # an upstream's figure beyond belief, as a row holds at most (see ledger.MAX_TOKENS)
    "clamp-tokens": clamp_statements("cst_requests", "cst_daily"),
}


def _repair(db: psycopg.Connection) -> None:
    """Run the repairs this store has not had, under the migration lock already held."""
    db.execute("CREATE TABLE IF NOT EXISTS cst_repairs (name text PRIMARY KEY)")
    done = {row[0] for row in db.execute("SELECT name FROM cst_repairs")}
    for name, statements in _REPAIRS.items():
        if name not in done:
            db.execute(statements)
            db.execute("INSERT INTO cst_repairs VALUES (%s)", (name,))
            log.info("the usage store had its repair %s", name)


class PostgresStore:
    """The ledger's blocking side: the writer thread's batches, and the reads of ``cst usage`` and
    the API. One connection, opened again after the store went away."""

    def __init__(self, conninfo: str, connect: dict[str, Any], migrates: bool = True):
        """Nothing is connected yet: a proxy starts while its store is away. ``migrates``: bring
        the schema up to date on the first connection (``cst usage`` only reads)."""
        self._conninfo, self._connect = conninfo, connect
        self._lock = threading.Lock()
        self._db: psycopg.Connection | None = None
        self._migrated = not migrates

    def _connection(self) -> psycopg.Connection:
        if self._db is None or self._db.closed or self._db.broken:
            if self._db is not None:
                self._db.close()
            self._db = psycopg.connect(self._conninfo, **self._connect)
        if not self._migrated:
            migrate(self._db)
            self._migrated = True
        return self._db


    def _run(self, query: str, params: Sequence[Any] = (),
             then: tuple[str, Sequence[Any]] | None = None) -> list[tuple[Any, ...]]:
        """``query`` (and ``then`` after it, in the same transaction): the rows of the first."""
        with self._lock:
            try:
                db = self._connection()
                if then is None:
                    cursor = db.execute(query, params)
                    return cursor.fetchall() if cursor.description else []
                with db.transaction():
                    cursor = db.execute(query, params)
                    found = cursor.fetchall() if cursor.description else []
                    db.execute(*then)
                return found
            except psycopg.OperationalError as exc:
                if self._db is not None:
                    self._db.close()   # opened afresh by the next call
                raise StoreUnavailable(f"{shown(self._conninfo)}: {str(exc).strip()}") from exc
            except psycopg.DataError as exc:   # a value the store cannot take (NUL in text, out of range)
                raise RowsRefused(f"{shown(self._conninfo)}: {str(exc).strip()}") from exc

    def write(self, rows: Sequence[RowValues]) -> None:
        """The rows and their daily totals, and the end of their holds, in one transaction."""
        if not rows:
            return
        columns = [list(column) for column in zip(*rows, strict=True)]
        self._run(_WRITE, columns, then=("SELECT cst_end_holds(%s, NULL)", (columns[-1],)))

    def end_holds(self, rids: Sequence[str]) -> None:
        self._run("SELECT cst_end_holds(%s, NULL)", (list(rids),))

    def standing(self, day: str, month: str, since: float) -> dict[str, Standing]:
        totals = self._run("SELECT day, caller, requests, errors, prompt_tokens, completion_tokens, estimated"
                           " FROM cst_daily WHERE day >= %s AND day <= %s", (f"{month}-01", f"{month}-31"))
        recent = self._run("SELECT caller, second, requests FROM cst_minute WHERE second >= floor(%s)", (since,))
        # admitted per second: each request starts at its second (the minute is counted to the second)
        return standings(day, totals, ((caller, float(second)) for caller, second, requests in recent
                                       for _ in range(requests)))

    def daily(self, first: str, last: str, caller: str | None = None) -> list[DayTotal]:
        return day_totals(self._run(*daily_query("cst_daily", "%s", first, last, caller)))

    def prune(self, before: float) -> int:
        return int(self._run("WITH gone AS (DELETE FROM cst_requests WHERE ended < %s RETURNING 1)"
                             " SELECT count(*) FROM gone", (before,))[0][0])

    def exists(self) -> bool:
        """Whether a proxy ever set the store up (a reader finds nothing to read otherwise)."""
        return bool(self._run("SELECT to_regclass('cst_schema') IS NOT NULL")[0][0])

    def ensure_schema(self) -> None:
        """Connect (and migrate) now; raises ``StoreUnavailable`` when the store cannot be reached."""
        self._run("SELECT 1")

    def rows(self) -> int:
        return int(self._run("SELECT count(*) FROM cst_requests")[0][0])

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
