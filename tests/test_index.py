"""Gallery library on real Faiss and real SQLite files: edits, search quality, crash safety."""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import re
import shutil
import sqlite3
import subprocess
import threading
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import pytest

from shitu.cli.main import main as shitu_main
from shitu.errors import DataError, GalleryError
from shitu.index import Catalog, Embedder, Gallery, GalleryItem, collect_items, metadata
from shitu.index import gallery as gallery_module
from shitu.index.backends.faiss_backend import CHANGES_KEY, MIN_TRAIN
from shitu.index.labels import parse_label_file
from shitu.index.metadata import MetadataStore
from shitu.vectors import l2_normalize
from tests.index_helpers import (
    PixelEmbedder,
    clustered,
    exact_top_k,
    make_images,
    run_killed,
    snapshot,
    unit,
)

DIM = 16


def new_gallery(path: Path, **kwargs) -> Gallery:
    return Gallery.create(path, embedding_dim=DIM, model_fingerprint="test-model", **kwargs)


def test_a_library_is_built_in_folders_not_made_yet_and_not_under_a_file(tmp_path):
    """`Gallery.build("out/galleries/mine", ...)` failed on a FileNotFoundError naming its
    staging folder's lock file (`create` made the folders); a file in the way of either
    failed on a FileExistsError or NotADirectoryError traceback, then on a DataError, which
    a caller catching the GalleryError the rest of the API raises missed."""
    photos = make_images(tmp_path / "photos", 2)
    items = [GalleryItem(photo, "x") for photo in photos]
    deep = tmp_path / "out" / "galleries" / "mine"
    assert len(Gallery.build(deep, PixelEmbedder(), items).ids) == 2
    with Gallery.open(deep) as gallery:
        assert gallery.verify() == [] and len(gallery) == 2
    under_a_file = photos[0] / "lib"
    refusal = f"^{under_a_file}: {photos[0]} is a file, not a folder$"
    with pytest.raises(GalleryError, match=refusal):
        Gallery.build(under_a_file, PixelEmbedder(), items)
    with pytest.raises(GalleryError, match=refusal):
        new_gallery(under_a_file)


def test_a_library_in_a_folder_not_writable_is_a_gallery_error(tmp_path):
    """No permission to make the library's folder (another user's, a read-only mount) came
    out of create and build as a DataError, not the GalleryError of the rest of the API."""
    locked = tmp_path / "locked"
    locked.mkdir()
    items = [GalleryItem(photo, "x") for photo in make_images(tmp_path / "photos", 1)]
    refusal = f"^{locked / 'new' / 'lib'}: cannot make the folder in {locked} "
    with read_only_folder(locked):
        with pytest.raises(GalleryError, match=refusal):
            Gallery.build(locked / "new" / "lib", PixelEmbedder(), items)
        with pytest.raises(GalleryError, match=refusal):
            new_gallery(locked / "new" / "lib")


def test_a_library_whose_rename_into_place_is_refused_names_why(tmp_path, monkeypatch):
    """A rename of the new library into place refused by the system (its folder made
    read-only meanwhile, a mount point) was said to be a library "built meanwhile by
    another process?", which there was not."""
    parent = tmp_path / "parent"
    parent.mkdir()
    write_manifest = MetadataStore.write_manifest
    made_read_only = contextlib.ExitStack()

    def folder_made_read_only(store, manifest) -> None:
        write_manifest(store, manifest)
        made_read_only.enter_context(read_only_folder(parent))

    monkeypatch.setattr(MetadataStore, "write_manifest", folder_made_read_only)
    with made_read_only, pytest.raises(GalleryError) as refused:
        new_gallery(parent / "lib")
    assert re.fullmatch(
        f"{re.escape(str(parent / 'lib'))}: cannot move the new library into place "
        r"\((Operation not permitted|Permission denied)\)",
        str(refused.value),
    ), refused.value
    assert not (parent / "lib").exists()


def test_a_library_that_fails_leaves_no_folder_made_for_it(tmp_path, monkeypatch):
    """`Gallery.build("new/sub/lib", ...)` that then added nothing, or a create whose write
    failed (a full disk), left behind the folders made for the library, as the command
    (`shitu index build --out new/sub/lib`) does not; a folder that was there stays."""
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(gallery_module.NothingAddedError):
        Gallery.build(tmp_path / "new" / "sub" / "lib", PixelEmbedder(), [GalleryItem(broken, "x")])

    def full_disk(self, manifest) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(MetadataStore, "write_manifest", full_disk)
    with pytest.raises(OSError, match="No space left"):
        new_gallery(tmp_path / "new" / "sub" / "lib")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["broken.png"]


@pytest.mark.parametrize(
    "stop", [OSError(28, "No space left on device"), KeyboardInterrupt()], ids=["full", "ctrl-c"]
)
def test_a_create_whose_write_fails_leaves_nothing_beside_its_path(tmp_path, monkeypatch, stop):
    """A full disk (or Ctrl-C) while the new library's database is written left its
    `.NAME.creating-PID` folder behind, which no later run removed."""

    def write_stopped(self, manifest) -> None:
        raise stop

    monkeypatch.setattr(MetadataStore, "write_manifest", write_stopped)
    with pytest.raises(type(stop)):
        new_gallery(tmp_path / "lib")
    assert list(tmp_path.iterdir()) == []


def test_a_build_whose_index_write_fails_names_the_library_not_its_staging(tmp_path, monkeypatch):
    """A build on a full disk named the file it could not write by its staging folder's
    path (`.lib.building-<hex>/index-....faiss`), a folder gone once the error was shown."""

    def full_disk(index, path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(faiss, "write_index", full_disk)
    items = [GalleryItem(path, "box") for path in make_images(tmp_path / "imgs", 2)]
    with pytest.raises(GalleryError, match="No space left on device") as refused:
        Gallery.build(tmp_path / "lib", PixelEmbedder(), items)
    message = str(refused.value)
    assert message.startswith(f"{tmp_path / 'lib'}{os.sep}index-"), message
    assert "building" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]


def labels_for(count: int) -> list[str]:
    return [f"product {i % 7}" for i in range(count)]


# --------------------------------------------------------------------------- gallery lists


def test_l2_normalize_keeps_huge_rows_and_zero_rows():
    """Rows of float32 values past 1e19, whose squares overflow float32, still come out of
    unit length (they were all zeros); zero rows stay zero; float64 rows keep their precision
    until the float32 result."""
    rows = np.array([[3e20, 4e20], [0.0, 0.0], [3.0, 4.0]], np.float32)
    normalised = l2_normalize(rows)
    assert normalised.dtype == np.float32
    np.testing.assert_allclose(normalised, [[0.6, 0.8], [0.0, 0.0], [0.6, 0.8]], rtol=1e-6)
    wide = np.random.default_rng(0).normal(size=(4, 8))
    expected = (wide / np.linalg.norm(wide, axis=1, keepdims=True)).astype(np.float32)
    assert np.array_equal(l2_normalize(wide), expected)


def test_label_file_keeps_spaces_and_resolves_relative_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    listing = tmp_path / "gallery.txt"
    listing.write_text("# comment\nimgs/a.jpg\tCoca Cola 330 ml\n\nimgs/b.jpg\tFanta\n")
    items = parse_label_file(listing)
    assert [i.label for i in items] == ["Coca Cola 330 ml", "Fanta"]
    assert items[0].path == (tmp_path / "imgs" / "a.jpg").resolve()


@pytest.mark.skipif(os.sep != "/", reason="Windows reads backslashes as separators itself")
def test_label_file_written_on_windows_finds_its_images(tmp_path):
    """PaddleClas lists made on Windows separate folders with backslashes: on Linux every
    image of such a list failed as missing."""
    (tmp_path / "imgs" / "fruit").mkdir(parents=True)
    (tmp_path / "imgs" / "fruit" / "a.jpg").touch()
    (tmp_path / "odd\\name.jpg").touch()  # a backslash in a file name: found as written
    listing = tmp_path / "gallery.txt"
    listing.write_text("imgs\\fruit\\a.jpg\tApple\nodd\\name.jpg\tOdd\nimgs\\none.jpg\tNone\n")
    items = parse_label_file(listing)
    assert [item.path for item in items] == [
        (tmp_path / "imgs" / "fruit" / "a.jpg").resolve(),
        (tmp_path / "odd\\name.jpg").resolve(),
        (tmp_path / "imgs\\none.jpg").resolve(),  # missing either way: reported as written
    ]


def test_label_file_lines_end_only_where_the_file_ends_them(tmp_path):
    """A label file is lines ended by \\n (\\r\\n, \\r): a file named with U+2028, or a
    label holding a form feed, split its line in two at the character Python's
    splitlines() also ends lines at, each refused for a missing tab at a line the file
    does not have."""
    (tmp_path / "imgs").mkdir()
    odd = tmp_path / "imgs" / "u\u2028v\x85w.jpg"
    odd.touch()
    listing = tmp_path / "gallery.txt"
    listing.write_bytes(f"imgs/{odd.name}\tKiwi\r\nimgs/b.jpg\tFig\rimgs/c.jpg\tPear".encode())
    items = parse_label_file(listing)
    assert [(item.path, item.label) for item in items] == [
        (odd.resolve(), "Kiwi"),
        ((tmp_path / "imgs" / "b.jpg").resolve(), "Fig"),
        ((tmp_path / "imgs" / "c.jpg").resolve(), "Pear"),
    ]
    listing.write_text("imgs/b.jpg\tFig\nimgs/c.jpg\tPear\x0cs\n")
    with pytest.raises(DataError, match=r":2: the label 'Pear\\x0cs' must not contain tabs"):
        parse_label_file(listing)


def label_file_refusal(listing: Path) -> str:
    """What `parse_label_file` says in refusing `listing`."""
    with pytest.raises(DataError) as caught:
        parse_label_file(listing)
    return str(caught.value)


def test_a_label_files_header_line_is_refused_saying_to_comment_it_out(tmp_path):
    """`path<TAB>label` above the list was warned of as a missing image `path`, and `path
    label` refused for want of a tab: neither said that a `#` comments the header out."""
    listing = tmp_path / "gallery.txt"
    for header in ("path\tlabel", "image path label"):
        listing.write_text(f"{header}\nimgs/a.jpg\tApple\n")
        head = header.split("\t")[0]
        assert label_file_refusal(listing) == (
            f"{listing}:1: {header!r} looks like a header, not an image and its label (no "
            f"image {head!r} beside the file); start the line with # to comment it out"
        )
        listing.write_text(f"# {header}\nimgs/a.jpg\tApple\n")  # as it says: taken
        assert [item.label for item in parse_label_file(listing)] == ["Apple"]
    # A first line whose columns are split wrong still names its image: not a header.
    listing.write_text("imgs/a.jpg Apple\nimgs/b.jpg\tFig\n")
    with pytest.raises(DataError, match=r":1: expected `path<TAB>label`, got 'imgs/a.jpg Apple'"):
        parse_label_file(listing)


def test_a_label_file_line_naming_a_path_too_long_for_a_file_is_a_missing_image(tmp_path):
    """A path column over 255 bytes (ENAMETOOLONG, which pathlib's exists() raises) stopped
    the whole list on an OSError naming no list or line; it names no file, as a missing
    image's line, which fails alone when read. First (the header check), listed, and
    commented out, with backslashes (read as a Windows list's)."""
    long_name = "a" * 300 + ".jpg"
    (tmp_path / "ok.jpg").touch()
    listing = tmp_path / "gallery.txt"
    listing.write_text(
        f"{long_name}\tKiwi\nok.jpg\tFig\n#{long_name}\tKiwi\nsub\\{long_name}\tPear\n"
    )
    items = parse_label_file(listing)
    assert [(item.path.name, item.label) for item in items] == [
        (long_name, "Kiwi"),
        ("ok.jpg", "Fig"),
        (f"sub\\{long_name}", "Pear"),
    ]


def test_a_label_file_with_its_columns_swapped_is_refused_saying_so(tmp_path):
    """`label<TAB>path` (a table exported in that order) failed image by image as missing
    files named after the labels, `could not add Kiwi`, nothing saying why."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").touch()
    listing = tmp_path / "gallery.txt"
    listing.write_text("Kiwi\timgs/a.jpg\n")
    assert label_file_refusal(listing) == (
        f"{listing}:1: expected `path<TAB>label`, got 'Kiwi\\timgs/a.jpg': the label names "
        "an image and the path (Kiwi) no file; are the columns the other way round?"
    )
    listing.write_text("imgs/a.jpg\tKiwi\n")  # as it says: taken
    assert [item.label for item in parse_label_file(listing)] == ["Kiwi"]
    # One missing image whose label merely looks like a file name is that line's failure
    # (when it is read), not a reason to refuse the whole list.
    long_label = "x" * 300 + ".png"  # longer than a file name may be: names no file
    listing.write_text(f"imgs/a.jpg\tKiwi\nimgs/gone.jpg\tlogo.png\nimgs/b.jpg\t{long_label}\n")
    labels = [item.label for item in parse_label_file(listing)]
    assert labels == ["Kiwi", "logo.png", long_label]


def test_label_file_without_tab_is_a_data_error(tmp_path):
    listing = tmp_path / "gallery.txt"
    listing.write_text("imgs/a.jpg Coca Cola\n")
    assert label_file_refusal(listing) == (
        f"{listing}:1: expected `path<TAB>label`, got 'imgs/a.jpg Coca Cola' (no tab: paths "
        "and labels may contain spaces, so only a tab separates them)"
    )
    for line, missing in (("imgs/a.jpg\t\n", "no label after"), ("\tCola\n", "no path before")):
        listing.write_text(line)  # a tab there, but nothing on one side of it
        with pytest.raises(DataError, match=f"got .* \\({missing} the tab\\)$"):
            parse_label_file(listing)


def test_a_grocery_store_list_says_how_to_build_a_gallery_of_its_photos(grocery):
    """Its `path, class_id, coarse_id` lines were refused for want of a tab alone, with no
    word of the build that works: the photos' folder, labelled by --leaf-labels."""
    listing = grocery / "train.txt"
    with pytest.raises(DataError) as caught:
        collect_items([listing])
    first = listing.read_text().splitlines()[0]
    assert str(caught.value) == (
        f"{listing}:1: expected `path<TAB>label`, got {first!r} (no tab: paths and labels "
        "may contain spaces, so only a tab separates them); a Grocery Store Dataset list "
        "(`path, class_id, coarse_id`, for `shitu train` and `shitu eval`) has no label "
        "names: build from its photos' folder, each photo labelled by the folder it is in, "
        f"`shitu index build {grocery / 'train'} --leaf-labels --out LIB`"
    )


