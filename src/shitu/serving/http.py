"""Request plumbing: the body size limit, the API key check, reading uploaded images and
the budget of decoded pixels they may hold."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlsplit

import numpy as np
from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from shitu.serving.errors import (
    BadRequest,
    Forbidden,
    PayloadTooLarge,
    RequestError,
    RequestTimeout,
    ServiceUnavailable,
    Unauthorized,
    UnsupportedMediaType,
)
from shitu.serving.images import decode_base64
from shitu.serving.settings import MB, MIN_BODY_RATE, ServeSettings

logger = logging.getLogger(__name__)
IMAGE_FIELD = "image"
IMAGE_AS_TEXT = (
    f"field '{IMAGE_FIELD}' must be a file upload, not text (curl: -F {IMAGE_FIELD}=@photo.jpg)"
)
# What clients send for a file part: any image type, or "some file" (curl, unknown suffix).
GENERIC_FILE_TYPES = {"", "application/octet-stream"}
# How Starlette's parser words a form over its `max_files`: answered as a JSON body with
# too many images is, not as "malformed multipart body: Too many files. Maximum ... is 32."
TOO_MANY_FILES = "Too many files"
# ... and over its `max_fields`: a valid body too, answered naming the fields a form takes.
TOO_MANY_FIELDS = "Too many fields"
MAX_FORM_FIELDS = 16
# How much of a refused body is read and thrown away before the 413 goes out. A server that
# closes a connection with unread bytes makes the kernel reset it, and the client can lose the
# reply it was sent; past this much the connection is closed anyway.
DRAIN_BYTES = 64 * MB
RETRY_AFTER_S = 1  # what a request refused for want of capacity is told to wait
UNLIMITED_PATHS = {"/healthz", "/metrics"}  # answered past --max-connections (RequestLimit)
# How long a request waits for other requests' decoded pixels to be freed before its 503.
PIXELS_WAIT_S = 5.0
# what an edit refused because another process kept the library locked (its write, a
# rebuild, may take minutes), or a request whose search the index service (a Milvus
# server) failed, is told to wait
LIBRARY_BUSY_RETRY_AFTER_S = 10
# what a request cut off by the server's stop is told to wait (a restart loads the models)
STOPPING_RETRY_AFTER_S = 10
# What browsers send as Sec-Fetch-Site for a request made by a page from another origin
# ("same-site" is another port or subdomain); this server's own page sends "same-origin".
OTHER_SITES = {"cross-site", "same-site"}
# The port an Origin leaves out, as browsers write it (`http://example.com`).
DEFAULT_PORTS = {"http": 80, "https": 443}
OTHER_SITE_REFUSED = (
    "changes to the gallery cannot come from another web site's page: use this server's "
    "page, or a client that is not a browser"
)


def too_large(limit_mb: float) -> PayloadTooLarge:
    # positional, shortest round-trip digits: 5000000 and 0.3, never 5e+06 or 0.299999
    shown = np.format_float_positional(limit_mb, trim="-")
    return PayloadTooLarge(f"request body is larger than the {shown} MB limit")


class HttpMiddleware:
    """ASGI middleware acting on HTTP requests (`handle`); the server's other traffic (its
    lifespan events) goes past it to the app as it came."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.handle(scope, receive, send)

    async def handle(self, scope: dict, receive: Callable, send: Callable) -> None:
        """Answer (or pass on) one HTTP request."""
        raise NotImplementedError


