"""Fonts for the captions drawn on images (`--save-vis`). Pillow's built-in font has ASCII
glyphs only, so labels in other scripts (Chinese product names, Cyrillic, Arabic, accented
Latin) need another font: the user's (`--vis-font`) or one installed on the system.
All drawing code gets its fonts here, so every picture falls back the same way."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import cast

from PIL import ImageFont

from shitu.errors import DataError
from shitu.fileio import special_kind

logger = logging.getLogger(__name__)

PROBE_SIZE = 32  # glyph coverage does not depend on the size: probe once, at this one
UNMAPPED = "\U0010fffd"  # a private-use code point no font maps: draws the font's .notdef
SCORE_CHARS = " 0123456789."  # what a caption adds to its label: `label 0.87`
_WINDOWS_FONTS = Path(os.environ.get("WINDIR", "C:/Windows")) / "Fonts"
# Tried in order where fontconfig is missing (Windows, macOS) or finds nothing that fits:
# CJK fonts first (they draw Latin too), then wide-coverage ones for Cyrillic, Arabic, ...
SYSTEM_FONTS: tuple[Path, ...] = (
    Path("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc"),  # Debian, Ubuntu
    Path("/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc"),  # Fedora
    Path("/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc"),  # Arch
    Path("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"),
    Path("/usr/share/fonts/wqy-microhei/wqy-microhei.ttc"),
    Path("/System/Library/Fonts/PingFang.ttc"),  # macOS
    Path("/System/Library/Fonts/STHeiti Medium.ttc"),
    Path("/Library/Fonts/Arial Unicode.ttf"),
    Path("/System/Library/Fonts/Supplemental/Arial Unicode.ttf"),
    _WINDOWS_FONTS / "msyh.ttc",  # Microsoft YaHei
    _WINDOWS_FONTS / "simhei.ttf",
    _WINDOWS_FONTS / "segoeui.ttf",
    Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),
    Path("/usr/share/fonts/dejavu/DejaVuSans.ttf"),
    Path("/usr/share/fonts/TTF/DejaVuSans.ttf"),
)


@dataclass(frozen=True)
class FontFace:
    """One face of a font file. A collection (.ttc) holds several: Noto Sans CJK has its
    Japanese, Korean, Simplified and Traditional Chinese faces in one file, and the same
    character is drawn in a different regional form by each."""

    path: str
    index: int = 0


def check_font_file(path: Path, index: int = 0) -> None:
    """Raise a one-line DataError unless Pillow can draw with face `index` of the font file
    at `path`: a wrong `--vis-font` (or `--vis-font-index`) is reported before any image is
    read, not after the first one."""
    if not path.is_file():
        kind = (
            "a folder"
            if path.is_dir()
            else f"{special_kind(path.stat())}, not a font file"
            if path.exists()
            else "no such file"
        )
        raise DataError(f"font {path}: {kind}")
    try:
        ImageFont.truetype(str(path), PROBE_SIZE)
    except OSError as exc:
        raise DataError(f"font {path}: not a TrueType/OpenType font ({exc})") from None
    try:
        ImageFont.truetype(str(path), PROBE_SIZE, index=index)
    except OSError:
        raise DataError(f"font {path}: has no face {index} (faces count from 0)") from None


@lru_cache(maxsize=256)
def load_font(face: FontFace | None, size: int) -> ImageFont.FreeTypeFont:
    """The font face (None: Pillow's built-in font) at `size` pixels."""
    if face is None:  # with a size, Pillow >= 10.1 gives its scalable font (Aileron)
        return cast(ImageFont.FreeTypeFont, ImageFont.load_default(size))
    return ImageFont.truetype(face.path, size, index=face.index)


@lru_cache(maxsize=64)
def _probe(face: FontFace | None) -> tuple[ImageFont.FreeTypeFont, tuple]:
    """The font without text shaping (each character drawn as the glyph its cmap gives,
    with no dotted circles or ligatures standing in), and what its .notdef looks like."""
    font = load_font(face, PROBE_SIZE).font_variant(layout_engine=ImageFont.Layout.BASIC)
    return font, _drawing(font, UNMAPPED)


def _drawing(font: ImageFont.FreeTypeFont, char: str) -> tuple:
    """What the font draws for `char`: its box and its pixels."""
    return font.getbbox(char), bytes(font.getmask(char))


@lru_cache(maxsize=65536)
def has_glyph(face: FontFace | None, char: str) -> bool:
    """Whether the font has a glyph for `char`. Pillow does not expose the font's cmap, but
    a character the font lacks is drawn as its .notdef glyph (the tofu box), exactly as a
    code point no font maps is: a drawing that differs from that one is a real glyph."""
    font, notdef = _probe(face)
    return _drawing(font, char) != notdef


def needs_glyph(char: str) -> bool:
    """Spaces draw nothing, and control and format characters (joiners, direction marks)
    and variation selectors change how others draw: none of them needs a glyph."""
    code = ord(char)
    selector = 0xFE00 <= code <= 0xFE0F or 0xE0100 <= code <= 0xE01EF
    return not (char.isspace() or selector or unicodedata.category(char).startswith("C"))


def missing_chars(face: FontFace | None, text: str) -> str:
    """The characters of `text` that the font cannot draw, each once, in order."""
    return "".join(c for c in dict.fromkeys(text) if needs_glyph(c) and not has_glyph(face, c))


def _fontconfig_match(text: str) -> FontFace | None:
    """The font face fontconfig picks for `text`'s characters (Linux, BSD; macOS with
    Homebrew): coverage ranks first in its matching, so it names one that has them all if
    any does, and the user's language picks the face of a collection (Chinese text in a
    zh_CN locale gets Noto Sans CJK SC, not the JP face that comes first in the file)."""
    fc_match = shutil.which("fc-match")
    if fc_match is None:
        return None
    charset = " ".join(f"{ord(c):x}" for c in dict.fromkeys(text) if needs_glyph(c))
    command = [fc_match, "--format=%{index}:%{file}", f"sans-serif:charset={charset}"]
    try:
        found = subprocess.run(command, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    index, _, path = found.stdout.strip().partition(":")
    if not path or not index.isdigit():
        return None
    return FontFace(path, int(index))


@lru_cache(maxsize=1024)
def installed_fonts(text: str) -> tuple[FontFace, ...]:
    """Installed font faces to try for `text`: fontconfig's pick, then the usual places."""
    listed = (FontFace(str(path)) for path in SYSTEM_FONTS if path.is_file())
    found = (_fontconfig_match(text), *listed)
    return tuple(face for face in dict.fromkeys(found) if face is not None and _readable(face))


def _readable(face: FontFace) -> bool:
    try:
        _probe(face)
    except OSError:  # not a font, or a colour emoji font that has one fixed size only
        return False
    return True


class CaptionFonts:
    """Chooses the font for each caption: the given font file (face `index` of a
    collection), else Pillow's built-in font; for a label that one cannot draw, an
    installed font that can. Use one for a whole run: a label that no font can draw is
    warned about once, not on every image, and the installed fonts chosen before are tried
    first (a search runs `fc-match`)."""

    def __init__(self, path: str | os.PathLike | None = None, index: int = 0) -> None:
        if path is not None:
            check_font_file(Path(path), index)
        self.given = None if path is None else FontFace(str(path), index)
        self.chosen: list[FontFace | None] = []
        self.warned: set[str] = set()

    def font_for(self, label: str, size: int) -> ImageFont.FreeTypeFont:
        """A font for `label` and its score at `size` pixels: the first that draws them all,
        else the one that lacks fewest characters (drawn as empty boxes, after a warning)."""
        text = label + SCORE_CHARS
        for known in (self.given, *self.chosen):  # None is a face here: Pillow's own font
            if not missing_chars(known, text):
                return load_font(known, size)
        choices = (self.given, *installed_fonts(text))
        face, missing = min(
            ((choice, missing_chars(choice, text)) for choice in choices),
            key=lambda choice: len(choice[1]),
        )
        if not missing:
            self.chosen.append(face)
        elif label not in self.warned:
            self.warned.add(label)
            logger.warning(
                "no font found that can draw all of the label %r (missing %s): its caption "
                "shows empty boxes instead; give --vis-font FILE, a font that has these "
                "characters (e.g. Noto Sans CJK for Chinese)",
                label,
                " ".join(missing),
            )
        return load_font(face, size)