def test_label_files_with_a_bom_binary_files_and_empty_sources(tmp_path):
    (tmp_path / "imgs").mkdir()
    listing = tmp_path / "gallery.txt"
    listing.write_text("imgs/a.jpg\tFanta\n", encoding="utf-8-sig")  # as Notepad saves it
    assert parse_label_file(listing)[0].path == (tmp_path / "imgs" / "a.jpg").resolve()
    binary = tmp_path / "photo.dat"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(DataError, match="photo.dat: not a label file"):
        parse_label_file(binary)
    listing.write_text("imgs/a.jpg\tCafé\r\n", encoding="utf-16")  # from PowerShell 5's `>`
    assert [item.label for item in parse_label_file(listing)] == ["Café"]
    listing.write_text("imgs/a.jpg\tCafé\n", encoding="cp1252")  # a legacy code page
    with pytest.raises(DataError, match="not UTF-8 or UTF-16 text.*save it as UTF-8"):
        parse_label_file(listing)
    empty_list = tmp_path / "empty.txt"
    empty_list.write_text("# nothing yet\n")
    with pytest.raises(DataError, match="no images listed in .*empty.txt"):
        collect_items([empty_list])
    with pytest.raises(DataError, match="imgs: no images in this folder"):
        collect_items([tmp_path / "imgs"], label="Fanta")


def test_folder_per_label_and_explicit_label(tmp_path):
    make_images(tmp_path / "lib" / "Green Apple", 2)
    make_images(tmp_path / "lib" / "Pear", 1, seed=1)
    items = collect_items([tmp_path / "lib"])
    assert sorted({i.label for i in items}) == ["Green Apple", "Pear"] and len(items) == 3
    relabelled = collect_items([tmp_path / "lib" / "Pear"], label="Conference Pear")
    assert [i.label for i in relabelled] == ["Conference Pear"]
    with pytest.raises(DataError, match="--label"):
        collect_items([items[0].path])


def test_a_tree_grouped_by_category_is_warned_of_and_labelled_by_leaf_folders(tmp_path, caplog):
    """The Grocery Store Dataset's `train/Fruit/Apple/Golden-Delicious/*.jpg`: its
    first-level folders are categories, so folder-per-label gives a few labels; the warning
    says so with an example and the way out, --leaf-labels, which labels by product."""
    tree = tmp_path / "train"
    make_images(tree / "Fruit" / "Apple" / "Golden-Delicious", 2)
    make_images(tree / "Fruit" / "Apple" / "Granny-Smith", 1, seed=1)
    make_images(tree / "Fruit" / "Pear", 1, seed=2)
    make_images(tree / "Vegetables" / "Leek", 1, seed=3)
    with caplog.at_level(logging.WARNING, logger="shitu"):
        grouped = collect_items(tree)
    assert sorted({item.label for item in grouped}) == ["Fruit", "Vegetables"]
    expected = (
        f"{tree}: each first-level folder is a label (2: Fruit, Vegetables), but the images "
        f"lie in folders below them ({Path('Fruit/Apple/Golden-Delicious')}, ...): to label "
        "each image by the folder it is in instead (4 labels), give --leaf-labels "
        "(leaf_labels=True in Python)"
    )
    assert caplog.messages == [expected]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shitu"):
        by_product = collect_items(tree, leaf_labels=True)
    assert [item.label for item in by_product] == [
        "Golden-Delicious", "Golden-Delicious", "Granny-Smith", "Pear", "Leek"
    ]  # fmt: skip
    assert caplog.messages == []
    # Named as a Python caller gives them too, not only as the flags it never typed
    both = r"--label \(label= in Python\) gives every image one label, --leaf-labels \(leaf"
    with pytest.raises(DataError, match=both):
        collect_items(tree, label="Fruit", leaf_labels=True)
    with pytest.raises(DataError, match=r"^--label \(label= in Python\): the label is empty"):
        collect_items(tree, label=" ")


def test_views_of_each_product_in_sub_folders_are_not_warned_of(tmp_path, caplog):
    """`Coke/front/`, `Coke/back/`: the folders below the labels are no labels (leaf labels
    would be fewer), so folder-per-label reads it quietly; --leaf-labels warns that the
    folders of one name would share a label."""
    for seed, (product, view) in enumerate(
        [("Coke", "front"), ("Coke", "back"), ("Fanta", "front"), ("Sprite", "front")]
    ):
        make_images(tmp_path / "shelf" / product / view, 1, seed=seed)
    with caplog.at_level(logging.WARNING, logger="shitu"):
        items = collect_items(tmp_path / "shelf")
    assert sorted({item.label for item in items}) == ["Coke", "Fanta", "Sprite"]
    assert caplog.messages == []
    with caplog.at_level(logging.WARNING, logger="shitu"):
        collect_items(tmp_path / "shelf", leaf_labels=True)
    shared = ", ".join(str(Path(p)) for p in ("Coke/front", "Fanta/front", "Sprite/front"))
    assert caplog.messages == [
        f"{tmp_path / 'shelf'}: folders of the same name share their label: front ({shared})"
    ]


# --------------------------------------------------------------------------- search quality


@pytest.mark.parametrize(
    ("metric", "normalize"), [("ip", True), ("l2", True), ("ip", False), ("l2", False)]
)
def test_flat_search_equals_exact_search(tmp_path, metric, normalize):
    data = clustered(500, DIM)
    queries = clustered(20, DIM, seed=1)
    with new_gallery(tmp_path / "lib", metric=metric, normalize=normalize) as gallery:
        ids = gallery.add(data, labels_for(500)).ids
        result = gallery.search(queries, k=10)
    stored, probe = (unit(data), unit(queries)) if normalize else (data, queries)
    expected = exact_top_k(stored, probe, 10, metric)
    np.testing.assert_array_equal(result.ids, ids[expected])
    if metric == "ip" or normalize:  # the cosine, whichever the metric
        expected_scores = np.take_along_axis(probe @ stored.T, expected, axis=1)
    else:
        distance = np.linalg.norm(probe[:, None] - stored[None], axis=-1)
        expected_scores = -np.take_along_axis(distance, expected, axis=1)
    np.testing.assert_allclose(result.scores, expected_scores, atol=1e-4)
    assert (np.diff(result.scores, axis=1) <= 1e-6).all(), "higher score must mean more similar"
    assert result.labels[0, 0] == labels_for(500)[expected[0, 0]]


def test_a_small_search_runs_on_the_calling_thread_alone_with_the_same_results(
    tmp_path, monkeypatch
):
    """Waking Faiss's OpenMP threads for a search of 8 photos against 81 images took 15-25 ms
    in `shitu recognize` on a 2-core host, 0.5 ms on one thread; a larger search keeps its
    threads, and the other threads' count is left as it was."""
    from shitu.index.backends import faiss_backend

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(2)
    try:
        with new_gallery(tmp_path / "lib") as gallery:
            gallery.add(clustered(81, DIM), labels_for(81))
            index_class = type(gallery._backend.index)
            search = index_class.search
            threads: list[int] = []

            def counting_search(self, *args, **kwargs):
                threads.append(faiss.omp_get_max_threads())
                return search(self, *args, **kwargs)

            monkeypatch.setattr(index_class, "search", counting_search)
            queries = clustered(8, DIM, seed=1)
            small = gallery.search(queries, k=5)
            monkeypatch.setattr(faiss_backend, "SERIAL_SEARCH_WORK", 0, raising=False)  # all large
            large = gallery.search(queries, k=5)
        assert threads == [1, 2] and faiss.omp_get_max_threads() == 2
    finally:
        faiss.omp_set_num_threads(before)
    np.testing.assert_array_equal(small.ids, large.ids)
    np.testing.assert_array_equal(small.scores, large.scores)


@pytest.mark.parametrize(
    ("index_type", "dim", "min_recall", "min_nn_found"),
    [("HNSW32", DIM, 0.95, 1.0), ("IVF", DIM, 0.9, 1.0), ("IVFPQ", 32, 0.2, 0.6)],
)
def test_approximate_indexes_find_the_exact_neighbours(
    tmp_path, index_type, dim, min_recall, min_nn_found
):
    """Recall@10 vs exact search; PQ (8 dims per code byte) is judged on 1-recall@10."""
    count = MIN_TRAIN.get(index_type, 0) + 2000
    data = clustered(count, dim, clusters=50)
    queries = data[:50] + 0.2 * np.random.default_rng(2).standard_normal((50, dim), np.float32)
    with Gallery.create(
        tmp_path / "lib", embedding_dim=dim, model_fingerprint="m", index_type=index_type
    ) as gallery:
        ids = gallery.add(data, labels_for(count)).ids
        assert gallery.stats()["index"]["built_type"] == index_type
        result = gallery.search(queries, k=10)
    expected = ids[exact_top_k(unit(data), unit(queries), 10, "ip")]
    pairs = list(zip(result.ids, expected, strict=True))
    assert np.mean([len(set(got) & set(want)) / 10 for got, want in pairs]) >= min_recall
    assert np.mean([want[0] in got for got, want in pairs]) >= min_nn_found


def test_trained_type_stays_exact_until_enough_data_then_trains(tmp_path):
    data = clustered(MIN_TRAIN["IVF"] + 100, DIM)
    with new_gallery(tmp_path / "lib", index_type="IVF") as gallery:
        gallery.add(data[:100], labels_for(100))
        assert gallery.stats()["index"]["built_type"] == "Flat"
        gallery.add(data[100:], labels_for(len(data) - 100))
        state = gallery.stats()["index"]
        assert state["built_type"] == "IVF" and state["trained_on"] == len(data)
        assert len(gallery) == len(data) and gallery.verify() == []


def test_k_past_the_library_is_cut_to_the_images_it_holds(tmp_path):
    """A huge k (10**9 was killed for memory, padded to k columns) gives every image once;
    an empty library answers one column of padding."""
    with new_gallery(tmp_path / "lib") as gallery:
        empty = gallery.search(np.ones(DIM), k=3)
        assert empty.ids.shape == (1, 1) and (empty.ids == -1).all() and (empty.labels == "").all()
        gallery.add(clustered(2, DIM), ["a", "b"])
        result = gallery.search(clustered(4, DIM, seed=3), k=10**9)
        above = gallery.search(clustered(4, DIM, seed=3), k=5, min_score=2.0)
    assert result.ids.shape == result.scores.shape == result.labels.shape == (4, 2)
    assert result.found.all() and np.isfinite(result.scores).all()
    assert (np.sort(result.labels, axis=1) == ["a", "b"]).all()
    assert above.ids.shape == (4, 2) and not above.found.any() and (above.labels == "").all()


def test_search_results_as_plain_json_ready_hits_without_padding(tmp_path):
    with new_gallery(tmp_path / "lib") as gallery:
        ids = gallery.add(clustered(2, DIM), ["a b", "c"]).ids
        result = gallery.search(clustered(2, DIM), k=4)
        empty = gallery.search(np.zeros((0, DIM), np.float32), k=4)
    hits = result.to_list()
    assert json.loads(json.dumps(hits)) == hits  # plain Python types only
    assert [[hit["image_id"] for hit in row] for row in hits] == [ids.tolist(), ids.tolist()[::-1]]
    assert hits[0][0] == {
        "label": "a b",
        "score": round(float(result.scores[0, 0]), 5),
        "image_id": int(ids[0]),
    }
    assert empty.to_list() == []


@pytest.mark.parametrize("min_score", [float("nan"), "0.5", True])
def test_a_min_score_that_is_no_number_is_refused(tmp_path, min_score):
    """NaN kept every hit (it compares false with every score), text failed inside numpy."""
    with new_gallery(tmp_path / "lib") as gallery:
        gallery.add(clustered(3, DIM), ["a", "b", "c"])
        with pytest.raises(GalleryError, match=r"min_score: expected a number, got"):
            gallery.search(clustered(1, DIM), k=2, min_score=min_score)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_min_score_keeps_only_hits_at_least_that_similar(tmp_path, metric):
    data = clustered(200, DIM)
    with new_gallery(tmp_path / "lib", metric=metric) as gallery:
        gallery.add(data, labels_for(200))
        full = gallery.search(data[:10], k=20)
        threshold = float(np.median(full.scores))
        kept = gallery.search(data[:10], k=20, min_score=threshold)
    assert (kept.scores[kept.found] >= threshold).all()
    np.testing.assert_array_equal(kept.found, full.scores >= threshold)
    np.testing.assert_array_equal(kept.ids[kept.found], full.ids[kept.found])


def test_k_is_any_whole_number_and_nothing_else(tmp_path):
    data = clustered(20, DIM)
    with new_gallery(tmp_path / "lib") as gallery:
        gallery.add(data, labels_for(20))
        expected = gallery.search(data[:2], k=3).ids
        # numpy's integers (k computed from an array's size, say) failed inside Faiss
        np.testing.assert_array_equal(gallery.search(data[:2], k=np.int64(3)).ids, expected)
        for k in (0, 2.0, True, "3", None):
            with pytest.raises(GalleryError, match=f"k: expected a whole number >= 1, got {k!r}"):
                gallery.search(data[:2], k=k)


# --------------------------------------------------------------------------- edits


@pytest.mark.parametrize("index_type", ["Flat", "HNSW32", "IVF"])
def test_add_remove_relabel_survive_reopen(tmp_path, index_type):
    data = clustered(1200, DIM)
    path = tmp_path / "lib"
    with new_gallery(path, index_type=index_type) as gallery:
        ids = gallery.add(data, labels_for(1200)).ids
        gallery.remove(ids=ids[:5].tolist())
        removed_label = gallery.remove(labels=["product 3"])
        assert gallery.relabel("product 4", "Green Apple") == len(range(4 + 7, 1200, 7))
        new_id = gallery.add(data[:1] + 1.0, ["fresh"]).ids[0]
    assert new_id > ids.max(), "ids of removed images are never reused"
    with Gallery.open(path) as gallery:
        assert gallery.verify() == []
        counts = gallery.label_counts()
        assert "product 3" not in counts and "product 4" not in counts
        assert counts["fresh"] == 1 and len(gallery) == 1200 - 5 - len(removed_label) + 1
        gone = set(ids[:5].tolist()) | set(removed_label.tolist())
        result = gallery.search(data[:50], k=10)
        assert not gone & set(result.ids.ravel().tolist())
        assert "product 3" not in set(result.labels.ravel())
        own = gallery.search(data[5:6], k=1)
        assert own.ids[0, 0] == ids[5] and own.labels[0, 0] == labels_for(6)[5]


def finds_the_same_reopened(gallery: Gallery, queries: np.ndarray) -> None:
    """The library opened anew (index file, and the changes since it replayed) answers
    as the writer's live index does."""
    expected = gallery.search(queries, k=5)
    with Gallery.open(gallery.root) as fresh:
        assert fresh.verify() == []
        found = fresh.search(queries, k=5)
    assert found.ids.tolist() == expected.ids.tolist()
    assert found.labels.tolist() == expected.labels.tolist()