class BodyLimit(HttpMiddleware):
    """ASGI middleware: a body over the settings' upload limit is refused with 413 and never
    kept.

    A declared Content-Length over the limit is refused before the app sees it; a chunked body
    is counted as it arrives and refused at the first byte over the limit. Either way the rest
    of the body (up to DRAIN_BYTES) is read and discarded first, so the client gets the reply;
    a client that sent "Expect: 100-continue" (curl does, for large uploads) is refused before it
    sends the body.
    """

    def __init__(self, app: Any, settings: ServeSettings) -> None:
        super().__init__(app)
        self.max_bytes = settings.max_upload_bytes
        self.max_mb = settings.max_upload_mb  # as the operator gave it, for the message

    async def handle(self, scope: dict, receive: Callable, send: Callable) -> None:
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit() or int(declared) > self.max_bytes:
                await refuse(headers, receive, send, too_large(self.max_mb))
                return
            await self.app(scope, receive, send)  # the server delivers no more than declared
            return
        received = 0

        async def counted() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                if message.get("more_body"):
                    await drain(receive)
                raise too_large(self.max_mb)  # answered by the app's error handler
            return message

        await self.app(scope, counted, send)


class EncodedBodies(HttpMiddleware):
    """ASGI middleware: a request body sent in a content coding (`Content-Encoding: gzip`)
    is refused with 415, as RFC 9110 has a server do with codings it does not take: the
    server read the compressed bytes as they came, so a gzipped JSON body was answered
    "Invalid JSON: expected value at line 1 column 1", and a gzipped form as malformed."""

    async def handle(self, scope: dict, receive: Callable, send: Callable) -> None:
        headers = dict(scope["headers"])
        coding = headers.get(b"content-encoding", b"").strip().lower()
        has_body = headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers
        if coding in (b"", b"identity") or not has_body:
            await self.app(scope, receive, send)
            return
        refused = UnsupportedMediaType(
            f"the request body is compressed ({coding.decode('latin-1')}, its Content-Encoding), "
            "which this server does not take: send it uncompressed"
        )
        await refuse(headers, receive, send, refused)


class BodyTimeout(HttpMiddleware):
    """ASGI middleware: a client that keeps the server waiting for its request body is
    answered 408 and its connection closed, which frees the request's slot: one that declared
    a body and sent nothing (or a byte now and then) held it for ever, and --max-connections
    of them shut every other client out.

    The client has the settings' `read_timeout_s` of the server's waiting for its body, in
    all, and a second more for every MIN_BODY_RATE bytes it sends: a slow link's upload goes
    through, a trickle runs out. Only the waiting for the client counts, not the time the
    server takes before reading (an edit's wait for the library's lock); once the body is in,
    reads (whether the client has gone) wait as long as they like.
    """

    def __init__(self, app: Any, settings: ServeSettings) -> None:
        super().__init__(app)
        self.timeout_s = settings.read_timeout_s

    async def handle(self, scope: dict, receive: Callable, send: Callable) -> None:
        waited = 0.0
        received = 0
        body_in = False
        timed_out = False

        async def timed() -> dict:
            nonlocal waited, received, body_in, timed_out
            if body_in:
                return await receive()
            allowed = self.timeout_s + received / MIN_BODY_RATE - waited
            began = time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), max(allowed, 0))
            except TimeoutError:
                timed_out = True
                raise RequestTimeout(
                    f"the request body stopped arriving ({_what_came(scope, received)}): the "
                    f"server waits {self.timeout_s:g} s for a body, and a second more for "
                    f"every {MIN_BODY_RATE} bytes (--read-timeout)"
                ) from None
            finally:
                waited += time.monotonic() - began
            received += len(message.get("body", b""))
            body_in = message["type"] != "http.request" or not message.get("more_body")
            return message

        async def closing(message: dict) -> None:
            """The answer, telling the client that a connection whose body is cut short is
            closed after it (the server cannot tell where its next request would start)."""
            headers = message.get("headers", [])
            if timed_out and message["type"] == "http.response.start" and not _closes(headers):
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, timed, closing)


