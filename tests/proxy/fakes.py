"""Local fakes of the DaiDai account platform and of an OpenAI-compatible upstream.

Both are real aiohttp servers on 127.0.0.1, port 0. The upstream's behaviour is
chosen by the API key it receives, so a test builds a pool of keys and knows
exactly what each one will do:

    sk-good-*   answers normally
    sk-bad-*    401 invalid key
    sk-429-*    429 with Retry-After: 30
    sk-500-*    500
    sk-hang-*   accepts the request and never answers
    sk-slow-*   streams its chunks ``slow_gap`` seconds apart (default 0.2 s)
    sk-cut-*    starts a stream and drops the connection half-way
    sk-drop-*   answers 200 and drops the connection before the first byte of the body

A request for model ``slow-stream`` streams slowly whatever the key. Model ``huge-usage`` claims
2^71 prompt and 2^64 completion tokens (an upstream's bug); model ``verbose`` (whole answers
only) generates all it is allowed: ``max_tokens`` (or ``max_completion_tokens``) per choice, else
100,000, reported in its usage.

``/v1/responses`` answers as OpenAI's Responses API: ``usage`` with ``input_tokens`` and
``output_tokens`` (one a chunk, at most ``max_output_tokens``), and as a stream, text deltas
ending with a ``response.completed`` event that carries it.

Answers carry ``usage`` (3 prompt tokens, one completion token per chunk). A stream ends with a
usage event (``"choices": []``) as DaiDai's one-api style gateway sends it whether asked or not;
with ``stream_usage="asked"`` only when the request asks (``stream_options.include_usage``), and
then every other event carries ``"usage": null``, as OpenAI does.

Run standalone (used by bench/proxy): ``python tests/proxy/fakes.py upstream
[CHUNKS [SLOW_GAP]]`` prints ``PORT <n>`` and serves until killed.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import ssl
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from aiohttp import web


@dataclass
class Seen:
    method: str
    path: str
    query: str
    key: str
    headers: dict[str, str]
    body: bytes


class _Server:
    app: web.Application

    def __init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.scheme = "http"

    async def start(self, port: int = 0, ssl_context: ssl.SSLContext | None = None) -> Self:
        self._runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True,
                                     shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port, ssl_context=ssl_context)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self.scheme = "https" if ssl_context else "http"
        return self

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


# -- OpenAI upstream --------------------------------------------------------------------


PROMPT_TOKENS = 3


def _event(model: str, choices: list, **extra: Any) -> bytes:
    event = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000, "model": model,
             "choices": choices, **extra}
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def _chunk(i: int, text: str, model: str, **extra: Any) -> bytes:
    return _event(model, [{"index": 0, "delta": {"content": text}, "finish_reason": None}], **extra)


def _usage(completion: int) -> dict[str, int]:
    return {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": completion, "total_tokens": PROMPT_TOKENS + completion}


class FakeUpstream(_Server):
    def __init__(self, chunks: int = 5, slow_gap: float = 0.2, stream_usage: str = "always"):
        super().__init__()
        self.chunks = chunks
        self.slow_gap = slow_gap
        self.stream_usage = stream_usage   # "always" (DaiDai's gateway) or "asked" (OpenAI)
        self.record = True
        self.seen: list[Seen] = []
        self.cancelled = 0  # streams whose client (the proxy) went away before the end
        self.hanging = 0
        self.hang_cancelled = 0
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        self.app.router.add_post("/v1/chat/completions", self.chat)
        self.app.router.add_post("/v1/completions", self.completions)
        self.app.router.add_post("/v1/embeddings", self.embeddings)
        self.app.router.add_post("/v1/responses", self.responses)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_route("*", "/v1/{tail:.*}", self.echo)

    def keys_seen(self, path: str | None = None) -> list[str]:
        return [s.key for s in self.seen if path is None or s.path == path]

    async def _gate(self, request: web.Request) -> tuple[str, web.Response | None, bytes]:
        """Record the call and apply the key's failure behaviour, if any."""
        body = await request.read()
        auth = request.headers.get("Authorization", "")
        key = auth[7:] if auth.startswith("Bearer ") else ""
        if self.record:
            self.seen.append(Seen(request.method, request.path, request.query_string, key,
                                  dict(request.headers), body))
        if key.startswith("sk-bad-") or not key:
            return key, _error(401, "Incorrect API key provided", "invalid_request_error", "invalid_api_key"), body
        if key.startswith("sk-429-"):
            response = _error(429, "Rate limit reached", "requests", "rate_limit_exceeded")
            response.headers["Retry-After"] = "30"
            return key, response, body
        if key.startswith("sk-500-"):
            return key, _error(500, "The server had an error", "server_error", "internal_error"), body
        if key.startswith("sk-hang-"):
            self.hanging += 1
            try:
                await asyncio.sleep(3600)   # a hung upstream: only a cancel ends it
            except asyncio.CancelledError:
                self.hang_cancelled += 1  # the caller went away
                raise
        return key, None, body

    async def chat(self, request: web.Request) -> web.StreamResponse:
        key, failure, body = await self._gate(request)
        if failure is not None:
            return failure
        data = json.loads(body)
        model = data.get("model", "gpt-fake")
        if key.startswith("sk-drop-"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"} if data.get("stream")
                                          else {"Content-Type": "application/json", "Content-Length": "500"})
            await response.prepare(request)
            assert request.transport is not None
            request.transport.close()
            return response
        if model == "missing-model":
            return _error(404, f"The model `{model}` does not exist", "invalid_request_error", "model_not_found")
        if model in ("huge-usage", "verbose"):
            limit = data.get("max_tokens") or data.get("max_completion_tokens") or 100_000
            usage = ({"prompt_tokens": 2 ** 71, "completion_tokens": 2 ** 64} if model == "huge-usage" else
                     {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": limit * data.get("n", 1)})
            return web.json_response({"id": "chatcmpl-fake", "object": "chat.completion", "model": model,
                                      "choices": [{"index": 0, "message": {"role": "assistant", "content": "..."},
                                                   "finish_reason": "length"}], "usage": usage})
        words = [f"w{i} " for i in range(self.chunks)]
        if not data.get("stream"):
            text = "".join(words) + f"[{key[-4:]}]"
            return web.json_response({
                "id": "chatcmpl-fake", "object": "chat.completion", "created": 1700000000, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "stop"}],
                "usage": _usage(self.chunks),
            })
        # A slow stream by key (tests) or by model name (the benchmark, whose keys rotate).
        gap = self.slow_gap if key.startswith("sk-slow-") or model == "slow-stream" else 0.0
        asked = bool((data.get("stream_options") or {}).get("include_usage"))
        nulls = {"usage": None} if asked else {}
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        try:
            for i, word in enumerate(words):
                if i and gap:
                    await asyncio.sleep(gap)   # a slow upstream's pace between chunks
                if key.startswith("sk-cut-") and i == len(words) // 2:
                    assert request.transport is not None
                    request.transport.close()
                    return response
                await response.write(_chunk(i, word, model, **nulls))
            if asked or self.stream_usage == "always":
                await response.write(_event(model, [], usage=_usage(len(words))))
            await response.write(b"data: [DONE]\n\n")
        except (asyncio.CancelledError, ConnectionResetError):
            self.cancelled += 1
            raise
        await response.write_eof()
        return response

    async def responses(self, request: web.Request) -> web.StreamResponse:
        key, failure, body = await self._gate(request)
        if failure is not None:
            return failure
        data = json.loads(body)
        words = [f"w{i} " for i in range(min(self.chunks, data.get("max_output_tokens") or self.chunks))]
        usage = {"input_tokens": PROMPT_TOKENS, "output_tokens": len(words),
                 "total_tokens": PROMPT_TOKENS + len(words), "output_tokens_details": {"reasoning_tokens": 0}}
        done = {"id": "resp_fake", "object": "response", "status": "completed", "model": data.get("model"),
                "output": [{"type": "message", "role": "assistant",
                            "content": [{"type": "output_text", "text": "".join(words)}]}], "usage": usage}
        if not data.get("stream"):
            return web.json_response(done)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def event(name: str, payload: dict[str, Any]) -> None:
            await response.write(f"event: {name}\ndata: {json.dumps({'type': name, **payload})}\n\n".encode())

        await event("response.created", {"response": {**done, "status": "in_progress", "usage": None}})
        for word in words:
            await event("response.output_text.delta", {"delta": word})
        await event("response.completed", {"response": done})
        await response.write_eof()
        return response

    async def completions(self, request: web.Request) -> web.Response:
        key, failure, body = await self._gate(request)
        if failure is not None:
            return failure
        data = json.loads(body)
        return web.json_response({"id": "cmpl-fake", "object": "text_completion", "created": 1700000000,
                                  "model": data.get("model", "gpt-fake"),
                                  "choices": [{"index": 0, "text": "completed", "finish_reason": "stop",
                                               "logprobs": None}]})

    async def embeddings(self, request: web.Request) -> web.Response:
        key, failure, body = await self._gate(request)
        if failure is not None:
            return failure
        data = json.loads(body)
        inputs = data["input"] if isinstance(data["input"], list) else [data["input"]]
        return web.json_response({
            "object": "list", "model": data.get("model", "emb-fake"),
            "data": [{"object": "embedding", "index": i, "embedding": [float(len(str(x))), 0.5, -1.0]}
                     for i, x in enumerate(inputs)],
            "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)},
        })

    async def models(self, request: web.Request) -> web.Response:
        key, failure, _ = await self._gate(request)
        if failure is not None:
            return failure
        return web.json_response({"object": "list", "data": [
            {"id": "gpt-fake", "object": "model", "created": 1700000000, "owned_by": "fake"},
            {"id": "emb-fake", "object": "model", "created": 1700000000, "owned_by": "fake"},
        ]})

    async def echo(self, request: web.Request) -> web.Response:
        key, failure, body = await self._gate(request)
        if failure is not None:
            return failure
        return web.json_response({"method": request.method, "path": request.path, "query": request.query_string,
                                  "body": body.decode("utf-8", "replace"),
                                  "headers": {k: v for k, v in request.headers.items() if k != "Authorization"}},
                                 headers={"X-Upstream-Echo": "yes"})