@pytest.mark.parametrize("index_type", ["Flat", "IVF"])
def test_a_small_write_leaves_the_index_file_and_opening_replays_it(tmp_path, index_type):
    """Adds, removals and relabels of a few images change the live index and the manifest's
    count of changes, not the index file (rewriting it took seconds a write with 200k
    images); a reader open before them catches up, and `repair` without the file builds
    the index again from every stored row."""
    count = MIN_TRAIN.get(index_type, 0) + 200
    data = clustered(count + 6, DIM)
    path = tmp_path / "lib"
    with new_gallery(path, index_type=index_type) as gallery:
        ids = gallery.add(data[:count], labels_for(count)).ids
        checkpoint = path / gallery.manifest.index_state["file"]
        written = checkpoint.stat().st_mtime_ns
        with Gallery.open(path) as reader:
            gallery.add(data[count:], ["new"] * 6)
            gallery.remove(ids=ids[:4].tolist())
            gallery.relabel("new", "newer")
            assert gallery.manifest.index_state[CHANGES_KEY] == 10
            assert list(path.glob("index-*")) == [checkpoint]
            assert checkpoint.stat().st_mtime_ns == written
            assert reader.refresh() and len(reader) == count + 2
            found, expected = reader.search(data, k=5), gallery.search(data, k=5)
            assert found.ids.tolist() == expected.ids.tolist()
            assert found.labels.tolist() == expected.labels.tolist()
        finds_the_same_reopened(gallery, data)
    checkpoint.unlink()
    with Gallery.open(path, repair=True) as repaired:
        assert repaired.repaired and repaired.manifest.index_state[CHANGES_KEY] == 0
        assert repaired.verify() == [] and len(repaired) == count + 2
        assert (repaired.search(data[count:], k=1).labels == "newer").all()


def test_a_write_is_not_failed_by_a_staged_index_file_its_writer_removes_meanwhile(
    tmp_path, monkeypatch
):
    """A write removes the index files of writes that did not commit; the writer of one
    that rolled back removes its own after giving up the lock, so the two can race: the
    file gone between the listing and its removal failed the other process's write."""
    data = clustered(30, DIM)
    path = tmp_path / "lib"
    with new_gallery(path) as gallery:
        gallery.add(data[:20], labels_for(20))
        orphan = path / "index-00000009-0badcafe.faiss"  # a rolled-back write's
        orphan.write_bytes(b"staged")
        unlink = Path.unlink

        def removed_first_by_its_writer(self: Path, missing_ok: bool = False) -> None:
            if self == orphan:
                unlink(self)  # the other process's discard_staged, a moment before
            unlink(self, missing_ok=missing_ok)

        monkeypatch.setattr(Path, "unlink", removed_first_by_its_writer)
        gallery.add(data[20:], labels_for(10))  # rewrites the file: a third of the images
        assert len(gallery) == 30 and gallery.verify() == [] and not orphan.exists()


def test_the_index_file_is_written_again_when_a_tenth_of_the_library_changed_since(tmp_path):
    """One add at a time stays out of the file until more than a tenth of the images
    changed since it; the write that passes that mark writes the live index as it was
    before it (no copy of a big index), and one that alone changes more, with itself."""
    data = clustered(70, DIM)
    path = tmp_path / "lib"
    with new_gallery(path) as gallery:
        gallery.add(data[:40], labels_for(40))
        first = gallery.manifest.index_state["file"]
        for row in range(40, 44):  # 4 changes, 44 images
            gallery.add(data[row : row + 1], ["one by one"])
        assert gallery.manifest.index_state["file"] == first
        assert gallery.manifest.index_state[CHANGES_KEY] == 4
        finds_the_same_reopened(gallery, data)
        gallery.add(data[44:45], ["one by one"])  # 5 changes > 4.5
        state = gallery.manifest.index_state
        assert state["file"] != first and state[CHANGES_KEY] == 1
        assert [p.name for p in path.glob("index-*")] == [state["file"]]
        finds_the_same_reopened(gallery, data)
        gallery.add(data[45:], ["many"] * 25)
        assert gallery.manifest.index_state[CHANGES_KEY] == 0
        finds_the_same_reopened(gallery, data)


def test_a_reader_follows_writes_that_kept_the_index_file_without_loading_it(tmp_path, monkeypatch):
    """Another process's writes that left the index file are applied to a reader's live
    index (loading and checksumming the file took seconds with 200k images); after a write
    that wrote the file again, the reader loads it."""
    data = clustered(60, DIM)
    path = tmp_path / "lib"
    loads: list[str] = []
    read_index = faiss.read_index
    monkeypatch.setattr(faiss, "read_index", lambda file: loads.append(file) or read_index(file))
    with new_gallery(path) as writer:
        ids = writer.add(data[:50], labels_for(50)).ids
        with Gallery.open(path) as reader:
            loads.clear()
            writer.add(data[50:53], ["new"] * 3)
            writer.remove(ids=[int(ids[0])])
            assert reader.refresh() and loads == [] and reader.verify() == []
            assert reader.search(data, k=5).ids.tolist() == writer.search(data, k=5).ids.tolist()
            writer.add(data[53:], ["more"] * 7)  # 11 changes > 5.9: the file again
            assert reader.refresh() and len(loads) == 1 and reader.verify() == []
            assert reader.search(data, k=5).ids.tolist() == writer.search(data, k=5).ids.tolist()
            assert reader.label_counts() == writer.label_counts()


def test_hnsw_takes_adds_in_place_and_is_built_again_on_a_removal(tmp_path):
    """HNSW cannot delete: a removal builds the index (and its file) again."""
    data = clustered(110, DIM)
    path = tmp_path / "lib"
    with new_gallery(path, index_type="HNSW32") as gallery:
        ids = gallery.add(data[:100], labels_for(100)).ids
        first = gallery.manifest.index_state["file"]
        gallery.add(data[100:], ["new"] * 10)
        assert gallery.manifest.index_state["file"] == first
        with Gallery.open(path) as fresh:
            assert fresh.verify() == [] and (fresh.search(data[100:], k=1).labels == "new").all()
        gallery.remove(ids=[int(ids[0])])
        state = gallery.manifest.index_state
        assert state["file"] != first and state[CHANGES_KEY] == 0
        finds_the_same_reopened(gallery, data)


def test_ids_and_labels_follow_each_write_as_a_reopened_library_has_them(tmp_path, monkeypatch):
    """A write updates the ids and labels that searches answer with from what it changed
    (reading them all again took 0.2 s a write with 200k images), and they are a freshly
    opened library's after adds, removals, renames and merges; after another process's
    write they are read whole, as it is not known what that changed."""
    data = clustered(60, DIM)
    path = tmp_path / "lib"
    reads: list[int] = []
    read_all = MetadataStore.id_labels
    monkeypatch.setattr(
        MetadataStore, "id_labels", lambda store: reads.append(1) or read_all(store)
    )

    def same_as_reopened(gallery: Gallery) -> None:
        with Gallery.open(path) as fresh:
            for ours, theirs in zip(gallery._id_labels, fresh._id_labels, strict=True):
                assert ours.tolist() == theirs.tolist()
            assert gallery.stats() | {"path": None} == fresh.stats() | {"path": None}
            assert (
                gallery.search(data, k=1).labels.tolist() == fresh.search(data, k=1).labels.tolist()
            )

    with new_gallery(path) as gallery:
        gallery.add(data[:40], labels_for(40))
        edits = [
            lambda: gallery.remove(ids=[3, 17]),
            lambda: gallery.add(data[40:45], [" new ", "new", "Cafe\u0301", "x", "product 2"]),
            lambda: gallery.relabel("product 1", "renamed"),
            lambda: gallery.relabel("product 2", "product 3", merge=True),
            lambda: gallery.remove(labels=["product 3", "new"]),
            lambda: gallery.relabel("Caf\u00e9", "Tea"),
            lambda: gallery.add(data[45:50], ["renamed"] * 5),
            lambda: gallery.rebuild(),
        ]
        for edit in edits:
            reads.clear()
            edit()
            assert reads == []
            same_as_reopened(gallery)
        with Gallery.open(path) as other:
            other.relabel("renamed", "elsewhere")
        gallery.add(data[50:], ["late"] * 10)
        same_as_reopened(gallery)
        assert gallery.label_counts()["elsewhere"] == len(range(1, 40, 7)) + 5


def test_duplicates_by_content_hash_are_skipped_unless_asked(tmp_path):
    data = clustered(3, DIM)
    with new_gallery(tmp_path / "lib") as gallery:
        gallery.add(data, ["a", "b", "c"], paths=["p0", "p1", "p2"], hashes=["h0", "h1", "h2"])
        again = gallery.add(data[:2], ["a", "a"], paths=["q0", "q1"], hashes=["h0", "h0"])
        assert len(again.ids) == 0 and again.duplicates == ["q0", "q1"]
        assert gallery.manifest.generation == 1, "a write that adds nothing is no new generation"
        forced = gallery.add(data[:1], ["a"], hashes=["h0"], allow_duplicates=True)
        assert len(forced.ids) == 1 and len(gallery) == 4 and gallery.manifest.generation == 2


def test_a_remove_of_no_images_writes_nothing(tmp_path):
    """`remove(ids=gone)` where none were gone committed a new generation, which every
    other process (a server) then reloaded, as a write that adds or renames nothing does not."""
    with new_gallery(tmp_path / "lib") as gallery:
        gallery.add(clustered(3, DIM), ["a", "b", "c"])
        assert gallery.remove(ids=[]).tolist() == [] and gallery.remove().tolist() == []
        assert gallery.manifest.generation == 1 and not gallery.stale() and len(gallery) == 3


def test_relabel_onto_a_label_in_use_merges_only_when_asked(tmp_path):
    with new_gallery(tmp_path / "lib") as gallery:
        gallery.add(clustered(3, DIM), ["a", "b", "b"])
        with pytest.raises(GalleryError, match="label 'b' already has images.*merge"):
            gallery.relabel("a", "b")
        assert gallery.label_counts() == {"a": 1, "b": 2}
        assert gallery.relabel("a", " b ", merge=True) == 1
        assert gallery.label_counts() == {"b": 3}
        generation = gallery.manifest.generation
        assert gallery.relabel("b", "b") == 3  # to itself: nothing written
        assert gallery.manifest.generation == generation


def test_a_label_with_accents_is_one_label_however_its_accents_are_encoded(tmp_path):
    """'Café' typed (é one code point) and from a macOS folder name (e + combining accent)
    is one label; rows stored decomposed before labels were normalised answer to it too."""
    typed, decomposed = "Caf\u00e9", "Cafe\u0301"
    path = tmp_path / "lib"
    with new_gallery(path) as gallery:
        gallery.add(clustered(3, DIM), [typed, decomposed, "Tea"])
        assert gallery.label_counts() == {typed: 2, "Tea": 1}
    with sqlite3.connect(path / "gallery.sqlite") as conn:  # as an older version stored it
        conn.execute("UPDATE images SET label = ? WHERE id = 1", (decomposed,))
    with Gallery.open(path) as gallery:
        assert [e.id for e in gallery.entries(decomposed)] == [1, 2]
        with pytest.raises(GalleryError, match="label 'Tea' already has images"):
            gallery.relabel(typed, "Tea")
        assert gallery.relabel(decomposed, typed) == 2  # no merge: it is the same label
        assert gallery.label_counts() == {typed: 2, "Tea": 1}
        assert [e.id for e in gallery.entries(" Tea ")] == [3]  # as `add` trims it
        assert len(gallery.remove(labels=[decomposed])) == 2


def test_a_class_id_label_is_its_text_and_other_non_text_labels_are_refused(tmp_path):
    """Labels from a numpy array of class ids are stored as '5'; None, bytes or a float
    would have been stored as their repr ('None', "b'tea'", 'nan'), so nothing is added."""
    with new_gallery(tmp_path / "lib") as gallery:
        gallery.add(clustered(2, DIM), [5, np.int64(7)])
        assert gallery.label_counts() == {"5": 1, "7": 1}
        for wrong, shown in ((None, "NoneType None"), (b"tea", "bytes b'tea'"), (2.5, "float")):
            with pytest.raises(GalleryError, match=f"add: a label is text, got {shown}"):
                gallery.add(clustered(2, DIM), ["tea", wrong])
        assert len(gallery) == 2


def test_add_names_the_list_whose_length_is_off(tmp_path):
    """Two rows and one label were 'features, labels, paths and hashes differ in length',
    though no path or hash was given."""
    with new_gallery(tmp_path / "lib") as gallery:
        with pytest.raises(GalleryError, match=r"^add: 2 feature rows, but 1 in labels; give"):
            gallery.add(clustered(2, DIM), ["a"])
        with pytest.raises(GalleryError, match=r"^add: 2 feature rows, but 3 in paths; give"):
            gallery.add(clustered(2, DIM), ["a", "b"], ["x.jpg", "y.jpg", "z.jpg"])
        assert len(gallery) == 0


def test_unknown_label_or_id_is_refused_without_change(tmp_path):
    with new_gallery(tmp_path / "lib") as gallery:
        ids = gallery.add(clustered(3, DIM), ["a", "b", "c"]).ids
        with pytest.raises(GalleryError, match="no images labelled 'zzz', 'yyy'$"):
            gallery.remove(labels=["a", "zzz", "yyy"])
        with pytest.raises(GalleryError, match="no images with ids"):
            gallery.remove(ids=[int(ids[0]), 999])
        # beyond SQLite's integers: an OverflowError's traceback from the query
        for call in (gallery.remove, gallery.entries_with_ids):
            with pytest.raises(GalleryError, match=rf": no image has id {10**20}, beyond the"):
                call(ids=[int(ids[0]), 10**20])
        with pytest.raises(GalleryError, match="no images labelled 'zzz'"):
            gallery.relabel("zzz", "y")
        assert len(gallery) == 3 and gallery.verify() == []


def test_an_unknown_label_is_refused_with_the_label_it_may_misspell(tmp_path, capsys):
    """Labels compare exactly: `Kiwi` typed for the library's `kiwi` is told which it has,
    named alike by remove, relabel and list (remove said ['Kiwi'], a Python list)."""
    with new_gallery(tmp_path / "lib") as gallery:
        gallery.add(clustered(2, DIM), ["kiwi", "Banana"])
        meant = r" \(did you mean 'kiwi'\?\)$"
        with pytest.raises(GalleryError, match="no images labelled 'Kiwi'" + meant):
            gallery.remove(labels=["Kiwi"])
        with pytest.raises(GalleryError, match="no images labelled 'Kiwi'" + meant):
            gallery.relabel("Kiwi", "Kiwi fruit")
    assert shitu_main(["index", "list", str(tmp_path / "lib"), "--label", "Kiwi"]) == 2
    assert capsys.readouterr().err.endswith("no images labelled 'Kiwi' (did you mean 'kiwi'?)\n")


