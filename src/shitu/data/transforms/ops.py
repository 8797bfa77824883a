"""Image ops under PaddleClas's names and parameters, in Pillow, numpy and torch.

Each op takes and returns an HWC uint8 numpy array (OpenCV's layout, which the
PaddleClas ops use) except where noted: `DecodeImage` turns file bytes into one,
`NormalizeImage` turns it into float32, `ToCHWImage` transposes. Random draws use
torch's generator (see `_base`), so a seeded run augments identically.
"""

from __future__ import annotations

import io
import math
import os
import struct
import warnings
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
from PIL import Image, ImageEnhance, ImageOps, UnidentifiedImageError

from shitu.data.transforms._base import (
    ImageSizeError,
    Stage,
    Transform,
    coin,
    from_pil,
    interpolation_name,
    pair,
    pil_filter,
    rand_int,
    rand_uniform,
    resize,
    to_pil,
)
from shitu.errors import ConfigError, DataError
from shitu.image_files import TEXT_FILE_REASON, TEXT_PROBE_BYTES, is_text, iso_media_kind
from shitu.registry import TRANSFORMS

Backend = Literal["cv2", "pil"]
Interpolation = str | int | None


class UnreadableImageError(DataError):
    """The bytes are not a decodable image (corrupt, truncated or an unsupported format),
    or one of a size the pipeline cannot take (see `ImageSizeError`)."""


MAX_MEGAPIXELS_VARIABLE = "SHITU_MAX_MEGAPIXELS"
# Above the largest photos (200-megapixel phone cameras), far below OpenCV's own limit (2^30
# pixels: 3 GB of RGB, from a PNG of one colour that takes 3.1 MB as Pillow saves it,
# `Image.new("RGB", (32768, 32768)).save(path)`); 750 MB decoded at most.
DEFAULT_MAX_MEGAPIXELS = 250
# shitu's limit, checked from the header before OpenCV or Pillow decode anything, takes the
# place of Pillow's decompression-bomb check: that one refuses from 179 megapixels (twice
# PIL.Image.MAX_IMAGE_PIXELS, as Image.open reads the header), which would refuse a 200 MP
# photo to training and to the Pillow-decoded formats while OpenCV decodes it for inference.
Image.MAX_IMAGE_PIXELS = None
# Pillow warns of EXIF (TIFF-tag) data it cannot read, "Possibly corrupt EXIF data" and the
# like, from its own source line, once per run and naming no file: harmless, as the pixels
# decode in full and only those tags are skipped, and such photos are common in
# large photo collections (ImageNet's), so not shown.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin")


def max_image_pixels() -> int:
    """The most pixels an image may have for shitu to decode it, or to resize one to:
    $SHITU_MAX_MEGAPIXELS million (default 250), read at each call."""
    text = os.environ.get(MAX_MEGAPIXELS_VARIABLE, "").strip()
    if not text:
        return DEFAULT_MAX_MEGAPIXELS * 1_000_000
    try:
        megapixels = float(text)
    except ValueError:
        megapixels = math.nan
    if not (math.isfinite(megapixels) and megapixels > 0):
        raise ConfigError(
            f"{MAX_MEGAPIXELS_VARIABLE}={text!r}: expected the pixel limit in megapixels, "
            "a number above 0"
        )
    return int(megapixels * 1_000_000)


def check_image_size(width: int, height: int) -> None:
    """UnreadableImageError for an image over `max_image_pixels`, from the size its header
    declares: a PNG of one colour, 2.6 MB on disk, decodes to 2.7 GB (30000 x 30000)."""
    limit = max_image_pixels()
    if width * height > limit:
        raise UnreadableImageError(
            f"image {width}x{height} is {round(width * height / 1e6, 1):g} megapixels, over the "
            f"limit of {limit / 1e6:g} megapixels ({MAX_MEGAPIXELS_VARIABLE} raises it); "
            "not decoded"
        )


def check_encoded_size(data: bytes) -> None:
    """`check_image_size` from the header of encoded image bytes, before any decoder runs.
    Bytes Pillow cannot identify are left to the decoder, which says why it cannot read them."""
    try:
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
    except (UnidentifiedImageError, OSError, ValueError):
        return
    check_image_size(width, height)


def image_list(images: Iterable[np.ndarray]) -> Sequence[np.ndarray]:
    """`images` as a sequence of images (a generator's listed); one image passed alone is
    refused with the reason (iterating an array would take its rows for images). An
    N x H x W x 3 stack is a sequence of N images. A path or encoded bytes, sequences of
    characters or numbers, are refused too, not taken one character or byte an image."""
    if isinstance(images, np.ndarray) and images.ndim in (2, 3):  # a grey one, or colour
        raise UnreadableImageError(
            f"expected a sequence of images, got one image array {images.shape}: pass [image]"
        )
    if isinstance(images, str | os.PathLike):
        raise UnreadableImageError(
            f"expected a sequence of images, got the path {os.fspath(images)!r}: "
            "shitu.inference.read_rgb(path) reads the image"
        )
    if isinstance(images, bytes | bytearray | memoryview):
        raise UnreadableImageError(
            f"expected a sequence of images, got {type(images).__name__}: "
            "shitu.inference.decode_rgb(data) decodes an encoded image"
        )
    if isinstance(images, np.ndarray | Sequence):
        return images
    if not isinstance(images, Iterable):  # a Pillow image, say
        raise UnreadableImageError(
            f"expected a sequence of images, got one {type(images).__name__}: pass [image]"
        )
    return list(images)


