"""`shitu serve`: the recognition pipeline and gallery editing over HTTP, with a web page."""

from __future__ import annotations

import argparse
import asyncio
import errno
import ipaddress
import json
import logging
import math
import os
import socket
import sys
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from shitu.cli.common import (
    bounded,
    count_of,
    given_output_path,
    port_number,
    positive_int,
    refuse_inside_gallery_sources,
)
from shitu.cli.recognize import (
    add_pipeline_arguments,
    naming_config_paths,
    pipeline_config_from_args,
)
from shitu.errors import ConfigError, ShituError
from shitu.serving.settings import (  # no web framework: the settings are plain values
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_MEGAPIXELS,
    DEFAULT_MAX_MEGAPIXELS_IN_FLIGHT,
    DEFAULT_MAX_REQUESTS,
    DEFAULT_MAX_UPLOAD_MB,
    DEFAULT_READ_TIMEOUT_S,
    MB,
    MIN_BODY_RATE,
    ServeSettings,
)

if TYPE_CHECKING:
    from uvicorn import Server

    from shitu.serving.library import SharedLibrary
    from shitu.serving.metrics import Metrics

logger = logging.getLogger(__name__)
API_KEY_ENV = "SHITU_API_KEY"
# How asyncio says that its listening socket could not accept a connection, and how often
# shitu says it at most.
ACCEPT_FAILED = "socket.accept() out of system resource"
ACCEPT_FAILURE_LOG_S = 60.0
# How much of a request's headers the server takes in while they have not ended (h11's
# default); more gets 431.
H11_MAX_HEADERS_KB = 16
# The smallest limits that let anything through: limits are applied in whole bytes and pixels.
megabytes = bounded(float, 1 / MB, None, "a number of MB above 0 (one byte or more)")
megapixels = bounded(float, 1e-6, None, "a number of megapixels above 0 (one pixel or more)")
seconds = bounded(float, 1e-3, None, "a number of seconds above 0 (a millisecond or more)")


def root_path(value: str) -> str:
    """A reverse proxy's prefix as FastAPI's docs need it: '/shitu', never '/shitu/'."""
    prefix = value.rstrip("/")
    if prefix and not prefix.startswith("/"):
        raise argparse.ArgumentTypeError(f"expected a URL path starting with '/', got {value}")
    return prefix


def listen_host(value: str) -> str:
    """A host name or address to listen on; an IPv6 address also in brackets, as URLs write
    it (`[::1]`), which the socket library took for a host name ("Name or service not
    known"). An empty one is refused: most often a variable that is not set (`--host
    "$HOST"`), with which the server listened on every interface, without the guard
    against DNS rebinding that loopback gets."""
    if not value.strip():
        raise argparse.ArgumentTypeError(
            "expected a host name or address (127.0.0.1, 0.0.0.0, ::), got an empty one (a "
            "variable that is not set?)"
        )
    if "://" in value:
        raise argparse.ArgumentTypeError(
            f"expected a host name or address (127.0.0.1, 0.0.0.0, ::), not a URL: {value}"
        )
    return value[1:-1] if value.startswith("[") and value.endswith("]") else value


def _host_name(value: str) -> str:
    """A host name as compared: in lower case, without the trailing dot of its fully
    qualified form (`shop.example.`, `LOCALHOST.`: the same names)."""
    return value.lower().removesuffix(".")


