"""Shared pieces of the image ops: pipeline stages, seeded random draws, resizing.

Between ops an image is a numpy uint8 array in HWC order (as in PaddleClas, which
uses OpenCV arrays), until `NormalizeImage` turns it into float32. Which ops may
follow which is checked once, when the pipeline is built, through `Stage`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import cv2
import numpy as np
from PIL import Image

Layout = Literal["hwc", "chw"]


@dataclass(frozen=True)
class Stage:
    """What the image looks like at one point of the pipeline, known at build time."""

    decoded: bool = False
    layout: Layout = "hwc"
    normalized: bool = False

    def with_(self, **changes: Any) -> Stage:
        return replace(self, **changes)


class ImageSizeError(ValueError):
    """An image of a size an op cannot take (too elongated to resize its short side,
    smaller than a crop): a fault of that image, not of the pipeline."""


class Transform:
    """Base of the registered ops: `plan` checks the op's place, `__call__` applies it.

    The default `plan` is for pixel ops that need a decoded HWC uint8 image, which
    is every geometric and colour op.
    """

    name: ClassVar[str] = "Transform"

    @classmethod
    def check_params(cls, **params: Any) -> None:
        """Build the op from `params`, so that a value its constructor refuses (a range,
        a list of the wrong length) is refused as a config loads (the registry calls this),
        not first when a dataset is built. An op is made of its parameters alone, reading
        no file, so building one to check it costs nothing."""
        cls(**params)

    def plan(self, stage: Stage) -> Stage:
        if not stage.decoded:
            raise ValueError("comes before the image is decoded (DecodeImage must be first)")
        if stage.normalized:
            raise ValueError("works on uint8 pixels; move it before NormalizeImage")
        if stage.layout != "hwc":
            raise ValueError("works on HWC images; move it before ToCHWImage (or channel_first)")
        return stage

    def output_size(self, width: int, height: int) -> tuple[int, int] | None:
        """The (width, height) this op makes of an image of that size, None where it is
        drawn at random; ImageSizeError for a size the op cannot take. From the size alone,
        so that a dataset can find such images at start-up. By default the size is kept."""
        return width, height

    def __call__(self, image: Any) -> Any:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


# Random draws. All use torch's global generator: DataLoader workers seed it per worker
# and the engine seeds it per sample, so an augmented image depends on the seed alone.
# torch is imported where it is used, in this package: inference takes the image helpers
# of these modules and has no use for torch (an import of a second or more) otherwise.


def rand_uniform(low: float, high: float) -> float:
    import torch

    return float(low + (high - low) * torch.rand(()).item())


def rand_int(low: int, high: int) -> int:
    """Uniform integer in [low, high], both ends included (like `random.randint`)."""
    import torch

    return int(torch.randint(low, high + 1, ()).item())


def coin(prob: float) -> bool:
    """True with probability `prob`; draws nothing when the answer is certain."""
    if prob <= 0:
        return False
    if prob >= 1:
        return True
    import torch

    return bool(torch.rand(()).item() < prob)


def pair(size: int | list[int] | tuple[int, ...], what: str = "size") -> tuple[int, int]:
    """(width, height) from an int or a [width, height] list, as PaddleClas reads sizes."""
    if isinstance(size, int):
        width = height = size
    elif len(size) == 2:
        width, height = int(size[0]), int(size[1])
    else:
        raise ValueError(f"{what}: give one int or [width, height], got {list(size)}")
    if width < 1 or height < 1:
        raise ValueError(f"{what}: sizes must be positive, got {size}")
    return width, height


# Interpolation names as PaddleClas configs spell them; ints are the backend's own codes
# (PaddleClas hands them to cv2.resize or to Pillow's resize as they are).
_CV2_CODES = {0: "nearest", 1: "bilinear", 2: "bicubic", 3: "area", 4: "lanczos"}
_PIL_CODES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
    "box": Image.Resampling.BOX,
    "lanczos": Image.Resampling.LANCZOS,
    "hamming": Image.Resampling.HAMMING,
}
# torch's "area" is adaptive average pooling, which differs from OpenCV's INTER_AREA at
# non-integer scales, and its "nearest" picks another pixel where a source position falls
# on a whole number (its scale is float32, OpenCV's float64): those go to OpenCV itself.
_TORCH_MODES = {"bilinear": "bilinear", "bicubic": "bicubic"}
_OPENCV_FLAGS = {"area": cv2.INTER_AREA, "nearest": cv2.INTER_NEAREST}


def interpolation_name(value: str | int | None, backend: str = "cv2") -> str:
    """The filter a PaddleClas resize with this `interpolation` and `backend` uses: left
    out, bilinear for cv2 and Pillow's own default, bicubic, for pil."""
    if value is None or value == -1:
        return "bicubic" if backend == "pil" else "bilinear"
    if isinstance(value, int):
        codes = _PIL_CODES if backend == "pil" else _CV2_CODES
        if value not in codes:
            raise ValueError(f"interpolation: unknown {backend} code {value}")
        return codes[value]
    name = value.lower()
    if name not in _PIL_FILTERS:
        raise ValueError(
            f"interpolation: unknown name {value!r}; use one of {', '.join(sorted(_PIL_FILTERS))}"
        )
    return name


def pil_filter(name: str) -> Image.Resampling:
    return _PIL_FILTERS[name]


def to_pil(image: np.ndarray) -> Image.Image:
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    return Image.fromarray(np.ascontiguousarray(image))


def from_pil(image: Image.Image) -> np.ndarray:
    array = np.asarray(image)
    return array[:, :, None] if array.ndim == 2 else array


def resize(
    image: np.ndarray, width: int, height: int, interpolation: str, backend: str
) -> np.ndarray:
    """Resize an HWC uint8 image.

    Backend "cv2" reproduces OpenCV's `cv2.resize` (what PaddleClas trains and
    evaluates with): no antialiasing when shrinking, half-pixel centres, within
    one grey level of OpenCV's fixed-point result. Backend "pil" uses Pillow,
    which antialiases. Lanczos, box and hamming always go through Pillow.
    """
    if image.shape[0] == height and image.shape[1] == width:
        return image
    if backend == "cv2" and interpolation in _OPENCV_FLAGS:
        flag = _OPENCV_FLAGS[interpolation]
        out = cv2.resize(np.ascontiguousarray(image), (width, height), interpolation=flag)
        return out[:, :, None] if out.ndim == 2 else out
    if backend == "cv2" and interpolation in _TORCH_MODES:
        import torch
        import torch.nn.functional as F

        array = np.ascontiguousarray(image)
        if not array.flags.writeable:  # torch warns about read-only arrays (Pillow's are)
            array = array.copy()
        tensor = torch.from_numpy(array).permute(2, 0, 1)[None].float()
        mode = _TORCH_MODES[interpolation]
        options: dict[str, Any] = {}
        if mode in ("bilinear", "bicubic"):
            options["align_corners"] = False
        out = F.interpolate(tensor, size=(height, width), mode=mode, **options)
        out = out.round_().clamp_(0, 255).to(torch.uint8)[0].permute(1, 2, 0)
        return out.numpy()
    return from_pil(to_pil(image).resize((width, height), pil_filter(interpolation)))
