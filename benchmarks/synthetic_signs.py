"""Retrieval on a domain unlike groceries that needs no download: drawn traffic signs.

Usage: python benchmarks/synthetic_signs.py [--model DIR ...] [--per-class 30]
       [--gallery-per-class 5] [--seed 0] [--work DIR]

This script draws 34 sign classes in the spirit of European road signs (its own drawings,
no third-party image): speed limits 20-120 (red ring, black digits: classes that differ
only in their digits), end of a limit (grey stripe over the digits), mandatory directions
(white arrows on blue discs), warnings (red triangles with a glyph), no entry, stop, yield,
priority road. Each photo is one sign cut out tightly (70-90% of its side, off centre by up
to 6%) from a cluttered background, slightly rotated and sheared, with lighting changes,
blur, a low resolution (24-72 px, as in road-sign datasets) and JPEG compression. The first
`--gallery-per-class` photos of each class form the gallery, the rest are queries; prints
recall@1, recall@5 and mAP per model (`shitu.evaluation.RetrievalEvaluator`, cosine similarity).
"""

from __future__ import annotations

import atexit
import random
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from arguments import benchmark_parser, count, folder
from common import every_feature, export_folders
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

from shitu.evaluation import RetrievalEvaluator
from shitu.inference import FeatureExtractor

CANVAS = 160  # drawing size; photos are shrunk to 24-72 px afterwards
RED, BLUE, WHITE, BLACK, YELLOW, GREY = (
    "#C8141E",
    "#1E50B4",
    "#F5F5F5",
    "#141414",
    "#F0C31E",
    "#8C8C8C",
)
SPEEDS = ("20", "30", "50", "60", "70", "80", "100", "120")
ARROWS = ("up", "left", "right", "up-left", "up-right", "round")
WARNINGS = ("!", "curve-left", "curve-right", "bump", "children", "narrow", "slippery", "work")


def sign_classes() -> list[str]:
    return (
        [f"limit {s}" for s in SPEEDS]
        + [f"end limit {s}" for s in SPEEDS[2:6]]
        + [f"ahead {a}" for a in ARROWS]
        + [f"warning {w}" for w in WARNINGS]
        + [
            "no entry",
            "stop",
            "yield",
            "priority road",
            "no overtaking",
            "no vehicles",
            "end all",
            "no parking",
        ]
    )