# --------------------------------------------------------------------------- model & files


def test_a_label_that_is_not_utf8_text_is_refused_naming_it(tmp_path):
    """`--label Café` typed in a Latin-1 terminal reaches Python as lone surrogates (and a
    JSON `\\udce9` escape makes one): refused as a label, not a UnicodeEncodeError
    traceback from SQLite."""
    latin1 = os.fsdecode(b"Caf\xe9")
    with new_gallery(tmp_path / "lib") as gallery:
        with pytest.raises(GalleryError, match=r"the label 'Caf\\udce9' is not UTF-8 text"):
            gallery.add(clustered(1, DIM), [latin1])
        gallery.add(clustered(1, DIM), ["Café"])
        with pytest.raises(GalleryError, match="is not UTF-8 text"):
            gallery.relabel("Café", latin1)
        assert gallery.label_counts() == {"Café": 1}


def test_a_file_whose_name_is_not_utf8_is_reported_not_added(tmp_path, capsys):
    """A name in a legacy encoding (Latin-1's `café.jpg`, bytes that are not UTF-8) has no
    UTF-8 text for the library to record: that file is named as not added, and the others
    are; the build stopped with a traceback (UnicodeEncodeError) and left no library."""
    images = make_images(tmp_path / "imgs" / "Cafe", 2)
    latin1 = images[1].with_name(os.fsdecode(b"caf\xe9.png"))
    try:
        images[1].rename(latin1)
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system takes UTF-8 names only")
    model = PixelEmbedder()
    report = Gallery.build(tmp_path / "lib", model, collect_items([tmp_path / "imgs"]))
    assert len(report.ids) == 1
    assert report.failures == [(str(latin1), gallery_module.NAME_NOT_UTF8)]
    with Gallery.open(tmp_path / "lib") as gallery:
        assert [entry.path for entry in gallery.entries()] == [str(images[0].resolve())]
        with pytest.raises(GalleryError, match="its path is not UTF-8 text"):
            gallery.add(unit(clustered(1, model.embedding_size)), ["Cafe"], [str(latin1)])
        assert len(gallery.entries()) == 1


def test_a_library_folder_whose_path_is_not_utf8_is_refused_naming_it(tmp_path):
    """Faiss writes and reads its index file by a UTF-8 path only: a library folder named
    in Latin-1 (`bibliothèque`) is refused by name, where the build stopped with a TypeError
    from inside Faiss; one moved there later is refused as it is opened."""
    latin1 = tmp_path / os.fsdecode(b"biblioth\xe8que")
    try:
        latin1.mkdir()
        latin1.rmdir()
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system takes UTF-8 names only")
    model = PixelEmbedder()
    items = collect_items([make_images(tmp_path / "imgs", 2)[0]], label="Cafe")
    not_utf8 = "the library's path is not UTF-8 text"
    with pytest.raises(GalleryError, match=not_utf8):
        Gallery.build(latin1, model, items)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]
    Gallery.build(tmp_path / "lib", model, items)
    (tmp_path / "lib").rename(latin1)
    with pytest.raises(GalleryError, match=not_utf8):
        Gallery.open(latin1)


def test_files_are_embedded_hashed_and_reembedded(tmp_path):
    images = make_images(tmp_path / "imgs", 6)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png")
    listing = tmp_path / "gallery.txt"
    listing.write_text(
        "".join(f"imgs/{p.name}\tItem {i // 2}\n" for i, p in enumerate(images))
        + "imgs/broken.png\tItem 9\nimgs/missing.png\tItem 9\n"
    )
    model = PixelEmbedder()
    path = tmp_path / "lib"
    with Gallery.create_for(path, model) as gallery:
        report = gallery.add_files(model, parse_label_file(listing))
        assert len(report.ids) == 6
        assert sorted(Path(p).name for p, _ in report.failures) == ["broken.png", "missing.png"]
        assert len(gallery.add_files(model, parse_label_file(listing)[:2]).duplicates) == 2

    bigger = PixelEmbedder(side=6, fingerprint="pixels-6", preprocessing={"resize": 6})
    with pytest.raises(GalleryError, match="re-embed"):
        Gallery.open(path, embedder=bigger)
    with Gallery.open(path) as gallery:
        with pytest.raises(GalleryError, match="48-d"):
            gallery.add_files(bigger, parse_label_file(listing)[:1])
        with pytest.raises(GalleryError, match=r"shape \[N, 48\]"):
            gallery.search(np.ones((1, 108)))
        assert gallery.reembed(bigger) == 6
    with Gallery.open(path, embedder=bigger) as gallery:
        assert gallery.manifest.preprocessing == {"resize": 6} and gallery.verify() == []
        query = bigger.extract_files([str(images[3])]).features
        result = gallery.search(query, k=1)
        assert result.labels[0, 0] == "Item 1" and result.scores[0, 0] == pytest.approx(1.0)


def test_a_folder_given_to_add_files_is_named_as_one_with_how_to_list_its_images(tmp_path):
    """A folder among add_files' items was reported with the OS's bare "Is a directory"
    (from hashing it), where read_rgb names it."""
    (image,) = make_images(tmp_path / "imgs", 1)
    model = PixelEmbedder()
    with Gallery.create_for(tmp_path / "lib", model) as gallery:
        report = gallery.add_files(
            model, [GalleryItem(tmp_path / "imgs", "Item 0"), GalleryItem(image, "Item 0")]
        )
    assert len(report.ids) == 1
    assert report.failures == [
        (
            str(tmp_path / "imgs"),
            "a folder, not an image file: pass the images in it "
            "(shitu.image_files.scan_images(Path(folder)) lists them)",
        )
    ]


def test_a_library_moved_whole_still_finds_the_files_kept_inside_it(tmp_path, monkeypatch):
    """Files inside the library folder (the server's uploads) are stored relative to it;
    files elsewhere keep their absolute path, a relative one taken from the working folder."""
    path = tmp_path / "lib"
    model = PixelEmbedder()
    Gallery.create_for(path, model).close()
    inside = make_images(path / "uploads", 2)
    outside = make_images(tmp_path / "photos", 2, seed=1)
    monkeypatch.chdir(tmp_path)
    with Gallery.open(path, embedder=model) as gallery:
        items = [GalleryItem(p, "inside") for p in inside]
        items += [
            GalleryItem(outside[0], "outside"),
            GalleryItem(Path("photos") / outside[1].name, "outside"),
        ]
        assert len(gallery.add_files(model, items).ids) == 4
    moved = tmp_path / "moved" / "lib"
    moved.parent.mkdir()
    path.rename(moved)
    with Gallery.open(moved) as gallery:
        paths = [entry.path for entry in gallery.entries()]
        assert paths == [str(p.resolve()) for p in (moved / "uploads").iterdir()] + [
            str(p.resolve()) for p in outside
        ]
        assert gallery.reembed(model) == 4 and gallery.verify() == []


@dataclass
class EditingEmbedder(PixelEmbedder):
    """A new model whose embedding passes run while another process edits the library:
    pass i runs `edits[i](writer)` on a second connection, as `shitu serve` would."""

    library: Path | None = None
    edits: list[Callable[[Gallery], None]] = field(default_factory=list)
    passes: list[int] = field(default_factory=list)

    def extract_files(self, paths, batch_size=32, progress=False):
        if len(self.passes) < len(self.edits):
            with Gallery.open(self.library) as writer:
                self.edits[len(self.passes)](writer)
        self.passes.append(len(paths))
        return super().extract_files(paths, batch_size, progress)


def test_reembed_follows_images_added_and_removed_while_it_runs(tmp_path):
    """Another process's edits during the long embedding pass are followed, not a reason to
    throw the pass away: the new images are embedded in a short round, the removed dropped."""
    path, model = tmp_path / "lib", PixelEmbedder()
    photos = make_images(tmp_path / "photos", 6)
    with Gallery.create_for(path, model) as gallery:
        ids = gallery.add_files(model, [GalleryItem(p, "old") for p in photos[:4]]).ids

    def edit(writer: Gallery) -> None:
        writer.add_files(model, [GalleryItem(p, "new") for p in photos[4:]])
        writer.remove(ids=[int(ids[0])])

    new = EditingEmbedder(6, "pixels-6", {"resize": 6}, library=path, edits=[edit])
    with Gallery.open(path) as gallery:
        assert gallery.reembed(new) == 5
        assert new.passes == [4, 2]  # the 2 added meanwhile, embedded in a second round
    plain = PixelEmbedder(side=6, fingerprint="pixels-6", preprocessing={"resize": 6})
    with Gallery.open(path, embedder=plain) as gallery:
        assert gallery.verify() == [] and gallery.label_counts() == {"old": 3, "new": 2}
        result = gallery.search(plain.extract_files([str(p) for p in photos[1:]]).features, k=1)
        assert result.labels[:, 0].tolist() == ["old"] * 3 + ["new"] * 2
        assert result.scores[:, 0] == pytest.approx(np.ones(5))


def test_reembed_gives_up_on_a_library_that_keeps_growing(tmp_path, monkeypatch):
    monkeypatch.setattr(gallery_module, "REEMBED_CATCH_UPS", 2)
    path, model = tmp_path / "lib", PixelEmbedder()
    photos = make_images(tmp_path / "photos", 6)
    with Gallery.create_for(path, model) as gallery:
        gallery.add_files(model, [GalleryItem(photos[0], "first")])
    arriving = iter(photos[1:])

    def edit(writer: Gallery) -> None:  # one more image during every round
        writer.add_files(model, [GalleryItem(next(arriving), "more")])

    new = EditingEmbedder(2, "new", {"resize": 2}, library=path, edits=[edit] * 3)
    with Gallery.open(path) as gallery:
        with pytest.raises(GalleryError, match="images kept being added during re-embedding"):
            gallery.reembed(new)
        assert new.passes == [1, 1, 1]
    with Gallery.open(path, embedder=model) as gallery:  # nothing changed: the old model's
        assert len(gallery) == 4 and gallery.verify() == []


def test_reembed_records_the_content_hash_of_a_file_changed_in_place(tmp_path):
    """The features come from the file as it is now: its content is what the library holds,
    so adding that file again is a duplicate (it kept the old hash and became a second
    image), and the content it had before is new."""
    path, model = tmp_path / "lib", PixelEmbedder()
    photos = make_images(tmp_path / "photos", 2)
    before = make_images(tmp_path / "before", 1, seed=5)[0]
    shutil.copyfile(photos[0], before)
    with Gallery.create_for(path, model) as gallery:
        gallery.add_files(model, [GalleryItem(p, "x") for p in photos])
    shutil.copyfile(make_images(tmp_path / "edited", 1, seed=7)[0], photos[0])
    with Gallery.open(path) as gallery:
        assert gallery.reembed(model) == 2
        again = gallery.add_files(model, [GalleryItem(photos[0], "x"), GalleryItem(before, "x")])
        assert again.duplicates == [str(photos[0])] and len(again.ids) == 1
        assert len(gallery) == 3 and gallery.verify() == []


def test_reembed_names_the_ids_of_images_it_cannot_read(tmp_path):
    """`shitu index remove` takes ids, so the refusal names them, not only a path."""
    path, model = tmp_path / "lib", PixelEmbedder()
    photos = make_images(tmp_path / "photos", 3)
    with Gallery.create_for(path, model) as gallery:
        ids = gallery.add_files(model, [GalleryItem(p, "x") for p in photos]).ids
        photos[1].unlink()
        with pytest.raises(GalleryError) as caught:
            gallery.reembed(PixelEmbedder(side=2, fingerprint="new"))
    assert f"1 of the 3 images could not be read, ids {ids[1]}: {photos[1]} (" in str(caught.value)
    assert "; put the files back" in str(caught.value)
    assert f"`shitu index remove {path} --id ID ...`, `remove(ids)` in Python" in str(caught.value)
    # The way on for a moved folder, as a Python caller gives it (not only as the flag)
    assert "(`--moved OLD NEW`, `moved=[(OLD, NEW)]` in Python: OLD the folder" in str(caught.value)


def test_reembed_moved_takes_the_deepest_old_folder_and_refuses_what_is_not_a_pair(tmp_path):
    """An image under two old folders moves with the deeper one; a file kept inside the
    library (stored relative to it) is no moved folder's; a pair given as one path, or
    three, is refused by name rather than unpacked a character at a time."""
    path, model = tmp_path / "lib", PixelEmbedder()
    outer = make_images(tmp_path / "photos", 1)
    inner = make_images(tmp_path / "photos" / "kiwi", 1, seed=1)
    with Gallery.create_for(path, model) as gallery:
        inside = make_images(path / "uploads", 1, seed=2)
        gallery.add_files(model, [GalleryItem(p, "x") for p in outer + inner + inside])
        for wrong in (("a", "b"), [tmp_path], [("a", "b", "c")], [5]):
            with pytest.raises(GalleryError, match="expected .old folder, new folder. pairs"):
                gallery.reembed(model, moved=wrong)
    (tmp_path / "photos").rename(tmp_path / "all")
    (tmp_path / "all" / "kiwi").rename(tmp_path / "kiwi")
    moves = [
        (tmp_path / "photos", tmp_path / "all"),
        (tmp_path / "photos" / "kiwi", tmp_path / "kiwi"),
    ]
    with Gallery.open(path) as gallery:
        assert gallery.reembed(model, moved=moves) == 3 and gallery.verify() == []
        paths = [entry.path for entry in gallery.entries()]
    expected = [tmp_path / "all" / outer[0].name, tmp_path / "kiwi" / inner[0].name, inside[0]]
    assert paths == [str(p.resolve()) for p in expected]


def test_create_at_a_link_to_an_empty_folder_makes_the_library_there(tmp_path):
    """A library is renamed into place whole, which cannot replace a link: followed."""
    (tmp_path / "disk").mkdir()
    (tmp_path / "lib").symlink_to(tmp_path / "disk")
    with Gallery.create_for(tmp_path / "lib", PixelEmbedder()) as gallery:
        gallery.add(clustered(2, 48), ["a", "b"])
    assert (tmp_path / "disk" / "gallery.sqlite").is_file() and (tmp_path / "lib").is_symlink()
    with Gallery.open(tmp_path / "lib") as gallery:
        assert gallery.label_counts() == {"a": 1, "b": 1}


