"""The folder scan behind every command given a folder: what it takes, and that it says
what it skips (real GIFs, real broken links, real linked folders)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from PIL import Image

from shitu import image_files
from shitu.cli.common import expand_images
from shitu.errors import DataError
from shitu.image_files import (
    TEXT_PROBE_BYTES,
    holds_an_image,
    is_text,
    read_image_file,
    scan_images,
)
from shitu.index import collect_items

SUPPORTED = "images are read from .bmp .jpeg .jpg .png .tif .tiff .webp files"


def save(path: Path, fmt: str = "JPEG") -> Path:
    """A real image file in `fmt` (GIF, PNG, ...), whatever its name says."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path, format=fmt)
    return path


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_scan_takes_the_images_and_names_what_it_skips_in_one_warning(tmp_path, caplog):
    photos = tmp_path / "photos"
    taken = [save(photos / "a.jpg"), save(photos / "b.PNG", "PNG"), save(photos / "sub" / "c.jpg")]
    save(photos / "anim.gif", "GIF")
    save(photos / "sub" / "still.gif", "GIF")
    save(photos / "IMG_0001")  # a JPEG without its extension
    (photos / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    # Quiet: hidden files and folders, and sidecars that are no one's photos.
    save(photos / "._a.jpg")
    save(photos / ".thumbnails" / "a.jpg")
    (photos / ".DS_Store").write_bytes(b"\0")
    (photos / "labels.txt").write_text("a.jpg\tApple\n")
    (photos / "a.xmp").write_text("<x:xmpmeta/>")

    with caplog.at_level(logging.WARNING, logger="shitu.image_files"):
        assert scan_images(photos) == taken
    assert warnings_of(caplog) == [
        f"skipped 4 files in {photos} (.gif x2, no extension x1, broken link x1; e.g. "
        f"{photos / 'IMG_0001'}, {photos / 'anim.gif'}, {photos / 'gone.jpg'}, ...); {SUPPORTED}"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert scan_images(photos / "sub") == [photos / "sub" / "c.jpg"]
    assert warnings_of(caplog) == [
        f"skipped 1 file in {photos / 'sub'} (.gif x1; e.g. {photos / 'sub' / 'still.gif'}); "
        f"{SUPPORTED}"
    ]
    caplog.clear()
    (photos / "sub" / "still.gif").unlink()
    with caplog.at_level(logging.WARNING):  # a folder of images only is not worth a word
        scan_images(photos / "sub")
    assert warnings_of(caplog) == []


def test_linked_folders_are_searched_once_and_links_back_are_reported(tmp_path, caplog):
    elsewhere = save(tmp_path / "elsewhere" / "d.jpg")
    photos = tmp_path / "photos"
    own = save(photos / "a.jpg")
    (photos / "more").symlink_to(elsewhere.parent)
    (photos / "loop").symlink_to(photos)  # would be searched forever
    with caplog.at_level(logging.WARNING):
        assert scan_images(photos) == [own, photos / "more" / "d.jpg"]
    assert warnings_of(caplog) == [
        f"skipped 1 file in {photos} (link to a folder scanned already x1; e.g. "
        f"{photos / 'loop'}); {SUPPORTED}"
    ]


def test_label_folders_warn_once_for_the_tree_and_about_loose_images(tmp_path, caplog):
    root = tmp_path / "gallery"
    save(root / "Apple" / "1.jpg")
    save(root / "Apple" / "2.gif", "GIF")
    save(root / "Pear" / "1.jpg")
    save(root / "Pear" / "2.gif", "GIF")
    save(root / "loose.jpg")  # which label? none: said, not guessed
    save(root / ".cache" / "x.jpg")  # not a label
    with caplog.at_level(logging.WARNING):
        items = collect_items([root])
    assert [(i.path.name, i.label) for i in items] == [("1.jpg", "Apple"), ("1.jpg", "Pear")]
    assert warnings_of(caplog) == [
        f"skipped 3 files in {root} (.gif x2, not in a label folder x1; e.g. "
        f"{root / 'Apple' / '2.gif'}, {root / 'Pear' / '2.gif'}, {root / 'loose.jpg'}); "
        f"{SUPPORTED}"
    ]


def test_a_folder_without_images_is_an_error_naming_it(tmp_path, caplog):
    gifs = tmp_path / "gifs"
    save(gifs / "anim.gif", "GIF")
    photos = tmp_path / "photos"
    save(photos / "a.jpg")
    empty = f"^{re.escape(str(gifs))}: no images in this folder$"
    with caplog.at_level(logging.WARNING), pytest.raises(DataError, match=empty):
        expand_images([str(photos), str(gifs)])  # one good folder does not hide it
    assert warnings_of(caplog) == [
        f"skipped 1 file in {gifs} (.gif x1; e.g. {gifs / 'anim.gif'}); {SUPPORTED}"
    ]
    with pytest.raises(DataError, match=empty):
        collect_items([gifs], label="Fanta")
    save(gifs / "loose.jpg")
    with pytest.raises(
        DataError, match=f"^{re.escape(str(gifs))}: no images in its label sub-folders"
    ):
        collect_items([gifs])


def test_a_folder_of_photos_without_label_folders_is_told_how_to_label_them(tmp_path):
    photos = tmp_path / "Lemon"
    save(photos / "a.jpg")
    hint = (  # as a Python caller gives it too
        "give them all one label with --label LABEL (`shitu index build` and `shitu index "
        "add`; label= in Python)"
    )
    with pytest.raises(DataError, match=f"no images in its label sub-folders.*{re.escape(hint)}$"):
        collect_items([photos])
    with pytest.raises(DataError, match=re.escape("add`; label= in Python), or list it in")):
        collect_items([photos / "a.jpg"])  # one image alone


def test_unreadable_folders_are_reported(tmp_path, caplog):
    photos = tmp_path / "photos"
    save(photos / "a.jpg")
    locked = photos / "locked"
    save(locked / "b.jpg")
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("this user reads folders whatever their permissions (root)")
        with caplog.at_level(logging.WARNING):
            assert scan_images(photos) == [photos / "a.jpg"]
    finally:
        locked.chmod(0o755)
    assert f"(unreadable folder x1; e.g. {locked})" in warnings_of(caplog)[0]


def test_the_cli_shows_the_warning_and_the_error(tmp_path):
    """What a user of `shitu extract` sees, from a real process (its logging set up as
    the entry point does)."""
    gifs = tmp_path / "gifs"
    save(gifs / "anim.gif", "GIF")
    (gifs / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    result = subprocess.run(
        [sys.executable, "-m", "shitu", "extract", str(gifs), "--out", str(tmp_path / "f")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"warning: skipped 2 files in {gifs} (.gif x1, broken link x1; e.g. "
        f"{gifs / 'anim.gif'}, {gifs / 'gone.jpg'}); {SUPPORTED}",
        f"error: {gifs}: no images in this folder",
    ]


def test_is_text_tells_text_from_image_bytes(tmp_path):
    """UTF-8 without NUL bytes is text, also where the probe cuts a character in two;
    image bytes (binary headers, NULs) and empty files are not."""
    cut = "a" * (TEXT_PROBE_BYTES - 1) + "é"  # its 2 bytes straddle the end of the probe
    assert is_text(b"photos/a.jpg\tbanana\n") and is_text(cut.encode())
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    assert not is_text((tmp_path / "a.png").read_bytes())
    assert not is_text(b"") and not is_text(b"text\x00with a NUL") and not is_text(b"\xff\xd8")


def test_the_image_file_size_limit_grows_with_the_pixel_limit_and_says_so(tmp_path, monkeypatch):
    """An image allowed by SHITU_MAX_MEGAPIXELS may be stored uncompressed (8 bytes a
    pixel, a 16-bit RGBA TIFF): its file was refused at 2 GiB whatever the pixel limit,
    by a message that did not say how to allow it. Devices stay refused."""
    photo = save(tmp_path / "photo.png", "PNG")
    size = photo.stat().st_size
    monkeypatch.setattr(image_files, "MAX_IMAGE_FILE_BYTES", size - 1)  # 2 GiB at 250 MP
    monkeypatch.delenv("SHITU_MAX_MEGAPIXELS", raising=False)
    with pytest.raises(OSError) as caught:
        read_image_file(photo)
    assert caught.value.strerror == (
        f"0.0 GiB, over the {(size - 1) / 2**30:g} GiB an image file may hold "
        "(SHITU_MAX_MEGAPIXELS raises it, with the pixel limit); not read"
    )
    monkeypatch.setenv("SHITU_MAX_MEGAPIXELS", "500")  # twice the default: twice the bytes
    assert read_image_file(photo) == photo.read_bytes()
    with pytest.raises(OSError, match="a character device, not an image file"):
        read_image_file("/dev/zero")


def test_an_image_too_large_for_pillows_own_check_given_by_name_is_still_an_image(
    tmp_path, monkeypatch
):
    """Pillow refuses, as it opens it, an image over twice its MAX_IMAGE_PIXELS (a GIF of
    180 megapixels at its default) with an error of no OSError kind: `index add` of such a
    file by name stopped with a traceback while telling an image from a label file."""
    gif = tmp_path / "shelf.gif"
    Image.new("P", (20, 20)).save(gif)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 400 pixels: over twice the limit
    items = collect_items([gif], label="Shelf")
    assert [(item.path, item.label) for item in items] == [(gif.resolve(), "Shelf")]


def test_telling_a_large_image_from_a_label_file_prints_no_pillow_warning(tmp_path, monkeypatch):
    """An image between once and twice Pillow's pixel limit made Pillow print its own
    DecompressionBombWarning on stderr while a scan only asked whether a file named without
    an image suffix is an image (scans can run before shitu lifts that limit)."""
    scan = tmp_path / "scan"  # no suffix: told by content
    Image.new("1", (10_000, 10_000)).save(scan, format="PNG")  # 100 MP in a small file
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1024 * 1024 * 1024 // 4 // 3)  # Pillow's
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert holds_an_image(scan)
    assert [warning.message for warning in caught] == []
