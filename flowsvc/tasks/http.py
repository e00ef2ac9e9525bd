"""The built-in `http` task: one HTTP request, asynchronously, through a shared pool.

Params: `url` (http or https), `method` (default GET), `headers`, `query` (a list value
repeats the parameter), and a body:
`json` (any JSON value) or `body` (text). Success when the status is 2xx, or one of
`success_statuses`. The result's data: `status`, `headers` (lower-case names), and the
body as `json` when it parses as JSON, else as `text`; a body longer than
MAX_BODY_BYTES is cut there and `truncated` is true. A gzip or deflate body is decoded
here, as it arrives, and only as far as MAX_BODY_BYTES: a few KiB that would decode to
gigabytes (a "zip bomb") cost no more memory than a plain body.

Failures that retrying may fix (connection errors, 5xx, 408, 425, 429) are retryable; other
4xx answers are not, so a retry policy does not repeat a request the server refused. A
retryable answer's `Retry-After` (seconds, or an HTTP date) is the least wait before the
retry (TaskResult.retry_after_s): a server that says when to come back is not asked sooner.
The client (connection pool) is shared by every flow on the event loop.
"""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import json as jsonlib
import re
import weakref
import zlib
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

import httpx

from flowsvc.models import TaskResult
from flowsvc.references import AT_RUN_TIME, as_text, whole_numbers
from flowsvc.tasks.builtin import BUILTINS
from flowsvc.validation import json_type_name

#: The most body bytes kept in a result; the rest is dropped (`truncated: true`).
MAX_BODY_BYTES = 64 * 1024
#: Statuses that are worth retrying although they are not 5xx.
RETRYABLE_4XX = frozenset({408, 425, 429})

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
    weakref.WeakKeyDictionary()
)


def client() -> httpx.AsyncClient:
    """The event loop's shared client (created on first use)."""
    loop = asyncio.get_running_loop()
    shared = _clients.get(loop)
    if shared is None or shared.is_closed:
        shared = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
            # No overall timeout of its own: the task's `timeout` bounds the request.
            timeout=httpx.Timeout(None, connect=30.0),
            follow_redirects=False,
            # What _read_body decodes (httpx asks for br and zstd too when their packages
            # are installed, and such a body would come back undecoded).
            headers={"Accept-Encoding": ACCEPT_ENCODING},
        )
        _clients[loop] = shared
    return shared


async def aclose_clients() -> None:
    """Close the running loop's client (server shutdown)."""
    shared = _clients.pop(asyncio.get_running_loop(), None)
    if shared is not None:
        await shared.aclose()


