"""Uploaded bytes -> RGB arrays, with the limits checked before anything is decoded.

Decoding is `shitu.inference.preprocess.decode_rgb`, the decoder of files too, so an upload
gives the same features as the same file given to `shitu recognize` or `shitu index add`.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from shitu.data.transforms.ops import pixel_format_refusal, to_rgb8
from shitu.fileio import open_regular_file
from shitu.image_files import iso_media_kind
from shitu.inference.preprocess import UnreadableImageError, decode_rgb
from shitu.serving.errors import BadRequest, NotFound, PayloadTooLarge, UnsupportedMediaType

THUMBNAIL_QUALITY = 85
# The formats an upload may be in (Pillow's names), with the suffix its kept file gets: those
# shitu finds in folders, and GIF. Pillow reads dozens more (AVIF, PPM, DDS, PSD, ...): kept
# as `.img` files that no tool (nor `shitu index build` on the folder) took for images, and
# each one more decoder that any client could reach.
SUFFIXES = {
    "JPEG": ".jpg",
    "MPO": ".jpg",  # many cameras' JPEGs (with a preview image)
    "PNG": ".png",
    "WEBP": ".webp",
    "BMP": ".bmp",
    "TIFF": ".tif",
    "GIF": ".gif",
}
EXPECTED = "expected JPEG, PNG, WebP, BMP, TIFF or GIF"


def check_pixels(width: int, height: int, max_pixels: int, name: str = "image") -> None:
    """PayloadTooLarge, its message starting with `name` as the other upload errors do."""
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"{name}: {width}x{height} pixels ({width * height / 1e6:.1f} megapixels); "
            f"the limit is {max_pixels / 1e6:g} megapixels"
        )


@dataclass(frozen=True)
class ImageHeader:
    """What an upload's header says, read before any pixel is decoded."""

    width: int
    height: int
    kind: str  # the format's name, for messages

    @property
    def pixels(self) -> int:
        return self.width * self.height


def read_header(data: bytes, max_pixels: int, name: str = "image") -> ImageHeader:
    """The image's size and format from its header alone, within the pixel limit: what
    decoding it will take is known before it starts. Raises BadRequest,
    UnsupportedMediaType (a format not in SUFFIXES) or PayloadTooLarge."""
    if not data:
        raise BadRequest(f"{name}: the upload is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
            kind = header.format or "image"
    except (UnidentifiedImageError, OSError, ValueError):
        kind = iso_media_kind(data)
        if kind is None:
            refusal = pixel_format_refusal(data)  # an image all the same: float32 RGB TIFF
            if refusal is not None:
                raise UnsupportedMediaType(f"{name}: {refusal}") from None
            raise BadRequest(
                f"{name}: not an image file ({EXPECTED}; got {len(data)} bytes starting "
                f"{data[:8]!r})"
            ) from None
    if kind not in SUFFIXES:
        raise UnsupportedMediaType(f"{name}: {kind} images are not accepted ({EXPECTED})")
    check_pixels(width, height, max_pixels, name)
    return ImageHeader(width, height, kind)


def decode_image(data: bytes, header: ImageHeader, name: str = "image") -> np.ndarray:
    """Encoded image bytes, whose header `read_header` checked -> RGB uint8 HxWx3. Raises
    BadRequest for a corrupt image."""
    try:
        return decode_rgb(data)
    except UnreadableImageError as exc:
        raise BadRequest(f"{name}: corrupt {header.kind} image ({exc})") from None


def decode_base64(text: str, name: str) -> bytes:
    """Base64 (plain, or a `data:image/...;base64,` URL) -> bytes. Whitespace is left out:
    `base64 photo.jpg` and MIME encoders wrap lines at 76 characters."""
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.lower().endswith(";base64"):  # RFC 2397: case-insensitive
            raise BadRequest(f"{name}: a data URL must be base64-encoded")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{name}: not valid base64") from None


@contextmanager
def _drafted(path: str, size: int, max_pixels: int) -> Iterator[Image.Image]:
    """A stored gallery image, opened to decode at the smallest scale a size x size thumbnail
    needs (JPEG: a reduced scale); NotFound, with the reason, for a file that is missing,
    cannot be read, is no file (a FIFO, whose opening waited for a writer, holding one of the
    server's worker threads for good), or is too large to decode (the pixel limit applies to
    what is decoded)."""
    try:
        with open_regular_file(path, "an image file") as file, Image.open(file) as image:
            image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster
            if image.size[0] * image.size[1] > max_pixels:
                raise NotFound(
                    f"no preview: the image is {image.size[0]}x{image.size[1]}, over the "
                    f"server's {max_pixels / 1e6:g} megapixel limit"
                )
            yield image
    except FileNotFoundError:
        raise NotFound(f"the image file is missing from the server ({path})") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise NotFound(f"the image file cannot be read ({exc})") from None


def thumbnail_pixels(path: str, size: int, max_pixels: int) -> int:
    """The pixels `thumbnail_jpeg` decodes for this image and size, from its header."""
    with _drafted(path, size, max_pixels) as image:
        return image.size[0] * image.size[1]


def thumbnail_jpeg(path: str, size: int, max_pixels: int) -> bytes:
    """A stored gallery image shrunk to fit size x size, as JPEG bytes: a large JPEG decodes
    at a reduced scale and passes; a stored image too large to decode has no preview (404)."""
    with _drafted(path, size, max_pixels) as image:
        small = to_rgb8(ImageOps.exif_transpose(image))
    small.thumbnail((size, size), Image.BILINEAR)
    out = io.BytesIO()
    small.save(out, "JPEG", quality=THUMBNAIL_QUALITY)
    return out.getvalue()
