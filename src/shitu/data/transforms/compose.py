"""Build an image pipeline from PaddleClas-style `transform_ops` config lists."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from shitu.data.transforms import ops as _ops
from shitu.data.transforms._base import ImageSizeError, Layout, Stage, Transform
from shitu.errors import ConfigError, DataError
from shitu.registry import TRANSFORMS

if TYPE_CHECKING:
    import torch

OpList = Sequence[dict[str, dict[str, Any] | None]]


class Compose:
    """Runs the ops in order and returns a float32 CHW tensor.

    The tensor holds whatever the last op produced: normalised values after
    `NormalizeImage`, raw 0..255 pixel values otherwise. Data-dependent failures
    (an undecodable file, a crop larger than the image) raise `DataError` naming
    the op; the dataset adds the file name.
    """

    def __init__(self, ops: list[Transform], names: list[str], layout: Layout) -> None:
        self.ops = ops
        self.names = names
        self.layout = layout

    def __call__(self, data: Any) -> torch.Tensor:
        image = data
        for name, op in zip(self.names, self.ops, strict=True):
            try:
                image = op(image)
            except DataError:
                raise
            except ImageSizeError as exc:  # the image's fault, as an undecodable one's
                raise _ops.UnreadableImageError(f"{name}: {exc}") from exc
            except (ValueError, OSError) as exc:
                raise DataError(f"{name}: {exc}") from exc
        return to_chw_tensor(image, self.layout)

    def size_problem(self, width: int, height: int) -> str | None:
        """Why an image of this upright size cannot go through the ops (too elongated to
        resize its short side, smaller than a crop), or None: from the size alone, so that
        a dataset can leave such images out at start-up. Ops after one that draws its
        output size at random are not checked."""
        size = (width, height)
        for name, op in zip(self.names, self.ops, strict=True):
            try:
                output = op.output_size(*size)
            except ImageSizeError as exc:
                return f"{name}: {exc}"
            if output is None:
                break
            size = output
        return None

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(op) for op in self.ops) + ")"


def to_chw_tensor(image: np.ndarray, layout: Layout) -> torch.Tensor:
    import torch  # here: inference uses this package's image helpers without torch (_base)

    array = image.transpose(2, 0, 1) if layout == "hwc" else image
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array)


def build_transforms(ops: OpList | None, where: str = "transform_ops") -> Compose:
    """A `Compose` from `[{OpName: {params}}, ...]`, checked before any image is read.

    Each op's parameters are validated against its constructor, and the op order
    is checked (e.g. no resizing after `NormalizeImage`); problems raise
    `ConfigError` naming `where[index]`, the op and the key. A pipeline that does
    not start with `DecodeImage` gets a default one (RGB, HWC) in front.
    """
    if ops is not None and not isinstance(ops, list | tuple):
        # A mapping was taken key by key: "[0]: each op is a one-key mapping, got 'ResizeImage'"
        raise ConfigError(
            f"{where}: expected a list of ops like [{{ResizeImage: {{size: 224}}}}], got "
            f"{type(ops).__name__} {ops!r}"
        )
    built: list[Transform] = []
    names: list[str] = []
    for index, item in enumerate(ops or []):
        label = f"{where}[{index}]"
        if not isinstance(item, dict) or len(item) != 1:
            raise ConfigError(
                f"{label}: each op is a one-key mapping like {{ResizeImage: {{size: 224}}}}, "
                f"got {item!r}"
            )
        ((name, params),) = item.items()
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise ConfigError(f"{label} {name}: parameters must be a mapping, got {params!r}")
        try:  # the op's own checks too (`Transform.check_params`)
            validated = TRANSFORMS.validate(name, params)
        except ConfigError as exc:
            raise ConfigError(f"{label}: {exc}") from None
        built.append(TRANSFORMS.get(name)(**validated))
        names.append(name)
    if not built or not isinstance(built[0], _ops.DecodeImage):
        built.insert(0, _ops.DecodeImage())
        names.insert(0, "DecodeImage")
        offset = -1
    else:
        offset = 0
    stage = Stage()
    for position, (name, op) in enumerate(zip(names, built, strict=True)):
        try:
            stage = op.plan(stage)
        except ValueError as exc:
            raise ConfigError(f"{where}[{position + offset}] {name}: {exc}") from None
    return Compose(built, names, stage.layout)