def _error(status: int, message: str, type_: str, code: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": type_, "code": code, "param": None}},
                             status=status)


# -- DaiDai platform --------------------------------------------------------------------


@dataclass
class FakeAccount:
    password: str
    keys: list[dict[str, Any]] = field(default_factory=list)
    user: dict[str, Any] = field(default_factory=dict)


class FakeDaiDai(_Server):
    """``/api/users/login`` and ``/api/general/orders`` as the aggregator's client sees them.

    ``fault`` makes the platform misbehave as a real one can: "hang" (accepts, never answers),
    "garbage" (an HTML error page with bytes that are not UTF-8), "wrong-shape" (JSON that is not
    the documented answer)."""

    def __init__(self, token_ttl: float = 3600.0):
        super().__init__()
        self.fault: str | None = None
        self.accounts: dict[str, FakeAccount] = {}
        self.tokens: dict[str, tuple[str, float]] = {}  # token -> (email, expires at)
        self.token_ttl = token_ttl
        self.logins = 0
        self.failed_logins = 0
        self.lists = 0
        self.app = web.Application()
        self.app.router.add_post("/api/users/login", self.login)
        self.app.router.add_post("/api/general/orders", self.orders)

    def add_account(self, email: str, password: str, keys: list[dict[str, Any]]) -> None:
        self.accounts[email] = FakeAccount(password, keys, {"id": len(self.accounts) + 1, "userEmail": email})

    def expire_tokens(self) -> None:
        self.tokens = {t: (e, 0.0) for t, (e, _) in self.tokens.items()}

    async def _fault(self) -> web.Response | None:
        if self.fault == "hang":
            await asyncio.sleep(3600)   # a hung platform
        if self.fault == "garbage":
            return web.Response(body=b"<html>\xff\xfe 502 Bad Gateway", content_type="text/html", status=200)
        if self.fault == "wrong-shape":
            return web.json_response({"code": 200, "token": ["not", "a", "token"], "msg": {"api_key": 5}})
        return None

    async def login(self, request: web.Request) -> web.Response:
        if (faulty := await self._fault()) is not None:
            return faulty
        data = await request.json()
        account = self.accounts.get(data.get("userEmail"))
        if account is None or not secrets.compare_digest(str(data.get("password")), account.password):
            self.failed_logins += 1
            return web.json_response({"code": 400, "msg": "账号或密码错误 (wrong email or password)"})
        self.logins += 1
        token = secrets.token_hex(16)
        self.tokens[token] = (data["userEmail"], time.monotonic() + self.token_ttl)
        return web.json_response({"code": 200, "token": token, "msg": account.user})

    async def orders(self, request: web.Request) -> web.Response:
        self.lists += 1
        if (faulty := await self._fault()) is not None:
            return faulty
        auth = request.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else ""
        email, expires = self.tokens.get(token, ("", 0.0))
        if not email or expires < time.monotonic():
            return web.json_response({"code": 401, "msg": "token expired, please log in again"}, status=401)
        data = await request.json()
        account = self.accounts[email]
        if json.loads(data["userData"]) != account.user or data.get("page") != 1:
            return web.json_response({"code": 400, "msg": "bad userData"})
        return web.json_response({"code": 200, "msg": account.keys})


