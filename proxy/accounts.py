"""Key-account sources and the manager that keeps them in line with desired.yaml.

A *source* owns one declared account: it fetches that account's keys, pushes
them into the pool with ``KeyPool.set_account_keys`` and refreshes them on its
own schedule. ``AccountManager.update(accounts)`` starts, replaces and stops
sources so that the running set always matches the declared one; the pool is
changed in place, so requests in flight are never disturbed.

Secrets: passwords are read from an environment variable or a 0600 file at each
login (so a rotated password is picked up) and never logged; keys are only ever
logged masked. The DaiDai key list is cached in ``<state_dir>/proxy/`` (0700 dir,
0600 file) so the proxy keeps serving while the platform is unreachable.

The platform may time out or answer garbage: each refresh is bounded in time and size, an
answer that is not the documented shape is a refresh error (the last keys stay), and a source
that fails in an unforeseen way is logged with its traceback and restarted (``BackgroundTasks``).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from reconciler.desired.model import Account
from reconciler.desired.secret_source import SecretUnavailable, read_secret
from reconciler.files import atomic_write, private_dir
from reconciler.tasks import BackgroundTasks

from .pool import KeyInfo, KeyPool, mask

log = logging.getLogger("cst.proxy.accounts")

# After a failed refresh, retry sooner than the normal period (but not hammer the platform).
RETRY_AFTER_ERROR = 30.0
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=30)
MAX_ANSWER = 4 * 2**20  # a key list is a few KiB; more is not an answer worth holding in memory


class AccountError(Exception):
    """A refresh failed for a reason worth showing to the operator as it is.

    ``transient``: the platform itself is in trouble (5xx, not JSON), so retry soon.
    """

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


@dataclass
class SourceStatus:
    provider: str
    keys: int = 0
    last_refresh: float | None = None  # wall clock of the last successful fetch
    last_error: str | None = None
    from_cache: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "keys": self.keys,
            "last_refresh": _iso(self.last_refresh),
            "last_error": self.last_error,
            "from_cache": self.from_cache,
        }


def _iso(ts: float | None) -> str | None:
    return None if ts is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _money(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return None


class Source(Protocol):
    status: SourceStatus

    async def run(self) -> None: ...


# -- static ----------------------------------------------------------------------------


class StaticSource:
    """Keys from ``keys_env`` (comma-separated) or ``keys_file`` (one a line, # comments)."""

    def __init__(self, account: Account, pool: KeyPool):
        self.account = account
        self.pool = pool
        self.status = SourceStatus("static")

    def read(self) -> list[KeyInfo]:
        a = self.account
        try:
            raw = read_secret(a.keys_env, a.keys_file)
        except SecretUnavailable as exc:
            raise AccountError(str(exc)) from None
        values = raw.split(",") if a.keys_env else raw.splitlines()
        return [KeyInfo(v) for v in (v.strip() for v in values) if v and not v.startswith("#")]

    def load(self) -> None:
        try:
            infos = self.read()
        except AccountError as exc:
            if self.status.last_error != str(exc):
                log.error("account %s: %s", self.account.name, exc)
            self.status.last_error = str(exc)
            return  # keep whatever keys the pool already has for this account
        self.pool.set_account_keys(self.account.name, infos)
        self.status.keys, self.status.last_error, self.status.last_refresh = len(infos), None, time.time()

    async def run(self) -> None:
        # The manager already called load(). Re-reading is cheap; it picks up a
        # keys_file edit and ends quarantines ("until the account's next refresh").
        while True:
            await asyncio.sleep(self.account.refresh)
            self.load()


# -- DaiDai ----------------------------------------------------------------------------


class DaiDaiClient:
    """The two calls of the DaiDai account API CST makes: log in (``POST /api/users/login``) and list
    the account's keys with their balances (``POST /api/general/orders``); ``tests/proxy/fakes.py``
    plays the platform as it answers them."""

    def __init__(self, session: aiohttp.ClientSession, api_base: str, email: str):
        self.session = session
        self.api_base = api_base.rstrip("/")
        self.email = email
        self.token: str | None = None
        self.user: Any = None

    async def _post(self, path: str, payload: dict[str, Any], token: str | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.session.post(self.api_base + path, json=payload, headers=headers,
                                     timeout=HTTP_TIMEOUT) as resp:
            raw = bytearray()
            while len(raw) <= MAX_ANSWER and (piece := await resp.content.read(MAX_ANSWER + 1 - len(raw))):
                raw += piece
            try:
                body = json.loads(raw) if len(raw) <= MAX_ANSWER else None
            except (ValueError, RecursionError):  # not JSON, not UTF-8, nested without end
                body = None
            return resp.status, body

    async def login(self, password: str) -> None:
        status, body = await self._post("/api/users/login", {"userEmail": self.email, "password": password})
        if isinstance(body, dict) and body.get("code") == 200 and body.get("token"):
            self.token, self.user = body["token"], body.get("msg")
            return
        self.token = None
        reason = body.get("msg") if isinstance(body, dict) else None
        raise AccountError(f"login failed for {self.email}: {reason if isinstance(reason, str) else f'HTTP {status}'}",
                           transient=status >= 500 or not isinstance(body, dict))

    async def list_keys(self) -> list[KeyInfo] | None:
        """The usable keys, or None when the token is no longer accepted."""
        if self.token is None:
            return None
        payload = {"userData": json.dumps(self.user, ensure_ascii=False), "page": 1}
        status, body = await self._post("/api/general/orders", payload, self.token)
        if isinstance(body, dict) and body.get("code") == 200 and isinstance(body.get("msg"), list):
            return [
                KeyInfo(item["api_key"], _money(item.get("balance")), _money(item.get("utilised")))
                for item in body["msg"]
                if isinstance(item, dict) and isinstance(item.get("api_key"), str) and item["api_key"]
                and item.get("state") == "success" and not item.get("hasError")
            ]
        if status in (401, 403) or (isinstance(body, dict) and body.get("code") in (401, 403)):
            return None
        reason = body.get("msg") if isinstance(body, dict) else None
        raise AccountError(f"key list failed: {reason if isinstance(reason, str) else f'HTTP {status}'}",
                           transient=status >= 500 or not isinstance(body, dict))


class DaiDaiSource:
    def __init__(self, account: Account, pool: KeyPool, session: aiohttp.ClientSession, cache_dir: Path):
        self.account = account
        self.pool = pool
        self.client = DaiDaiClient(session, account.api_base, account.email or "")
        self.cache_path = cache_dir / f"keys-{account.name}.json"
        self.status = SourceStatus("daidai")
        self._retry_soon = False

    def _password(self) -> str:
        a = self.account
        try:
            return read_secret(a.password_env, a.password_file)
        except SecretUnavailable as exc:
            raise AccountError(str(exc)) from None

    async def fetch(self) -> list[KeyInfo]:
        keys = await self.client.list_keys()
        if keys is None:  # no token yet, or it expired: log in (again) once
            await self.client.login(self._password())
            keys = await self.client.list_keys()
            if keys is None:
                raise AccountError("the platform refused a fresh token")
        return keys

    async def refresh(self) -> bool:
        try:
            keys = await self.fetch()
        except (AccountError, aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            # A network problem is worth retrying soon; a refused login is not (hammering a
            # platform with a wrong password can lock the account), so it waits a full period.
            self._retry_soon = not isinstance(exc, AccountError) or exc.transient
            message = (str(exc) if isinstance(exc, AccountError)
                       else f"platform unreachable: {type(exc).__name__}" + (f": {exc}" if str(exc) else ""))
            if self.status.last_error != message:
                log.error("account %s: %s", self.account.name, message)
            self.status.last_error = message
            return False
        self.pool.set_account_keys(self.account.name, keys)
        self.status.keys, self.status.last_error, self.status.from_cache = len(keys), None, False
        self.status.last_refresh = time.time()
        log.info("account %s: %d usable keys", self.account.name, len(keys))
        await asyncio.to_thread(self._write_cache, keys)  # an fsync: not on the loop that relays requests
        return True

    # The cache names the account's email and base so a changed account never
    # serves another account's keys.
    def _identity(self) -> dict[str, str]:
        return {"email": self.account.email or "", "api_base": self.account.api_base}

    def _write_cache(self, keys: list[KeyInfo]) -> None:
        data = {**self._identity(), "fetched_at": time.time(),
                "keys": [{"api_key": k.value, "balance": k.balance, "used": k.used} for k in keys]}
        try:
            atomic_write(self.cache_path, json.dumps(data).encode(), mode=0o600)
        except OSError as exc:
            log.warning("account %s: cannot write key cache: %s", self.account.name, exc.strerror or exc)

    def load_cache(self) -> bool:
        try:
            data = json.loads(self.cache_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        if not isinstance(data, dict) or any(data.get(k) != v for k, v in self._identity().items()):
            return False
        keys = [KeyInfo(str(k["api_key"]), _money(k.get("balance")), _money(k.get("used")))
                for k in data.get("keys", []) if isinstance(k, dict) and k.get("api_key")]
        self.pool.set_account_keys(self.account.name, keys)
        self.status.keys, self.status.from_cache = len(keys), True
        self.status.last_refresh = _money(data.get("fetched_at"))
        log.info("account %s: serving %d cached keys until the platform answers", self.account.name, len(keys))
        return True

    async def run(self) -> None:
        cached = False
        if not await self.refresh():
            cached = self.load_cache()
            if not cached:
                # Nothing to serve for this account; do not keep a replaced account's old keys.
                self.pool.set_account_keys(self.account.name, [])
        period = self.account.refresh
        while True:
            await asyncio.sleep(min(period, RETRY_AFTER_ERROR) if self.status.last_error and self._retry_soon
                                else period)
            await self.refresh()


# -- the manager -------------------------------------------------------------------------


class AccountManager:
    """Keeps one running source per declared account (``update`` reconciles)."""

    def __init__(self, pool: KeyPool, session: aiohttp.ClientSession, state_dir: Path):
        self.pool = pool
        self.session = session
        self.cache_dir = state_dir / "proxy"
        self._running: dict[str, tuple[Account, Source]] = {}
        # one account's trouble must not stop the proxy: its source is retried for as long as it runs
        self._tasks = BackgroundTasks(log, give_up_after=None)

    def _ensure_cache_dir(self) -> None:
        private_dir(self.cache_dir)

    def _make(self, account: Account) -> Source:
        if account.provider == "static":
            return StaticSource(account, self.pool)
        self._ensure_cache_dir()
        return DaiDaiSource(account, self.pool, self.session, self.cache_dir)

    def update(self, accounts: tuple[Account, ...] | list[Account]) -> None:
        wanted = {a.name: a for a in accounts}
        for name in list(self._running):
            if name not in wanted:
                _, source = self._running.pop(name)
                self._tasks.stop(_task_name(name))
                self.pool.remove_account(name)
                if isinstance(source, DaiDaiSource):
                    # Its keys are secrets: do not leave a copy behind for an account that is gone.
                    source.cache_path.unlink(missing_ok=True)
                log.info("account %s removed", name)
        for name, account in wanted.items():
            current = self._running.get(name)
            if current is not None and current[0] == account:
                continue
            if current is not None:
                self._tasks.stop(_task_name(name))  # its keys stay in the pool until the new source replaces them
                log.info("account %s changed", name)
            else:
                log.info("account %s added (%s)", name, account.provider)
            source = self._make(account)
            if isinstance(source, StaticSource):
                source.load()  # synchronous: the new keys are in the pool before update() returns
            self._tasks.keep(_task_name(name), source.run)
            self._running[name] = (account, source)

    def status(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name, (_, source) in self._running.items():
            out[name] = source.status.as_dict()
            health = self._tasks.health.get(_task_name(name))
            if health is not None and health.last_error:
                out[name]["task_failures"], out[name]["task_error"] = health.total_failures, health.last_error
        return out

    async def close(self) -> None:
        self._running.clear()
        await self._tasks.close()


def _task_name(account: str) -> str:
    return f"cst-account-{account}"


__all__ = ["AccountError", "AccountManager", "DaiDaiClient", "DaiDaiSource", "StaticSource", "mask"]