def allowed_host(value: str) -> str:
    """A host name as a Host header carries it, without a port, as `_host_name` compares it."""
    name = _host_name(value.strip())
    if not name or any(char in name for char in "/:[] "):
        raise argparse.ArgumentTypeError(
            f"expected a host name (shop.example), without a scheme, port or path: {value!r}"
        )
    return name


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve recognition and gallery editing over HTTP, with a web page",
        description=(
            "Loads the models and the gallery library once, then answers HTTP: POST "
            "/v1/recognize and /v1/extract, gallery endpoints under /v1/gallery, /healthz, "
            "/metrics (Prometheus), API docs at /docs, and a web page at / to recognise "
            "photos and browse and edit the gallery. Needs: pip install 'shitu[serve]'."
        ),
    )
    add_pipeline_arguments(parser)
    parser.add_argument(
        "--host",
        type=listen_host,
        default="127.0.0.1",
        help="address or host name to listen on (every interface: 0.0.0.0, or :: for IPv6 "
        "too); a name is listened on at its IPv4 address where it has one, else its IPv6 one",
    )
    parser.add_argument(
        "--port", type=port_number, default=8000, help="port (0: any free port; the URL is printed)"
    )
    parser.add_argument(
        "--api-key",
        help=f"key that gallery edits need (default: ${API_KEY_ENV}; none: no key needed)",
    )
    parser.add_argument(
        "--protect-reads",
        action="store_true",
        help="require the API key for every endpoint except /healthz, the page and the docs",
    )
    parser.add_argument(
        "--max-upload-mb",
        type=megabytes,
        default=DEFAULT_MAX_UPLOAD_MB,
        help=f"largest request body (default {DEFAULT_MAX_UPLOAD_MB:g})",
    )
    parser.add_argument(
        "--max-megapixels",
        type=megapixels,
        default=DEFAULT_MAX_MEGAPIXELS,
        help=f"largest image, in millions of pixels (default {DEFAULT_MAX_MEGAPIXELS:g}; at "
        "most --max-megapixels-in-flight and $SHITU_MAX_MEGAPIXELS); a request's images "
        "together may hold 4 times that, at most --max-megapixels-in-flight",
    )
    parser.add_argument(
        "--max-megapixels-in-flight",
        type=megapixels,
        default=DEFAULT_MAX_MEGAPIXELS_IN_FLIGHT,
        help="decoded pixels, in millions, that all requests in progress may hold together "
        f"(default {DEFAULT_MAX_MEGAPIXELS_IN_FLIGHT:g}, 3 bytes each); a request beyond it "
        "waits a few seconds, then gets 503, and one whose images alone hold more gets 413",
    )
    parser.add_argument(
        "--max-batch",
        type=positive_int,
        default=DEFAULT_MAX_BATCH,
        help="images of concurrent requests one model call may take "
        f"(default {DEFAULT_MAX_BATCH}; 1: no batching)",
    )
    parser.add_argument(
        "--upload-dir",
        type=given_output_path,
        help="where images added over HTTP are kept (default: GALLERY/uploads); not inside "
        "a folder the gallery's images came from, whose next scan would take them",
    )
    parser.add_argument(
        "--max-connections",
        type=positive_int,
        default=DEFAULT_MAX_REQUESTS,
        help="requests in progress beyond which requests get 503 (bounds the memory that "
        f"queued uploads take; default {DEFAULT_MAX_REQUESTS}); /healthz and /metrics are "
        "answered past it",
    )
    parser.add_argument(
        "--read-timeout",
        type=seconds,
        default=DEFAULT_READ_TIMEOUT_S,
        metavar="SECONDS",
        help="how long the server waits for a request's headers (then closes the connection), "
        f"and for its body, in all, plus a second for every {MIN_BODY_RATE} bytes that came "
        "(then answers 408 and closes it): a client that stops sending holds a connection "
        f"and a request slot no longer (default {DEFAULT_READ_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--root-path",
        type=root_path,
        default="",
        metavar="PREFIX",
        help="the path prefix a reverse proxy serves this server under (e.g. /shitu), which "
        "the proxy strips: for the API docs' links and the thumbnail paths the API gives "
        "(default: none, served at /)",
    )
    parser.add_argument(
        "--allowed-host",
        action="append",
        type=allowed_host,
        default=[],
        metavar="NAME",
        help="a host name requests may be addressed to besides localhost, IP addresses and "
        "the name --host gives (repeatable): the name a reverse proxy passes on as Host. "
        "Where the server listens on loopback (the default) or this is given, requests "
        "addressed to other names are "
        "refused, as a web page's would be after pointing its name at this machine (DNS "
        "rebinding)",
    )
    parser.add_argument("--access-log", action="store_true", help="log every request")
    parser.set_defaults(func=run)


def _listen(host: str, port: int) -> socket.socket:
    """Bind before loading anything slow, so a taken port fails at once and port 0 works.
    `host` is bound at the address it resolves to (`_listen_address`)."""
    try:
        family, address = _listen_address(host, port)
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:  # a name no address answers to, or a family the system lacks
        raise ShituError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ShituError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    return sock


def _listen_address(host: str, port: int) -> tuple[socket.AddressFamily, tuple[Any, ...]]:
    """The family and socket address `host` resolves to: its first IPv4 address where it
    has one (a name with both, such as `localhost` on most systems, listens on IPv4 as
    before), else the first the resolver gives. A name was taken for IPv4 unless it held a
    colon, so one that resolves to IPv6 only (Debian's `ip6-localhost`, ::1) could not be
    listened on."""
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, _, _, _, address = next(
        (entry for entry in found if entry[0] == socket.AF_INET), found[0]
    )
    return family, address


