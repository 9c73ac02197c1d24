"""Fixtures for the proxy tests: fake upstream, fake DaiDai platform, and proxies built from desired.yaml.

Not a conftest.py on purpose: the suite's own tests do ``from conftest import ...``, and a
second conftest module would shadow theirs. Test modules import what they need from here.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Iterator

import openai
import pytest
from fakes import FakeDaiDai, FakeUpstream
from postgres_cluster import PostgresCluster

from conftest import free_ports
from ports import free_port
from proxy.service import ProxyService
from reconciler.desired.model import load


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    server = await FakeUpstream().start()
    yield server
    await server.stop()


@pytest.fixture(scope="module")
def cluster() -> Iterator[PostgresCluster]:
    """A PostgreSQL server of the module's own (Debian's), removed with its files at the end."""
    server = PostgresCluster(free_ports(1)[0])
    try:
        server.start()
        yield server
    finally:
        server.remove()


@pytest.fixture
def store_url(cluster: PostgresCluster) -> str:
    """A database of its own for each test."""
    return cluster.url(cluster.new_database())


@pytest.fixture
async def daidai() -> AsyncIterator[FakeDaiDai]:
    server = FakeDaiDai()
    await server.start()
    yield server
    await server.stop()


def desired_text(upstream_url: str, accounts: str, port: int, proxy_extra: str = "", state_dir: str = ".cst",
                 timeout: str = "1s", closed: bool = False) -> str:
    """A desired.yaml with the given ``accounts:`` list (YAML, unindented). The proxy serves
    requests without a key (``anonymous: true``) unless ``closed``, CST's default, or
    ``proxy_extra`` says otherwise: most tests here are about forwarding, not about keys."""
    if not closed and "anonymous:" not in proxy_extra:
        proxy_extra = f"anonymous: true\n{textwrap.dedent(proxy_extra).strip()}"
    accounts_block = textwrap.indent(textwrap.dedent(accounts).strip(), "  ") if accounts.strip() else "  []"
    return (
        "version: 1\n"
        "settings:\n"
        f"  state_dir: {state_dir}\n"
        "  proxy:\n"
        f"    listen: \"127.0.0.1:{port}\"\n"
        f"    upstream: \"{upstream_url}/v1\"\n"
        f"    timeout: {timeout}\n"
        f"{textwrap.indent(textwrap.dedent(proxy_extra).strip(), '    ')}\n"
        "accounts:\n"
        f"{accounts_block}\n"
    )


MakeProxy = Callable[..., Awaitable[ProxyService]]


@pytest.fixture
async def make_proxy(tmp_path: Path, upstream: FakeUpstream) -> AsyncIterator[MakeProxy]:
    """Write desired.yaml into tmp_path, load it through the real loader, start a ProxyService."""
    services: list[ProxyService] = []

    async def make(accounts: str, proxy_extra: str = "", upstream_url: str | None = None,
                   file: Path | None = None, timeout: str = "1s", closed: bool = False,
                   extra: str = "") -> ProxyService:
        path = file or tmp_path / "desired.yaml"
        path.write_text(desired_text(upstream_url or upstream.url, accounts, free_port(), proxy_extra,
                                     timeout=timeout, closed=closed) + extra)
        service = ProxyService(load(path))
        await service.start()
        services.append(service)
        return service

    yield make
    for service in services:
        await service.stop()


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Callable[[str, str], None]:
    def set_(name: str, value: str) -> None:
        monkeypatch.setenv(name, value)
    return set_


def static_account(name: str, env_name: str) -> str:
    return f"- {{name: {name}, provider: static, keys_env: {env_name}}}"


__all__ = ["desired_text", "static_account", "MakeProxy", "upstream", "daidai", "make_proxy", "env", "cluster",
           "store_url"]


def sdk(service: ProxyService, api_key: str = "client-key-ignored") -> openai.AsyncOpenAI:
    """The official SDK against the proxy; max_retries=0: any retry must be the proxy's doing."""
    return openai.AsyncOpenAI(base_url=service.url + "/v1", api_key=api_key, max_retries=0, timeout=20)