def _text(draw: ImageDraw.ImageDraw, text: str, size: int, fill: str) -> None:
    font = ImageFont.load_default(size)
    box = draw.textbbox((0, 0), text, font=font)
    x = (CANVAS - (box[2] - box[0])) / 2 - box[0]
    y = (CANVAS - (box[3] - box[1])) / 2 - box[1]
    draw.text((x, y), text, fill=fill, font=font, stroke_width=size // 14, stroke_fill=fill)


def _arrow(draw: ImageDraw.ImageDraw, kind: str) -> None:
    c, w = CANVAS / 2, 12
    if kind == "round":
        draw.arc((c - 38, c - 38, c + 38, c + 38), 30, 330, fill=WHITE, width=w)
        draw.polygon([(c + 30, c - 44), (c + 52, c - 18), (c + 20, c - 14)], fill=WHITE)
        return
    ends = {
        "up": [(c, c + 45), (c, c - 30)],
        "left": [(c + 45, c), (c - 30, c)],
        "right": [(c - 45, c), (c + 30, c)],
        "up-left": [(c + 15, c + 45), (c + 15, c), (c - 30, c)],
        "up-right": [(c - 15, c + 45), (c - 15, c), (c + 30, c)],
    }[kind]
    draw.line(ends, fill=WHITE, width=w, joint="curve")
    (x0, y0), (x1, y1) = ends[-2], ends[-1]
    dx, dy = np.sign(x1 - x0), np.sign(y1 - y0)
    tip = (x1 + dx * 18, y1 + dy * 18)
    side = [(x1 - dy * 22, y1 + dx * 22), (x1 + dy * 22, y1 - dx * 22)]
    draw.polygon([tip, *side], fill=WHITE)


def _warning_glyph(draw: ImageDraw.ImageDraw, kind: str) -> None:
    c = CANVAS / 2 + 12
    if kind == "!":
        _text(draw, "!", 60, BLACK)
    elif kind == "curve-left":
        draw.arc((c - 40, c - 30, c + 10, c + 30), 200, 340, fill=BLACK, width=8)
    elif kind == "curve-right":
        draw.arc((c - 10, c - 30, c + 40, c + 30), 20, 160, fill=BLACK, width=8)
    elif kind == "bump":
        draw.chord((c - 35, c - 10, c + 35, c + 40), 180, 360, fill=BLACK)
    elif kind == "children":
        for dx, h in ((-14, 38), (14, 28)):
            draw.ellipse((c + dx - 7, c - h / 2 - 14, c + dx + 7, c - h / 2), fill=BLACK)
            draw.rectangle((c + dx - 5, c - h / 2, c + dx + 5, c + h / 2), fill=BLACK)
    elif kind == "narrow":
        draw.line([(c - 25, c + 30), (c - 10, c - 25)], fill=BLACK, width=8)
        draw.line([(c + 25, c + 30), (c + 10, c - 25)], fill=BLACK, width=8)
    elif kind == "slippery":
        draw.rectangle((c - 18, c - 22, c + 18, c), fill=BLACK)
        for dx in (-24, 0, 24):
            draw.arc((c + dx - 12, c + 6, c + dx + 12, c + 30), 0, 180, fill=BLACK, width=5)
    else:  # work
        draw.ellipse((c - 20, c - 30, c - 6, c - 16), fill=BLACK)
        draw.line([(c - 13, c - 14), (c - 5, c + 12), (c - 18, c + 32)], fill=BLACK, width=7)
        draw.polygon([(c + 2, c + 32), (c + 30, c + 32), (c + 22, c + 10)], fill=BLACK)


def draw_sign(name: str) -> Image.Image:
    """The sign on a transparent square canvas."""
    image = Image.new("RGBA", (CANVAS, CANVAS), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    disc, m = (4, 4, CANVAS - 4, CANVAS - 4), 4
    if name.startswith("limit "):
        draw.ellipse(disc, fill=RED)
        draw.ellipse((22, 22, CANVAS - 22, CANVAS - 22), fill=WHITE)
        _text(draw, name.split()[-1], 62 if len(name.split()[-1]) == 2 else 46, BLACK)
    elif name.startswith("end limit"):
        draw.ellipse(disc, fill=WHITE, outline=GREY, width=4)
        _text(draw, name.split()[-1], 62, GREY)
        draw.line([(40, CANVAS - 40), (CANVAS - 40, 40)], fill=GREY, width=12)
    elif name.startswith("ahead "):
        draw.ellipse(disc, fill=BLUE)
        _arrow(draw, name.split(maxsplit=1)[1])
    elif name.startswith("warning "):
        up = [(CANVAS / 2, m + 6), (CANVAS - m, CANVAS - 20), (m, CANVAS - 20)]
        draw.polygon(up, fill=RED)
        inner = [(CANVAS / 2, 40), (CANVAS - 28, CANVAS - 32), (28, CANVAS - 32)]
        draw.polygon(inner, fill=WHITE)
        _warning_glyph(draw, name.split(maxsplit=1)[1])
    elif name == "no entry":
        draw.ellipse(disc, fill=RED)
        draw.rectangle((30, CANVAS / 2 - 12, CANVAS - 30, CANVAS / 2 + 12), fill=WHITE)
    elif name == "stop":
        r, c = CANVAS / 2 - m, CANVAS / 2
        points = [
            (c + r * np.cos(np.pi / 8 + k * np.pi / 4), c + r * np.sin(np.pi / 8 + k * np.pi / 4))
            for k in range(8)
        ]
        draw.polygon(points, fill=RED)
        _text(draw, "STOP", 40, WHITE)
    elif name == "yield":
        draw.polygon([(m, 20), (CANVAS - m, 20), (CANVAS / 2, CANVAS - m - 6)], fill=RED)
        draw.polygon([(32, 34), (CANVAS - 32, 34), (CANVAS / 2, CANVAS - 44)], fill=WHITE)
    elif name == "priority road":
        c = CANVAS / 2
        draw.polygon([(c, m), (CANVAS - m, c), (c, CANVAS - m), (m, c)], fill=WHITE)
        draw.polygon([(c, 28), (CANVAS - 28, c), (c, CANVAS - 28), (28, c)], fill=YELLOW)
    elif name == "no overtaking":
        draw.ellipse(disc, fill=RED)
        draw.ellipse((22, 22, CANVAS - 22, CANVAS - 22), fill=WHITE)
        draw.rounded_rectangle((42, 60, 74, 100), 6, fill=BLACK)
        draw.rounded_rectangle((86, 60, 118, 100), 6, fill=RED)
    elif name == "no vehicles":
        draw.ellipse(disc, fill=RED)
        draw.ellipse((22, 22, CANVAS - 22, CANVAS - 22), fill=WHITE)
    elif name == "end all":
        draw.ellipse(disc, fill=WHITE, outline=GREY, width=4)
        for offset in (-20, 0, 20):
            draw.line(
                [(40 + offset, CANVAS - 40 + offset), (CANVAS - 40 + offset, 40 + offset)],
                fill=GREY,
                width=5,
            )
    else:  # no parking
        draw.ellipse(disc, fill=RED)
        draw.ellipse((22, 22, CANVAS - 22, CANVAS - 22), fill=BLUE)
        draw.line([(40, 40), (CANVAS - 40, CANVAS - 40)], fill=RED, width=14)
    return image


def photo(sign: Image.Image, rng: random.Random) -> Image.Image:
    """One roadside photo of `sign`: clutter, pose, light, blur, low resolution, JPEG."""
    size = 2 * CANVAS
    hue = [rng.randint(40, 200) for _ in range(3)]
    noise = np.random.default_rng(rng.randint(0, 2**31)).normal(0, 28, (size // 8, size // 8, 3))
    background = Image.fromarray(np.clip(np.asarray(hue) + noise, 0, 255).astype(np.uint8))
    background = background.resize((size, size), Image.Resampling.BICUBIC).convert("RGBA")
    scale = rng.uniform(0.7, 0.9) * size / CANVAS  # a tight crop, as road-sign datasets cut
    shear = rng.uniform(-0.12, 0.12)
    posed = sign.transform(
        sign.size, Image.Transform.AFFINE, (1, shear, -shear * CANVAS / 2, 0, 1, 0),
        Image.Resampling.BICUBIC,
    ).rotate(rng.uniform(-10, 10), Image.Resampling.BICUBIC)  # fmt: skip
    posed = posed.resize((round(CANVAS * scale),) * 2, Image.Resampling.BICUBIC)
    jitter = round(0.06 * size)
    x = (size - posed.width) // 2 + rng.randint(-jitter, jitter)
    y = (size - posed.height) // 2 + rng.randint(-jitter, jitter)
    background.alpha_composite(posed, (x, y))
    image = background.convert("RGB")
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.45, 1.4))
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.6, 1.3))
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 2.5)))
    side = rng.randint(24, 72)
    return image.resize((side, side), Image.Resampling.BILINEAR)