def _is_loopback(sock: socket.socket) -> bool:
    """Whether the listening socket is bound to a loopback address: judged by the address
    that --host resolved to, not by its name, which took only `localhost` for loopback. A
    name the resolver maps to loopback (the machine's own in /etc/hosts, Debian's
    127.0.1.1; `shop.localhost` where systemd-resolved answers for `*.localhost`) had no
    guard against DNS rebinding, and a needless warning to set an API key; and a name that
    is loopback by its form but resolves elsewhere must keep that warning. An IPv4 address
    mapped into IPv6 (`::ffff:127.0.0.1`) is the IPv4 address."""
    address = ipaddress.ip_address(sock.getsockname()[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _server_that_stops_waiting(server: type[Server], library: SharedLibrary) -> type[Server]:
    """uvicorn's Server, whose shutdown first has the library's edits stop waiting for
    another process's write: uvicorn waits for the requests under way (up to its grace
    period) before anything else, and an edit may wait a minute. Its event loop says that
    connections cannot be accepted in brief (`_accept_failures_in_brief`)."""

    class StoppingServer(server):  # type: ignore[misc,valid-type]
        async def serve(self, sockets: list[socket.socket] | None = None) -> None:
            asyncio.get_running_loop().set_exception_handler(_accept_failures_in_brief())
            await super().serve(sockets)

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            library.stop_waiting()
            await super().shutdown(sockets)

    return StoppingServer


def _accept_failures_in_brief() -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
    """An event loop's exception handler that says in one line, at most once every
    ACCEPT_FAILURE_LOG_S, that connections cannot be accepted (the process is out of file
    descriptors, say): asyncio logged a traceback for each try, up to uvicorn's backlog
    (2048) of them a second, megabytes of log in seconds. It tries again each second, and
    the connections wait meanwhile. Anything else goes to the loop's default handler."""
    said_at = -math.inf

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        nonlocal said_at
        error = context.get("exception")
        if context.get("message") != ACCEPT_FAILED or not isinstance(error, OSError):
            loop.default_exception_handler(context)
            return
        if loop.time() - said_at < ACCEPT_FAILURE_LOG_S:
            return
        said_at = loop.time()
        out_of_files = error.errno in (errno.EMFILE, errno.ENFILE)
        logger.warning(
            "new connections wait: they cannot be accepted (%s)%s",
            error.strerror,
            "; raise the limit on open files (ulimit -n)" if out_of_files else "",
        )

    return handle


def _http_protocol(timeout_s: float, metrics: Metrics) -> type:
    """uvicorn's HTTP/1.1 protocol, which closes a connection whose request headers have not
    come whole `timeout_s` after it opened or its last answer went out: uvicorn waits for
    them for ever, so a client that opened connections and sent nothing, or half a request
    line, held each open (a file descriptor, and the memory of its buffer) for good. The body
    is BodyTimeout's to time. A request that is not valid HTTP (no Host, a Content-Length
    that is no number, headers too large) is answered as JSON naming the problem, with the
    status h11 gives it, as every other error is: uvicorn's was a plain-text 400, "Invalid
    HTTP request received.". Both are counted in `metrics` as the app's answers are (the
    app never sees them): a request begun and dropped as a 408, the status nginx logs for
    it; a chunked body found malformed once the app has its request is counted once, by the
    app, as the 400 (it was also counted as a 499, the app taking the closing for the client
    leaving). The h11 protocol is uvicorn's own where httptools is missing."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from shitu.serving.metrics import ANSWERED_BELOW

    class Http11(H11Protocol):
        waiting: asyncio.TimerHandle | None = None
        malformed: h11.RemoteProtocolError | None = None  # why the request was not HTTP

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            next_event = self.conn.next_event

            def noting_why() -> Any:  # uvicorn drops h11's reason
                try:
                    event = next_event()
                    if isinstance(event, h11.Request):
                        _refuse_other_versions(event)
                except h11.RemoteProtocolError as exc:
                    self.malformed = exc
                    raise
                return _origin_form(event) if isinstance(event, h11.Request) else event

            self.conn.next_event = noting_why  # type: ignore[method-assign]

        def send_400_response(self, msg: str) -> None:
            status = self.malformed.error_status_hint if self.malformed else 400
            detail = (
                f"the request's headers are too large: {H11_MAX_HEADERS_KB} KB came and they "
                "had not ended"
                if status == 431
                else f"invalid HTTP request: {self.malformed or msg}"
            )
            body = json.dumps({"detail": detail}).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ]
            running = self.cycle is not None and not self.cycle.response_complete
            # An answer begun or given (a body sent on after a 404) leaves nothing to answer:
            # the connection is closed, and the request was counted as the app answered it.
            if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                for event in (
                    h11.Response(
                        status_code=status, headers=headers, reason=HTTPStatus(status).phrase
                    ),
                    h11.Data(data=body),
                    h11.EndOfMessage(),
                ):
                    self.transport.write(self.conn.send(event))
                if running:  # the app, reading the body, counts it (once) as this answer
                    self.cycle.scope[ANSWERED_BELOW] = status
                else:
                    metrics.count_unrouted(status)
            self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._wait_for_headers()

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request's headers came whole
                self._stop_waiting()

        def on_response_complete(self) -> None:
            self._wait_for_headers()  # before: a pipelined request may start in it
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_waiting()
            super().connection_lost(exc)

        def _wait_for_headers(self) -> None:
            self._stop_waiting()
            self.waiting = self.loop.call_later(timeout_s, self._drop)

        def _stop_waiting(self) -> None:
            if self.waiting is not None:
                self.waiting.cancel()
                self.waiting = None

        def _drop(self) -> None:
            self.waiting = None
            if not self.transport.is_closing():
                self.transport.close()
                # Part of a request's headers came, not none; not the rest of a body sent on
                # after its answer (a 404 given before it was read), counted as that answer.
                if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
                    metrics.count_unrouted(HTTPStatus.REQUEST_TIMEOUT)

    def _refuse_other_versions(request: h11.Request) -> None:
        """A RemoteProtocolError (505) for a request of an HTTP version other than 1.x, which
        h11 reads as one: an HTTP/2 client without TLS (a proxy told the backend speaks it)
        opens with `PRI * HTTP/2.0`, which was answered 404 "nothing is served at /*"."""
        if request.http_version not in (b"1.0", b"1.1"):
            version = request.http_version.decode("ascii")
            raise h11.RemoteProtocolError(
                f"HTTP/{version} is not served: this server speaks HTTP/1.1 (have the client "
                "or proxy use it)",
                error_status_hint=HTTPStatus.HTTP_VERSION_NOT_SUPPORTED,
            )

    def _origin_form(request: h11.Request) -> h11.Request:
        """A request whose target is a whole URL (`GET http://HOST/healthz`, as clients send
        them to a proxy) as the same request for its path, addressed (its Host) to the URL's
        host, as RFC 9112 has a server take it: uvicorn took the URL for the path, and
        answered 404 "nothing is served at /http://HOST/healthz"."""
        try:
            target = urlsplit(request.target.decode("ascii"))
        except ValueError:  # an unclosed '[': no URL, left to answer 404 as a path
            return request
        if not (target.scheme and target.netloc):
            return request
        path = (target.path or "/") + (f"?{target.query}" if target.query else "")
        host = target.netloc.rpartition("@")[2]  # without a user name and password
        headers = [(name, value) for name, value in request.headers if name != b"host"]
        return h11.Request(
            method=request.method,
            target=path.encode("ascii"),
            headers=[(b"host", host.encode("ascii")), *headers],
            http_version=request.http_version,
        )

    return Http11


def _api_key(given: str | None) -> str | None:
    """The key of --api-key, else of $SHITU_API_KEY (set but empty: none). An empty
    --api-key is refused: most often a variable that is not set (`--api-key "$KEY"`), with
    which the server took edits from anyone, without a word where it listens on loopback."""
    if given is None:
        return os.environ.get(API_KEY_ENV) or None
    if not given:
        raise ConfigError(
            "--api-key is empty (a variable that is not set?): give the key, or leave the "
            f"option out (and ${API_KEY_ENV} unset) to serve without one"
        )
    return given


def _refuse_uploads_among_gallery_sources(upload_dir: Path, library: Path) -> None:
    """Refuse an --upload-dir inside a folder the library's images came from: a later
    `shitu index add` or build of that folder would take the images added over HTTP for
    gallery photos (of a label named after the upload folder). One inside the library's
    own folder (the default, GALLERY/uploads) is the library's: nothing scans it. Read
    from the library's database alone, before the models load."""
    from shitu.index import Catalog

    if upload_dir.resolve().is_relative_to(library.resolve()):
        return
    with Catalog(library) as catalog:
        refuse_inside_gallery_sources(
            upload_dir, "--upload-dir", catalog, "the images added over HTTP"
        )


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from shitu.serving.app import create_app
        from shitu.serving.metrics import Metrics
        from shitu.serving.service import RecognitionService
    except ImportError as exc:
        raise ShituError(
            f"shitu serve needs the serve extra ({exc.name} is missing): pip install 'shitu[serve]'"
        ) from None
    key = _api_key(args.api_key)
    if args.protect_reads and not key:
        raise ConfigError(f"--protect-reads needs an API key (--api-key or ${API_KEY_ENV})")
    if key and not (key.isascii() and key.isprintable() and key == key.strip()):
        raise ConfigError(
            "the API key must be printable ASCII without leading or trailing spaces: HTTP "
            "headers carry nothing else reliably"
        )
    config = pipeline_config_from_args(args)
    library = config.IndexProcess.index_dir
    if not library:
        raise ConfigError("give the gallery library to serve with --gallery")
    upload_dir = args.upload_dir or Path(library) / "uploads"
    with naming_config_paths(args, config):
        _refuse_uploads_among_gallery_sources(upload_dir, Path(library))
    sock = _listen(args.host, args.port)
    metrics = Metrics()
    try:
        settings = ServeSettings(
            upload_dir=upload_dir,
            max_upload_mb=args.max_upload_mb,
            max_pixels=int(args.max_megapixels * 1_000_000),
            max_pixels_in_flight=int(args.max_megapixels_in_flight * 1_000_000),
            api_key=key,
            protect_reads=args.protect_reads,
            max_batch=args.max_batch,
            max_requests=args.max_connections,
            read_timeout_s=args.read_timeout,
            # On loopback only this machine's clients are meant: a name other than localhost
            # and the one --host gives is a proxy's, allowed by name, or a rebinding page's.
            allowed_hosts=frozenset([*args.allowed_host, _host_name(args.host)])
            if args.allowed_host or _is_loopback(sock)
            else None,
        )
        with naming_config_paths(args, config):
            service = RecognitionService(config, settings, metrics.observe_batch)
    except BaseException:
        sock.close()
        raise
    # The app's shutdown closes the service; this covers a failure before it starts.
    with service:
        app = create_app(service, metrics)
        host, port = sock.getsockname()[:2]
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        snapshot = service.library.snapshot
        # Under --root-path the docs page asks for PREFIX/openapi.json: found through the
        # proxy only.
        docs = f"{args.root_path}/docs through the proxy" if args.root_path else f"{url}/docs"
        print(
            f"serving {library} ({count_of(len(snapshot.by_id), 'image')}, "
            f"{count_of(len(snapshot.by_label), 'label')}) at {url}  (web page: {url}/, "
            f"API docs: {docs})",
            flush=True,
        )
        if not snapshot.by_id:  # else every photo's answer is a silent "nothing"
            print(
                f"warning: {library} holds no images: nothing can be recognised until some are "
                "added (on the web page, or POST /v1/gallery/images)",
                file=sys.stderr,
            )
        if not settings.api_key and not _is_loopback(sock):
            print(
                f"warning: listening on {args.host} without an API key: anyone who can reach it "
                "can edit the gallery (set --api-key)",
                file=sys.stderr,
            )
        verbose = logging.getLogger().isEnabledFor(logging.INFO)
        config = uvicorn.Config(
            app,
            # its records go to shitu's handler: "warning: ...", as every command's
            log_config=None,
            log_level="info" if verbose else "warning",
            access_log=args.access_log,
            root_path=args.root_path,
            timeout_graceful_shutdown=10,
            http=_http_protocol(settings.read_timeout_s, metrics),
            h11_max_incomplete_event_size=H11_MAX_HEADERS_KB * 1024,
        )
        if args.access_log:  # uvicorn gives its access log the log level: "warning" would drop it
            logging.getLogger("uvicorn.access").setLevel(logging.INFO)
        server = _server_that_stops_waiting(uvicorn.Server, service.library)(config)
        server.run(sockets=[sock])
        return 0
