"""Inference preprocessing recorded beside an exported model, and its OpenCV fast path.

The training pipeline (shitu.data.transforms) decodes with Pillow and resizes with a
torch emulation of OpenCV; here the same steps run in OpenCV's C++ code (which releases
the GIL, so decoding threads overlap with inference), with Pillow as the fallback
decoder for formats OpenCV lacks, for images OpenCV decodes otherwise than training
(those that may be transparent, CMYK JPEGs) and for Pillow-only filters.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, features

from shitu import registry
from shitu.config import ShituConfig
from shitu.data.transforms._base import interpolation_name, pair, pil_filter
from shitu.data.transforms.ops import (
    PNG_SIGNATURE,
    NormalizeImage,
    UnreadableImageError,
    check_encoded_size,
    check_normalization,
    check_rgb_image,
    declares_transparency,
    decode_rgb_image,
    short_side_size,
)
from shitu.errors import ConfigError
from shitu.fileio import is_given_path
from shitu.image_files import read_image_file, unreadable_reason

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_CV2_FLAGS = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
}
# Eval-time ops an export can record, in the order inference runs them (each at most once;
# ToCHWImage only sets the layout, anywhere); anything else (augmentation) has no place at
# inference.
_SUPPORTED_OPS = ("DecodeImage", "ResizeImage", "CropImage", "NormalizeImage", "ToCHWImage")
_ORDERED_OPS = _SUPPORTED_OPS[:-1]
# Train transforms whose `size` is that of the images the model trains on (the last one's).
_TRAIN_SIZING_OPS = ("ResizeImage", "CropImage", "RandCropImage", "RandCropImageV2")
# Without a NormalizeImage the eval transforms give raw 0..255 pixels, and so must inference.
_NO_NORMALIZATION = {"scale": 1.0, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}


@dataclass(frozen=True)
class Preprocessing:
    """Image file -> model input: decode, resize, optional centre crop, normalise, NCHW.

    Resize to `resize` ((width, height)) or the short side to `resize_short`, then
    centre-crop `crop` if given. backend: 'cv2' (no antialiasing, as OpenCV and
    PaddleClas) or 'pil' (Pillow's antialiased filters). channel_order: of the model
    input ('RGB', or 'BGR' for DecodeImage to_rgb: false).
    """

    resize: tuple[int, int] | None = (224, 224)
    resize_short: int | None = None
    crop: tuple[int, int] | None = None
    interpolation: str = "bilinear"
    backend: str = "cv2"
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    channel_order: str = "RGB"
    layout: str = "NCHW"
    _factor: np.ndarray = field(init=False, repr=False, compare=False)
    _offset: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if (self.resize is None) == (self.resize_short is None):
            raise ValueError("give exactly one of resize and resize_short")
        if self.resize_short is not None and self.crop is None:
            raise ValueError("resize_short needs a CropImage after it for a fixed input size")
        short = self.resize_short
        if short is not None and (
            isinstance(short, bool) or not isinstance(short, int) or short < 1
        ):
            # else compared with the crop: "crop [224, 224] is larger than the resize_short
            # -1", or Python's words on comparing a number with a hand-edited text
            raise ValueError(f"resize_short: expected a whole number >= 1, got {short!r}")
        # A crop that no resized image can hold would refuse every image, one by one.
        if self.crop is not None and self.resize is not None:
            if self.crop[0] > self.resize[0] or self.crop[1] > self.resize[1]:
                raise ValueError(
                    f"crop {list(self.crop)} is larger than the resize {list(self.resize)}"
                )
        elif self.crop is not None and short is not None and min(self.crop) > short:
            raise ValueError(
                f"crop {list(self.crop)} is larger than the resize_short {self.resize_short} "
                "on both sides"
            )
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std need 3 values")
        # Checked here, not where an image is resized: a hand-edited manifest is refused
        # when the model loads, not at its first image (or never, for a channel order).
        if self.backend not in ("cv2", "pil"):
            raise ValueError(f"backend: unknown {self.backend!r}; use cv2 or pil")
        if not isinstance(self.interpolation, str) or (
            interpolation_name(self.interpolation, self.backend) != self.interpolation
        ):
            raise ValueError(f"interpolation: unknown {self.interpolation!r}")
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order: unknown {self.channel_order!r}; use RGB or BGR")
        if self.layout != "NCHW":
            raise ValueError(f"layout: unknown {self.layout!r}; models take NCHW")
        check_normalization(self.scale, self.mean, self.std)
        # (x * scale - mean) / std == x * factor - offset, one fused pass per channel.
        std = np.asarray(self.std, np.float32)
        object.__setattr__(self, "_factor", np.float32(self.scale) / std)
        object.__setattr__(self, "_offset", np.asarray(self.mean, np.float32) / std)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the model input."""
        size = self.crop or self.resize
        assert size is not None
        return size

    def to_dict(self) -> dict[str, Any]:
        """The JSON form `shitu_model.json` and a library's manifest record."""
        data = asdict(self)
        data.pop("_factor")
        data.pop("_offset")
        for key in ("resize", "crop"):
            data[key] = list(data[key]) if data[key] is not None else None
        data["mean"] = list(self.mean)
        data["std"] = list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        """From `to_dict`'s form; keys this version does not know are left out. A value
        of the wrong JSON type (a hand-edited manifest) is a ValueError naming its key."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("resize", "crop"):
            if known.get(key) is not None:
                _check_json_numbers(known[key], key, 2, whole=True)
                known[key] = pair(known[key], key)
        for key in ("mean", "std"):
            if key in known:
                _check_json_numbers(known[key], key, 3)
                known[key] = tuple(known[key])
        if "scale" in known:
            _check_json_numbers(known["scale"], "scale", None)
        return cls(**known)

    @classmethod
    def from_config(cls, config: ShituConfig) -> Preprocessing:
        """DataLoader.Eval's transforms (Query and Gallery alike), as inference needs them.

        Without eval transforms: Global.image_shape, bilinear, and the normalisation and
        channel order of DataLoader.Train's transforms (ImageNet mean/std without those).
        """
        ops = _eval_ops(config)
        if not ops:
            return cls._from_train_ops(config)
        values: dict[str, Any] = dict(_NO_NORMALIZATION)
        seen: list[str] = []
        for index, item in enumerate(ops):
            ((name, params),) = item.items()
            params = params or {}
            where = f"DataLoader.Eval transform_ops[{index}] {name}"
            if name not in _SUPPORTED_OPS:
                raise ConfigError(
                    f"{where}: cannot be exported; inference supports {', '.join(_SUPPORTED_OPS)}"
                )
            if name in _ORDERED_OPS:
                rank = _ORDERED_OPS.index
                if seen and (name in seen or rank(name) < rank(seen[-1])):
                    raise ConfigError(
                        f"{where}: cannot be exported after {', '.join(seen)}; inference runs "
                        f"each of {', '.join(_ORDERED_OPS)} at most once, in that order"
                    )
                seen.append(name)
            try:
                _read_op(name, params, values)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"{where}: {exc}") from None
        if "ResizeImage" not in seen:
            raise ConfigError("DataLoader.Eval transform_ops: no ResizeImage; export needs a size")
        try:
            preprocessing = cls(**values)
        except ValueError as exc:
            raise ConfigError(f"DataLoader.Eval transform_ops: {exc}") from None
        _, height, width = config.Global.image_shape
        if (
            "image_shape" in config.Global.model_fields_set
            and (width, height) != preprocessing.size
        ):
            # Set by hand (an -o override, say) and taken for the model's input, it is not:
            logger.warning(
                "Global.image_shape %s is not the model's input: that is the eval transforms' "
                "%d x %d (DataLoader.Eval transform_ops sets it)",
                config.Global.image_shape,
                *preprocessing.size,
            )
        return preprocessing

    @classmethod
    def _from_train_ops(cls, config: ShituConfig) -> Preprocessing:
        """Global.image_shape with the normalisation and channel order the model was
        trained with: the train transforms' crops and flips are augmentation, but an export
        with ImageNet statistics for a model trained on others would give wrong features."""
        _, height, width = config.Global.image_shape
        train = config.DataLoader.Train if config.DataLoader else None
        ops = (train.dataset.params.get("transform_ops") or []) if train else []
        values: dict[str, Any] = {"resize": (width, height)}
        if ops:  # without a NormalizeImage, training saw raw 0..255 pixels
            values |= _NO_NORMALIZATION
        trained_size = None
        for index, item in enumerate(ops):
            ((name, params),) = item.items()
            params = params or {}
            try:
                if name in ("DecodeImage", "NormalizeImage"):
                    _read_op(name, params, values)
                elif name in _TRAIN_SIZING_OPS and params.get("size") is not None:
                    trained_size = pair(params["size"])
            except (ValueError, TypeError) as exc:
                where = f"DataLoader.Train transform_ops[{index}] {name}"
                raise ConfigError(f"{where}: {exc}") from None
        if trained_size is not None and trained_size != (width, height):
            logger.warning(
                "no DataLoader.Eval transform_ops: the export resizes to Global.image_shape's "
                "%d x %d, but the model trained on %d x %d images (DataLoader.Train); set "
                "Global.image_shape to match, or give the eval transforms",
                width,
                height,
                *trained_size,
            )
        return cls(**values)

    # --- the fast path -------------------------------------------------------------------

    def load(self, path: str | Path) -> np.ndarray:
        """Decode and resize one file -> float32 CHW model input. Raises UnreadableImageError."""
        return self.normalize(self.prepare(read_rgb(path)))

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """RGB uint8 HxWx3 -> uint8 at the model's size (crop included), model channel order."""
        check_rgb_image(image)
        image = self._resize(image, *self.check_size(image.shape[1], image.shape[0]))
        if self.crop is not None:
            width, height = self.crop
            top = (image.shape[0] - height) // 2
            left = (image.shape[1] - width) // 2
            image = image[top : top + height, left : left + width]
        return image[:, :, ::-1] if self.channel_order == "BGR" else image

    def check_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) an image of this size is resized to, or UnreadableImageError if
        this preprocessing cannot take it (too elongated to resize its short side, or
        smaller than the crop): from the size alone, so callers can refuse such an image
        before it joins a batch and fails the others."""
        if width < 1 or height < 1:  # else a ZeroDivisionError resizing its short side
            raise UnreadableImageError(f"the image is empty ({width}x{height} pixels)")
        if self.resize_short is None:
            assert self.resize is not None
            size = self.resize
        else:
            try:
                size = short_side_size(width, height, self.resize_short)
            except ValueError as exc:
                raise UnreadableImageError(str(exc)) from None
        if self.crop is not None and (self.crop[0] > size[0] or self.crop[1] > size[1]):
            raise UnreadableImageError(
                f"crop {self.crop[0]}x{self.crop[1]} is larger than the image "
                f"({width}x{height}, resized to {size[0]}x{size[1]})"
            )
        return size

    def normalize(self, image: np.ndarray) -> np.ndarray:
        """uint8 HxWx3 -> float32 3xHxW, normalised (per channel: no per-pixel Python)."""
        out = np.empty((3, *image.shape[:2]), np.float32)
        for channel in range(3):
            np.multiply(image[:, :, channel], self._factor[channel], out=out[channel])
            out[channel] -= self._offset[channel]
        return out

    def _resize(self, image: np.ndarray, width: int, height: int) -> np.ndarray:
        if image.shape[0] == height and image.shape[1] == width:
            return image
        if self.backend == "cv2" and self.interpolation in _CV2_FLAGS:
            return cv2.resize(image, (width, height), interpolation=_CV2_FLAGS[self.interpolation])
        resized = Image.fromarray(np.ascontiguousarray(image)).resize(
            (width, height), pil_filter(self.interpolation)
        )
        return np.asarray(resized)


def _check_json_numbers(value: Any, key: str, count: int | None, whole: bool = False) -> None:
    """A ValueError naming `key` unless `value` is a list of `count` JSON numbers (None:
    one number): a hand-edited manifest's mean of "abc" would otherwise fail with Python's
    words on its first letter ("could not convert string to float: 'a'"). `whole`: whole
    numbers only, as sizes are (a resize of 224.5 was rounded down, unsaid)."""
    numbers = [value] if count is None else value
    kind = int if whole else int | float
    if (
        not isinstance(numbers, list | tuple)
        or len(numbers) != (count or 1)
        or not all(
            isinstance(v, kind) and not isinstance(v, bool) and math.isfinite(v) for v in numbers
        )
    ):  # (Python's json reads NaN and Infinity)
        noun = "whole number" if whole else "number"
        wanted = f"a {noun}" if count is None else f"a list of {count} {noun}s"
        raise ValueError(f"{key}: expected {wanted}, got {json.dumps(value, default=repr)}")


def read_rgb(path: str | Path) -> np.ndarray:
    """File -> RGB uint8 HxWx3 with EXIF orientation applied; OpenCV first, then Pillow.

    Raises UnreadableImageError (a DataError) naming the reason; the file is named in a
    note (`read_rgb('photo.jpg')`, below a traceback), not in the message, which callers
    that name the file themselves (`skipped PATH: REASON`) take as the reason.
    """
    if not is_given_path(path):
        raise UnreadableImageError(f"expected an image file's path, got {_not_a_path(path)}")
    try:
        try:
            data = read_image_file(path)
        except OSError as exc:
            raise UnreadableImageError(unreadable_reason(path, exc)) from None
        return decode_rgb(data)
    except UnreadableImageError as exc:  # "No such file or directory" named no file
        exc.add_note(f"read_rgb({os.fspath(path)!r})")
        raise


def _not_a_path(value: object) -> str:
    """What `read_rgb` was given instead of a path, and what reads it."""
    if isinstance(value, str | os.PathLike):
        return "an empty path"
    hint = ""
    if isinstance(value, bytes | bytearray | memoryview):
        hint = " (an encoded image: shitu.inference.decode_rgb(data) decodes it)"
    elif hasattr(value, "read"):
        hint = " (an open file: shitu.inference.decode_rgb(file.read()) decodes it)"
    elif hasattr(value, "convert"):
        hint = " (a Pillow image: np.asarray(image.convert('RGB')) is its RGB array)"
    elif isinstance(value, np.ndarray):
        hint = " (an array is an image already read)"
    return f"{type(value).__name__}{hint}"


def decode_rgb(data: bytes | np.ndarray) -> np.ndarray:
    """Encoded image bytes -> RGB uint8 HxWx3, decoded as `read_rgb` decodes files, so an
    upload gives the same pixels (and features) as the same file on disk. An image over
    the pixel limit (`check_image_size`) is refused from its header, before decoding."""
    encoded = _encoded_bytes(data)
    check_encoded_size(encoded)
    image = None
    if encoded and not decoded_otherwise_by_opencv(encoded) and not _png_cut_short(encoded):
        buffer = np.frombuffer(_without_png_profile(encoded), np.uint8)
        try:
            # Straight to RGB: the same pixels as BGR then cvtColor, without another pass
            # over the whole photo (a tenth of a 12-megapixel JPEG's decoding time).
            image = cv2.imdecode(buffer, cv2.IMREAD_COLOR_RGB)
        except cv2.error:  # a file OpenCV refuses: Pillow, below, decodes it or says why
            image = None
    if image is not None:
        return image
    # Formats OpenCV does not read (e.g. ICO) through Pillow, which also says why a file
    # cannot be read.
    return np.asarray(decode_rgb_image(encoded))


def _encoded_bytes(data: object) -> bytes:
    """`data`'s bytes (an array's buffer copied). Anything else is refused naming what to
    pass: `bytes()` fails on a path or an open file saying nothing of either, and takes a
    number as a count of zero bytes to decode."""
    if isinstance(data, bytes | bytearray | memoryview | np.ndarray):
        return bytes(data)
    if isinstance(data, str | os.PathLike):
        hint = " (a path: shitu.inference.read_rgb(path) reads the file)"
    elif hasattr(data, "read"):
        hint = " (an open file: decode_rgb(file.read()))"
    else:
        hint = ""
    raise UnreadableImageError(
        f"expected an encoded image's bytes, got {type(data).__name__}{hint}"
    )


# Formats whose transparency a header check does not settle (GIF sets a transparent colour
# frame by frame, TIFF and JPEG 2000 their alpha in tags or boxes anywhere in the file).
_TRANSPARENCY_ANYWHERE = (
    b"GIF87a",
    b"GIF89a",
    b"II*\x00",  # TIFF, little- and big-endian, then BigTIFF
    b"MM\x00*",
    b"II+\x00",
    b"MM\x00+",
    b"\x00\x00\x00\x0cjP  \r\n\x87\n",  # JPEG 2000: the JP2 file, then a bare codestream
    b"\xffO\xffQ",
)


def decoded_otherwise_by_opencv(data: bytes) -> bool:
    """Whether OpenCV would give other pixels than Pillow, training's decoder, for these
    image bytes, which must then go to Pillow. OpenCV drops an alpha channel, keeping the
    colour stored under transparent parts (often black) where Pillow shows them on white:
    PNG and WebP that declare transparency ahead of their pixels (PNG's after all of its
    metadata, which Photoshop's XMP can make hundreds of KB), and GIF, TIFF, JPEG 2000,
    AVIF and 32-bit BMP always. It also converts CMYK JPEGs with its own rounding."""
    return (
        data.startswith(_TRANSPARENCY_ANYWHERE)
        or (data[4:8] == b"ftyp" and _pillow_reads_avif())  # AVIF: alpha in an item of its own
        or declares_transparency(data)  # whole: metadata may come before PNG's tRNS
        or is_cmyk_jpeg(data)
        or _is_32_bit_bmp(data)
    )


# The IEND chunk (no data, then its CRC) that ends every whole PNG file.
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def _png_cut_short(data: bytes) -> bool:
    """Whether PNG bytes do not end with the chunk that ends a whole PNG (a download cut
    short, say): OpenCV's libpng prints `libpng error: ...` on stderr for such a file, from
    C and naming no file, so Pillow reads it instead and says why it cannot (or decodes
    one that has only more bytes after its end, with the pixels OpenCV would give)."""
    return data[:8] == PNG_SIGNATURE and not data.endswith(PNG_END)


def _without_png_profile(data: bytes) -> bytes:
    """PNG bytes without their colour profile (an iCCP chunk, ahead of the pixels), for
    OpenCV: its libpng checks the profile and prints `libpng warning: iCCP: ...` on stderr,
    from C and naming no file, for each one it finds wrong (old editors' "known incorrect
    sRGB profile"). Neither decoder applies the profile: the pixels are the same. Other
    bytes (another format, a PNG without a profile or whose chunks do not add up) are
    returned as they are; a PNG with a profile is copied without it."""
    if data[:8] != PNG_SIGNATURE:
        return data
    start = 8
    while start + 8 <= len(data):
        kind = data[start + 4 : start + 8]
        end = start + 12 + int.from_bytes(data[start : start + 4], "big")  # length, type, CRC
        if kind == b"iCCP" and end <= len(data):
            return data[:start] + data[end:]
        if kind == b"IDAT":
            break
        start = end
    return data


def _is_32_bit_bmp(data: bytes) -> bool:
    """Whether the bytes are a BMP of 32 bits a pixel, whose fourth byte may be alpha (a
    V4 or V5 header's alpha mask, as Windows tools write them): OpenCV drops it, as it
    drops PNG's. From the bit count in the header (offset 28), without decoding."""
    return data[:2] == b"BM" and int.from_bytes(data[28:30], "little") == 32


@functools.cache
def _pillow_reads_avif() -> bool:
    """Whether this Pillow decodes AVIF (11.3 and later): an older one leaves AVIF files to
    OpenCV, which reads them without their alpha, rather than to no decoder at all."""
    try:
        return bool(features.check_module("avif"))
    except ValueError:  # a Pillow that knows no AVIF
        return False


# Start-of-frame markers (baseline, progressive, lossless...), which hold the component count;
# C4, C8 and CC, in their range, are other segments.
_JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE_MARKERS = frozenset([0x01, *range(0xD0, 0xD9)])  # no length follows them


def is_cmyk_jpeg(data: bytes) -> bool:
    """Whether JPEG bytes hold four colour components (CMYK or YCCK, as print workflows and
    Photoshop save them). OpenCV converts those to RGB with other rounding than Pillow,
    training's decoder: about one level off on every pixel, so the features of such a photo
    would differ a little between `shitu eval` and an export. From the frame header, found
    by skipping the segments before it (EXIF, colour profiles), without decoding."""
    if data[:2] != b"\xff\xd8":
        return False
    position = 2
    while position + 4 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == 0xFF:  # a fill byte before the marker
            position += 1
        elif marker in _JPEG_STANDALONE_MARKERS:
            position += 2
        elif marker in _JPEG_FRAME_MARKERS:  # length, precision, height, width, components
            return position + 9 < len(data) and data[position + 9] == 4
        elif marker == 0xDA:  # the pixels start: no frame header came before them
            return False
        else:
            position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    return False


def _eval_ops(config: ShituConfig) -> list[dict[str, Any]]:
    """The eval transforms of DataLoader.Eval. An export embeds queries and gallery images
    alike, so a Query and a Gallery set that `shitu eval` preprocesses differently are
    refused: either one's transforms would deploy a pairing that was never evaluated."""
    evaluation = config.DataLoader.Eval if config.DataLoader else None
    splits = {"Query": evaluation.Query, "Gallery": evaluation.Gallery} if evaluation else {}
    found = {
        name: [
            {op: params or {} for op, params in item.items()}
            for item in split.dataset.params.get("transform_ops") or []
        ]
        for name, split in splits.items()
        if split is not None
    }
    if len(found) == 2 and found["Query"] != found["Gallery"]:
        raise ConfigError(
            "DataLoader.Eval: Query and Gallery transform_ops differ, but an export has one "
            "preprocessing for queries and gallery images alike; give both the same ops"
        )
    return next(iter(found.values()), [])


def _read_op(name: str, params: dict[str, Any], values: dict[str, Any]) -> None:
    if name == "DecodeImage":
        # Typed as the training transform reads them: `to_rgb: no` is YAML text, not false.
        params = registry.TRANSFORMS.validate(name, params)
        if params.get("channel_first"):
            raise ValueError("channel_first: true is not supported at inference")
        values["channel_order"] = "RGB" if params.get("to_rgb", True) else "BGR"
    elif name == "ResizeImage":
        if (params.get("resize_short") or 0) > 0:  # as ResizeImage: -1 or 0 stands for none
            values["resize_short"] = int(params["resize_short"])
            values["resize"] = None
        else:
            values["resize"] = pair(params["size"])
        values["backend"] = params.get("backend", "cv2")
        values["interpolation"] = interpolation_name(params.get("interpolation"), values["backend"])
    elif name == "CropImage":
        values["crop"] = pair(params["size"])
    elif name == "NormalizeImage":
        op = NormalizeImage(params.get("scale"), params.get("mean"), params.get("std"))
        values["scale"] = float(op.scale)
        values["mean"] = tuple(float(v) for v in op.mean)
        values["std"] = tuple(float(v) for v in op.std)
