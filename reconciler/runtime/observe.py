"""Observing the fleet: every recorded instance, plus whoever holds a declared port.

Identity is never a bare pid: a record holds the pid *and* the process's start time, and a
process found on a port without a record is ours only if its environment carries our instance
id and state dir.
"""
from __future__ import annotations

import os

import psutil

from ..desired.model import DesiredState
from . import sillytavern
from .base import Observed
from .launch import ENV_FINGERPRINT, ENV_INSTANCE, ENV_RELEASE, ENV_STATE_DIR
from .processes import describe, listeners, live_process, port_is_free
from .statedir import Record, StateDir


def observe(desired: DesiredState, state: StateDir, records: dict[str, Record] | None = None) -> dict[str, Observed]:
    """What runs now: every recorded instance, plus whoever holds a declared port."""
    observed: dict[str, Observed] = {}
    for record in (state.records() if records is None else records).values():
        if record.pid is None:
            # a parked one's release: what its data was last used with (a wake onto another takes a snapshot)
            observed[record.id] = (Observed(record.id, record.port, "parked", release=record.release)
                                   if record.parked_at else Observed(record.id, record.port, "stopped"))
        elif live_process(record.pid, record.create_time):
            observed[record.id] = Observed(record.id, record.port, "running", record.pid, record.fingerprint,
                                           create_time=record.create_time, release=_release(record.release, record.argv))
        else:
            observed[record.id] = Observed(record.id, record.port, "crashed", record.pid, record.fingerprint,
                                           release=_release(record.release, record.argv))

    host = desired.settings.sillytavern.listen_address
    # an instance behind the edge: nginx holds its port, and node answers on its socket
    unsure = {i.port: i.id for i in desired.instances
              if getattr(observed.get(i.id), "status", None) not in ("running", "parked") and not desired.behind_edge(i)}
    busy = {port for port in unsure if not port_is_free(host, port)}
    holders = listeners(busy) if busy else {}
    # this process opened it for a node it is starting (a pass beside a listing in cst serve)
    busy -= {port for port, pid in holders.items() if pid == os.getpid()}
    for port in busy:
        id_, pid = unsure[port], holders.get(port)
        ours = _our_process(state, pid, id_)
        if pid is not None and ours is not None:
            fingerprint, release = ours
            observed[id_] = Observed(id_, port, "running", pid, fingerprint, adopted=True,
                                     create_time=psutil.Process(pid).create_time(), release=release)
        else:
            observed[id_] = Observed(id_, port, "port-taken", holder=describe(pid))
    # a process spawned by a cst killed before it wrote the record, not listening yet: ours all
    # the same, and starting another beside it would run the instance twice
    starting = {i.id for i in desired.instances if i.state == "running"
                and ((i.port in unsure and i.port not in busy)
                     or (desired.behind_edge(i) and getattr(observed.get(i.id), "status", None) != "running"))}
    spawned: dict[str, Observed] = {}
    for seen in _spawned_without_record(desired, state, starting) if starting else []:
        spawned.setdefault(seen.id, seen)
    observed.update(spawned)
    return observed


def _spawned_without_record(desired: DesiredState, state: StateDir, ids: set[str]) -> list[Observed]:
    """Live processes whose environment names one of ``ids`` and this state dir."""
    ports = {i.id: i.port for i in desired.instances}
    found: list[Observed] = []
    for proc in psutil.process_iter():
        try:
            with proc.oneshot():
                env = proc.environ()
                if (env.get(ENV_INSTANCE) not in ids or env.get(ENV_STATE_DIR) != str(state.root)
                        or proc.status() == psutil.STATUS_ZOMBIE):
                    continue
                id_ = env[ENV_INSTANCE]
                found.append(Observed(id_, ports[id_], "running", proc.pid, env.get(ENV_FINGERPRINT, ""),
                                      adopted=True, create_time=proc.create_time(),
                                      release=_release(env.get(ENV_RELEASE), proc.cmdline())))
        except psutil.Error:
            continue
    return found


def _our_process(state: StateDir, pid: int | None, id_: str) -> tuple[str, str | None] | None:
    """The fingerprint and release of ``pid`` if it is instance ``id_`` started from this state dir."""
    if pid is None:
        return None
    try:
        proc = psutil.Process(pid)
        env = proc.environ()
        if env.get(ENV_INSTANCE) == id_ and env.get(ENV_STATE_DIR) == str(state.root):
            return env.get(ENV_FINGERPRINT, ""), _release(env.get(ENV_RELEASE), proc.cmdline())
    except psutil.Error:
        return None
    return None


def _release(said: str | None, argv: list[str]) -> str | None:
    """The release a process was started on: as its record or environment says, else (started by
    a cst from before either said it) read off its server.js, when that is an npm release of an
    install home (``<home>/<version>/node_modules/sillytavern/server.js``); None: unknown."""
    if said is not None:
        return said
    script = next((arg for arg in argv[1:] if not arg.startswith("-")), None)   # after node's own flags
    version = sillytavern.version_of_server(script) if script else None
    return sillytavern.identity(version) if version else None
