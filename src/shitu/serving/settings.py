"""What an operator can set about the server, apart from the recognition pipeline itself."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shitu.errors import ConfigError

MB = 1 << 20
DEFAULT_MAX_UPLOAD_MB = 20.0
DEFAULT_MAX_MEGAPIXELS = 50.0
# Decoded pixels all requests in progress may hold together: two requests at their own
# limit (4 x 50 megapixels), 1.2 GB as 8-bit RGB.
DEFAULT_MAX_MEGAPIXELS_IN_FLIGHT = 400.0
# All images of one request together: at most 4 times the per-image limit.
REQUEST_PIXELS_FACTOR = 4
DEFAULT_MAX_BATCH = 8
MAX_IMAGES_PER_REQUEST = 32
DEFAULT_MAX_REQUESTS = 64
# How long, in seconds, the server waits in all for a request's body to arrive (beyond it, a
# second more for every MIN_BODY_RATE bytes that came) before answering 408: a client that
# declared a body and sent nothing held its request's slot (--max-connections) for ever.
# `shitu serve` waits as long for a request's headers before it closes the connection.
DEFAULT_READ_TIMEOUT_S = 30.0
# Bytes a second that a body must arrive at, past the read timeout (Apache's mod_reqtimeout
# MinRate default): one trickled a byte at a time runs out, a slow link's upload does not.
MIN_BODY_RATE = 500


@dataclass(frozen=True)
class ServeSettings:
    """Request limits, access control and batching.

    api_key: when set, every write (gallery edits) needs it; with `protect_reads` also
    every read (recognise, extract, gallery listing, thumbnails, metrics). `/healthz`,
    the web page and the API docs never need it: they hold no data.
    upload_dir: where images added over HTTP are kept (the gallery stores their path).
    max_upload_mb: the largest request body, as the operator gave it, for the 413 message
    (0.3 is 314572.8 bytes: converted back, the byte limit would read 0.299999 MB).
    max_batch: images one model call may take from concurrent requests (1: no batching).
    max_requests: requests in progress beyond which a request gets 503 (--max-connections:
    each may hold an upload, so this bounds the memory they take).
    max_pixels_in_flight: decoded pixels that the requests in progress may hold together
    (--max-megapixels-in-flight): a request that does not fit waits briefly, then gets 503.
    read_timeout_s: how long the server waits for a request body to arrive, in all, plus a
    second for every MIN_BODY_RATE bytes that came (--read-timeout); a client past it gets
    408 and its connection is closed.
    allowed_hosts: None, requests addressed to any host; else only those addressed to an
    IP address, localhost (or a name under .localhost) or one of these names, as a server
    on loopback must: a web page whose name its DNS then points at 127.0.0.1 (DNS
    rebinding) is the browser's same origin as the server, and would read and edit the
    gallery, Sec-Fetch-Site and Origin notwithstanding.

    A largest image (max_pixels) over what shitu decodes ($SHITU_MAX_MEGAPIXELS) or over
    max_pixels_in_flight is a ConfigError: images between the limits would pass the
    header check and then never be decoded (refused as corrupt, or 413 as too many pixels
    together), and /healthz would tell clients a limit the server does not keep.
    """

    upload_dir: Path
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB
    max_pixels: int = int(DEFAULT_MAX_MEGAPIXELS * 1_000_000)
    max_images_per_request: int = MAX_IMAGES_PER_REQUEST
    api_key: str | None = None
    protect_reads: bool = False
    max_batch: int = DEFAULT_MAX_BATCH
    max_requests: int = DEFAULT_MAX_REQUESTS
    max_pixels_in_flight: int = int(DEFAULT_MAX_MEGAPIXELS_IN_FLIGHT * 1_000_000)
    allowed_hosts: frozenset[str] | None = None
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S

    def __post_init__(self) -> None:
        # imported here: the CLI's parser imports these settings, and must not import OpenCV
        from shitu.data.transforms.ops import MAX_MEGAPIXELS_VARIABLE, max_image_pixels

        largest = f"--max-megapixels {self.max_pixels / 1e6:g} (max_pixels)"
        decodable = max_image_pixels()
        if self.max_pixels > decodable:
            raise ConfigError(
                f"{largest} is over the {decodable / 1e6:g} megapixels shitu decodes; set "
                f"{MAX_MEGAPIXELS_VARIABLE} to at least that too"
            )
        if self.max_pixels > self.max_pixels_in_flight:
            raise ConfigError(
                f"{largest} is over --max-megapixels-in-flight "
                f"{self.max_pixels_in_flight / 1e6:g} (max_pixels_in_flight), which every "
                "request's images must fit in: lower the one or raise the other"
            )

    @property
    def max_pixels_per_request(self) -> int:
        """What the images of one request may hold together: REQUEST_PIXELS_FACTOR times the
        largest image, within the budget all requests share."""
        return min(REQUEST_PIXELS_FACTOR * self.max_pixels, self.max_pixels_in_flight)

    @property
    def max_upload_bytes(self) -> int:
        """The largest body within max_upload_mb: bodies are whole bytes."""
        return int(self.max_upload_mb * MB)
