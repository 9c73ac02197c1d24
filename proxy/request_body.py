"""What the proxy needs to know of a request before it goes upstream: how it is paid for (see
``metering``), and for a path metered in tokens, the top-level fields of its JSON body (the
model, whether it streams, how many answers and tokens it may generate), the body with the
stream's usage asked for when the client did not ask, and with its output limit lowered when
its budget cannot hold more.

The body is decoded by msgspec into the few top-level fields it names: the rest (the messages,
a tool's schema with a property named ``stream``) is skipped without being built, so a 100 KB
body costs ~50 µs and a small one ~0.3 µs, and a field nested anywhere is never taken for the
request's own. A body that is not a JSON object is refused before it goes upstream: what cannot
be read cannot be billed.
"""
from __future__ import annotations

import enum
import json
import math
from typing import Any, NamedTuple

import msgspec

from .metering import STREAMABLE, Metering, MeteringPolicy, PathCost, Refused

# An estimate when the upstream reports nothing: about three bytes of UTF-8 text a token (four
# English letters, one Chinese character) errs towards charging a little more, never zero.
BYTES_PER_TOKEN = 3
# What an answer is assumed to generate when the request sets no limit: its reservation, and
# under a token budget the limit it is sent with.
DEFAULT_COMPLETION_RESERVE = 4096
MAX_CHOICES = 128   # OpenAI's own limit on n

_INJECT = b'"stream_options":{"include_usage":true},'
_BLANK = b" \t\r\n"
_TRUE_WORDS = frozenset({"true", "1", "yes", "on", "t", "y"})
# the fields that limit an answer's tokens, by path; the first is added when none is set
_LIMIT_FIELDS = {"/v1/responses": ("max_output_tokens",),
                 "/v1/chat/completions": ("max_tokens", "max_completion_tokens")}