def make_signs(folder: Path, per_class: int, seed: int) -> tuple[list[Path], np.ndarray]:
    rng = random.Random(seed)
    paths, labels = [], []
    for label, name in enumerate(sign_classes()):
        sign = draw_sign(name)
        for index in range(per_class):
            path = folder / f"{label:02d}_{index:03d}.jpg"
            photo(sign, rng).save(path, quality=rng.randint(60, 95))
            paths.append(path)
            labels.append(label)
    return paths, np.asarray(labels)


def main() -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument(
        "--model", action="append", help="export folder, repeatable (default: the shipped model)"
    )
    parser.add_argument("--per-class", type=count, default=30, help="photos drawn per sign")
    parser.add_argument(
        "--gallery-per-class", type=count, default=5, help="of them, gallery photos"
    )
    parser.add_argument("--seed", type=int, default=0, help="drawing seed")
    parser.add_argument("--work", type=folder, help="keep the drawn photos here")
    args = parser.parse_args()
    if args.gallery_per_class >= args.per_class:  # no queries left
        parser.error("--gallery-per-class must be below --per-class")
    models = export_folders(args.model)
    work = args.work or Path(tempfile.mkdtemp(prefix="shitu-signs-"))
    if args.work is None:  # a scratch folder: gone when the table is printed
        atexit.register(shutil.rmtree, work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    paths, labels = make_signs(work, args.per_class, args.seed)
    in_gallery = np.arange(len(paths)) % args.per_class < args.gallery_per_class
    evaluator = RetrievalEvaluator(recall_k=(1, 5))
    kept = f" ({work})" if args.work else ""  # not the scratch folder, gone by then
    print(f"{len(sign_classes())} classes, {in_gallery.sum()} gallery photos, "
          f"{(~in_gallery).sum()} queries{kept}\n")  # fmt: skip
    print("| model | recall@1 | recall@5 | mAP |")
    print("|---|---:|---:|---:|")
    for model in models:
        features = torch.from_numpy(every_feature(FeatureExtractor.load(model), paths))
        result = evaluator.evaluate(
            features[~in_gallery], torch.from_numpy(labels[~in_gallery]),
            features[in_gallery], torch.from_numpy(labels[in_gallery]),
        )  # fmt: skip
        values = " | ".join(f"{result[name]:.4f}" for name in ("recall@1", "recall@5", "mAP"))
        print(f"| {model} | {values} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