def _problems(params: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """What no request could be sent with (param, problem): checked before a flow runs,
    on the params known then, and again on each attempt's params."""
    url = params.get("url")
    if isinstance(url, str):
        problem = _bad_url(url)
        if problem:
            yield "url", problem
    method = params.get("method", "GET")
    if isinstance(method, str) and not _TOKEN.fullmatch(method):
        yield "method", f"must be an HTTP method such as GET or POST, not {method!r}"
    headers = params.get("headers")
    if isinstance(headers, dict):
        yield from _header_problems(headers)
    given = [params.get(name) for name in ("json", "body")]
    if not any(value is None or value is AT_RUN_TIME for value in given):
        yield "body", "give `json` or `body`, not both"
    statuses = params.get("success_statuses")
    if isinstance(statuses, list):
        bad = [s for s in statuses if not _is_status(s)]
        if bad:
            yield (
                "success_statuses",
                "must be HTTP statuses, whole numbers from 100 to 599, not "
                + ", ".join(map(jsonlib.dumps, whole_numbers(bad))),  # 600, not 600.0
            )


@BUILTINS.task("http", check=_problems)
async def http(
    *,
    url: str,
    method: str = "GET",
    headers: dict[str, Any] | None = None,
    query: dict[str, Any] | None = None,
    json: Any = None,
    body: str | None = None,
    success_statuses: list[Any] | None = None,
) -> TaskResult:
    """Send one HTTP request; succeed on 2xx or success_statuses.
    data: status, headers, and json (a JSON body) or text."""
    given = {
        "url": url,
        "method": method,
        "headers": headers,
        "query": query,
        "json": json,
        "body": body,
        "success_statuses": success_statuses,
    }
    for name, problem in itertools.chain(_wrong_types(given), _problems(given)):
        # "must ..." is said of the param: "method must be an HTTP method ...".
        text = f"{name} {problem}" if problem.startswith("must ") else problem
        return TaskResult.failure(text, retryable=False)
    try:
        request = client().build_request(
            method.upper(),
            url,
            # A list is the header's values, comma-separated (RFC 9110, 5.3); null (or an
            # empty list) leaves the header out.
            headers={k: ", ".join(v) for k, v in _values(headers).items()},
            # A list is the parameter repeated: {"tag": ["a", "b"]} -> ?tag=a&tag=b; null
            # leaves it out. Added to the url's own query, never in place of it.
            params=httpx.URL(url).params.merge(_values(query)) if query else None,
            json=whole_numbers(json),  # 1.0 sent as 1, as it was written
            content=body.encode() if body is not None else None,
        )
    except (httpx.HTTPError, ValueError, TypeError) as exc:
        return TaskResult.failure(f"cannot build the request: {exc}", retryable=False)
    try:
        response = await client().send(request, stream=True)
    except httpx.LocalProtocolError as exc:  # our request is malformed (a header name ...)
        return TaskResult.failure(
            f"{method.upper()} {_shown(request.url)}: the request is not valid HTTP: "
            + _QUOTED_BYTES.sub("(not shown)", str(exc)),
            retryable=False,
        )
    except httpx.HTTPError as exc:
        return TaskResult.failure(
            f"{method.upper()} {_shown(request.url)}: {type(exc).__name__}: {_reason(exc)}"
        )
    try:
        raw = await _read_body(response)
    except _TooManyEncodings as exc:
        return TaskResult.failure(f"{method.upper()} {_shown(request.url)}: {exc}", retryable=False)
    except httpx.HTTPError as exc:
        return TaskResult.failure(
            f"{method.upper()} {_shown(request.url)}: {type(exc).__name__}: {_reason(exc)}"
        )
    finally:
        await response.aclose()
    data: dict[str, Any] = {
        "status": response.status_code,
        "headers": {k.lower(): v for k, v in response.headers.items()},
    }
    if len(raw) > MAX_BODY_BYTES:
        raw = raw[:MAX_BODY_BYTES]
        data["truncated"] = True
    data.update(_body(raw, response.headers.get("content-type", ""), response.encoding))
    allowed = {int(s) for s in success_statuses or ()}
    if 200 <= response.status_code < 300 or response.status_code in allowed:
        return TaskResult.success(data)
    retryable = response.status_code >= 500 or response.status_code in RETRYABLE_4XX
    return TaskResult.failure(
        f"HTTP {response.status_code} from {method.upper()} {_shown(request.url)}",
        data,
        retryable=retryable,
        retry_after_s=retry_after(response.headers.get("retry-after")) if retryable else None,
    )


#: The longest Retry-After taken: a wait the server's backoff cap then lowers further.
MAX_RETRY_AFTER_S = 86400.0


def retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds a Retry-After header asks to wait (RFC 9110: a number of seconds, or an
    HTTP date); None when there is none or it is neither."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit() and text.isascii():
        # Past 9 digits, past the cap (and int() refuses some thousands of them).
        return min(float(int(text)), MAX_RETRY_AFTER_S) if len(text) <= 9 else MAX_RETRY_AFTER_S
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000": a time in UTC, as every HTTP date is
        when = when.replace(tzinfo=UTC)
    wait = (when - (now or datetime.now(UTC))).total_seconds()
    return min(max(wait, 0.0), MAX_RETRY_AFTER_S)


#: The most Content-Encoding layers a body may have ("gzip, gzip" is two); each one
#: holds a decompressor, and no server sends more than one or two.
MAX_ENCODINGS = 5
#: The most bytes one layer decodes at a time: what it holds beside MAX_BODY_BYTES.
_PIECE_BYTES = 64 * 1024


class _TooManyEncodings(Exception):
    """A body with more than MAX_ENCODINGS Content-Encoding layers."""


async def _read_body(response: httpx.Response) -> bytes:
    """The body, decoded, up to one byte past MAX_BODY_BYTES (which says there is more).

    httpx's own decoders decode each chunk read whole: a 64 KiB chunk of gzip can be
    64 MiB, and each further layer multiplies that again. Here every layer decodes at
    most what the next one (or the result) asks for, so decoding stops at the cut."""
    names = [
        name.strip().lower()
        for value in response.headers.get_list("content-encoding")
        for name in value.split(",")
    ]
    # Applied in the order listed, so undone from the last; unknown ones are left as they
    # are (httpx does the same), "identity" is none.
    layers = [_Inflate(name) for name in reversed(names) if name in _WBITS]
    if len(layers) > MAX_ENCODINGS:
        raise _TooManyEncodings(
            f"the body has {len(layers)} content encodings (at most {MAX_ENCODINGS} are read)"
        )
    want = MAX_BODY_BYTES + 1
    chunks: list[bytes] = []
    async for received in response.aiter_raw():
        if layers:
            layers[0].feed(received)
            data = _pull(layers, len(layers) - 1, want)
        else:
            data = received[:want]
        chunks.append(data)
        want -= len(data)
        if want <= 0:
            break
    return b"".join(chunks)


def _pull(layers: list[_Inflate], index: int, limit: int) -> bytes:
    """At most `limit` bytes out of layers[index], feeding it from the layers before it."""
    layer, out, size = layers[index], [], 0
    while size < limit:
        piece = layer.read(limit - size)
        if not piece:
            if index == 0:
                break  # the next bytes must come from the network
            more = _pull(layers, index - 1, _PIECE_BYTES)
            if not more:
                break
            layer.feed(more)
            continue
        out.append(piece)
        size += len(piece)
    return b"".join(out)


#: The encodings asked for: those _read_body decodes.
ACCEPT_ENCODING = "gzip, deflate"
#: zlib's window bits for each encoding read: gzip's header, or deflate's zlib header.
_WBITS = {"gzip": zlib.MAX_WBITS | 16, "x-gzip": zlib.MAX_WBITS | 16, "deflate": zlib.MAX_WBITS}


class _Inflate:
    """One gzip or deflate layer that never decodes more than it is asked for."""

    def __init__(self, encoding: str) -> None:
        self._encoding = encoding
        self._zlib = zlib.decompressobj(_WBITS[encoding])
        self._pending = b""
        self._started = False
        #: Past the end: what comes after is ignored.
        self._ended = False

    def feed(self, data: bytes) -> None:
        self._pending += data

    def read(self, limit: int) -> bytes:
        """Up to `limit` decoded bytes: b"" when it needs more input (or has ended)."""
        while True:
            if self._zlib.eof and not self._next_member():
                return b""
            if not self._started and self._encoding == "deflate" and len(self._pending) < 2:
                # zlib's header is two bytes: given one alone, zlib cannot yet refuse raw
                # deflate, which would then fail when the next chunk comes.
                return b""
            try:
                out = self._zlib.decompress(self._pending, limit)
            except zlib.error as exc:
                if self._started or self._encoding != "deflate":
                    raise httpx.DecodingError(f"{self._encoding}: {exc}") from exc
                # Many servers send raw deflate, without the zlib header, as "deflate".
                self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)
                self._started = True
                continue
            self._started = self._started or bool(self._pending)
            if self._zlib.eof:
                self._pending = self._zlib.unused_data  # input is left over only here
            else:
                self._pending = self._zlib.unconsumed_tail
            if out or not self._zlib.eof:
                return out
            # An empty gzip member: the next one may be waiting already.

    def _next_member(self) -> bool:
        """At the end of the stream: whether another gzip member begins, a decoder now
        made for it. A gzip body may hold several one after another (RFC 1952, 2.2), as
        gzip readers decode; anything else after the end is ignored, as httpx does."""
        if (
            self._ended
            or self._encoding == "deflate"
            or not _GZIP_MAGIC.startswith(self._pending[:2])
        ):
            self._ended = True
            self._pending = b""
            return False
        if len(self._pending) < len(_GZIP_MAGIC):
            return False  # the next bytes say
        self._zlib = zlib.decompressobj(_WBITS[self._encoding])
        return True