def estimate_tokens(nbytes: int) -> int:
    return -(-nbytes // BYTES_PER_TOKEN)


class _TopLevel(msgspec.Struct):
    """The top-level fields read; any other field, at any depth, is skipped unread."""

    model: Any = None
    stream: Any = None
    stream_options: Any = msgspec.UNSET   # null and absent differ: a later null would undo an added one
    n: Any = None
    best_of: Any = None
    max_tokens: Any = msgspec.UNSET   # present (even null) or not: a limit is then rewritten, not added
    max_completion_tokens: Any = msgspec.UNSET
    max_output_tokens: Any = msgspec.UNSET
    background: Any = None


_DECODE = msgspec.json.Decoder(_TopLevel).decode


class Unreadable(enum.Enum):
    """Why a body on a token path is refused (400) before it goes upstream."""

    NOT_AN_OBJECT = "invalid_body"


class RequestFacts(NamedTuple):   # a tuple: built on every request, at a fraction of a dataclass's cost
    path: str
    model: str
    metering: Metering
    charge: int               # tokens per request (Metering.PER_REQUEST)
    stream: bool
    choices: int              # answers generated (n, best_of)
    prompt_estimate: int      # tokens
    completion_limit: int     # tokens each answer may generate, as sent upstream (0: no completion)
    limited: bool             # the body sets that limit (else the upstream's default applies)
    limit_in_body: bool       # a field that limits it is at the body's top level, whatever its value
    body: bytes               # what goes upstream
    usage_added: bool         # the proxy asked for the stream's usage: its usage-only event is not relayed

    @property
    def reservation(self) -> int:
        """Tokens the request may cost: what its budget holds while it runs."""
        if self.metering is Metering.TOKENS:
            return self.prompt_estimate + self.choices * self.completion_limit
        return self.charge

    def within(self, tokens: int) -> "RequestFacts":
        """These facts with the output limit set, or lowered, so that the request costs at most
        ``tokens`` (plus its prompt's underestimate, and one token an answer when even that does
        not fit): how a request under a token budget is sent."""
        if self.metering is not Metering.TOKENS or not self.completion_limit or (
                self.limited and tokens >= self.reservation):
            return self
        limit = max((tokens - self.prompt_estimate) // self.choices, 1)
        fields = _LIMIT_FIELDS.get(self.path, ("max_tokens",))
        if not self.limit_in_body:   # added first, as the stream's usage is: no JSON to rebuild
            body = _first(self.body, b'"%b":%d,' % (fields[0].encode(), limit))
        else:
            data = json.loads(self.body)
            for name in [name for name in fields if name in data]:
                data[name] = limit
            body = _dumped(data)
        return RequestFacts(self.path, self.model, self.metering, self.charge, self.stream, self.choices,
                            self.prompt_estimate, limit, True, True, body, self.usage_added)


def _dumped(data: dict[str, Any]) -> bytes:
    """A body edited as JSON, as compact as a client would send it."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def _first(body: bytes, field: bytes) -> bytes:
    """``body`` (a JSON object) with ``field`` (``"name":value,``) added as its first member."""
    start = 0 if body[:1] == b"{" else len(body) - len(body.lstrip(_BLANK))
    whole = memoryview(body)   # slices of a view are not copies: a 100 KB body is copied once, not three times
    return b"".join((whole[:start + 1], field, whole[start + 1:]))


def _count(value: Any) -> int | None:
    """A count as an upstream would take it (an int, a float rounded up, a numeric string), or
    None when it is absent or no count at all."""
    if value is None or value is msgspec.UNSET or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float):
        return math.ceil(value) if math.isfinite(value) and value >= 0 else None
    if isinstance(value, str):
        try:
            return _count(float(value))
        except ValueError:
            return None
    return None


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in _TRUE_WORDS
    return bool(value) if isinstance(value, (bool, int, float)) else False


def _with_usage(body: bytes, top: _TopLevel) -> bytes | None:
    """``body`` asking for the stream's usage, or None when it already does."""
    options = top.stream_options
    if isinstance(options, dict) and options.get("include_usage") is True:
        return None
    if options is msgspec.UNSET:   # not at the top level: added first, where a later field of the same name cannot be
        return _first(body, _INJECT)
    data = json.loads(body)
    data["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return _dumped(data)


def inspect(path: str, method: str, body: bytes, policy: MeteringPolicy) -> RequestFacts | Refused | Unreadable:
    """The facts of a request to ``path`` (normalised, without its query), or why it is refused."""
    cost = policy.cost(method, path)
    if cost.refused is not None:
        return cost.refused
    if cost.metering is not Metering.TOKENS:
        return RequestFacts(path, "", cost.metering, cost.charge, False, 1, 0, 0, False, False, body, False)
    try:
        top = _DECODE(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return Unreadable.NOT_AN_OBJECT
    if path == "/v1/responses" and _truthy(top.background):
        deferred = policy.deferred(path)
        if deferred.refused is not None:
            return deferred.refused
        return _charged(path, top, body, deferred)
    model = top.model if isinstance(top.model, str) else ""
    stream = path in STREAMABLE and _truthy(top.stream)
    usage_added = False
    if stream and path != "/v1/responses":   # the Responses API always reports a stream's usage
        edited = _with_usage(body, top)
        if edited is not None:
            body, usage_added = edited, True
    choices = 1 if top.n is None and top.best_of is None else \
        min(max(_count(top.n) or 1, _count(top.best_of) or 1), MAX_CHOICES)
    asked = None if path == "/v1/embeddings" else _asked_limit(path, top)
    limit = 0 if path == "/v1/embeddings" else asked if asked is not None else DEFAULT_COMPLETION_RESERVE
    in_body = (top.max_output_tokens is not msgspec.UNSET if path == "/v1/responses" else
               top.max_tokens is not msgspec.UNSET or top.max_completion_tokens is not msgspec.UNSET)
    return RequestFacts(path, model, Metering.TOKENS, 0, stream, choices, estimate_tokens(len(body)), limit,
                        asked is not None, in_body, body, usage_added)


def _asked_limit(path: str, top: _TopLevel) -> int | None:
    """The most tokens the client lets each answer generate, if it says."""
    if path == "/v1/responses":
        return _count(top.max_output_tokens)
    if top.max_completion_tokens is msgspec.UNSET and top.max_tokens is msgspec.UNSET:
        return None   # most requests: neither field
    found = [value for value in (_count(top.max_completion_tokens), _count(top.max_tokens)) if value is not None]
    return max(found) if found else None


def _charged(path: str, top: _TopLevel, body: bytes, cost: PathCost) -> RequestFacts:
    model = top.model if isinstance(top.model, str) else ""
    return RequestFacts(path, model, Metering.PER_REQUEST, cost.charge, False, 1, 0, 0, False, False, body, False)
