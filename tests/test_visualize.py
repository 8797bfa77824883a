"""Captions on --save-vis pictures: glyph coverage, the font option, the fallback to an
installed font for labels Pillow's font cannot draw, and the warning when nothing can."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from shitu.cli.common import visualisation_writer
from shitu.cli.main import build_parser
from shitu.cli.main import main as shitu_main
from shitu.data.transforms.ops import UnreadableImageError
from shitu.pipeline import CaptionFonts, draw_boxes, fonts
from shitu.pipeline.visualize import fitted_caption, label_colour
from tests.font_helpers import font_collection, labels_and_font

BOX = (10, 60, 230, 110)


@pytest.fixture
def no_installed_fonts(monkeypatch):
    """A machine with no fonts beyond Pillow's own (as a bare CI machine may be)."""
    monkeypatch.setattr(fonts, "installed_fonts", lambda text: ())


@pytest.fixture
def found():
    found = labels_and_font()
    if found is None:
        pytest.skip("no installed font draws any of the test labels")
    return found


def face_of(font) -> fonts.FontFace:
    return fonts.FontFace(font.path, font.index)


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def text_pixels(caption_fonts: CaptionFonts, label: str) -> np.ndarray:
    """Where the caption's white text is, drawn over black."""
    image = draw_boxes(np.zeros((120, 240, 3), np.uint8), [(BOX, label, 0.5)], caption_fonts)
    return np.all(np.asarray(image) == 255, axis=-1)


def test_glyph_coverage_tells_pillows_ascii_glyphs_from_its_tofu():
    assert fonts.missing_chars(None, "Banana juice 0.93") == ""
    # Joiners and variation selectors need no glyph; each missing character named once.
    assert fonts.missing_chars(None, "a\u200db\ufe0f Café 可乐 可") == "é可乐"


def test_a_latin_label_keeps_pillows_font(caplog):
    assert CaptionFonts().font_for("Oat milk", 20) is fonts.load_font(None, 20)
    assert not warnings(caplog)


def test_a_label_pillows_font_draws_searches_no_installed_font(monkeypatch):
    """Pillow's own font, as the first choice, was taken for "none drew it": each caption
    it drew ran the search for an installed font (`fc-match` per new label) and added
    Pillow's font to the chosen ones again, a list that grew with every caption of a run."""
    searched: list[str] = []
    monkeypatch.setattr(fonts, "installed_fonts", lambda text: searched.append(text) or ())
    caption_fonts = CaptionFonts()
    for _ in range(3):
        assert caption_fonts.font_for("Oat milk", 20) is fonts.load_font(None, 20)
    assert searched == []
    assert caption_fonts.chosen == []