def test_model_fingerprint_mismatch_is_refused(tmp_path):
    """With the model to use: refused to `index add`, the advice was to 'search with' it."""
    new_gallery(tmp_path / "lib").close()
    other = PixelEmbedder(side=2, fingerprint="other")  # 12-d, not the library's 16-d
    other_same_dim = PixelEmbedder(side=2, fingerprint="other")
    with pytest.raises(GalleryError) as caught:
        Gallery.open(tmp_path / "lib", embedder=other)
    assert (
        "16-d features of model test-model but this model, other, gives 12-d; use the "
        "model that built it, or re-embed" in str(caught.value)
    )
    Gallery.create(tmp_path / "lib12", embedding_dim=12, model_fingerprint="m12").close()
    with pytest.raises(
        GalleryError,
        match=r"built with model m12 but this model is other .*; use the model and precision",
    ):
        Gallery.open(tmp_path / "lib12", embedder=other_same_dim)


@pytest.mark.parametrize("table", ["manifest", "sqlite_sequence"])
def test_a_damaged_database_page_is_a_gallery_error_not_sqlites_traceback(tmp_path, table):
    """The manifest's page: every command's open fails, naming the file; the ids' counter:
    the library opens, and verify (PRAGMA integrity_check cannot finish) reports it."""
    path = tmp_path / "lib"
    with new_gallery(path) as gallery:
        gallery.add(clustered(20, DIM), labels_for(20))
    database = path / "gallery.sqlite"
    with contextlib.closing(sqlite3.connect(database)) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        query = "SELECT rootpage FROM sqlite_master WHERE name = ?"
        page = conn.execute(query, (table,)).fetchone()[0]
    with open(database, "r+b") as handle:
        handle.seek((page - 1) * page_size)
        handle.write(b"\x13" * page_size)
    if table == "manifest":
        with pytest.raises(GalleryError, match="gallery.sqlite: not a readable gallery database"):
            Gallery.open(path)
    else:
        with Gallery.open(path) as gallery:
            assert gallery.verify()[0] == "sqlite: database disk image is malformed"


@pytest.mark.parametrize(
    ("edit", "refusal"),
    [
        (
            "json_remove(document, '$.model_fingerprint')",
            r"manifest lacks the keys \['model_fingerprint'\]",
        ),
        ("'[1, 2]'", "manifest is not a JSON object: \\[1, 2\\]"),
        ("json_set(document, '$.index_type', 'Foo')", "manifest: unknown index type 'Foo'"),
        ("json_set(document, '$.embedding_dim', 'abc')", "manifest: embedding_dim is 'abc', not"),
        ("json_set(document, '$.generation', 'x')", "manifest: generation is 'x', not int"),
        (
            "json_set(document, '$.backend_options', json('[1]'))",
            "manifest: backend_options is \\[1\\]",
        ),
        ("json_set(document, '$.normalize', 1)", "manifest: normalize is 1, not bool"),
    ],
)
def test_a_damaged_manifest_is_a_gallery_error_naming_the_library(tmp_path, edit, refusal):
    """A manifest without a key it must have failed on a TypeError's traceback, one not
    an object or a value of another type (text for a count, a list for settings) on a
    TypeError's or AttributeError's, at the first write or at once, and one with a value out
    of place was refused without naming the library (`unknown index type 'Foo'`)."""
    path = tmp_path / "lib"
    with new_gallery(path) as gallery:
        gallery.add(clustered(10, DIM), labels_for(10))
    with contextlib.closing(sqlite3.connect(path / "gallery.sqlite")) as conn, conn:
        conn.execute(f"UPDATE manifest SET document = {edit}")
    for opening in (Gallery.open, Catalog):
        with pytest.raises(GalleryError, match=f"^{path / 'gallery.sqlite'}: {refusal}"):
            opening(path)


def test_a_write_to_a_library_whose_manifest_is_gone_says_so_not_attributeerror(tmp_path):
    """The manifest row deleted while the library was open: the write's transaction read
    it as None and failed on `None.generation`, an AttributeError shown above the
    GalleryError the roll-back's reload then raised, as if shitu itself had crashed."""
    path = tmp_path / "lib"
    with new_gallery(path) as gallery:
        gallery.add(clustered(10, DIM), labels_for(10))
        with contextlib.closing(sqlite3.connect(path / "gallery.sqlite")) as conn, conn:
            conn.execute("DELETE FROM manifest")
        with pytest.raises(GalleryError, match="gallery.sqlite: library has no manifest") as info:
            gallery.relabel(labels_for(1)[0], "renamed")
        chained = []
        error: BaseException | None = info.value
        while error is not None:
            chained.append(type(error).__name__)
            error = error.__cause__ or error.__context__
        assert "AttributeError" not in chained


def test_a_write_to_a_library_built_again_since_it_was_opened_says_so(tmp_path):
    """A server's library deleted and built again at its path: the server's edits went to
    the deleted file, which SQLite refuses as "attempt to write a readonly database" (a
    500 'internal error' from the server)."""
    path = tmp_path / "lib"
    with new_gallery(path) as gallery:
        gallery.add(clustered(20, DIM), labels_for(20))
        shutil.rmtree(path)
        new_gallery(path).close()
        with pytest.raises(GalleryError, match="lib/gallery.sqlite: the library was deleted or "
                           "replaced .* nothing was changed: open it again"):  # fmt: skip
            gallery.remove(ids=[1])
    with Gallery.open(path) as gallery:
        assert len(gallery) == 0


@contextlib.contextmanager
def read_only_folder(folder: Path) -> Iterator[None]:
    """`folder` that this user cannot write in: by its mode, or for root (whom modes do not
    stop) by the immutable attribute, where the file system has it (else the test skips)."""
    folder.chmod(0o555)
    immutable = False
    try:
        if os.access(folder, os.W_OK):  # root
            made = subprocess.run(["chattr", "+i", folder], capture_output=True)
            if made.returncode != 0:
                pytest.skip("cannot make a folder read-only for this user here")
            immutable = True
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", folder], check=True)
        folder.chmod(0o755)