def check_rgb_image(image: object) -> np.ndarray:
    """`image` if it is what the models take, an RGB uint8 HxWx3 numpy array with pixels;
    else an UnreadableImageError that says what it is instead."""
    if not isinstance(image, np.ndarray):
        raise UnreadableImageError(
            f"expected an RGB uint8 HxWx3 numpy array, got {type(image).__name__}"
            f"{_not_array_hint(image)}"
        )
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise UnreadableImageError(
            f"expected an RGB uint8 HxWx3 image, got {image.dtype} {image.shape}{_rgb_hint(image)}"
        )
    if not image.shape[0] or not image.shape[1]:
        raise UnreadableImageError(f"the image is empty ({image.shape[1]}x{image.shape[0]} pixels)")
    return image


def _not_array_hint(image: object) -> str:
    """How to make an RGB array of what callers most often pass instead: a Pillow image, a
    file path, a file's bytes (read as the command line reads files: upright, alpha on white)."""
    if hasattr(image, "convert"):
        return " (np.asarray(image.convert('RGB')) gives one)"
    if isinstance(image, str | os.PathLike):
        return " (an image file: shitu.inference.read_rgb(path) reads one)"
    if isinstance(image, bytes | bytearray | memoryview):
        return " (an encoded image: shitu.inference.decode_rgb(data) decodes one)"
    return ""


def _rgb_hint(image: np.ndarray) -> str:
    """How to make an RGB array of the arrays callers most often have instead (grey, RGBA,
    float or 16-bit pixels), as `_not_array_hint` says for other objects."""
    if image.dtype.kind == "f":  # 0..1 or 0..255: only the caller knows which
        return (
            " (float: pixels are uint8 0..255; of 0..1: (image * 255).round().astype(np.uint8),"
            " of 0..255: image.round().astype(np.uint8))"
        )
    if image.dtype == np.uint16:  # a 16-bit PNG or TIFF as OpenCV reads it unchanged
        return " (16-bit: pixels are uint8 0..255; of 0..65535: (image >> 8).astype(np.uint8))"
    if image.dtype.kind in "iu" and image.dtype != np.uint8:  # np.array of Python ints, say
        return f" ({image.dtype}: pixels are uint8 0..255; of 0..255: image.astype(np.uint8))"
    if image.dtype != np.uint8:
        return ""
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        return " (grey: np.dstack([image] * 3) makes it RGB)"
    if image.ndim == 3 and image.shape[2] == 4:
        return " (RGBA: image[:, :, :3] drops the alpha)"
    if image.ndim == 3 and image.shape[0] == 3:  # a tensor's layout, CxHxW
        return " (channels first: image.transpose(1, 2, 0) makes it HxWx3)"
    if image.ndim == 4 and image.shape[0] == 1 and image.shape[3] == 3:
        return " (a batch of one: image[0] is the image)"
    return ""


@TRANSFORMS.register("DecodeImage")
class DecodeImage(Transform):
    """File bytes -> HWC uint8 RGB array (BGR with `to_rgb: false`, like OpenCV).

    EXIF orientation is applied, as `cv2.imdecode` does. Grey, palette, CMYK and
    alpha images become 3-channel. Already-decoded input (a PIL image or an
    array) is accepted too, so the same pipeline serves in-memory images.
    `to_np` is accepted for PaddleClas configs and has no effect.
    """

    def __init__(self, to_rgb: bool = True, channel_first: bool = False, to_np: bool = False):
        self.to_rgb = to_rgb
        self.channel_first = channel_first

    def plan(self, stage: Stage) -> Stage:
        if stage.decoded:
            raise ValueError("the image is already decoded; DecodeImage must come first, once")
        return stage.with_(decoded=True, layout="chw" if self.channel_first else "hwc")

    def __call__(self, data: bytes | Image.Image | np.ndarray) -> np.ndarray:
        if isinstance(data, np.ndarray):  # RGB(A), grey or 16-bit grey, as Pillow reads them
            try:
                image = Image.fromarray(data)
            except (TypeError, ValueError) as exc:
                raise UnreadableImageError(
                    f"cannot use a {data.dtype} array of shape {data.shape} as an image ({exc})"
                ) from None
        else:
            image = data if isinstance(data, Image.Image) else _decode(data)
        array = np.asarray(to_rgb8(image))
        if not self.to_rgb:
            array = array[:, :, ::-1]
        if self.channel_first:
            array = array.transpose(2, 0, 1)
        return array


