"""Draw recognition results on the image (boxes, labels, scores) with Pillow."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from shitu.pipeline.recognizer import Recognition


def label_colour(label: str) -> tuple[int, int, int]:
    """A stable, saturated colour per label, so one product has one colour everywhere."""
    hue = int(hashlib.md5(label.encode()).hexdigest()[:4], 16) / 0xFFFF
    rgb = Image.new("HSV", (1, 1), (int(hue * 255), 200, 220)).convert("RGB").getpixel((0, 0))
    return rgb  # type: ignore[return-value]


def draw_results(image: np.ndarray, results: Sequence[Recognition]) -> Image.Image:
    """A copy of the RGB image with each result's box and `label score` caption."""
    canvas = Image.fromarray(image).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    size = max(12, min(canvas.size) // 30)
    font = ImageFont.load_default(size=size)
    width = max(2, min(canvas.size) // 150)
    for result in results:
        colour = label_colour(result.label)
        x1, y1, x2, y2 = result.bbox
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), outline=colour, width=width)
        caption = f"{result.label} {result.score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
        text_y = y1 - (bottom - top) - 6 if y1 >= (bottom - top) + 6 else y1
        draw.rectangle((x1, text_y, x1 + right - left + 6, text_y + bottom - top + 6), fill=colour)
        draw.text((x1 + 3 - left, text_y + 3 - top), caption, fill=(255, 255, 255), font=font)
    return canvas