def test_a_write_to_a_read_only_library_is_a_gallery_error_and_reads_go_on(tmp_path):
    """A library in a folder this user cannot write in (another user's, a read-only mount):
    SQLite cannot make its journal, and a write was its traceback ("unable to open database
    file"); it is searched as before."""
    path = tmp_path / "lib"
    with new_gallery(path) as gallery:
        gallery.add(clustered(20, DIM), labels_for(20))
    with read_only_folder(path), Gallery.open(path) as gallery:
        with pytest.raises(GalleryError, match="lib/gallery.sqlite: cannot write the library .*"
                           "read-only to this user.*; nothing was changed"):  # fmt: skip
            gallery.remove(ids=[1])
        assert len(gallery) == 20 and gallery.search(clustered(1, DIM), k=1).found.all()


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_corrupt_index_file_is_detected(tmp_path, damage):
    path = tmp_path / "lib"
    with new_gallery(path) as gallery:
        gallery.add(clustered(100, DIM), labels_for(100))
        index_file = path / gallery.manifest.index_state["file"]
    raw = bytearray(index_file.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0xFF
        index_file.write_bytes(raw)
    elif damage == "truncate":
        index_file.write_bytes(raw[:-100])
    else:
        index_file.unlink()
    expected = {"flip": "checksum", "truncate": "bytes", "delete": "missing"}[damage]
    with pytest.raises(GalleryError, match=expected):
        Gallery.open(path)


def test_stored_features_are_read_a_few_rows_at_a_time(tmp_path, monkeypatch):
    """`features` (rebuilds, verify, a Milvus resync) fills one array FETCH_ROWS rows at a
    time, never holding every row's bytes besides it, and gives what was added, by id; a
    row of another size is refused even where another one's would make up the length."""
    monkeypatch.setattr(metadata, "FETCH_ROWS", 3, raising=False)  # steps of 3: checked below
    features = clustered(11, DIM)
    fetched: list[int] = []

    class Steps:  # the feature query's cursor, recording how many rows each step brings
        def __init__(self, cursor: sqlite3.Cursor) -> None:
            self.cursor = cursor

        def fetchmany(self, size: int) -> list:
            rows = self.cursor.fetchmany(size)
            fetched.append(len(rows))
            return rows

    class Recording:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def __getattr__(self, name: str):
            return getattr(self.conn, name)

        def execute(self, sql: str, *args):
            cursor = self.conn.execute(sql, *args)
            return Steps(cursor) if "feature FROM" in sql else cursor

    with new_gallery(tmp_path / "lib") as gallery:
        ids = gallery.add(features, labels_for(11)).ids
        gallery.remove(ids=[int(ids[4])])
        store = gallery._store
        monkeypatch.setattr(store, "conn", Recording(store.conn))
        got_ids, got = gallery.features()
        assert np.array_equal(got_ids, np.delete(ids, 4))
        assert np.array_equal(got, l2_normalize(np.delete(features, 4, axis=0)))
        assert max(fetched) == 3 and sum(fetched) == 10
        monkeypatch.undo()
        short, long = bytes(4 * (DIM - 1)), bytes(4 * (DIM + 1))
        rows = [(short, int(ids[0])), (long, int(ids[1]))]
        store.conn.executemany("UPDATE images SET feature = ? WHERE id = ?", rows)
        with pytest.raises(GalleryError, match=f"stored features are not all {DIM}-d float32"):
            gallery.features()


def test_not_a_library_and_existing_target_are_refused(tmp_path):
    build = f"`shitu index build {tmp_path} --out LIB`"  # images given as a library
    with pytest.raises(GalleryError, match=f"not a gallery library .*{re.escape(build)}"):
        Gallery.open(tmp_path)
    with pytest.raises(GalleryError, match="nowhere: no such gallery library"):
        Gallery.open(tmp_path / "nowhere")
    in_place = tmp_path / "database_a_folder"  # not "no gallery.sqlite": one is there
    (in_place / "gallery.sqlite").mkdir(parents=True)
    with pytest.raises(GalleryError, match="gallery.sqlite: a folder, not the library's database"):
        Gallery.open(in_place)
    paddle = tmp_path / "paddle_index"  # PaddleClas's IndexProcess.index_dir, via `-c`
    paddle.mkdir()
    (paddle / "vector.index").write_bytes(b"")
    (paddle / "id_map.pkl").write_bytes(b"")
    with pytest.raises(GalleryError, match="a PaddleClas index .*`shitu index build DATA_FILE"):
        Gallery.open(paddle)
    library = new_gallery(tmp_path / "lib")  # a library's database, given for the library
    library.close()
    with pytest.raises(GalleryError, match=f"gallery.sqlite: a file of the library {library.root}"):
        Gallery.open(library.root / "gallery.sqlite")
    model = tmp_path / "my_model"  # a `shitu export` folder, given as the library
    model.mkdir()
    (model / "shitu_model.json").write_text("{}")
    with pytest.raises(GalleryError, match=f"{model}: an exported model, not a gallery library"):
        Gallery.open(model)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(GalleryError, match="already exists"):
        new_gallery(tmp_path / "taken")
    with pytest.raises(GalleryError, match="unknown index type"):
        new_gallery(tmp_path / "bad", index_type="LSH")
    for option in ({"ef_search": 0}, {"nprobe": -1}, {"ef_search": 2.5}):
        with pytest.raises(GalleryError, match=f"{next(iter(option))} must be a whole number"):
            new_gallery(tmp_path / "bad", index_type="HNSW32", backend_options=option)
    assert not (tmp_path / "bad").exists()
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "gallery.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(GalleryError, match="not a readable gallery database"):
        Gallery.open(tmp_path / "garbage")


# --------------------------------------------------------------------------- crash safety

WRITES = {
    "add": "gallery.add(np.full((3, 16), 5, np.float32) + np.eye(3, 16, dtype=np.float32), ['new'] * 3)",
    "add-many": "gallery.add(np.full((9, 16), 5, np.float32) + np.eye(9, 16, dtype=np.float32), ['new'] * 9)",
    "remove": "gallery.remove(labels=['product 1'])",
    "relabel": "gallery.relabel('product 2', 'renamed')",
    "rebuild": "gallery.rebuild('HNSW32')",
}
# On 60 images: more than a tenth of them changed, so these write an index file; a small
# add changes the live index only, and a relabel no vectors.
WRITES_INDEX_FILE = ("add-many", "remove", "rebuild")


KILL_POINTS = [
    (write, point)
    for write in sorted(WRITES)
    for point in ("rows-written", "index-file-written", "before-commit")
    if point != "index-file-written" or write in WRITES_INDEX_FILE
]


@pytest.mark.parametrize(("write", "point"), KILL_POINTS)
def test_killed_write_leaves_previous_library(tmp_path, write, point):
    path = tmp_path / "lib"
    data = clustered(60, DIM)
    with new_gallery(path) as gallery:
        gallery.add(data, labels_for(60))
    before = snapshot(path, data[:8])
    killed = run_killed(path, point, WRITES[write])
    assert killed.returncode == -9, killed.stderr
    assert snapshot(path, data[:8]) == before
    with Gallery.open(path) as gallery:  # and the next write works, clearing leftovers
        gallery.add(data[:1] * 2, ["after"])
        assert gallery.verify() == [] and len(gallery) == 61
    assert len(list(path.glob("index-*"))) == 1


@pytest.mark.parametrize("write", ["add", "remove"])
def test_write_killed_after_commit_keeps_the_new_library(tmp_path, write):
    """Also a small add, which the index file does not hold: opening replays it."""
    path = tmp_path / "lib"
    data = clustered(60, DIM)
    with new_gallery(path) as gallery:
        gallery.add(data, labels_for(60))
    killed = run_killed(path, "after-commit", WRITES[write])
    assert killed.returncode == -9, killed.stderr
    with Gallery.open(path) as gallery:
        assert gallery.verify() == []
        if write == "remove":
            assert "product 1" not in gallery.label_counts()
        else:
            hits = gallery.search(np.full((1, DIM), 5, np.float32), k=3)
            assert gallery.label_counts()["new"] == 3 and (hits.labels == "new").all()


@pytest.mark.parametrize("point", ["rows-written", "index-file-written", "before-commit"])
def test_killed_checkpoint_leaves_the_previous_library_and_its_changes_since_the_last(
    tmp_path, point
):
    """A write that writes the index file again, in a library whose file lacks its last
    writes, killed before its commit: the old file and the changes since it are what opens."""
    path = tmp_path / "lib"
    data = clustered(60, DIM)
    with new_gallery(path) as gallery:
        gallery.add(data, labels_for(60))
        gallery.add(data[:5] + 1.0, ["since"] * 5)  # 5 of 65 changed: in the manifest only
        gallery.remove(ids=[7])
        assert gallery.manifest.index_state[CHANGES_KEY] == 6
    before = snapshot(path, data[:8] + 1.0)
    killed = run_killed(path, point, WRITES["add"])  # 9 changed: the file is written again
    assert killed.returncode == -9, killed.stderr
    assert snapshot(path, data[:8] + 1.0) == before
    with Gallery.open(path) as gallery:
        assert gallery.label_counts()["since"] == 5 and len(gallery) == 64
        gallery.add(data[:1] * 2, ["after"])
        assert gallery.verify() == [] and len(gallery) == 65
    assert len(list(path.glob("index-*"))) == 1


def test_opening_keeps_one_generation_while_another_writer_publishes(tmp_path, monkeypatch):
    """Opening reads the manifest, index file and labels under one read lock: a writer in
    another connection commits (and deletes the old index file) only after it."""
    path = tmp_path / "lib"
    with new_gallery(path) as gallery:
        gallery.add(clustered(50, DIM), labels_for(50))
    written = threading.Event()

    def write() -> None:
        with Gallery.open(path) as writer:
            writer.add(clustered(5, DIM, seed=3), ["new product"] * 5)
        written.set()

    thread = threading.Thread(target=write)
    real_open_backend = gallery_module.open_backend
    committing = threading.Event()  # the writer's last step before its commit
    real_write_manifest = MetadataStore.write_manifest

    def write_manifest(store, manifest):
        real_write_manifest(store, manifest)
        if threading.current_thread() is thread:
            committing.set()

    def open_backend_while_writing(*args, **kwargs):
        if not thread.is_alive() and not written.is_set():  # the first open only
            thread.start()
            assert committing.wait(10)
            assert not written.wait(0.5)  # the writer's commit waits for the open to end
        return real_open_backend(*args, **kwargs)

    monkeypatch.setattr(MetadataStore, "write_manifest", write_manifest)
    monkeypatch.setattr(gallery_module, "open_backend", open_backend_while_writing)
    with Gallery.open(path) as reader:
        assert len(reader) == 50 and reader.search(clustered(1, DIM), k=1).labels[0, 0]
    thread.join(30)
    assert written.is_set()
    with Gallery.open(path) as reader:
        assert len(reader) == 55


def test_refresh_catches_up_with_other_writers_but_not_with_another_model(tmp_path):
    embedder = PixelEmbedder()
    images = make_images(tmp_path / "images", 6)
    path = tmp_path / "lib"
    with Gallery.create_for(path, embedder) as gallery:
        gallery.add_files(embedder, [GalleryItem(p, "first") for p in images[:4]])
    with Gallery.open(path, embedder=embedder) as reader:
        assert not reader.stale() and not reader.refresh()
        with Gallery.open(path) as writer:  # another process, as far as SQLite knows
            writer.add_files(embedder, [GalleryItem(p, "second") for p in images[4:]])
        assert reader.stale() and len(reader) == 4
        assert reader.refresh() and len(reader) == 6 and not reader.stale()
        assert reader.label_counts() == {"first": 4, "second": 2}

        with Gallery.open(path) as writer:  # a generation whose index file is then damaged
            writer.remove(labels=["second"])
            damaged = path / writer.manifest.index_state["file"]
        sound = damaged.read_bytes()
        damaged.write_bytes(sound[:100])
        with pytest.raises(GalleryError, match="index file is 100 bytes"):
            reader.refresh()
        assert len(reader) == 6 and reader.stale()  # still serving, and it will try again
        hits = reader.search(embedder.extract_files([str(images[5])]).features, k=1)
        assert hits.labels[0, 0] == "second"
        damaged.write_bytes(sound)  # e.g. a file system that caught up
        assert reader.refresh() and reader.label_counts() == {"first": 4}

        other = PixelEmbedder(fingerprint="pixels-4-retrained")
        with Gallery.open(path) as writer:
            writer.reembed(other)
        with pytest.raises(GalleryError, match="re-embedded with model pixels-4-retrained"):
            reader.refresh()  # its features would not match this model's queries
        hits = reader.search(embedder.extract_files([str(images[0])]).features, k=1)
        assert hits.labels[0, 0] == "first"  # still serving what it had


# --------------------------------------------------------------------------- API misuse


def sqlite_calls(gallery: Gallery, tmp_path: Path) -> dict[str, Callable[[], object]]:
    """Every Gallery call that reads or writes the library's database, by name."""
    embedder = PixelEmbedder()
    image = make_images(tmp_path / "images", 1)[0]
    return {
        "generation_on_disk": gallery.generation_on_disk,
        "stale": gallery.stale,
        "refresh": gallery.refresh,
        "add": lambda: gallery.add(clustered(1, DIM), ["x"]),
        "add_files": lambda: gallery.add_files(embedder, [GalleryItem(image, "x")]),
        "remove": lambda: gallery.remove(ids=[1]),
        "relabel": lambda: gallery.relabel("product 0", "y"),
        "rebuild": gallery.rebuild,
        "reembed": lambda: gallery.reembed(embedder),
        "entries": gallery.entries,
        "label_counts": gallery.label_counts,
        "features": gallery.features,
        "verify": gallery.verify,
    }


def test_a_closed_library_refuses_every_call(tmp_path):
    embedder = PixelEmbedder()
    gallery = new_gallery(tmp_path / "lib")
    gallery.add(clustered(5, DIM), labels_for(5))
    gallery.close()
    gallery.close()  # closing twice is harmless
    calls = {
        "search": lambda: gallery.search(clustered(1, DIM), k=3),
        "len": lambda: len(gallery),
        "with": lambda: gallery.__enter__(),
        "check_embedder": lambda: gallery.check_embedder(embedder),
        "stats": gallery.stats,
        **sqlite_calls(gallery, tmp_path),
    }
    for name, call in calls.items():
        with pytest.raises(GalleryError) as caught:
            call()
        assert str(caught.value) == f"{tmp_path / 'lib'}: the library is closed", name


def test_a_closed_catalog_refuses_every_call_as_a_library_does(tmp_path):
    """Its calls failed on an AttributeError of the error handling ('ProgrammingError'
    object has no attribute 'sqlite_errorcode') or SQLite's "closed database"."""
    new_gallery(tmp_path / "lib").close()
    catalog = Catalog(tmp_path / "lib")
    assert catalog.label_counts() == {}
    catalog.close()
    catalog.close()  # closing twice is harmless
    calls = {
        "label_counts": catalog.label_counts,
        "entries": catalog.entries,
        "stats": catalog.stats,
        "with": catalog.__enter__,
    }
    for name, call in calls.items():
        with pytest.raises(GalleryError) as caught:
            call()
        assert str(caught.value) == f"{tmp_path / 'lib'}: the catalog is closed", name


@pytest.mark.parametrize("normalize", [True, False])
def test_vectors_without_a_value_or_direction_are_refused(tmp_path, normalize):
    with new_gallery(tmp_path / "lib", normalize=normalize) as gallery:
        gallery.add(clustered(3, DIM), labels_for(3))
        features = clustered(14, DIM)
        features[2, 5] = np.nan
        features[7, 0] = np.inf
        features[9, 1] = -np.inf
        with pytest.raises(GalleryError) as caught:
            gallery.add(features, labels_for(14))
        assert str(caught.value) == f"{tmp_path / 'lib'}: add: rows 2, 7, 9 contain NaN or inf"
        zero = clustered(12, DIM)
        zero[[0, 3, 4, 5, 6, 7, 8, 9, 10, 11]] = 0
        if normalize:  # a zero vector has no direction, so no cosine with anything
            with pytest.raises(GalleryError) as caught:
                gallery.add(zero, labels_for(12))
            assert str(caught.value) == (
                f"{tmp_path / 'lib'}: add: rows 0, 3, 4, 5, 6, 7, 8, 9, 10, 11 are all zero or "
                "cannot be normalised: a library that normalises its features needs vectors "
                "with a direction"
            )
            assert len(gallery) == 3
        else:  # a point at the origin has a Euclidean distance to everything
            gallery.add(zero, labels_for(12))
            assert len(gallery) == 15
        assert gallery.verify() == []


@pytest.mark.parametrize("index_type", ["Flat", "HNSW32"])
def test_searches_in_another_thread_see_each_write_whole(tmp_path, index_type):
    features = clustered(200, DIM, seed=3)
    with new_gallery(tmp_path / "lib", index_type=index_type) as gallery:
        gallery.add(features[:20], labels_for(20))
        done = threading.Event()
        seen: list[tuple[np.ndarray, np.ndarray]] = []
        errors: list[BaseException] = []

        def search() -> None:
            try:
                while not done.is_set():
                    hits = gallery.search(features, k=3)  # the rows added meanwhile, too
                    seen.append((hits.ids, hits.labels))
            except BaseException as exc:  # reported in the test's thread
                errors.append(exc)

        reader = threading.Thread(target=search)
        reader.start()
        try:
            for start in range(20, 200, 6):  # the owner thread writes meanwhile
                added = gallery.add(features[start : start + 6], labels_for(6)).ids
                gallery.relabel("product 1", f"product 1 v{start}")
                gallery.remove(ids=added[:2])
        finally:
            done.set()
            reader.join(30)
        assert not errors and len(seen) > 10
        for ids, labels in seen:
            assert (labels[ids >= 0] != "").all() and (labels[ids < 0] == "").all()


def test_only_search_may_run_in_other_threads(tmp_path):
    path = tmp_path / "lib"
    gallery = new_gallery(path)
    gallery.add(clustered(5, DIM), labels_for(5))
    outcome: dict[str, object] = {}

    def elsewhere() -> None:
        outcome["search"] = gallery.search(clustered(1, DIM), k=2).labels.tolist()
        outcome["len"], outcome["stats"] = len(gallery), gallery.stats()["images"]
        calls = {**sqlite_calls(gallery, tmp_path), "close": gallery.close}
        for name, call in calls.items():
            try:
                call()
            except GalleryError as exc:
                outcome[name] = str(exc)

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join(30)
    refused = (
        f"{path}: a Gallery is used from the thread that opened it (only search may run in "
        "other threads); open one per thread, or make every other call on one thread, as "
        "`shitu serve` does"
    )
    assert len(outcome.pop("search")[0]) == 2 and outcome.pop("len") == outcome.pop("stats") == 5
    assert outcome == dict.fromkeys(outcome, refused) and len(outcome) == 14
    assert gallery.label_counts() == {f"product {i}": 1 for i in range(5)}  # still usable here
    gallery.close()


@pytest.mark.parametrize("dim", [4.5, "4", 0, -3, True, None])
def test_an_embedding_size_that_is_not_a_positive_integer_is_refused(tmp_path, dim):
    with pytest.raises(GalleryError) as caught:
        Gallery.create(tmp_path / "lib", embedding_dim=dim, model_fingerprint="m")
    assert str(caught.value) == f"embedding_dim must be a positive integer, got {dim!r}"
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_an_embedder_given_as_a_path_or_none_is_refused_naming_what_to_pass(tmp_path):
    """A model folder's path where the loaded model goes failed on "'PosixPath' object has
    no attribute 'embedding_size'" (or 'fingerprint'), before or after the build began."""
    images = make_images(tmp_path / "photos", 2)
    items = [GalleryItem(path, "a") for path in images]
    model = tmp_path / "model"
    with Gallery.create_for(tmp_path / "lib", PixelEmbedder()) as gallery:
        gallery.add_files(PixelEmbedder(), items)
    with Gallery.open(tmp_path / "lib") as gallery:
        calls = {
            "build": lambda: Gallery.build(tmp_path / "new", model, items),
            "create_for": lambda: Gallery.create_for(tmp_path / "new", str(model)),
            "open": lambda: Gallery.open(tmp_path / "lib", embedder=model),
            "add_files": lambda: gallery.add_files(model, items),
            "reembed": lambda: gallery.reembed(model),
        }
        for name, call in calls.items():
            with pytest.raises(GalleryError) as caught:
                call()
            assert str(caught.value) == (
                "embedder: expected a loaded model, shitu.inference.FeatureExtractor.load"
                f"(model_dir), got the path '{model}'"
            ), name
        with pytest.raises(
            GalleryError, match=r"FeatureExtractor.load\(model_dir\), got NoneType$"
        ):
            gallery.check_embedder(None)
        assert len(gallery) == 2
    assert sorted(path.name for path in tmp_path.iterdir()) == ["lib", "photos"]


@pytest.mark.parametrize("normalize", ["no", 0, None])
def test_a_normalize_that_is_not_a_bool_is_refused(tmp_path, normalize):
    """normalize="no" made a library that stored "no" and normalised all the same."""
    with pytest.raises(GalleryError) as caught:
        Gallery.create(
            tmp_path / "lib", embedding_dim=DIM, model_fingerprint="m", normalize=normalize
        )
    assert str(caught.value) == f"normalize must be True or False, got {normalize!r}"
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_numpy_integer_embedding_size_is_stored_as_a_number(tmp_path):
    with Gallery.create(tmp_path / "lib", embedding_dim=np.int64(DIM), model_fingerprint="m"):
        pass
    with Gallery.open(tmp_path / "lib") as gallery:
        assert gallery.manifest.embedding_dim == DIM
        assert type(gallery.manifest.embedding_dim) is int


def test_unknown_index_options_and_wrong_values_are_refused(tmp_path):
    path = tmp_path / "lib"
    for backend, options, expected in [
        (
            "faiss",
            {"M": "abc", "bogus": 1},
            "unknown faiss index option 'M': valid options are ef_search, nprobe",
        ),
        (
            "faiss",
            {"nlist": 8},  # Faiss libraries choose their lists from the size of the data
            "unknown faiss index option 'nlist': valid options are ef_search, nprobe",
        ),
        (
            "milvus",
            {"efSearch": 128},
            "unknown milvus index option 'efSearch' (did you mean 'ef_search'?): valid "
            "options are ef_search, nprobe, nlist, uri, collection",
        ),
        ("milvus", {"uri": 5}, "index option uri must be a non-empty string, got 5"),
        (
            "milvus",
            {"uri": "vectors"},
            "index option uri must be a server's http://host:port or a Milvus Lite file "
            "ending in .db, got 'vectors'",
        ),
        ("milvus", {"nlist": "8"}, "index option nlist must be a whole number >= 1, got '8'"),
        *(  # names a Milvus server refuses (Milvus Lite takes some)
            (
                "milvus",
                {"collection": name},
                "index option collection must be a letter or underscore followed by letters, "
                f"digits and underscores, at most 255 in all, got {name!r}",
            )
            for name in ("my-products", "my products", "x'y", "produits_été", "9lives", "a" * 256)
        ),
    ]:
        with pytest.raises(GalleryError) as caught:
            new_gallery(path, backend=backend, backend_options=options)
        assert str(caught.value) == expected
        assert not path.exists()
    with pytest.raises(GalleryError, match="replace_collection: only for the milvus backend"):
        new_gallery(path, replace_collection=True)  # a Faiss library has no collection
    assert not path.exists()
    with new_gallery(path, index_type="HNSW32", backend_options={"ef_search": 32}) as gallery:
        gallery.add(clustered(20, DIM), labels_for(20))
        with pytest.raises(GalleryError) as caught:
            gallery.rebuild("HNSW32", efSearch=128)
        assert str(caught.value) == (
            "unknown faiss index option 'efSearch' (did you mean 'ef_search'?): valid options "
            "are ef_search, nprobe"
        )
        with pytest.raises(GalleryError, match="ef_search must be a whole number >= 1, got 1.5"):
            gallery.rebuild(ef_search=1.5)
        assert gallery.manifest.generation == 1
        gallery.rebuild(ef_search=128)
        assert gallery.manifest.backend_options == {"ef_search": 128}
        assert gallery.search(clustered(1, DIM), k=3).found.all()


def test_a_search_setting_beyond_32_bit_is_refused_not_stored(tmp_path):
    """Faiss keeps nprobe and efSearch as 32-bit integers: an IVF library built with
    nprobe 2**31 failed every search inside Faiss (a RuntimeError naming its C++ source),
    and an HNSW32 one with a larger ef_search found fewer hits than asked for."""
    path = tmp_path / "lib"
    refusal = "index option nprobe must be at most 2147483647, got 2147483648"
    with pytest.raises(GalleryError, match=refusal):
        new_gallery(path, index_type="IVF", backend_options={"nprobe": 2**31})
    assert not path.exists()
    with new_gallery(path, index_type="HNSW32") as gallery:
        gallery.add(clustered(20, DIM), labels_for(20))
        with pytest.raises(GalleryError, match="ef_search must be at most 2147483647"):
            gallery.rebuild(ef_search=2**40)
        assert gallery.manifest.backend_options == {} and gallery.manifest.generation == 1
        assert gallery.search(clustered(1, DIM), k=3).found.all()


def test_a_setting_given_as_none_is_left_out_not_stored_as_null(tmp_path):
    """`backend_options={"ef_search": None}` (a caller passing on a setting it was not
    given) was stored as null: the first add failed inside Faiss after its commit, and the
    library never opened again, nor could `index rebuild` mend it. None is a setting left
    out, as a flag not typed; in a rebuild it keeps the value stored. A library in which
    an earlier shitu stored such a null opens with the default."""
    path = tmp_path / "lib"
    options = {"ef_search": None, "nprobe": None}
    with new_gallery(path, index_type="HNSW32", backend_options=options) as gallery:
        gallery.add(clustered(20, DIM), labels_for(20))
        assert gallery.manifest.backend_options == {}
        gallery.rebuild("IVF", nprobe=12, ef_search=None)
        gallery.rebuild(nprobe=None)
        assert gallery.manifest.backend_options == {"nprobe": 12}
    earlier = tmp_path / "earlier"
    with new_gallery(earlier, index_type="HNSW32") as gallery:
        gallery.add(clustered(20, DIM), labels_for(20))
    with contextlib.closing(sqlite3.connect(earlier / "gallery.sqlite")) as conn, conn:
        conn.execute(
            "UPDATE manifest SET document = json_set(document, '$.backend_options', "
            "json('{\"ef_search\": null}'))"
        )
    with Gallery.open(earlier) as gallery:
        assert gallery.verify() == [] and gallery.search(clustered(1, DIM), k=3).found.all()
        assert gallery.manifest.backend_options == {}


def test_a_setting_the_index_type_never_reads_is_refused_by_create_and_rebuild(tmp_path):
    """`Gallery.create(index_type="Flat", backend_options={"nprobe": 4})` stored the setting,
    which Flat never reads, and `rebuild` kept one given for a type that does not read it:
    the CLI refused both (`--nprobe: only with --index-type ...`), Python took them."""
    path = tmp_path / "lib"
    for backend, index_type, options, expected in [
        (
            "faiss",
            "Flat",
            {"nprobe": 4},
            "index option nprobe: only with index_type IVF or IVFPQ (not Flat)",
        ),
        (
            "faiss",
            "IVF",
            {"ef_search": 32},
            "index option ef_search: only with index_type HNSW32 (not IVF)",
        ),
        (
            "milvus",
            "HNSW32",
            {"nlist": 64},
            "index option nlist: only with index_type IVF or IVFPQ (not HNSW32)",
        ),
    ]:
        with pytest.raises(GalleryError) as caught:
            new_gallery(path, backend=backend, index_type=index_type, backend_options=options)
        assert str(caught.value) == expected
        assert not path.exists()
    with new_gallery(path, index_type="Flat") as gallery:
        gallery.add(clustered(20, DIM), labels_for(20))
        for call, expected in [
            (
                lambda: gallery.rebuild(nprobe=4),
                "nprobe: only with index_type IVF or IVFPQ (not Flat)",
            ),
            (
                lambda: gallery.rebuild("HNSW32", nprobe=4),
                "nprobe: only with index_type IVF or IVFPQ (not HNSW32)",
            ),
            (
                lambda: gallery.rebuild("IVF", ef_search=64),
                "ef_search: only with index_type HNSW32 (not IVF)",
            ),
        ]:
            with pytest.raises(GalleryError, match=re.escape(expected)):
                call()
            assert gallery.manifest.index_type == "Flat"
            assert gallery.manifest.backend_options == {}
            assert gallery.manifest.generation == 1
        assert gallery.rebuild("IVF", nprobe=4) == {}
        assert gallery.manifest.backend_options == {"nprobe": 4}
    with Gallery.open(path) as gallery:
        assert (gallery.manifest.index_type, gallery.manifest.backend_options) == (
            "IVF",
            {"nprobe": 4},
        )


def test_a_string_where_a_list_belongs_is_not_read_a_character_at_a_time(tmp_path):
    with new_gallery(tmp_path / "lib") as gallery:
        gallery.add(clustered(3, DIM), ["zero", "one", "two"])
        for call, expected in [
            (
                lambda: gallery.add(clustered(3, DIM), "abc"),
                "add: expected a list of labels, got the string 'abc'",
            ),
            (
                lambda: gallery.add(clustered(3, DIM), ["a", "b", "c"], paths="xyz"),
                "add: expected a list of paths, got the string 'xyz'",
            ),
            (
                lambda: gallery.remove(labels="zero"),
                "remove: expected a list of labels, got the string 'zero'",
            ),
            (
                lambda: gallery.remove(ids="12"),
                "remove: expected a list of ids, got the string '12'",
            ),
            (lambda: gallery.remove(ids=1), "remove: expected a list of ids, got 1"),
        ]:
            with pytest.raises(GalleryError) as caught:
                call()
            assert str(caught.value) == expected
        assert gallery.label_counts() == {"one": 1, "two": 1, "zero": 1}
        assert len(gallery.remove(labels=["zero"])) == 1
        with pytest.raises(GalleryError, match=r"got complex values \(complex64\)$"):
            gallery.search(clustered(1, DIM).astype(np.complex64))  # not its real parts
        with pytest.raises(GalleryError, match=r"got list \[\[1, 2\], \[3\]\]$"):
            gallery.search([[1, 2], [3]])


def test_an_id_that_is_not_a_whole_number_is_refused_not_taken_for_another_image(tmp_path):
    with new_gallery(tmp_path / "lib") as gallery:
        ids = gallery.add(clustered(3, DIM), ["zero", "one", "two"]).ids
        for wrong, named in [
            (1.5, "float 1.5"),
            (True, "bool True"),
            ("2", "str '2'"),
            (None, "NoneType None"),
        ]:
            with pytest.raises(GalleryError) as caught:
                gallery.remove(ids=[int(ids[2]), wrong])
            assert str(caught.value) == f"remove: an image id is a whole number, got {named}"
        assert gallery.label_counts() == {"one": 1, "two": 1, "zero": 1}
        for wrong, named in [(1.5, "float 1.5"), ("2", "str '2'"), (None, "NoneType None")]:
            with pytest.raises(GalleryError) as caught:
                gallery.entries_with_ids([wrong])
            assert str(caught.value) == f"entries: an image id is a whole number, got {named}"
        with pytest.raises(GalleryError, match="^entries: expected a list of ids, got the str"):
            gallery.entries_with_ids("12")
        assert gallery.remove(ids=ids[:1]).tolist() == [int(ids[0])]  # numpy ints are ids
        assert [entry.id for entry in gallery.entries_with_ids(ids)] == ids[1:].tolist()


def test_the_type_hints_take_the_feature_extractor_and_the_ids_add_returns(tmp_path):
    """What a type checker (mypy) refused although it runs: a Protocol's plain attribute is
    one the library may set, so FeatureExtractor's read-only `preprocessing` did not
    satisfy Embedder (Gallery.open(path, embedder=extractor)), and remove's ids were a
    Sequence, which the numpy array of ids that add returns is not."""
    for name in ("embedding_size", "fingerprint", "preprocessing"):
        assert isinstance(inspect.getattr_static(Embedder, name, None), property), name
    with new_gallery(tmp_path / "lib") as gallery:
        ids = gallery.add(clustered(2, DIM), ["zero", "one"]).ids
        hint = typing.get_type_hints(Gallery.remove)["ids"]
        assert isinstance(ids, typing.get_origin(hint))
        assert gallery.remove(ids=ids).tolist() == ids.tolist()


def test_a_library_without_a_model_fingerprint_is_not_created(tmp_path):
    """Stored, None or "" is a fingerprint that no model has: every use was refused."""
    for wrong in (None, "", " ", 5):
        with pytest.raises(GalleryError) as caught:
            Gallery.create(tmp_path / "lib", embedding_dim=DIM, model_fingerprint=wrong)
        assert str(caught.value).startswith(
            f"model_fingerprint: expected the model's fingerprint (text: its FeatureExtractor's "
            f"fingerprint), got {wrong!r}; "
        )
        assert not (tmp_path / "lib").exists()


def test_a_library_given_no_path_names_the_argument(tmp_path, monkeypatch):
    """None (an unset setting) failed inside pathlib; '' was the current folder."""
    monkeypatch.chdir(tmp_path)
    for given in (None, "", 3):
        for call in (
            Gallery.open,
            new_gallery,
            lambda path: Gallery.build(path, PixelEmbedder(), []),
            Catalog,
        ):
            with pytest.raises(GalleryError) as caught:
                call(given)
            assert str(caught.value) == f"expected a gallery library's path, got {given!r}"
    assert not list(tmp_path.iterdir())


def test_a_label_looked_up_is_text_or_a_whole_number(tmp_path):
    """None (or another non-text) label to remove or rename failed with an AttributeError
    inside the did-you-mean hint; a whole number is found as `add` stored it."""
    with new_gallery(tmp_path / "lib") as gallery:
        gallery.add(clustered(3, DIM), [7, "seven", "eight"])
        for call, where in (
            (lambda: gallery.remove(labels=[None]), "remove"),
            (lambda: gallery.relabel(None, "x"), "relabel"),
            (lambda: gallery.relabel(b"seven", "x"), "relabel"),
        ):
            with pytest.raises(
                GalleryError, match=rf"^{where}: a label is text, got (NoneType|bytes)"
            ):
                call()
        assert gallery.relabel(7, "seven", merge=True) == 1
        assert len(gallery.remove(labels=["seven"])) == 2
        with pytest.raises(GalleryError, match="no images labelled '8'$"):
            gallery.remove(labels=[8])
        assert gallery.label_counts() == {"eight": 1}


def test_a_path_to_add_that_is_not_text_is_named(tmp_path):
    """None failed as a NOT NULL constraint of the database, a number inside pathlib."""
    with new_gallery(tmp_path / "lib") as gallery:
        for wrong, named in [(None, "NoneType None"), (3, "int 3")]:
            with pytest.raises(GalleryError) as caught:
                gallery.add(clustered(2, DIM), ["a", "b"], paths=["a.jpg", wrong])
            assert str(caught.value) == f"add: a path is text ('' for none), got {named}"
        assert len(gallery) == 0
        features = clustered(2, DIM)
        gallery.add(features, ["a", "b"], paths=[tmp_path / "a.jpg", ""], hashes=["x", "y"])
        assert [entry.path for entry in gallery.entries()] == [str(tmp_path / "a.jpg"), ""]
        again = gallery.add(features[:1], ["a"], paths=[tmp_path / "a.jpg"], hashes=["x"])
        assert again.duplicates == [str(tmp_path / "a.jpg")]  # text, as the report's type says


def test_sources_given_as_strings_or_as_one_path(tmp_path, monkeypatch):
    make_images(tmp_path / "photos" / "Fanta", 2)
    make_images(tmp_path / "photos" / "Sprite", 1)
    expected = collect_items([tmp_path / "photos"])
    assert len(expected) == 3
    assert collect_items(str(tmp_path / "photos")) == expected
    assert collect_items([str(tmp_path / "photos")]) == expected
    assert collect_items(tmp_path / "photos") == expected
    monkeypatch.chdir(tmp_path)
    assert collect_items("photos") == expected
    with pytest.raises(DataError, match="nowhere: no such file or folder"):
        collect_items("nowhere")
    # nothing, or what is no path, named: it failed inside pathlib or on iterating it
    for wrong, message in (
        (None, "expected label files, folders or images (paths or strings), got NoneType None"),
        (3, "expected label files, folders or images (paths or strings), got int 3"),
        ([None], "expected label files, folders or images (paths or strings), got NoneType None"),
        ("", "expected label files, folders or images (paths or strings), got str ''"),
        ([], "no sources given: expected label files, folders or images (paths or strings)"),
    ):
        with pytest.raises(DataError) as caught:
            collect_items(wrong)
        assert str(caught.value) == message


def test_queries_that_are_not_float_arrays_are_refused_by_name(tmp_path):
    path = tmp_path / "lib"
    expected = f"{path}: expected a float array of shape [N, {DIM}] or [{DIM}], got"
    with new_gallery(path) as gallery:
        gallery.add(clustered(3, DIM), labels_for(3))
        for query, got in [
            ("abc", "the string 'abc'"),
            ([[1.0, 2.0], [3.0]], "list [[1.0, 2.0], [3.0]]"),
            (None, "NoneType None"),
            (np.zeros((2, DIM + 1)), f"shape [2, {DIM + 1}]"),
            # cast to float32 these searched: a mask or ids taken for features
            (clustered(2, DIM) > 0, "bool values (bool)"),
            (np.ones((2, DIM), np.int64), "integer values (int64)"),
            (np.ones(DIM, np.uint8), "integer values (uint8)"),
            (clustered(2, DIM).astype(object), "object values (object)"),
            (clustered(2, DIM).astype(np.complex64), "complex values (complex64)"),
            ([[1] * DIM], "integer values (int64)"),
            # float64 past float32's range: cast to inf, it was refused as a NaN or inf row
            (np.full((2, DIM), -1e39), "1e+39, beyond float32's range, which features are kept in"),
        ]:
            with pytest.raises(GalleryError) as caught:
                gallery.search(query)
            assert str(caught.value) == f"{expected} {got}"
        for features, got in [("abc", "the string 'abc'"), ([[True] * DIM], "bool values (bool)")]:
            with pytest.raises(GalleryError) as caught:
                gallery.add(features, ["x"])
            assert str(caught.value) == f"{expected} {got}"
        assert len(gallery) == 3
        assert gallery.search(clustered(1, DIM).astype(np.float16), k=2).found.all()
        assert gallery.search(clustered(1, DIM)[0].tolist(), k=2).found.all()  # a list is fine
        queries = clustered(3, DIM)
        queries[1, 0] = np.nan
        with pytest.raises(GalleryError, match=r"search: query rows 1 contain NaN or inf"):
            gallery.search(queries)


def test_an_all_zero_query_gets_no_hits_in_a_normalising_library(tmp_path):
    """A zero vector has no cosine similarity to anything: it got k arbitrary images scored
    0.0 (added it is refused); one such row of a batch leaves the others their hits."""
    with new_gallery(tmp_path / "lib") as gallery:
        gallery.add(clustered(5, DIM), labels_for(5))
        queries = clustered(3, DIM)
        queries[1] = 0.0
        for min_score in (None, -1.0):
            result = gallery.search(queries, k=2, min_score=min_score)
            assert result.found.tolist() == [[True, True], [False, False], [True, True]]
            assert result.scores[1].tolist() == [-np.inf, -np.inf]
            assert result.labels[1].tolist() == ["", ""]
            assert result.to_list()[1] == []


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_opening_with_repair_builds_a_damaged_index_again(tmp_path, damage):
    path = tmp_path / "lib"
    features = clustered(9, DIM)
    with new_gallery(path, index_type="HNSW32") as gallery:
        gallery.add(features, labels_for(9))
        index_file = path / gallery.manifest.index_state["file"]
        assert not gallery.repaired
    if damage == "flip":
        raw = bytearray(index_file.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        index_file.write_bytes(raw)
    else:
        index_file.unlink()
    with Gallery.open(path, repair=True) as gallery:
        assert gallery.repaired and gallery.verify() == []
        assert gallery.manifest.generation == 2 and not index_file.exists()
        hits = gallery.search(features, k=1)
        assert hits.ids[:, 0].tolist() == list(range(1, 10))
        assert hits.labels[:, 0].tolist() == labels_for(9)
    with Gallery.open(path) as gallery:  # a sound library again, for anyone
        assert not gallery.repaired and gallery.verify() == [] and len(gallery) == 9


class FailingEmbedder(PixelEmbedder):
    """Embeds like PixelEmbedder until its `fail_after`-th file, then fails as a model might."""

    def __init__(self, fail_after: int) -> None:
        super().__init__()
        self.fail_after = fail_after

    def extract_files(self, paths, batch_size=32, progress=False):
        if len(paths) > self.fail_after:
            raise RuntimeError("the model ran out of memory")
        return super().extract_files(paths, batch_size, progress)


class OverflowingEmbedder(PixelEmbedder):
    """Gives the files whose names hold "inf" features of inf and NaN, as a model that
    overflows on some photos (an int8 or fp16 runtime) gives them."""

    def extract_files(self, paths, batch_size=32, progress=False):
        result = super().extract_files(paths, batch_size, progress)
        for row, path in enumerate(result.paths):
            if "inf" in Path(path).name:
                result.features[row, :2] = [np.inf, np.nan]
        return result


def test_a_file_the_model_gives_nan_or_inf_is_named_and_the_rest_are_added(tmp_path):
    """Such a file is named as not added, as an unreadable one is; the whole add or build
    was refused with `add: rows 1 contain NaN or inf`, a row of a batch the user never saw."""
    photos = make_images(tmp_path / "photos", 4)
    overflows = photos[1].rename(photos[1].with_name("inf.png"))
    items = [GalleryItem(p, "label") for p in [photos[0], overflows, *photos[2:]]]
    model = OverflowingEmbedder()
    report = Gallery.build(tmp_path / "lib", model, items)
    assert len(report.ids) == 3
    assert report.failures == [(str(overflows), gallery_module.NOT_FINITE)]
    with Gallery.open(tmp_path / "lib", embedder=model) as gallery:
        assert gallery.verify() == []
        assert str(overflows) not in [entry.path for entry in gallery.entries()]
    with pytest.raises(gallery_module.NothingAddedError) as nothing:
        Gallery.build(tmp_path / "none", model, items[1:2])
    assert nothing.value.report.failures == [(str(overflows), gallery_module.NOT_FINITE)]


def test_a_reembedding_the_model_gives_nan_or_inf_names_those_images_by_id(tmp_path):
    """It was refused with `re-embed: rows 1 contain NaN or inf`, a row of the readable
    images, not an id that `shitu index remove` takes."""
    photos = make_images(tmp_path / "photos", 3)
    overflows = photos[2].rename(photos[2].with_name("inf.png"))
    items = [GalleryItem(p, "label") for p in [*photos[:2], overflows]]
    path = tmp_path / "lib"
    ids = Gallery.build(path, PixelEmbedder(), items).ids
    before = snapshot(path, unit(clustered(2, PixelEmbedder().embedding_size)))
    with Gallery.open(path) as gallery, pytest.raises(GalleryError) as caught:
        gallery.reembed(OverflowingEmbedder(fingerprint="pixels-4 int8"))
    assert str(caught.value) == (
        f"cannot re-embed: {gallery_module.NOT_FINITE} for 1 of the 3 images, ids {ids[2]}: "
        f"{overflows}; nothing was changed"
    )
    assert snapshot(path, unit(clustered(2, PixelEmbedder().embedding_size))) == before


def test_build_makes_a_whole_library_or_nothing_at_its_path(tmp_path):
    """`Gallery.build` is `shitu index build` for Python callers: the library appears at its
    path whole, while a build that fails, or adds no image, leaves nothing there (no
    half-written library, no staging folder beside it)."""
    photos = make_images(tmp_path / "photos", 6)
    items = [GalleryItem(p, f"label {i % 2}") for i, p in enumerate(photos)]
    model = PixelEmbedder()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")

    path = tmp_path / "lib"
    report = Gallery.build(path, model, [*items, GalleryItem(broken, "x")], index_type="HNSW32")
    assert len(report.ids) == 6 and [f[0] for f in report.failures] == [str(broken)]
    with Gallery.open(path, embedder=model) as gallery:
        assert len(gallery) == 6 and gallery.manifest.index_type == "HNSW32"
        assert gallery.label_counts() == {"label 0": 3, "label 1": 3}
    with pytest.raises(GalleryError, match="lib: already exists and is not an empty folder"):
        Gallery.build(path, model, items)
    made_beforehand = tmp_path / "made"  # `mkdir made` first: the folder to fill, as create's
    made_beforehand.mkdir()
    Gallery.build(made_beforehand, model, items)
    with Gallery.open(made_beforehand, embedder=model) as gallery:
        assert len(gallery) == 6

    with pytest.raises(RuntimeError, match="out of memory"):
        Gallery.build(tmp_path / "failed", FailingEmbedder(fail_after=3), items)
    with pytest.raises(gallery_module.NothingAddedError) as nothing:
        Gallery.build(tmp_path / "empty", model, [GalleryItem(broken, "x")])
    assert "not built, none of the 1 images was added" in str(nothing.value)
    assert [f[0] for f in nothing.value.report.failures] == [str(broken)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.png", "lib", "made", "photos"]


def test_a_build_that_adds_nothing_names_why_in_its_notes_not_its_message(tmp_path):
    """From Python, "not built, none of the 7 images was added" said no reason (a command
    prints each failure itself before it, and the message stays as it printed it)."""
    broken = []
    for index in range(7):
        broken.append(tmp_path / f"broken{index}.png")
        broken[-1].write_bytes(f"not an image {index}".encode())  # no two the same
    with pytest.raises(gallery_module.NothingAddedError) as nothing:
        Gallery.build(tmp_path / "lib", PixelEmbedder(), [GalleryItem(p, "x") for p in broken])
    assert str(nothing.value) == f"{tmp_path / 'lib'}: not built, none of the 7 images was added"
    reasons = dict(nothing.value.report.failures)
    assert nothing.value.__notes__ == [
        *(f"not added: {path}: {reasons[str(path)]}" for path in broken[:5]),
        "and 2 more (the error's report.failures lists them all)",
    ]


def test_reembed_moves_an_empty_library_to_the_new_model(tmp_path):
    """A library whose images were all removed takes the new model, so that images can be
    added with it, rather than being refused both the re-embedding and the adds."""
    path, old = tmp_path / "lib", PixelEmbedder()
    photos = make_images(tmp_path / "photos", 2)
    with Gallery.create_for(path, old) as gallery:
        gallery.add_files(old, [GalleryItem(photos[0], "gone")])
        gallery.remove(labels=["gone"])
        new = PixelEmbedder(side=6, fingerprint="pixels-6", preprocessing={"resize": 6})
        assert gallery.reembed(new) == 0
    with Gallery.open(path, embedder=new) as gallery:
        assert gallery.manifest.embedding_dim == 108
        assert len(gallery.add_files(new, [GalleryItem(photos[1], "new")]).ids) == 1
        assert gallery.verify() == []


def test_build_and_add_take_items_from_a_generator_and_name_wrong_ones(tmp_path):
    """Items may come from a generator (read once, though each item is looked at more than
    once); a `(path, label)` pair, a path alone or a folder's name instead of GalleryItems is
    refused naming what to pass, not failed on a missing attribute."""
    photos = make_images(tmp_path / "photos", 4)
    model = PixelEmbedder()
    report = Gallery.build(tmp_path / "lib", model, (GalleryItem(p, "label") for p in photos[:2]))
    assert len(report.ids) == 2
    with Gallery.open(tmp_path / "lib", embedder=model) as gallery:
        assert len(gallery.add_files(model, (GalleryItem(p, "new") for p in photos[2:])).ids) == 2
        assert gallery.label_counts() == {"label": 2, "new": 2}
    for wrong, got in (
        ([(photos[0], "label")], "got tuple"),
        ([str(photos[0])], "got str"),
        ([GalleryItem(photos[0], "label"), None], "got NoneType None"),
        (str(tmp_path / "photos"), "got the string"),
    ):
        with pytest.raises(
            GalleryError, match=f"expected (a list of )?GalleryItem.*collect_items.*{got}"
        ):
            Gallery.build(tmp_path / "other", model, wrong)
    with pytest.raises(GalleryError) as caught:
        Gallery.build(tmp_path / "other", model, [GalleryItem(None, "label")])
    assert (
        str(caught.value) == "build: GalleryItem(path=None, label='label'): its path is not a path"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lib", "photos"]


def test_a_library_given_as_a_folder_of_images_is_named_as_one(tmp_path):
    """A gallery library given where its images are wanted (`index build OLD_LIB --out
    NEW`) is said to be one, with where its images are listed: the scan skips it, which
    left only 'no images in its label sub-folders'."""
    library = tmp_path / "lib"
    Gallery.create_for(library, PixelEmbedder()).close()
    make_images(library / "uploads", 1)  # as `shitu serve` keeps what it is sent
    for label in (None, "Kiwi"):
        with pytest.raises(DataError, match=rf"^{library}: a gallery library, .*index list"):
            collect_items([library], label=label)


def test_a_label_file_comment_naming_a_file_there_is_warned_of(tmp_path, caplog):
    """`#` lines are comments, but a photo may be named `#1.jpg`: its line was left out of
    the gallery without a word. It is warned of, with the way to list it (`./#1.jpg`); a
    comment naming no file, or an entry commented out, says nothing."""
    make_images(tmp_path, 2)
    first, second = sorted(tmp_path.glob("*.png"))
    first.rename(tmp_path / "#1.png")
    listing = tmp_path / "gallery.txt"
    listing.write_text(
        f"# path<TAB>label\n#1.png\tHash\n#{second.name}\tCommented out\n./#1.png\tListed\n"
    )
    with caplog.at_level(logging.WARNING):
        items = parse_label_file(listing)
    assert [(item.path.name, item.label) for item in items] == [("#1.png", "Listed")]
    assert [record.getMessage() for record in caplog.records] == [
        f"{listing}:2: skipped as a comment (it starts with #), though #1.png is a file "
        "there; to list it, write its path as ./#1.png"
    ]


def test_a_folder_in_a_label_file_is_refused_naming_its_line(tmp_path):
    """A label file's line naming a folder (`photos/apple<TAB>Apple`) was skipped when
    the images were read, with advice for Python callers (scan_images) that a user of
    `shitu index build LIST` cannot follow; it is refused with its line and what to do."""
    make_images(tmp_path / "photos" / "apple", 1)
    listing = tmp_path / "gallery.txt"
    listing.write_text("photos/apple\tApple\n")
    with pytest.raises(DataError) as refused:
        parse_label_file(listing)
    assert str(refused.value) == (
        f"{listing}:1: photos/apple is a folder; a label file lists image files, one a line "
        "(a folder of images is given to the command itself, with --label LABEL where it "
        "takes one, or as FOLDER/LABEL/IMAGE)"
    )


def test_one_label_over_a_folder_per_label_tree_is_warned_of(tmp_path, caplog):
    """`shitu index build my_products --label X` gave every image of a folder-per-label
    tree the one label without a word; it is warned of, with the sub-folders that would
    label them. A folder with images of its own, or one sub-folder, says nothing."""
    for name in ("Apple", "Kiwi", "Lemon", "Milk"):
        make_images(tmp_path / "tree" / name, 1)
    make_images(tmp_path / "one" / "front", 2)
    make_images(tmp_path / "loose", 1)
    make_images(tmp_path / "loose" / "back", 1)
    with caplog.at_level(logging.WARNING, logger="shitu.index"):
        collect_items([tmp_path / "one", tmp_path / "loose"], label="X")
        assert caplog.messages == []
        items = collect_items([tmp_path / "tree"], label="X")
    assert {item.label for item in items} == {"X"} and len(items) == 4
    assert caplog.messages == [
        f"{tmp_path / 'tree'}: --label 'X' gives all 4 images one label, though they lie in 4 "
        "sub-folders (Apple, Kiwi, Lemon and 1 more), which label them without --label: leave "
        "it out to label each image by its folder"
    ]