#: How a gzip member begins.
_GZIP_MAGIC = b"\x1f\x8b"


def _reason(exc: BaseException) -> str:
    """What went wrong, in words: httpx's ConnectError and ReadError often say nothing
    themselves (a connection closed in the TLS handshake, or reset), while the OS or ssl
    error they were raised from does ("Connection reset by peer")."""
    seen: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and cause not in seen and len(seen) < 10:
        if str(cause):
            # The first one is httpx's own (shown as it always was); a cause is not, so
            # it is shown as a url would be, in case it quotes one.
            return str(cause) if cause is exc else _shown(str(cause))
        seen.append(cause)
        cause = cause.__cause__ or cause.__context__
    return "no reason given (the connection was closed or reset)"


def _values(params: dict[str, Any] | None) -> dict[str, list[str]]:
    """Header or query params as lists of texts, leaving nulls out."""
    out: dict[str, list[str]] = {}
    for key, value in (params or {}).items():
        texts = [
            as_text(v) for v in (value if isinstance(value, list) else [value]) if v is not None
        ]
        if texts:
            out[key] = texts
    return out


def _header_problems(headers: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """Header names and values no request could be sent with. A value is never shown: an
    Authorization header read with its line break at the end is a common mistake, and
    errors are stored, returned and logged (h11's own message quoted the value)."""
    for name, texts in _values(headers).items():
        if not _TOKEN.fullmatch(name):
            valid = _TOKEN.match(name)
            shown = (valid.group() if valid else "") + "..."
            yield "headers", f"header name {shown!r} is not an HTTP token (RFC 9110, 5.6.2)"
        elif not all(_FIELD_VALUE.fullmatch(text) for text in texts):
            yield (
                "headers",
                f"header {name!r} has a value that is not valid HTTP: it holds a line "
                "break or another control character, a character outside ASCII, or a "
                "space at its start or end (the value is not shown: it may be a secret)",
            )


#: The JSON types of each param but `json` (which takes any value), as the flow's check
#: names them; a literal of another type is refused before the flow runs, a value from a
#: reference only here.
_TYPES: dict[str, tuple[str, type | tuple[type, ...]]] = {
    "url": ("string", str),
    "method": ("string", str),
    "headers": ("object or null", (dict, type(None))),
    "query": ("object or null", (dict, type(None))),
    "body": ("string or null", (str, type(None))),
    "success_statuses": ("array or null", (list, type(None))),
}


def _wrong_types(params: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """Params (from references) of a type the task cannot use: said without the value,
    which may be a secret (a header)."""
    for name, (expected, types) in _TYPES.items():
        value = params.get(name)
        if not isinstance(value, types):
            yield name, f"must be {expected}, not {json_type_name(value)}"


def _is_status(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and float(value).is_integer()
        and 100 <= value <= 599
    )


def _bad_url(url: str) -> str | None:
    """Why `url` cannot be requested (a failure no retry can fix), or None."""
    shown = _shown(url)
    hidden = ""
    if "@" in _USERINFO.sub("//", url):
        # User info that _shown could not cut out: in a URL that does not parse, where it
        # ends cannot be told (a password may hold / ? # or spaces). Show only what follows
        # the last "@", and not the parser's message, which may quote part of it.
        scheme = url.partition("//")[0] + "//" if "//" in url else ""
        shown = scheme + "...@" + _QUERY.sub("", url.rpartition("@")[2])
        hidden = " (what comes before its last '@' is not shown: it may hold a password)"
    try:
        parsed = httpx.URL(url)
        port = parsed.port
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        return f"not a valid URL: {shown!r}" + (hidden or f": {_shown(str(exc))}")
    if parsed.scheme not in ("http", "https"):
        return f"url must start with http:// or https://, not {shown!r}{hidden}"
    if not parsed.host:
        return f"url has no host: {shown!r}{hidden}"
    if port is not None and not 0 < port < 65536:
        return f"url has a port out of range: {shown!r}{hidden}"
    return None


def _shown(url: str | httpx.URL) -> str:
    """A URL (or a text holding one, parsed or not) as an error shows it: without
    user:password@ and without the query, where credentials and API keys travel (errors
    are stored, returned and logged)."""
    return _QUERY.sub("", _LOOSE_USERINFO.sub(_cut_loose, _USERINFO.sub("//", str(url))))


def _cut_loose(match: re.Match[str]) -> str:
    """A word from "//" and an authority holding ":" on: up to its last "@" cut out."""
    text = match.group()
    at = text.rfind("@")
    return text if at < 0 else "//...@" + text[at + 1 :]


#: An HTTP method is a token (RFC 9110, 5.6.2): GET, POST, M-SEARCH ...
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: A header value httpx and h11 send: visible ASCII, with spaces and tabs only inside.
_FIELD_VALUE = re.compile(r"(?:[\x21-\x7e](?:[\t\x20-\x7e]*[\x21-\x7e])?)?")
#: A bytes value that h11 quotes in its errors (a header's name or value).
_QUOTED_BYTES = re.compile(r"""b(['"]).*\1""")
_USERINFO = re.compile(r"//[^/?#@\s]*@")
#: What may still be user info: an "@" after an authority holding ":" (user:password, or
#: host:port) in the same word. A password holding "/" or "#" makes the URL parse with
#: its user as host and the password's first part as port ("http://u:4242/SECRET@h/"), so
#: everything up to the last "@" goes (a path holding "@" then loses its start). The
#: pattern takes the whole word and _cut_loose finds its last "@": with `\S*@` in the
#: pattern, a long word without "@" cost quadratic time (a 40 KB url blocked the event
#: loop for 2.5 s when its flow was validated).
_LOOSE_USERINFO = re.compile(r"//[^/?#@\s:]*:\S*")
_QUERY = re.compile(r"\?[^\s'\"#]*")


def _body(raw: bytes, content_type: str, encoding: str | None) -> dict[str, Any]:
    text = raw.decode(encoding or "utf-8", errors="replace")
    if "json" in content_type:
        try:
            return {"json": jsonlib.loads(text)}
        except ValueError:
            pass
    return {"text": text}