def daidai_key(value: str, balance: str = "10.00", used: str = "1.00", state: str = "success",
               has_error: bool = False) -> dict[str, Any]:
    return {"api_key": value, "balance": balance, "utilised": used, "state": state, "hasError": has_error}


def throwaway_tls(folder: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a certificate it issued for 127.0.0.1 (trustme): (chain, key, CA)."""
    import trustme

    authority = trustme.CA()
    issued = authority.issue_cert("127.0.0.1", "localhost")
    chain, key, ca = folder / "chain.pem", folder / "key.pem", folder / "ca.pem"
    issued.cert_chain_pems[0].write_to_path(str(chain))
    for extra in issued.cert_chain_pems[1:]:
        extra.write_to_path(str(chain), append=True)
    issued.private_key_pem.write_to_path(str(key))
    authority.cert_pem.write_to_path(str(ca))
    return chain, key, ca


async def _serve_upstream(chunks: int, slow_gap: float) -> None:
    upstream = FakeUpstream(chunks, slow_gap)
    upstream.record = False  # a benchmark must not grow a list forever
    await upstream.start()
    print(f"PORT {upstream.port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    if sys.argv[1:2] != ["upstream"]:
        sys.exit("usage: fakes.py upstream [CHUNKS [SLOW_GAP]]")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_upstream(int(sys.argv[2]) if len(sys.argv) > 2 else 5,
                                    float(sys.argv[3]) if len(sys.argv) > 3 else 0.2))