def test_a_label_no_font_can_draw_keeps_its_box_and_is_warned_about_once(
    no_installed_fonts, caplog
):
    caption_fonts = CaptionFonts()
    image = np.zeros((120, 240, 3), np.uint8)
    for _ in range(3):  # three photos of one run
        drawn = draw_boxes(image, [(BOX, "可口可乐", 0.9), (BOX, "banana", 0.8)], caption_fonts)
    (message,) = warnings(caplog)
    assert "'可口可乐'" in message and "missing 可 口 乐" in message and "--vis-font" in message
    x1, _, x2, y2 = BOX
    assert tuple(np.asarray(drawn)[y2 - 1, (x1 + x2) // 2]) == label_colour("banana")
    assert text_pixels(caption_fonts, "可口可乐").any()  # the caption is still drawn


def test_the_font_given_draws_glyphs_that_pillows_font_draws_as_tofu(
    no_installed_fonts, found, caplog
):
    (first, second), path = found
    given = CaptionFonts(Path(path))
    assert given.font_for(first, 20).path == path
    # as text too (it was refused with an AttributeError, 'str' has no is_file)
    assert CaptionFonts(str(path)).font_for(first, 20).path == path
    assert (text_pixels(given, first) != text_pixels(given, second)).any()
    assert not warnings(caplog)
    tofu = CaptionFonts()
    assert (text_pixels(tofu, first) == text_pixels(tofu, second)).all()
    assert len(warnings(caplog)) == 2


def test_without_a_font_given_an_installed_font_that_has_the_glyphs_is_used(
    found, caplog, monkeypatch
):
    (first, second), _ = found
    searched: list[str] = []
    search = fonts.installed_fonts
    monkeypatch.setattr(
        fonts, "installed_fonts", lambda text: searched.append(text) or search(text)
    )
    caption_fonts = CaptionFonts()
    chosen = caption_fonts.font_for(first, 20)
    assert chosen is not fonts.load_font(None, 20)
    assert fonts.missing_chars(face_of(chosen), first + fonts.SCORE_CHARS) == ""
    for label in (second, first):
        assert not fonts.missing_chars(face_of(caption_fonts.font_for(label, 20)), label)
    assert searched.count(first + fonts.SCORE_CHARS) == 1  # the font found is kept
    assert not warnings(caplog)


def fontconfig_faces(text: str, languages: tuple[str, ...]) -> list[tuple[str, int]]:
    """The face (file, index) that fontconfig picks for `text` for each language."""
    if shutil.which("fc-match") is None:
        pytest.skip("no fontconfig on this machine")
    charset = " ".join(f"{ord(c):x}" for c in text)
    picked = []
    for language in languages:
        found = subprocess.run(
            ["fc-match", "--format=%{index}:%{file}", f"sans-serif:charset={charset}"],
            env={**os.environ, "FC_LANG": language},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        index, _, path = found.partition(":")
        picked.append((path, int(index)))
    return picked


def test_a_font_collection_draws_chinese_in_the_face_of_the_users_language(monkeypatch):
    """Noto Sans CJK holds its Japanese, Simplified and Traditional Chinese faces in one
    .ttc, and draws shared characters differently in each: the caption uses the face that
    fontconfig picks for the user's language, not the collection's first (Japanese) one."""
    label = "骨刃"  # characters whose regional forms differ
    languages = ("zh-cn", "zh-tw")
    expected = fontconfig_faces(label, languages)
    if len(set(expected)) < 2:
        pytest.skip("no installed font collection with regional faces for these characters")
    for language, face in zip(languages, expected, strict=True):
        monkeypatch.setenv("FC_LANG", language)
        fonts.installed_fonts.cache_clear()
        font = CaptionFonts().font_for(label, 20)
        assert (font.path, font.index) == face


def test_label_colours_are_drawn_where_fips_mode_refuses_md5_for_security(monkeypatch):
    """FIPS-mode Python (RHEL with FIPS enabled) refuses MD5 unless it is declared as not
    for security; the colours stay what they were."""
    import hashlib

    colour = label_colour("banana")
    real_md5 = hashlib.md5

    def fips_md5(data: bytes = b"", *, usedforsecurity: bool = True):
        if usedforsecurity:
            raise ValueError("[digital envelope routines] unsupported")
        return real_md5(data, usedforsecurity=False)

    monkeypatch.setattr(hashlib, "md5", fips_md5)
    assert label_colour("banana") == colour


def test_a_box_under_a_pixel_wide_is_drawn_not_refused():
    """A detector's box clipped at the image's edge can be narrower than a pixel (or empty):
    `shitu detect --save-vis` draws it as a line instead of stopping with Pillow's error."""
    image = np.zeros((60, 80, 3), np.uint8)
    # each box, and a pixel on its line below any caption
    for box, (row, column) in [
        ((10.2, 10, 10.8, 40), (35, 10)),
        ((79.6, 5, 80, 50), (45, 79)),
        ((20, 45, 50, 45), (45, 35)),
    ]:
        drawn = np.asarray(draw_boxes(image, [(box, "x", 0.5)]))
        assert tuple(drawn[row, column]) == label_colour("x")


def test_drawing_on_what_is_no_rgb_array_is_refused_naming_it_as_recognition_does():
    """A Pillow image failed on "a bytes-like object is required, not 'Image'", a float
    array on "Cannot handle this data type": neither said what the image should be."""
    image = np.zeros((60, 80, 3), np.uint8)
    for given, message in [
        (Image.fromarray(image), r"got Image \(np.asarray\(image.convert\('RGB'\)\) gives one\)"),
        (image.astype(np.float32), r"got float32 \(60, 80, 3\) \(float: pixels are uint8"),
        (image[:, :, 0], r"got uint8 \(60, 80\) \(grey: "),
    ]:
        with pytest.raises(UnreadableImageError, match=message):
            draw_boxes(given, [(BOX, "x", 0.5)])
    assert draw_boxes(image[:, :, ::-1], [(BOX, "x", 0.5)]).size == (80, 60)  # a BGR view


def test_a_caption_at_the_right_edge_is_moved_left_to_show_the_label_and_score_whole():
    image = np.zeros((120, 240, 3), np.uint8)
    label = "Arla-Ecological-Medium-Fat-Milk"
    at_left = draw_boxes(image, [((0, 60, 100, 110), label, 0.91)])
    at_right = draw_boxes(image, [((140, 60, 240, 110), label, 0.91)])
    white = [np.all(np.asarray(drawn) == 255, axis=-1) for drawn in (at_left, at_right)]
    assert white[0].sum() == white[1].sum() > 0  # every pixel of the text, not its start only
    assert not white[1][:, -1].any()  # nor does it touch the edge


def test_a_caption_wider_than_the_image_shortens_the_label_and_keeps_the_score():
    image = np.zeros((120, 240, 3), np.uint8)
    label = "Very-long-product-name-" * 20
    drawn = draw_boxes(image, [((0, 60, 240, 110), label, 0.91)])
    assert not np.asarray(drawn)[:60, -1].any()  # the caption, above the box, ends inside
    canvas = Image.fromarray(image)
    font = CaptionFonts().font_for(label, 12)
    caption = fitted_caption(ImageDraw.Draw(canvas), label, 0.91, font, 200)
    assert caption.startswith("Very-long-") and caption.endswith("... 0.91")
    assert ImageDraw.Draw(canvas).textlength(caption, font=font) <= 200
    assert fitted_caption(ImageDraw.Draw(canvas), "Kiwi", 0.91, font, 200) == "Kiwi 0.91"


def test_vis_font_that_cannot_be_used_is_refused_before_anything_is_written(tmp_path, capsys):
    photo = tmp_path / "photos" / "photo.jpg"
    photo.parent.mkdir()
    Image.new("RGB", (32, 32)).save(photo)
    not_a_font = tmp_path / "notes.ttf"
    not_a_font.write_text("not a font")
    vis = tmp_path / "vis"
    for font, problem in (
        (tmp_path / "missing.ttf", "no such file"),
        (not_a_font, "not a TrueType/OpenType font (unknown file format)"),
        (tmp_path, "a folder"),
        (Path("/dev/null"), "a character device, not a font file"),  # not "no such file"
    ):
        code = shitu_main(
            ["recognize", str(photo), "--save-vis", str(vis), "--vis-font", str(font)]
        )
        assert code == 2
        assert capsys.readouterr().err == f"error: font {font}: {problem}\n"
        assert not vis.exists()
    assert shitu_main(["recognize", str(photo), "--vis-font", str(not_a_font)]) == 2
    expected = f"error: --vis-font {not_a_font}: only used with --save-vis DIR\n"
    assert capsys.readouterr().err == expected


def test_vis_font_index_picks_the_face_of_a_font_collection(tmp_path, capsys):
    """A .ttc holds several faces (Noto Sans CJK: one per region, each drawing some
    characters in its own form); without --vis-font-index its first face is used."""
    collection = font_collection()
    if collection is None:
        pytest.skip("no font collection (.ttc) with several faces is installed")
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (32, 32)).save(photo)
    command = ["recognize", str(photo), "--save-vis", str(tmp_path / "vis")]

    def font(*options: str) -> tuple[str, str]:
        args = build_parser().parse_args([*command, "--vis-font", collection, *options])
        return visualisation_writer(args, [photo]).fonts.font_for("Oat milk", 20).getname()

    first, second = (fonts.load_font(fonts.FontFace(collection, i), 20) for i in (0, 1))
    assert font() == first.getname() != second.getname() == font("--vis-font-index", "1")
    assert shitu_main([*command, "--vis-font", collection, "--vis-font-index", "999"]) == 2
    refused = f"error: font {collection}: has no face 999 (faces count from 0)\n"
    assert capsys.readouterr().err == refused
    assert shitu_main([*command, "--vis-font-index", "1"]) == 2
    expected = "error: --vis-font-index 1: only used with --vis-font FILE\n"
    assert capsys.readouterr().err == expected