def _closes(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether response headers already say the connection closes after it (`_answer`'s)."""
    return (b"connection", b"close") in [(name.lower(), value.lower()) for name, value in headers]


def _what_came(scope: dict, received: int) -> str:
    """How much of the request's body came, and of how much it declared, in words."""
    declared = dict(scope["headers"]).get(b"content-length")
    if declared is None:
        return f"{received} bytes of it came, in chunks"
    return f"{received} of its {declared.decode('latin-1')} bytes came"


class AllowedHosts(HttpMiddleware):
    """ASGI middleware: with the settings' `allowed_hosts`, a request addressed (its Host
    header) to any other name than those, localhost or a name under .localhost is refused
    with 403, as a DNS rebinding page's are; an IP address is always let through (a page
    can only be served from one that is its own)."""

    def __init__(self, app: Any, settings: ServeSettings) -> None:
        super().__init__(app)
        self.allowed = settings.allowed_hosts

    async def handle(self, scope: dict, receive: Callable, send: Callable) -> None:
        if self.allowed is None:  # any host: the headers need not be read
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        # No Host at all (HTTP/1.0) is no browser's: they always send one
        if not host or _host_allowed(host, self.allowed):
            await self.app(scope, receive, send)
            return
        refused = Forbidden(
            f"this server answers requests addressed to localhost or an IP address, not to "
            f"{host!r}, as a web page would send them after pointing its name at this machine "
            "(DNS rebinding); a name this server is reached by (a reverse proxy passing its "
            "Host on) is allowed with --allowed-host NAME"
        )
        await refuse(headers, receive, send, refused)


def _host_allowed(host: str, allowed: frozenset[str]) -> bool:
    """Whether a Host header (`name[:port]`, `[v6]:port`) names an IP address, localhost, a
    name under .localhost (browsers resolve those to loopback themselves) or an allowed name;
    a name in its fully qualified form (`localhost.`, as a browser sends a URL written so)
    is the same name."""
    try:
        name = (urlsplit(f"//{host}").hostname or "").removesuffix(".")
    except ValueError:  # an unclosed '[', say
        return False
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    return name == "localhost" or name.endswith(".localhost") or name in allowed


class HeadAsGet(HttpMiddleware):
    """ASGI middleware: HEAD is answered as GET would be, without the body, and a 405's
    Allow lists HEAD wherever it lists GET (RFC 9110 says a server that answers GET answers
    HEAD). FastAPI's routes answer only the methods they list, so `curl -I` on the API, the
    docs or /metrics, as link checkers and uptime monitors send it, got 405."""

    async def handle(self, scope: dict, receive: Callable, send: Callable) -> None:
        head = scope["method"] == "HEAD"

        async def answer(message: dict) -> None:
            if message["type"] == "http.response.start" and message["status"] == 405:
                message = {**message, "headers": allowing_head(message.get("headers", []))}
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        inner = {**scope, "method": "GET"} if head else scope
        try:
            await self.app(inner, receive, answer)
        finally:  # the route that answered, which the router notes there, for the metrics
            if "route" in inner:
                scope["route"] = inner["route"]


def allowing_head(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The headers with HEAD added to an Allow that lists GET."""
    allowing = []
    for name, value in headers:
        methods = [method.strip() for method in value.split(b",")]
        if name.lower() == b"allow" and b"GET" in methods and b"HEAD" not in methods:
            value = b", ".join([*methods, b"HEAD"])
        allowing.append((name, value))
    return allowing


class RequestLimit(HttpMiddleware):
    """ASGI middleware: beyond the settings' number of requests in progress, a request is
    answered 503, as JSON naming the limit, with Retry-After, and its body is never kept.
    Health checks and metrics scrapes (GET or HEAD of UNLIMITED_PATHS), which keep no
    upload, neither count nor wait: a liveness probe refused while uploads filled the
    server had a busy server restarted, and the metrics went blank when most needed."""

    def __init__(self, app: Any, settings: ServeSettings) -> None:
        super().__init__(app)
        self.max_requests = settings.max_requests
        self.in_progress = 0  # changed on the event loop only: no lock

    async def handle(self, scope: dict, receive: Callable, send: Callable) -> None:
        path = scope["path"].removeprefix(scope.get("root_path", ""))  # as routed
        if scope["method"] in ("GET", "HEAD") and path in UNLIMITED_PATHS:
            await self.app(scope, receive, send)
            return
        if self.in_progress >= self.max_requests:
            busy = ServiceUnavailable(
                f"the server is busy: {self.in_progress} requests in progress, its limit "
                "(--max-connections); retry in a moment"
            )
            retry = [(b"retry-after", str(RETRY_AFTER_S).encode())]
            await refuse(dict(scope["headers"]), receive, send, busy, retry)
            return
        self.in_progress += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_progress -= 1


class AnswerCutOff(HttpMiddleware):
    """ASGI middleware: a request still running when the server stops (uvicorn cancels
    those left after its grace period) is answered with a JSON 503 where its answer has not
    begun, as every other error is: uvicorn's own answer was a plain-text 500. A gallery
    edit it asked for may still be made (the library's thread runs each one to its end),
    which the answer to one says."""

    async def handle(self, scope: dict, receive: Callable, send: Callable) -> None:
        started = False

        async def watched(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except asyncio.CancelledError:
            if started:  # uvicorn closes the connection: the client sees the answer cut short
                raise
            # Only a gallery edit may still be made (recognize, extract change nothing).
            edit = scope["method"] not in ("GET", "HEAD") and "/v1/gallery/" in scope["path"]
            stopping = ServiceUnavailable(
                "the server is stopping and did not wait for this request to finish; "
                + (
                    "an edit it asked for may still be made: check before retrying"
                    if edit
                    else "retry it"
                )
            )
            retry = [(b"retry-after", str(STOPPING_RETRY_AFTER_S).encode())]
            await _answer(send, stopping, retry)
            # Answered: the task ends as one that finished (no traceback in the log)
            logger.warning("%s %s cut off as the server stopped", scope["method"], scope["path"])


class PixelBudget:
    """The decoded pixels that all requests in progress may hold together
    (--max-megapixels-in-flight).

    The limits per request alone let --max-connections requests each hold 4 times
    --max-megapixels at once (tens of GB, from small, highly compressed PNGs). Each request
    reserves its images' pixels, counted from their headers, before it decodes any, and
    gives them back once its answer is computed, on every path (errors, cancellation). One
    that does not fit waits its turn (first come, first served) for up to `wait_s`, then is
    refused with ServiceUnavailable. Changed on the event loop only: no lock.
    """

    def __init__(self, capacity: int, wait_s: float = PIXELS_WAIT_S) -> None:
        self.capacity = capacity
        self.wait_s = wait_s
        self.held = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    @asynccontextmanager
    async def hold(self, pixels: int) -> AsyncIterator[None]:
        """`pixels` (at most the capacity) reserved for the block."""
        await self._reserve(pixels)
        try:
            yield
        finally:
            self._give_back(pixels)

    async def _reserve(self, pixels: int) -> None:
        if not self._waiting and self.held + pixels <= self.capacity:
            self.held += pixels
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        place = (pixels, turn)
        self._waiting.append(place)
        try:
            await asyncio.wait([turn], timeout=self.wait_s)
        except BaseException:  # cancelled while waiting
            if turn.done():  # given its turn meanwhile
                self._give_back(pixels)
            else:
                self._leave(place)
            raise
        if not turn.done():
            self._leave(place)
            raise ServiceUnavailable(
                f"the server is busy: the images of the requests in progress hold "
                f"{self.held / 1e6:.1f} of its {self.capacity / 1e6:g} decoded megapixels "
                "(--max-megapixels-in-flight); retry in a moment"
            )

    def _leave(self, place: tuple[int, asyncio.Future[None]]) -> None:
        self._waiting.remove(place)
        self._admit()  # the requests behind it may fit

    def _give_back(self, pixels: int) -> None:
        self.held -= pixels
        self._admit()

    def _admit(self) -> None:
        while self._waiting and self.held + self._waiting[0][0] <= self.capacity:
            pixels, turn = self._waiting.popleft()
            self.held += pixels
            turn.set_result(None)


async def refuse(
    headers: dict[bytes, bytes],
    receive: Callable,
    send: Callable,
    error: RequestError,
    extra_headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """Answer `error` as JSON `{"detail": ...}` and close the connection, the request's body
    read and discarded first (up to DRAIN_BYTES) so the client gets the reply."""
    # A client that asked "Expect: 100-continue" has sent no body and sends none after a
    # refusal; reading would tell the server to ask for it.
    if headers.get(b"expect", b"").lower() != b"100-continue":
        await drain(receive)
    await _answer(send, error, extra_headers)


async def _answer(
    send: Callable, error: RequestError, extra_headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    """Send `error` as JSON `{"detail": ...}`, closing the connection after it."""
    body = json.dumps({"detail": str(error)}).encode()
    response_headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
    response_headers += [(b"content-length", str(len(body)).encode()), *extra_headers]
    await send({"type": "http.response.start", "status": error.status, "headers": response_headers})
    await send({"type": "http.response.body", "body": body})


async def drain(receive: Callable) -> None:
    """Read and discard the rest of a request body, up to DRAIN_BYTES, or until the client
    stops sending it (BodyTimeout): the answer then closes the connection."""
    drained = 0
    try:
        while drained <= DRAIN_BYTES:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body"):
                return
            drained += len(message.get("body", b""))
    except RequestTimeout:
        return


# --------------------------------------------------------------------------- API key
_bearer = HTTPBearer(auto_error=False, description="the API key as a bearer token")
_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the API key")


def api_key_check(settings: ServeSettings, write: bool) -> Callable[..., Awaitable[None]]:
    """A dependency that lets a request through if it needs no key or sends the right one.

    A write that a browser says comes from another site's page is refused, key or not: a
    page can post a form to any address without asking (no CORS preflight), so without a key
    any web site the operator visits could add images to a server on their machine.
    """
    needed = settings.api_key is not None and (write or settings.protect_reads)

    async def check(
        request: Request,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        header: Annotated[str | None, Depends(_key_header)],
    ) -> None:
        if write:
            refuse_other_sites(request)
        if not needed:
            return
        given = header or (bearer.credentials if bearer else None)
        if not given:
            what = "changes to the gallery need" if write else "this server needs"
            raise Unauthorized(
                f"{what} the API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"
            )
        assert settings.api_key is not None
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise Forbidden("wrong API key")

    return check


def refuse_other_sites(request: Request) -> None:
    """Forbidden where a browser says the request comes from another site's page: its
    Sec-Fetch-Site, or where it sends none (Safari before 16.4, older browsers) its Origin,
    which every browser sends with a POST, PATCH or DELETE, unless it is this server's
    address (its Host). Clients that are not browsers send neither."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        if site in OTHER_SITES:
            raise Forbidden(OTHER_SITE_REFUSED)
        return
    origin = request.headers.get("origin")
    if origin is None:
        return
    host = request.headers.get("host", "").lower()
    scheme, _, netloc = origin.lower().partition("://")
    if scheme in DEFAULT_PORTS and netloc in (host, host.removesuffix(f":{DEFAULT_PORTS[scheme]}")):
        return
    raise Forbidden(
        f"{OTHER_SITE_REFUSED} (Origin {origin}, not this server's address, {host}; behind a "
        "reverse proxy, have it pass the Host header on, nginx's proxy_set_header Host "
        "$http_host, and allow that name with --allowed-host NAME)"
    )


async def query_as_declared(request: Request) -> None:
    """A dependency refusing a query parameter the route does not take, or one given more
    than once: FastAPI ignores the first, so a misspelt `?limt=5` gave the default page of
    200 images as if asked for it (the form's and JSON's unknown fields are refused too),
    and takes the last value of the second, so `DELETE /v1/gallery/label?label=a&label=b`
    removed b alone, as if asked to. The route's own parameters: its dependencies take none."""
    params = request.query_params
    takes = {field.alias for field in request.scope["route"].dependant.query_params}
    unknown = [key for key in params if key not in takes]
    if unknown:
        expected = ", ".join(f"'{name}'" for name in sorted(takes)) or "none"
        raise BadRequest(
            f"invalid query: unexpected parameter '{unknown[0]}' (this endpoint takes {expected})"
        )
    repeated = [key for key in params if len(params.getlist(key)) > 1]
    if repeated:
        raise BadRequest(f"invalid query: {repeated[0]}: given more than once; send one value")


# --------------------------------------------------------------------------- bodies
def media_type(request: Request) -> str:
    """The request's content type without parameters, lower case ('' when none is sent)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def validation_problems(errors: Iterable[Any], skip: int = 0) -> str:
    """Pydantic's validation errors as one line, `where: what; ...`; `skip` leading parts of
    each location (FastAPI's start with where the value came from: body, path, query)."""
    problems = []
    for error in errors:
        if error["type"] == "json_invalid":  # located at a character offset
            # FastAPI's message is "JSON decode error", the reason apart; Pydantic's has it
            message, reason = error["msg"], str(error.get("ctx", {}).get("error", ""))
            problems.append(f"body: {message}" + (f" ({reason})" if reason not in message else ""))
        else:
            problems.append(f"{'.'.join(map(str, error['loc'][skip:])) or 'body'}: {error['msg']}")
    return "; ".join(problems)


# --------------------------------------------------------------------------- uploads
@dataclass
class RawUploads:
    """Encoded images as sent (name, bytes) and the other form or JSON fields."""

    images: list[tuple[str, bytes]]
    fields: dict[str, str]


async def read_uploads(request: Request, schema: type[BaseModel], at_most: int) -> RawUploads:
    """Images from multipart/form-data (file fields named `image`) or JSON (`image` and/or
    `images` as base64, validated by `schema`); anything else is 415."""
    media = media_type(request)
    if media == "multipart/form-data":
        uploads = await _read_multipart(request, at_most, schema)
    elif media == "application/json":
        body = await request.body()
        uploads = await run_in_threadpool(_parse_json, body, schema, at_most)
    else:
        raise UnsupportedMediaType(
            f"unsupported content type '{media or 'none'}': send multipart/form-data with the "
            f"file in field '{IMAGE_FIELD}', or application/json with base64 '{IMAGE_FIELD}'"
        )
    if not uploads.images:
        if media == "application/json" and "images" in schema.model_fields:
            # `{"images": []}` was told that field 'image' was missing, as if 'images' were
            # not taken
            raise BadRequest(
                f"no image in the request: send '{IMAGE_FIELD}', or 'images' with at least one"
            )
        raise BadRequest(f"missing field '{IMAGE_FIELD}': no image in the request")
    return uploads


class _WholeBodyParser(MultiPartParser):
    """Starlette's multipart parser, which also says whether the body reached its closing
    boundary: without it, Starlette drops the part cut short and goes on, so a truncated
    upload lost its image silently ("missing field 'image'", or one image fewer). A text
    field that is not text in the body's charset (UTF-8 unless its Content-Type names
    another) is refused, naming it: Starlette read it as Latin-1 instead, so a label sent
    in a legacy encoding (GBK, Shift JIS) was stored garbled. An image sent as a text field
    (curl's `-F image=<photo.jpg` sends a file's bytes without a file name) is refused as
    such, not as text in another encoding."""

    complete = False

    def on_part_end(self) -> None:  # python-multipart's callback for the end of a part
        part = self._current_part  # Starlette's, as its own on_part_end reads it
        if part.file is None:
            if part.field_name == IMAGE_FIELD:
                raise BadRequest(IMAGE_AS_TEXT)
            try:
                part.data.decode(self._charset)
            except UnicodeDecodeError:
                raise BadRequest(
                    f"field '{part.field_name}' is not {self._charset.upper()} text: send text "
                    "fields as UTF-8"
                ) from None
        super().on_part_end()

    def on_end(self) -> None:  # python-multipart's callback for the closing boundary
        super().on_end()
        self.complete = True


async def _read_multipart(request: Request, at_most: int, schema: type[BaseModel]) -> RawUploads:
    """The form's images and its text fields: those of the JSON `schema` other than the
    images, each once. Others are refused, as in JSON: a field the endpoint does not take
    (a misspelt one, `k=3`) or a second value was silently dropped."""
    images: list[tuple[str, bytes]] = []
    fields: dict[str, str] = {}
    takes = [name for name in schema.model_fields if name not in (IMAGE_FIELD, "images")]
    expected = ", ".join(f"'{name}'" for name in [IMAGE_FIELD, *takes])
    try:
        async with aclosing(request.stream()) as stream:
            parser = _WholeBodyParser(
                request.headers, stream, max_files=at_most, max_fields=MAX_FORM_FIELDS
            )
            form = await parser.parse()
    except MultiPartException as exc:
        if exc.message.startswith(TOO_MANY_FILES):  # a valid body, not a malformed one
            raise BadRequest(f"too many images sent; at most {at_most} per request") from None
        if exc.message.startswith(TOO_MANY_FIELDS):
            raise BadRequest(
                f"too many form fields sent (over {MAX_FORM_FIELDS}); the form takes {expected}"
            ) from None
        raise BadRequest(f"malformed multipart body: {exc.message}") from None
    try:
        if not parser.complete:
            raise BadRequest(
                "truncated multipart body: it ends before its closing boundary, so its last "
                "part may be cut short; send the whole body"
            )
        for key, value in form.multi_items():
            if not isinstance(value, UploadFile):
                if key not in takes:
                    raise BadRequest(f"unexpected field '{key}': the form takes {expected}")
                if key in fields:
                    raise BadRequest(f"field '{key}' is given more than once")
                fields[key] = value
                continue
            if key != IMAGE_FIELD:
                raise BadRequest(f"unexpected file field '{key}': send images as '{IMAGE_FIELD}'")
            kind = (value.content_type or "").split(";")[0].strip().lower()
            name = value.filename or f"{IMAGE_FIELD} {len(images) + 1}"
            if not kind.startswith("image/") and kind not in GENERIC_FILE_TYPES:
                raise UnsupportedMediaType(f"{name}: the part is {kind}; upload an image file")
            images.append((name, await value.read()))
    finally:
        await form.close()
    return RawUploads(images, fields)


def _parse_json(body: bytes, schema: type[BaseModel], at_most: int) -> RawUploads:
    """The JSON body's images, decoded from base64, and its other fields. Run in a worker
    thread: a body of megabytes takes the event loop, which answers every request, from the
    others; and the images are counted before any is decoded (5 million empty strings in
    20 MB took seconds to decode, only to be refused). Read as Python's json (and so the
    routes FastAPI parses) reads it: UTF-8 with a BOM (PowerShell's), or UTF-16 or 32."""
    encoding = json.detect_encoding(body)
    try:
        document = body if encoding == "utf-8" else body.decode(encoding)
        parsed = schema.model_validate_json(document)
    except UnicodeDecodeError:
        raise BadRequest(f"invalid JSON body: not {encoding} text throughout") from None
    except ValidationError as exc:
        raise BadRequest(f"invalid JSON body: {validation_problems(exc.errors())}") from None
    data = parsed.model_dump()
    single = data.get("image")  # "": an empty image (as an empty file part), not none sent
    texts = ([] if single is None else [single]) + list(data.get("images") or [])
    if len(texts) > at_most:
        raise BadRequest(f"{len(texts)} images sent; at most {at_most} per request")
    images = [
        (f"image {number}", decode_base64(text, f"image {number}"))
        for number, text in enumerate(texts, start=1)
    ]
    fields = {k: v for k, v in data.items() if isinstance(v, str) and k != IMAGE_FIELD}
    return RawUploads(images, fields)
