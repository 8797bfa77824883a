"""Draw recognition and detection results on the image (boxes, labels, scores) with Pillow."""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from shitu.data.transforms.ops import check_rgb_image
from shitu.pipeline.fonts import CaptionFonts
from shitu.pipeline.recognizer import Recognition

# A box to draw: [x1, y1, x2, y2] in pixels (x2, y2 excluded), its label and its score.
LabelledBox = tuple[Sequence[float], str, float]


def label_colour(label: str) -> tuple[int, int, int]:
    """A stable, saturated colour per label, so one product has one colour everywhere.
    MD5 here only spreads labels over hues: said so, as FIPS-mode Python refuses it otherwise."""
    digest = hashlib.md5(label.encode(), usedforsecurity=False).hexdigest()
    hue = int(digest[:4], 16) / 0xFFFF
    rgb = Image.new("HSV", (1, 1), (int(hue * 255), 200, 220)).convert("RGB").getpixel((0, 0))
    return rgb  # type: ignore[return-value]


def fitted_caption(
    draw: ImageDraw.ImageDraw, label: str, score: float, font: ImageFont.FreeTypeFont, width: float
) -> str:
    """`label score`, the label cut short with "..." where the caption is wider than
    `width` pixels: a caption wider than the image would lose its score off the edge."""

    def text_width(text: str) -> float:
        left, _, right, _ = draw.textbbox((0, 0), text, font=font)
        return right - left

    def shortened(kept: int) -> str:
        return f"{label[:kept].rstrip()}... {score:.2f}"

    caption = f"{label} {score:.2f}"
    if text_width(caption) <= width:
        return caption
    # The longest start of the label that fits (at least none of it: the score alone).
    fits = bisect.bisect_right(
        range(len(label)), width, key=lambda kept: text_width(shortened(kept))
    )
    return shortened(max(0, fits - 1))


def draw_boxes(
    image: np.ndarray, boxes: Iterable[LabelledBox], fonts: CaptionFonts | None = None
) -> Image.Image:
    """A copy of the image, an RGB uint8 HxWx3 array, with each box in its label's colour,
    captioned `label score`.
    `fonts`: one for a whole run, so that each label no font can draw is warned about once
    (default: Pillow's font, installed fonts for the labels it cannot draw)."""
    # What recognition takes, refused as it refuses it: Pillow's own errors named neither
    # the image ("a bytes-like object is required" for a Pillow image, "Cannot handle this
    # data type" for a float array), and a grey or RGBA array was drawn as given.
    check_rgb_image(image)
    fonts = fonts or CaptionFonts()
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    size = max(12, min(canvas.size) // 30)
    width = max(2, min(canvas.size) // 150)
    for (x1, y1, x2, y2), label, score in boxes:
        colour = label_colour(label)
        # x2, y2 excluded; a detector's box under a pixel wide (one clipped at the image's
        # edge) is drawn a pixel wide, where Pillow would refuse it and end the run
        draw.rectangle((x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)), outline=colour, width=width)
        font = fonts.font_for(label, size)
        # Its box, 3 px wider than the text on each side, ends 1 px inside the image.
        caption = fitted_caption(draw, label, score, font, canvas.width - 7)
        left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
        text_y = y1 - (bottom - top) - 6 if y1 >= (bottom - top) + 6 else y1
        # Moved left as far as needed to end inside the image: a box at the right edge
        # would otherwise lose the end of its label and its score.
        text_x = max(0, min(x1, canvas.width - (right - left + 6) - 1))
        draw.rectangle(
            (text_x, text_y, text_x + right - left + 6, text_y + bottom - top + 6), fill=colour
        )
        draw.text((text_x + 3 - left, text_y + 3 - top), caption, fill=(255, 255, 255), font=font)
    return canvas


def draw_results(
    image: np.ndarray, results: Sequence[Recognition], fonts: CaptionFonts | None = None
) -> Image.Image:
    """A copy of the RGB image with each recognition result's box, label and score."""
    return draw_boxes(image, ((r.bbox, r.label, r.score) for r in results), fonts)