def to_rgb8(image: Image.Image) -> Image.Image:
    """8-bit RGB. Pillow converts 16-bit and 32-bit grey by clipping at 255 (nearly all
    white): 16-bit grey keeps its top 8 bits instead, as OpenCV (PaddleClas's decoder)
    does, and 32-bit integer and float grey are scaled by `grey_levels`. Transparent
    parts are shown on white (see `on_white`), a 16-bit grey PNG's transparent level (its
    tRNS) too: told apart by all 16 bits, as levels that share their top 8 may not be."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        levels, transparent = np.asarray(image), image.info.get("transparency")
        image = Image.fromarray((levels >> 8).astype(np.uint8))
        if isinstance(transparent, int):
            alpha = Image.fromarray(np.where(levels == transparent, 0, 255).astype(np.uint8))
            return on_white(Image.merge("LA", (image, alpha)))
    elif image.mode in ("I", "F"):
        image = Image.fromarray(grey_levels(np.asarray(image)))
    elif image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        return on_white(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def grey_levels(values: np.ndarray) -> np.ndarray:
    """uint8 levels of 32-bit integer or float grey (Pillow's modes I and F, from TIFFs or
    numpy arrays), whose mode does not say what range the levels are of: so by the range
    they fill. Floats of at most 1 are of 0..1; levels of at most 255 are kept as they
    are (8-bit levels in a 32-bit file); of at most 65535, they keep their top 8 bits, as
    16-bit grey does; beyond that, they are scaled by the image's brightest level.
    Negative levels are black, as are NaN and infinite ones."""
    floats = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    top = floats.max(initial=0.0)
    if values.dtype.kind == "f" and top <= 1:
        levels = np.rint(floats * 255)
    elif top <= 255:
        levels = np.rint(floats)
    elif top <= 65535:
        levels = np.floor(floats / 256)
    else:
        levels = np.floor(floats * 255 / top)
    return np.clip(levels, 0, 255).astype(np.uint8)


def on_white(image: Image.Image) -> Image.Image:
    """RGB of an image with transparency, composited on white as a page shows it. Dropping
    the alpha (OpenCV's and PaddleClas's way) keeps the colour stored under transparent
    pixels, often black: a black logo on a transparent background would be a black square,
    and a cut-out packshot would be searched on a background that no photo has."""
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_ALPHA_COLOUR_TYPES = (4, 6)  # grey + alpha, RGB + alpha


def declares_transparency(data: bytes) -> bool:
    """Whether PNG or WebP bytes say the image may be transparent: a colour type with alpha
    or a transparent colour (PNG's tRNS, before the pixel data), an alpha flag (extended
    WebP) or lossless WebP (which may hold alpha). From the header, without decoding: a
    decoder that drops the alpha (OpenCV's colour decode) must leave these to `on_white`."""
    if data[:8] == PNG_SIGNATURE and len(data) > 25:
        pixels = data.find(b"IDAT")
        return data[25] in PNG_ALPHA_COLOUR_TYPES or data.find(b"tRNS", 0, pixels) >= 0
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        chunk = data[12:16]
        return chunk == b"VP8L" or (chunk == b"VP8X" and len(data) > 20 and data[20] & 0x10 > 0)
    return False


def decode_rgb_image(data: bytes) -> Image.Image:
    """File bytes -> 8-bit RGB image, EXIF orientation applied: how training reads photos."""
    return to_rgb8(_decode(data))


# What Pillow's plugins say of a file of their format whose pixel format they cannot decode.
_PIXEL_FORMAT_REFUSALS = ("unknown pixel mode",)  # TIFF: e.g. 3-channel float samples


def pixel_format_refusal(data: bytes) -> str | None:
    """Why a file Pillow could not identify cannot be decoded, where its format's plugin
    (found by the file's first bytes, as Image.open finds it) refused its pixel format:
    Image.open says "cannot identify" whatever the plugin's reason, and a float32 RGB TIFF
    is no corrupt file. None for any other refusal, corrupt files included."""
    Image.init()
    for name in Image.ID:
        factory, accept = Image.OPEN[name]
        try:  # a plugin's check may unpack more bytes than a tiny file has (BMP's 4)
            taken = accept is not None and accept(data[:16])
        except (SyntaxError, IndexError, TypeError, struct.error):  # as Image.open
            continue
        if not taken or isinstance(taken, str):  # a str: a format Pillow knows, never opens
            continue
        try:
            factory(io.BytesIO(data), "").close()
        except (SyntaxError, IndexError, TypeError, struct.error) as exc:  # as Image.open
            if str(exc) in _PIXEL_FORMAT_REFUSALS:
                return (
                    f"a {name} image in a pixel format Pillow cannot decode ({exc}; "
                    "floating-point colour, say): save it with 8-bit samples, as JPEG or PNG"
                )
            return None
    return None


def unidentified_reason(data: bytes) -> str:
    """Why Pillow could not identify the file bytes `data` as an image, for
    "cannot decode image: ...": Pillow's UnidentifiedImageError names the in-memory stream
    they were read from (`<_io.BytesIO object at 0x...>`), not the file or the reason."""
    if not data:
        return "the file is empty"
    kind = iso_media_kind(data)
    if kind is not None:
        return f"{kind} images are not supported: convert it to JPEG or PNG"
    if is_text(data) and b"<svg" in data[:TEXT_PROBE_BYTES].lower():  # a logo, not a list
        return "SVG (vector) images are not supported: convert it to PNG"
    return pixel_format_refusal(data) or (
        TEXT_FILE_REASON if is_text(data) else "unknown or corrupt format"
    )


def _decode(data: bytes) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        check_image_size(*image.size)
        image.load()
        transposed = ImageOps.exif_transpose(image)
    except UnidentifiedImageError:
        raise UnreadableImageError(f"cannot decode image: {unidentified_reason(data)}") from None
    except UnreadableImageError:
        raise
    except Exception as exc:  # any decoder failure means a corrupt or unsupported file
        raise UnreadableImageError(f"cannot decode image ({type(exc).__name__}: {exc})") from exc
    return transposed if transposed is not None else image


@TRANSFORMS.register("ResizeImage")
class ResizeImage(Transform):
    """Resize to `size` ([width, height] or int), or the short side to `resize_short`.

    A `resize_short` of 0 or less stands for none (PaddleClas's configs write -1). Both
    given is refused: PaddleClas silently resizes by `resize_short` then, which keeps the
    aspect ratio that a `size` was meant to fix.

    `backend: cv2` (PaddleClas's default) reproduces OpenCV's resize without
    antialiasing; `pil` uses Pillow's antialiased filters. See `_base.resize`.
    `return_numpy` is accepted for PaddleClas configs and has no effect (the next
    transform always gets an array).
    """

    def __init__(
        self,
        size: int | list[int] | None = None,
        resize_short: int | None = None,
        interpolation: Interpolation = None,
        backend: Backend = "cv2",
        return_numpy: bool = True,
    ):
        if resize_short is not None and resize_short > 0:
            if size is not None:
                raise ValueError(
                    f"resize_short: {resize_short} given with size {size}, which resize "
                    "differently; keep size to resize to a fixed width and height, or "
                    "resize_short to scale the short side and keep the aspect ratio"
                )
            _output_pair(resize_short, "resize_short")
            self.resize_short: int | None = resize_short
            self.size: tuple[int, int] | None = None
        elif size is not None:
            self.resize_short = None
            self.size = _output_pair(size)
        else:
            raise ValueError("size: required unless resize_short is above 0")
        self.interpolation = interpolation_name(interpolation, backend)
        self.backend = backend

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        if self.resize_short is not None:
            return short_side_size(width, height, self.resize_short)
        assert self.size is not None
        return self.size

    def __call__(self, image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        return resize(image, *self.output_size(width, height), self.interpolation, self.backend)


def _output_pair(size: int | list[int], what: str = "size") -> tuple[int, int]:
    """`pair(size)` for the size an op makes every image (at least: a `resize_short`'s
    square): refused (ValueError) where it holds more pixels than `max_image_pixels`, as a
    config typo (`size: 22400`) made each image gigabytes when first loaded, which stopped
    the run on memory, or refused each image as too elongated, not naming the setting."""
    width, height = pair(size, what)
    limit = max_image_pixels()
    if width * height > limit:
        raise ValueError(
            f"{what}: {width}x{height} is {round(width * height / 1e6, 1):g} megapixels, over the "
            f"limit of {limit / 1e6:g} megapixels ({MAX_MEGAPIXELS_VARIABLE})"
        )
    return width, height


def short_side_size(width: int, height: int, short: int) -> tuple[int, int]:
    """(width, height) with the short side scaled to `short` and the aspect ratio kept.

    A very thin image (1x4000, say) would grow into an array of gigabytes, so a result
    with more pixels than `max_image_pixels` is refused with an ImageSizeError, as an image
    that large is refused before decoding.
    """
    factor = short / min(width, height)
    new_w, new_h = round(width * factor), round(height * factor)
    limit = max_image_pixels()
    if new_w * new_h > limit:
        raise ImageSizeError(
            f"image {width}x{height} is too elongated to resize its short side to {short}: "
            f"that makes {new_w}x{new_h} pixels, over the limit of {limit / 1e6:g} megapixels "
            f"({MAX_MEGAPIXELS_VARIABLE})"
        )
    return new_w, new_h


class _Crop(Transform):
    """A crop of `size` ([width, height] or int), without resizing: the image must be at
    least that big."""

    def __init__(self, size: int | list[int]):
        self.size = _output_pair(size)

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        if width < self.size[0] or height < self.size[1]:
            raise ImageSizeError(
                f"image {width}x{height} is smaller than the crop {self.size[0]}x{self.size[1]}"
            )
        return self.size


@TRANSFORMS.register("CropImage")
class CropImage(_Crop):
    """Centre crop to `size` ([width, height] or int); the image must be at least that big."""

    def __call__(self, image: np.ndarray) -> np.ndarray:
        img_h, img_w = image.shape[:2]
        width, height = self.output_size(img_w, img_h)
        top, left = (img_h - height) // 2, (img_w - width) // 2
        return image[top : top + height, left : left + width]


@TRANSFORMS.register("RandCropImage")
class RandCropImage(Transform):
    """Random-resized crop (PaddleClas's single-draw form of torchvision's RandomResizedCrop).

    Draws an aspect ratio from `ratio` and an area fraction from `scale` (capped so
    the crop fits), crops at a random place and resizes to `size` ([width, height]).
    """

    def __init__(
        self,
        size: int | list[int],
        scale: list[float] | None = None,
        ratio: list[float] | None = None,
        interpolation: Interpolation = None,
        backend: Backend = "cv2",
    ):
        self.size = _output_pair(size)
        self.scale = tuple(scale) if scale is not None else (0.08, 1.0)
        self.ratio = tuple(ratio) if ratio is not None else (3.0 / 4.0, 4.0 / 3.0)
        for key, value in (("scale", self.scale), ("ratio", self.ratio)):
            if len(value) != 2 or not 0 < value[0] <= value[1]:
                raise ValueError(f"{key}: give [low, high] with 0 < low <= high, got {list(value)}")
        self.interpolation = interpolation_name(interpolation, backend)
        self.backend = backend

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        return self.size

    def __call__(self, image: np.ndarray) -> np.ndarray:
        img_h, img_w = image.shape[:2]
        aspect = rand_uniform(*self.ratio) ** 0.5
        rel_w, rel_h = aspect, 1.0 / aspect
        # Largest area fraction at this aspect ratio that still fits inside the image.
        bound = min((img_w / img_h) / rel_w**2, (img_h / img_w) / rel_h**2)
        low, high = min(self.scale[0], bound), min(self.scale[1], bound)
        side = (img_w * img_h * rand_uniform(low, high)) ** 0.5
        crop_w = min(img_w, max(1, int(side * rel_w)))
        crop_h = min(img_h, max(1, int(side * rel_h)))
        left = rand_int(0, img_w - crop_w)
        top = rand_int(0, img_h - crop_h)
        crop = image[top : top + crop_h, left : left + crop_w]
        return resize(crop, *self.size, self.interpolation, self.backend)


@TRANSFORMS.register("RandCropImageV2")
class RandCropImageV2(_Crop):
    """Crop `size` ([width, height] or int) at a uniformly random place, no resizing.

    Unlike PaddleClas, whose offsets may run one pixel past the edge (returning a
    crop one pixel short), the crop always has exactly `size`.
    """

    def __call__(self, image: np.ndarray) -> np.ndarray:
        img_h, img_w = image.shape[:2]
        width, height = self.output_size(img_w, img_h)
        top = rand_int(0, img_h - height)
        left = rand_int(0, img_w - width)
        return image[top : top + height, left : left + width]


@TRANSFORMS.register("RandFlipImage")
class RandFlipImage(Transform):
    """Flip with probability 1/2: `flip_code` 1 horizontally, 0 vertically, -1 both (as OpenCV)."""

    def __init__(self, flip_code: Literal[-1, 0, 1] = 1):
        self.flip_code = flip_code

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if rand_int(0, 1) == 0:
            return image
        if self.flip_code == 1:
            return image[:, ::-1]
        if self.flip_code == 0:
            return image[::-1]
        return image[::-1, ::-1]


def _probability(value: float, key: str) -> float:
    """`value` if it lies in [0, 1]: a percentage (50) or a negative one would silently mean
    always or never."""
    if not 0 <= value <= 1:
        raise ValueError(f"{key}: a probability in [0, 1], got {value}")
    return value


def _sides(padding: int | list[int]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) from torchvision-style padding: int, [lr, tb] or [l, t, r, b]."""
    if isinstance(padding, int):
        values = [padding] * 4
    elif len(padding) == 2:
        values = [padding[0], padding[1], padding[0], padding[1]]
    elif len(padding) == 4:
        values = list(padding)
    else:
        raise ValueError(f"padding: give an int, [left/right, top/bottom] or 4 ints, got {padding}")
    if min(values) < 0:
        raise ValueError(f"padding: must not be negative, got {padding}")
    left, top, right, bottom = (int(v) for v in values)
    return left, top, right, bottom


@TRANSFORMS.register("Pad")
class Pad(Transform):
    """Pad the borders (`padding` as torchvision: int, [lr, tb] or [l, t, r, b]).

    `padding_mode` is constant (with `fill`: one grey level or one per channel),
    edge, reflect or symmetric. `backend` is accepted for PaddleClas configs: both of
    its backends pad alike.
    """

    def __init__(
        self,
        padding: int | list[int],
        fill: int | list[int] = 0,
        padding_mode: Literal["constant", "edge", "reflect", "symmetric"] = "constant",
        backend: Literal["pil", "cv2"] = "pil",
    ):
        self.padding = _sides(padding)
        self.fill = _check_fill(fill)
        self.padding_mode = padding_mode

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        left, top, right, bottom = self.padding
        return width + left + right, height + top + bottom

    def __call__(self, image: np.ndarray) -> np.ndarray:
        left, top, right, bottom = self.padding
        if self.padding_mode != "constant":
            return np.pad(image, ((top, bottom), (left, right), (0, 0)), mode=self.padding_mode)
        img_h, img_w, channels = image.shape
        out = np.empty((img_h + top + bottom, img_w + left + right, channels), dtype=image.dtype)
        out[...] = np.asarray(self.fill, dtype=image.dtype)
        out[top : top + img_h, left : left + img_w] = image
        return out


def _check_fill(fill: int | list[int]) -> int | list[int]:
    """`fill` if it is one level or one per channel, each 0..255: checked when the pipeline
    is built, as a wrong one fails on every image (or wraps around in uint8)."""
    values = [fill] if isinstance(fill, int) else list(fill)
    if len(values) not in (1, 3) or not all(0 <= value <= 255 for value in values):
        raise ValueError(f"fill: give one level or one per channel (3), each 0..255, got {fill}")
    return values[0] if len(values) == 1 else values


def _fill_color(fill: int | list[int], channels: int) -> int | tuple[int, ...]:
    if isinstance(fill, int):
        return fill if channels == 1 else (fill,) * channels
    return tuple(int(v) for v in fill)


@TRANSFORMS.register("RandomRotation")
class RandomRotation(Transform):
    """With probability `prob`, rotate by a uniform angle in [-degrees, degrees] (or [min, max]).

    Counter-clockwise about the centre, keeping the size (or growing to fit with
    `expand`), corners filled with `fill`, as paddle.vision's RandomRotation.
    """

    def __init__(
        self,
        degrees: float | list[float],
        prob: float = 0.5,
        interpolation: Literal["nearest", "bilinear", "bicubic"] = "nearest",
        expand: bool = False,
        fill: int | list[int] = 0,
    ):
        if isinstance(degrees, int | float):
            if degrees < 0:
                raise ValueError(f"degrees: a single value must not be negative, got {degrees}")
            self.degrees = (-float(degrees), float(degrees))
        elif len(degrees) == 2 and degrees[0] <= degrees[1]:
            self.degrees = (float(degrees[0]), float(degrees[1]))
        else:
            raise ValueError(f"degrees: give a number or [min, max], got {degrees}")
        self.prob = _probability(prob, "prob")
        self.interpolation = interpolation
        self.expand = expand
        self.fill = _check_fill(fill)

    def output_size(self, width: int, height: int) -> tuple[int, int] | None:
        return None if self.expand else (width, height)  # grown to fit the angle drawn

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if not coin(self.prob):
            return image
        angle = rand_uniform(*self.degrees)
        rotated = to_pil(image).rotate(
            angle,
            resample=pil_filter(self.interpolation),
            expand=self.expand,
            fillcolor=_fill_color(self.fill, image.shape[2]),
        )
        return from_pil(rotated)


def _factor_range(value: float | list[float], key: str, centre: float) -> tuple[float, float]:
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"{key}: must not be negative, got {value}")
        return (max(0.0, centre - value) if centre else -value, centre + value)
    if len(value) != 2 or value[0] > value[1]:
        raise ValueError(f"{key}: give a number or [min, max], got {value}")
    if centre and value[0] < 0:  # a negative factor inverts the image (torchvision refuses it)
        raise ValueError(f"{key}: factors must not be negative, got {value}")
    return float(value[0]), float(value[1])


@TRANSFORMS.register("ColorJitter")
class ColorJitter(Transform):
    """With probability `prob`, jitter brightness, contrast, saturation and hue in random order.

    A number b gives factors in [max(0, 1 - b), 1 + b] (hue: shifts in [-h, h] of a
    full turn, h <= 0.5); a [min, max] pair gives the range itself. Same maths as
    paddle.vision / torchvision's ColorJitter, on Pillow.
    """

    def __init__(
        self,
        brightness: float | list[float] = 0.0,
        contrast: float | list[float] = 0.0,
        saturation: float | list[float] = 0.0,
        hue: float | list[float] = 0.0,
        prob: float = 1.0,
    ):
        self.brightness = _factor_range(brightness, "brightness", 1.0)
        self.contrast = _factor_range(contrast, "contrast", 1.0)
        self.saturation = _factor_range(saturation, "saturation", 1.0)
        self.hue = _factor_range(hue, "hue", 0.0)
        if not -0.5 <= self.hue[0] <= self.hue[1] <= 0.5:
            raise ValueError(f"hue: shifts must lie in [-0.5, 0.5], got {list(self.hue)}")
        self.prob = _probability(prob, "prob")

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if not coin(self.prob):
            return image
        pil = to_pil(image)
        steps = [
            (ImageEnhance.Brightness, self.brightness, (1.0, 1.0)),
            (ImageEnhance.Contrast, self.contrast, (1.0, 1.0)),
            (ImageEnhance.Color, self.saturation, (1.0, 1.0)),
            (None, self.hue, (0.0, 0.0)),
        ]
        import torch

        for index in torch.randperm(len(steps)).tolist():
            enhancer, bounds, identity = steps[index]
            if bounds == identity:
                continue
            factor = rand_uniform(*bounds)
            pil = _shift_hue(pil, factor) if enhancer is None else enhancer(pil).enhance(factor)
        return from_pil(pil)


def _shift_hue(image: Image.Image, shift: float) -> Image.Image:
    if image.mode != "RGB":
        return image
    hsv = np.array(image.convert("HSV"))
    hsv[:, :, 0] = (hsv[:, :, 0].astype(np.int16) + round(shift * 255)) % 256
    return Image.frombytes("HSV", image.size, hsv.tobytes()).convert("RGB")


def parse_scale(scale: float | str | None) -> float:
    """A finite number, or PaddleClas's string form such as '1.0/255.0' (read without eval)."""
    if scale is None:
        return 1.0 / 255.0
    if isinstance(scale, int | float):
        values = [float(scale)]
    else:
        try:
            values = [float(part) for part in scale.replace(" ", "").split("/")]
        except ValueError:
            values = []
    if len(values) == 2 and values[1] != 0:
        values = [values[0] / values[1]]
    if len(values) == 1 and math.isfinite(values[0]):
        return values[0]
    raise ValueError(f"scale: write a finite number or 'a/b' such as '1.0/255.0', got {scale!r}")


def check_normalization(scale: float, mean: Sequence[float], std: Sequence[float]) -> None:
    """Refuse a normalisation, (pixel * scale - mean) / std in float32, that cannot give
    the model images: a scale of 0 maps every image to one constant, a negative scale or
    std turns the pixel values round, a mean outside the scaled pixels' range puts them all
    on one side of it, and a std so small that some pixel of 0-255 overflows float32
    (1e-50 is 0 there) gives inf. ValueError naming the key."""
    if not scale > 0:
        raise ValueError(f"scale: must be positive (0 makes every image one constant), got {scale}")
    if not all(value > 0 for value in std):
        raise ValueError(f"std: must be positive, got {list(std)}")
    # A mean beyond the scaled pixels' range shifts every pixel to one side of it: mean and
    # std of 0-255 pixels ([123.675, ...]) with scale 1/255 make every image about one value.
    top = 255 * scale
    if not all(0 <= value <= top for value in mean):
        raise ValueError(
            f"mean: {list(mean)} lies outside the scaled pixels' range [0, {top:.4g}] "
            f"(0-255 times scale {scale:.4g}); give mean and std in the units of pixel * scale"
        )
    mean32, std32 = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    with np.errstate(over="ignore", divide="ignore"):
        farthest = np.maximum(np.abs(mean32), np.abs(np.float32(255 * scale) - mean32)) / std32
    if not np.all(np.isfinite(farthest)):
        raise ValueError(
            f"std: {list(std)} is too small: a pixel normalised by it, "
            "(pixel * scale - mean) / std, is inf in float32"
        )


def _check_pixel_units(scale: float, mean: Sequence[float], std: Sequence[float]) -> None:
    """Refuse (ValueError naming scale) mean and std of pixels scaled to 0-1 ([0.485, ...])
    with a scale that leaves them 0-255 (`scale: 1`, the /255 left out): every image
    normalised to values in the hundreds, which trained and searched without an error. A
    config's check, not an export's: a model trained so takes its images so."""
    top = 255 * scale
    if top > 2 and 0 < max(mean) <= 1 and max(std) <= 1:
        raise ValueError(
            f"scale: {scale:.4g} leaves pixels in [0, {top:.4g}], but mean {list(mean)} and std "
            f"{list(std)} are those of pixels in [0, 1], so normalised images reach values "
            "in the hundreds; set scale: 1.0/255.0"
        )


@TRANSFORMS.register("NormalizeImage")
class NormalizeImage(Transform):
    """(pixel * scale - mean) / std per channel -> float32.

    `order` is the layout of the incoming image, as in PaddleClas ('' means hwc);
    left out, it follows the pipeline (HWC unless ToCHWImage or channel_first came
    first). A stated order that disagrees with the pipeline is a config error.
    PaddleClas's `output_fp16` and `channel_num: 3` are accepted and change nothing
    (mixed precision is `Global.amp`; models here take 3 channels).
    """

    def __init__(
        self,
        scale: float | str | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        order: Literal["chw", "hwc", ""] | None = None,
        output_fp16: bool = False,
        channel_num: Literal[3] = 3,
    ):
        self.scale = np.float32(parse_scale(scale))
        mean = mean if mean is not None else [0.485, 0.456, 0.406]
        std = std if std is not None else [0.229, 0.224, 0.225]
        for key, values in (("mean", mean), ("std", std)):
            if len(values) != channel_num:
                raise ValueError(
                    f"{key}: needs one value per channel ({channel_num}), got {values}"
                )
        check_normalization(float(self.scale), mean, std)
        _check_pixel_units(float(self.scale), mean, std)
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.order: str | None = "hwc" if order == "" else order

    def plan(self, stage: Stage) -> Stage:
        if not stage.decoded:
            raise ValueError("comes before the image is decoded (DecodeImage must be first)")
        if stage.normalized:
            raise ValueError("the image is already normalised")
        if self.order is not None and self.order != stage.layout:
            raise ValueError(
                f"order is '{self.order}' but the image is {stage.layout.upper()} here; "
                f"set order: {stage.layout} (or leave it out)"
            )
        self.order = stage.layout
        return stage.with_(normalized=True)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        shape = (-1, 1, 1) if self.order == "chw" else (1, 1, -1)
        mean, std = self.mean.reshape(shape), self.std.reshape(shape)
        return (image.astype(np.float32) * self.scale - mean) / std


@TRANSFORMS.register("ToCHWImage")
class ToCHWImage(Transform):
    """HWC -> CHW. Optional: the pipeline ends in a CHW float32 tensor either way."""

    def plan(self, stage: Stage) -> Stage:
        if not stage.decoded:
            raise ValueError("comes before the image is decoded (DecodeImage must be first)")
        if stage.layout == "chw":
            raise ValueError("the image is already CHW")
        return stage.with_(layout="chw")

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return image.transpose(2, 0, 1)


@TRANSFORMS.register("RandomErasing")
class RandomErasing(Transform):
    """With probability `EPSILON`, overwrite one random rectangle of the normalised image.

    Random Erasing (Zhong et al., 2017), with PaddleClas's parameter names: the
    rectangle covers a fraction in [`sl`, `sh`] of the image with an aspect ratio
    in [`r1`, 1/`r1`] (log-uniform with `use_log_aspect`); up to `attempt` draws
    look for one that fits. `mode` fills it with `mean` ("const", one value per
    channel), one random normal value per channel ("rand") or per pixel ("pixel").
    It simulates occlusion, so features must not hang on one part of an object.
    """

    def __init__(
        self,
        EPSILON: float = 0.5,  # PaddleClas's name
        sl: float = 0.02,
        sh: float = 0.4,
        r1: float = 0.3,
        mean: list[float] | None = None,
        attempt: int = 100,
        use_log_aspect: bool = False,
        mode: Literal["const", "rand", "pixel"] = "const",
    ):
        _probability(EPSILON, "EPSILON")
        if not 0 < sl <= 1:
            raise ValueError(f"sl: the smallest area fraction, in (0, 1], got {sl}")
        if not sl <= sh <= 1:
            raise ValueError(f"sh: the largest area fraction, in [sl, 1] = [{sl}, 1], got {sh}")
        if not 0 < r1 <= 1:
            raise ValueError(f"r1: the smallest aspect ratio, in (0, 1], got {r1}")
        if attempt < 1:
            raise ValueError(f"attempt: at least 1, got {attempt}")
        mean = mean if mean is not None else [0.0, 0.0, 0.0]
        if len(mean) != 3:  # else every erased image fails, as a fault of that image
            raise ValueError(f"mean: needs one value per channel (3), got {mean}")
        self.EPSILON = EPSILON
        self.sl = sl
        self.sh = sh
        self.r1 = r1
        self.mean = np.asarray(mean, np.float32)
        self.attempt = attempt
        self.use_log_aspect = use_log_aspect
        self.mode = mode
        self._layout: str = "hwc"

    def plan(self, stage: Stage) -> Stage:
        if not stage.normalized:
            raise ValueError("erases normalised values; move it after NormalizeImage")
        self._layout = stage.layout
        return stage

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if not coin(self.EPSILON):
            return image
        chw = self._layout == "chw"
        channels, img_h, img_w = image.shape if chw else image.shape[2:] + image.shape[:2]
        low, high = (
            (np.log(self.r1), -np.log(self.r1)) if self.use_log_aspect else (self.r1, 1 / self.r1)
        )
        for _ in range(self.attempt):
            area = rand_uniform(self.sl, self.sh) * img_h * img_w
            aspect = rand_uniform(low, high)
            aspect = float(np.exp(aspect)) if self.use_log_aspect else aspect
            height = round((area * aspect) ** 0.5)
            width = round((area / aspect) ** 0.5)
            if 0 < height < img_h and 0 < width < img_w:
                top = rand_int(0, img_h - height)
                left = rand_int(0, img_w - width)
                out = image.copy()
                planes = out if chw else np.moveaxis(out, 2, 0)  # a CHW view of `out`
                planes[:, top : top + height, left : left + width] = self._fill(
                    channels, height, width
                )
                return out
        return image

    def _fill(self, channels: int, height: int, width: int) -> np.ndarray:
        if self.mode == "const":
            return self.mean[:, None, None]
        shape = (channels, 1, 1) if self.mode == "rand" else (channels, height, width)
        import torch

        return torch.randn(shape).numpy()
