"""Finding a font on the test machine that has given characters, independently of the
search that shitu.pipeline.fonts makes (CI machines may have no such font: tests skip)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from shitu.pipeline import fonts

# Label pairs of the same length whose characters all differ: drawn in a font that has
# them, the two captions differ; drawn as tofu, they look the same.
LABEL_PAIRS = (("可口可乐", "百事雪碧"), ("Жук", "Дом"), ("éèê", "ñõü"))


def _listed_fonts() -> list[str]:
    """The font files fontconfig knows (none without it)."""
    if not shutil.which("fc-list"):
        return []
    listed = subprocess.run(
        ["fc-list", "--format=%{file}\n"], capture_output=True, text=True, check=False
    ).stdout
    return listed.splitlines()


def font_covering(text: str) -> str | None:
    """A font file on this machine that has every character of `text`."""
    for path in (*_listed_fonts(), *map(str, fonts.SYSTEM_FONTS)):
        if Path(path).suffix.lower() not in (".ttf", ".otf", ".ttc") or not Path(path).is_file():
            continue
        try:
            if not fonts.missing_chars(fonts.FontFace(path), text + fonts.SCORE_CHARS):
                return path
        except OSError:
            continue
    return None


def labels_and_font() -> tuple[tuple[str, str], str] | None:
    """The first of LABEL_PAIRS that Pillow's own font cannot draw and an installed font
    can, with that font."""
    for pair in LABEL_PAIRS:
        font = font_covering("".join(pair))
        if font is not None:
            return pair, font
    return None


def font_collection() -> str | None:
    """An installed font collection (.ttc) with more than one face."""
    for path in (*_listed_fonts(), *map(str, fonts.SYSTEM_FONTS)):
        if Path(path).suffix.lower() != ".ttc" or not Path(path).is_file():
            continue
        try:
            fonts.load_font(fonts.FontFace(path, 1), fonts.PROBE_SIZE)
        except OSError:
            continue
        return path
    return None
