"""A real PostgreSQL server of the tests' own: a cluster in a temporary folder, on a free port,
started and stopped by pid (Debian's server binaries, installed by ``make postgres``).

PostgreSQL refuses to run as root; when the tests do, the cluster runs as the ``postgres`` user
that Debian's package creates, in a folder that user owns.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

PASSWORD = "cst-test-store-password"
USER = "cst"


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name) or ""]
    if not found[-1]:
        raise RuntimeError(f"PostgreSQL's {name} is not installed (make postgres installs Debian's postgresql)")
    return found[-1]


class PostgresCluster:
    def __init__(self, port: int, durable: bool = False):
        """``durable``: fsync'd commits, as a host runs it (benchmarks); the tests need no durability."""
        self.port = port
        self.durable = durable
        self.folder = Path(tempfile.mkdtemp(prefix="cst-pg-"))
        self.data = self.folder / "data"
        self._as: dict[str, Any] = {}
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.folder, owner.pw_uid, owner.pw_gid)
            self._as = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
        self.proc: subprocess.Popen[bytes] | None = None
        self._tls: list[str] = []
        self._databases = 0
        password_file = self.folder / "password"
        password_file.write_text(PASSWORD)
        if self._as:
            os.chown(password_file, self._as["user"], self._as["group"])
        subprocess.run([_bin("initdb"), "-D", str(self.data), "-U", USER, "--auth=scram-sha-256",
                        f"--pwfile={password_file}", "--no-sync", "-E", "UTF8", "--locale=C.UTF-8"],
                       check=True, capture_output=True, cwd=self.folder, **self._as)

    def url(self, database: str = "postgres") -> str:
        """The store's URL as desired.yaml holds it: no password."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres") -> psycopg.Connection:
        return psycopg.connect(self.url(database), password=PASSWORD, autocommit=True, connect_timeout=3)

    def serve_tls(self, cert_pem: bytes, key_pem: bytes) -> None:
        """Serve TLS from the next start with this certificate (the server wants its key 0600, its own)."""
        for name, data in (("server.crt", cert_pem), ("server.key", key_pem)):
            path = self.folder / name
            path.write_bytes(data)
            path.chmod(0o600)
            if self._as:
                os.chown(path, self._as["user"], self._as["group"])
        self._tls = ["-c", "ssl=on", "-c", f"ssl_cert_file={self.folder / 'server.crt'}",
                     "-c", f"ssl_key_file={self.folder / 'server.key'}"]

    def start(self) -> None:
        with open(self.folder / "server.log", "ab") as log:   # the server keeps its own copy
            self.proc = subprocess.Popen(
                [_bin("postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.folder),
                 "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200", *self._tls,
                 *([] if self.durable else ["-c", "fsync=off", "-c", "synchronous_commit=off",
                                            "-c", "full_page_writes=off"])],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.folder, **self._as)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.connect().close()
                return
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("PostgreSQL did not start:\n" + (self.folder / "server.log").read_text()[-2000:]) from None
                time.sleep(0.05)   # polled until it takes connections (bench/ imports this file, not conftest)

    def stop(self) -> None:
        """A fast shutdown: clients are disconnected at once, as when a store's host goes away."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def new_database(self) -> str:
        self._databases += 1
        name = f"cst_test_{self._databases}"
        with self.connect() as db:
            db.execute(f"CREATE DATABASE {name}")
        return name

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)
