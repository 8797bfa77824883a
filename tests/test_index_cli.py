"""`shitu index ...` end to end: a real exported model, real grocery photos, a real library.

The CLI runs in-process through its entry point; crash safety (a killed process) is tested
with real subprocesses in test_index.py."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from shitu.cli import index as index_cli
from shitu.cli.common import count_of
from shitu.cli.main import build_parser, main
from shitu.index import Gallery
from shitu.index import gallery as gallery_module
from shitu.index.backends.faiss_backend import FaissBackend
from tests.index_helpers import clustered, make_images
from tests.terminal_helpers import run_in_terminal

CLASSES = {0: "Golden Delicious apple", 1: "Granny Smith apple", 2: "Pink Lady apple"}


def shitu(*args: str | Path) -> subprocess.CompletedProcess:
    """Run the real CLI entry point in this process (a subprocess per call costs a torch import)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(arg) for arg in args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[int, Path]:
    """Two random-weight exports with different embedding sizes (a model upgrade)."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for size in (512, 128):
        out[size] = root / f"m{size}"
        result = shitu(
            "export",
            "-c",
            "GroceryStore_EfficientNetLite0",
            "-o",
            "Arch.Backbone.pretrained=false",
            f"Arch.Backbone.class_num={size}",
            "Arch.Neck=null",
            "--out",
            out[size],
        )
        assert result.returncode == 0, result.stderr
    return out


@pytest.fixture
def gallery_list(grocery: Path, tmp_path: Path) -> Path:
    """Two photos of each of three classes, listed with paths relative to the list file."""
    rows = [line.split(",") for line in (grocery / "train.txt").read_text().splitlines()]
    picked = [r for cls in CLASSES for r in [r for r in rows if int(r[1]) == cls][:2]]
    listing = grocery / "train.txt"  # only to name the root: paths in train.txt are relative
    lines = [f"{(listing.parent / r[0].strip()).resolve()}\t{CLASSES[int(r[1])]}" for r in picked]
    out = tmp_path / "gallery.txt"
    out.write_text("\n".join(lines) + "\n")
    return out


def test_build_search_edit_and_reembed(models, gallery_list, tmp_path):
    lib = tmp_path / "lib"
    built = shitu("index", "build", "--gallery", gallery_list, "--model", models[512], "--out", lib)
    assert built.returncode == 0, built.stderr
    assert f"added 6 images to {lib} (now 6 images of 3 labels)" in built.stdout

    first_image = gallery_list.read_text().splitlines()[0].split("\t")[0]
    found = shitu("index", "search", lib, first_image, "--model", models[512], "-k", "1")
    assert found.returncode == 0, found.stderr
    assert "Golden Delicious apple (1.000" in found.stdout
    every = shitu("index", "search", lib, first_image, "--model", models[512], "-k", 10**15)
    assert every.returncode == 0, every.stderr  # all 6 hits, no 4-petabyte score array
    assert every.stdout.count(", id ") == 6
    # For jq: a JSON line per image, in the keys of `shitu recognize`.
    both = shitu("index", "search", lib, first_image, first_image, "--model", models[512],
                 "-k", "2", "--format", "jsonl")  # fmt: skip
    assert both.returncode == 0, both.stderr
    lines = [json.loads(line) for line in both.stdout.splitlines()]
    assert [line["image"] for line in lines] == [first_image, first_image]
    best = lines[0]["results"][0]
    assert best["label"] == "Golden Delicious apple" and best["score"] == pytest.approx(1, abs=1e-4)
    assert len(lines[0]["results"]) == 2 and isinstance(best["image_id"], int)
    unreadable = shitu("index", "search", lib, tmp_path / "missing.jpg", "--model", models[512])
    assert unreadable.returncode == 1 and "could not read" in unreadable.stderr

    folder = tmp_path / "new"  # two new photos and a renamed copy of a gallery photo
    folder.mkdir()
    source = sorted(Path(first_image).parent.glob("*.jpg"))
    for index, photo in enumerate([source[-1], source[-2], Path(first_image)]):
        shutil.copy(photo, folder / f"{index}.jpg")
    added = shitu(
        "index", "add", lib, folder, "--label", "Mixed bag", "--model", models[512], "--no-progress"
    )  # fmt: skip
    assert added.returncode == 0 and "img/s" not in added.stderr, added.stderr
    assert "added 2 images" in added.stdout and "duplicate" not in added.stdout
    assert f"could not add {folder / '2.jpg'}: the library has this photo as image " in (
        added.stderr  # under another label
    )
    by_folder = shitu("index", "search", lib, folder, "--model", models[512], "-k", "1")
    assert by_folder.returncode == 0, by_folder.stderr  # a folder is its images, each found
    assert "img/s" not in by_folder.stderr  # no bar: stderr is not a terminal here
    assert [line.split("\t")[0] for line in by_folder.stdout.splitlines()] == [
        str(folder / f"{index}.jpg") for index in range(3)
    ]
    assert by_folder.stdout.count("(1.000") == 3

    assert shitu("index", "relabel", lib, "Pink Lady apple", "Pink Lady").returncode == 0
    itself = shitu("index", "relabel", lib, "Pink Lady", "Pink Lady")
    assert itself.returncode == 0
    assert itself.stdout == "'Pink Lady' is already the label of 2 images: no change\n"
    merging = shitu("index", "relabel", lib, "Pink Lady", "Mixed bag")
    assert merging.returncode == 2 and "--merge" in merging.stderr
    removed = shitu("index", "remove", lib, "--label", "Granny Smith apple")
    assert removed.returncode == 0 and "removed 2 images" in removed.stdout

    listing = shitu("index", "list", lib)
    counts = {line.split(None, 1)[1]: int(line.split()[0]) for line in listing.stdout.splitlines()}
    assert counts == {"Golden Delicious apple": 2, "Mixed bag": 2, "Pink Lady": 2}

    refused = shitu("index", "add", lib, gallery_list, "--model", models[128])
    assert refused.returncode == 2 and "reembed" in refused.stderr

    reembedded = shitu("index", "reembed", lib, "--model", models[128])
    assert reembedded.returncode == 0, reembedded.stderr
    stats = json.loads(shitu("index", "stats", lib).stdout)
    assert stats["embedding_dim"] == 128 and stats["images"] == 6
    verified = shitu("index", "verify", lib)
    assert verified.returncode == 0 and "OK" in verified.stdout


def test_search_warns_that_an_empty_library_matches_nothing(models, gallery_list, tmp_path):
    """As `recognize` warns: else each image's "no match" looks like a poor photo."""
    lib = tmp_path / "lib"
    photo = gallery_list.read_text().splitlines()[0].split("\t")[0]
    built = shitu("index", "build", gallery_list, "--model", models[128], "--out", lib)
    assert built.returncode == 0, built.stderr
    search = ("index", "search", lib, photo, "--model", models[128])
    assert "holds no images" not in shitu(*search).stderr
    labels = [line.split(None, 1)[1] for line in shitu("index", "list", lib).stdout.splitlines()]
    assert shitu("index", "remove", lib, "--label", *labels).returncode == 0
    empty = shitu(*search)
    assert empty.returncode == 0 and empty.stdout == f"{photo}\tno match\n"
    assert f"warning: {lib} holds no images: no match can be found" in empty.stderr


def test_search_scores_are_cosines_on_l2_libraries_too(models, gallery_list, tmp_path, capsys):
    first_image = gallery_list.read_text().splitlines()[0].split("\t")[0]
    answers = {}
    for metric in ("ip", "l2"):
        lib = tmp_path / metric
        built = shitu(
            "index", "build", "--gallery", gallery_list, "--model", models[512], "--out", lib,
            "--metric", metric,
        )  # fmt: skip
        assert built.returncode == 0, built.stderr
        assert "note:" not in built.stdout  # Flat: nothing to train
        found = shitu(
            "index", "search", lib, first_image, "--model", models[512], "-k", "3",
            "--min-score", "0.5",
        )  # fmt: skip
        assert found.returncode == 0, found.stderr
        answers[metric] = found.stdout
    assert "Golden Delicious apple (1.000" in answers["l2"]  # not the distance 0.000
    assert answers["l2"] == answers["ip"]
    with pytest.raises(SystemExit) as exit_info:  # NaN would compare false: no hit dropped
        main(["index", "search", str(lib), first_image, "--min-score", "nan"])
    assert exit_info.value.code == 2
    assert "--min-score: expected a finite number, got nan" in capsys.readouterr().err
    ivf = shitu(
        "index", "build", "--gallery", gallery_list, "--model", models[512],
        "--out", tmp_path / "ivf", "--index-type", "IVF",
    )  # fmt: skip
    assert ivf.returncode == 0, ivf.stderr
    assert (
        "too few images (6) to train the IVF index (it needs 1,000); searching them "
        "exactly (Flat)" in ivf.stdout
    )


def test_index_help_gives_the_default_of_every_option_that_has_one():
    """argparse shows a default only where the help says it: `--index-type` and `--metric`
    were listed bare, their defaults (Flat, ip) unsaid."""
    (index,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    (commands,) = [
        a for a in index.choices["index"]._actions if isinstance(a, argparse._SubParsersAction)
    ]
    checked = set()
    for name, command in commands.choices.items():
        words = " ".join(command.format_help().split())
        for action in command._actions:
            if action.default in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
                continue
            assert f"default {action.default})" in words, (name, action.option_strings)
            checked.add(action.option_strings[-1])
    assert {"--index-type", "--metric", "--backend", "--batch-size", "-k"} <= checked
    # The usage names the arguments as the description and docs/commands.md do: `relabel OLD NEW`.
    relabel = " ".join(commands.choices["relabel"].format_help().split())
    assert "library OLD NEW" in relabel and "Rename label OLD to NEW" in relabel


def test_build_refuses_an_existing_library_and_bad_lists(models, tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "notes.txt").write_text("x")  # an empty folder would be built into
    taken = shitu(
        "index", "build", "--gallery", tmp_path, "--model", models[512], "--out", tmp_path / "lib"
    )
    assert taken.returncode == 2 and "already exists and is not an empty folder" in taken.stderr
    assert "index add" not in taken.stderr  # a folder, not a library to add to
    empty = shitu("index", "build", "--out", tmp_path / "x")
    assert empty.returncode == 2 and "nothing to embed; give the gallery" in empty.stderr
    bad = tmp_path / "bad.txt"
    bad.write_text("no-tab-here.jpg label\n")
    broken = shitu(
        "index", "build", "--gallery", bad, "--model", models[512], "--out", tmp_path / "x"
    )
    assert broken.returncode == 2 and "bad.txt:1" in broken.stderr
    assert not (tmp_path / "x").exists()
    faiss = shitu("index", "build", "--gallery", bad, "--out", tmp_path / "x",
                  "--milvus-uri", "vectors.db")  # fmt: skip
    assert faiss.returncode == 2
    assert "--milvus-uri: only with --backend milvus" in faiss.stderr
    for option, value, expected in (  # named as typed, not as the library's option names it
        ("--milvus-collection", "9th", "--milvus-collection must be a letter or underscore"),
        ("--milvus-uri", "vectors", "--milvus-uri must be a server's http://host:port"),
    ):
        milvus = shitu("index", "build", "--gallery", bad, "--out", tmp_path / "x",
                       "--backend", "milvus", option, value)  # fmt: skip
        assert milvus.returncode == 2 and expected in milvus.stderr, milvus.stderr
    for option, index_type, expected in (
        ("--nprobe", "Flat", "--nprobe: only with --index-type IVF or IVFPQ (not Flat)"),
        ("--ef-search", "IVF", "--ef-search: only with --index-type HNSW32 (not IVF)"),
    ):
        ignored = shitu("index", "build", "--gallery", bad, "--out", tmp_path / "x",
                        "--index-type", index_type, option, "8")  # fmt: skip
        assert ignored.returncode == 2 and expected in ignored.stderr
    with pytest.raises(SystemExit) as exit_info:  # beyond Faiss's 32-bit settings
        shitu("index", "build", "--gallery", bad, "--out", tmp_path / "x", "--index-type",
              "IVF", "--nprobe", str(2**31))  # fmt: skip
    assert exit_info.value.code == 2


def test_a_library_inside_the_folder_it_is_built_from_is_no_part_of_its_scans(models, tmp_path):
    """A library inside its gallery folder keeps the images `shitu serve` adds (in its
    uploads folder): the next build or add of that folder skips the library, rather than
    taking them for photos of a label named after the library."""
    photos = tmp_path / "photos"
    make_images(photos / "Kiwi", 1)
    lib = photos / "lib"
    built = shitu("index", "build", photos, "--out", lib, "--model", models[128])
    assert built.returncode == 0, built.stderr
    make_images(lib / "uploads", 1, seed=1)  # as the server keeps what it is sent
    make_images(photos / "Tea", 1, seed=2)
    added = shitu("index", "add", lib, photos, "--model", models[128])
    assert added.returncode == 0 and "added 1 image" in added.stdout, added.stderr
    listed = shitu("index", "list", lib)
    assert [line.split()[-1] for line in listed.stdout.splitlines()] == ["Kiwi", "Tea"]


def test_a_folder_scan_skips_another_library_in_it(models, tmp_path, caplog):
    """A library kept in a folder of photos (not the one added to) holds the images
    `shitu serve` adds in its uploads folder: a build or add of that folder took them for
    photos of a label named after the library's folder."""
    photos = tmp_path / "photos"
    make_images(photos / "Kiwi", 1)
    old = photos / "old_lib"
    built = shitu("index", "build", photos, "--out", tmp_path / "lib", "--model", models[128])
    assert built.returncode == 0, built.stderr
    (tmp_path / "lib").rename(old)
    make_images(old / "uploads", 1, seed=1)  # as the server keeps what it is sent
    new = tmp_path / "new"
    for command in (
        ("build", photos, "--out", new),
        ("add", new, photos, "--allow-duplicates"),
        ("add", new, photos, "--label", "Kiwi", "--allow-duplicates"),
    ):
        caplog.clear()
        scanned = shitu("index", *command, "--model", models[128])
        assert scanned.returncode == 0, scanned.stderr
        assert f"(a gallery library x1; e.g. {old})" in caplog.text
    listed = shitu("index", "list", new)
    assert listed.returncode == 0 and listed.stdout.split() == ["3", "Kiwi"]


def test_a_list_option_given_twice_keeps_the_values_of_both(models, tmp_path):
    """`--gallery a --gallery b`, `--label A --label B`: argparse kept the last only, so a
    library was built from half its gallery, and a removal left a label it was given."""
    make_images(tmp_path / "fruit" / "Kiwi", 1)
    make_images(tmp_path / "drinks" / "Cola", 1, seed=1)
    make_images(tmp_path / "drinks" / "Tea", 1, seed=2)
    lib = tmp_path / "lib"
    built = shitu("index", "build", "--gallery", tmp_path / "fruit", "--gallery",
                  tmp_path / "drinks", "--out", lib, "--model", models[128])  # fmt: skip
    assert built.returncode == 0, built.stderr
    assert shitu("index", "list", lib).stdout.split() == ["1", "Cola", "1", "Kiwi", "1", "Tea"]
    removed = shitu("index", "remove", lib, "--label", "Kiwi", "--label", "Tea", "--id", "2")
    assert removed.returncode == 0, removed.stderr
    assert shitu("index", "list", lib).stdout == ""


def test_a_single_unlabelled_image_is_told_a_build_option_that_works(
    models, gallery_list, tmp_path
):
    """There is no library yet to `index add` to: the advice is --label, which build takes."""
    image = gallery_list.read_text().splitlines()[0].split("\t")[0]
    lib = tmp_path / "lib"
    build = ("index", "build", image, "--model", models[128], "--out", lib)  # as `index add`
    unlabelled = shitu(*build)
    assert unlabelled.returncode == 2 and "needs a label: give it one with --label LABEL" in (
        unlabelled.stderr
    )
    assert "index add LIB" not in unlabelled.stderr
    labelled = shitu(*build, "--label", "Lemon")
    assert labelled.returncode == 0, labelled.stderr
    assert shitu("index", "list", lib).stdout.split() == ["1", "Lemon"]


def test_an_image_named_without_a_scanned_suffix_is_read_as_an_image_not_a_label_file(
    models, gallery_list, tmp_path
):
    """A photo given by name is read as one, as `recognize` reads it, whatever its suffix:
    a GIF is added, and a phone's HEIC is named as unsupported. They were taken for label
    files, `--label` refused as for a listing ('a label file carries its own labels')."""
    from PIL import Image

    photo = gallery_list.read_text().splitlines()[0].split("\t")[0]
    gif = tmp_path / "photo.gif"
    Image.open(photo).convert("P").save(gif)
    heic = tmp_path / "IMG_0001.HEIC"  # an iPhone's: an ISO media box of brand heic
    heic.write_bytes(b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(range(256)) * 8)
    lib = tmp_path / "lib"
    built = shitu("index", "build", gif, "--label", "Lemon", "--model", models[128], "--out", lib)
    assert built.returncode == 0, built.stderr
    assert shitu("index", "list", lib).stdout.split() == ["1", "Lemon"]

    added = shitu("index", "add", lib, heic, "--label", "Lemon", "--model", models[128])
    assert added.returncode == 1 and "carries its own labels" not in added.stderr
    assert "HEIC images are not supported: convert it to JPEG or PNG" in added.stderr
    unlabelled = shitu("index", "add", lib, heic, "--model", models[128])
    assert unlabelled.returncode == 2 and "a single image needs a label" in unlabelled.stderr


def test_a_library_is_not_built_into_another_library_or_an_export(models, tmp_path):
    """`--out EXPORT/lib` built a library among an export's files, which `shitu export`
    then refused to replace, and `--out LIB/inner` one among another library's; as
    weights and features are, it is refused there."""
    image = make_images(tmp_path / "photos", 1)[0]
    build = ("index", "build", image, "--label", "X", "--model", models[128], "--out")
    assert shitu(*build, tmp_path / "lib").returncode == 0
    for owner, kind, marker in [
        (models[128], "an exported model", "shitu_model.json"),
        (tmp_path / "lib", "a gallery library", "gallery.sqlite"),
    ]:
        before = sorted(owner.iterdir())
        inner = owner / "inner"
        refused = shitu(*build, inner)
        assert refused.returncode == 2 and refused.stderr == (
            f"error: --out {inner}: {owner} is {kind}'s folder ({marker}), whose files are its "
            "own: write the library to another folder\n"
        )
        assert sorted(owner.iterdir()) == before


def test_a_build_that_fails_leaves_no_folder_made_for_its_out(models, tmp_path):
    """`--out new/sub/lib`: the folders made for it, to check they could be written in,
    were left behind by a build that then failed (no image could be read, no such model)
    or was stopped, as the library was not."""
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    out = tmp_path / "new" / "sub" / "lib"
    failed = shitu("index", "build", broken, "--label", "X", "--model", models[128], "--out", out)
    assert failed.returncode == 1 and "none of the 1 images was added" in failed.stderr
    refused = shitu(
        "index", "build", broken, "--label", "X", "--model", tmp_path / "no", "--out", out
    )
    assert refused.returncode == 2, refused.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["broken.png"]


def test_labels_apart_only_by_case_are_warned_of(models, tmp_path, caplog):
    """`Apple/` beside `apple/`, or `--label apple` added to a library of `Apple`, made two
    labels without a word: recognition then names one product two ways."""
    photos = tmp_path / "photos"
    make_images(photos / "Apple", 1)
    make_images(photos / "apple", 1, seed=1)
    make_images(photos / "Kiwi", 1, seed=2)
    lib = tmp_path / "lib"
    built = shitu("index", "build", photos, "--out", lib, "--model", models[128])
    assert built.returncode == 0, built.stderr
    relabel = f"`shitu index relabel {lib} OLD NEW --merge`"
    assert caplog.text.count("differ only in case") == 1
    assert f"are kept apart: 'Apple' and 'apple'; to make them one label, {relabel}" in (
        caplog.text
    )
    extra = make_images(tmp_path / "extra", 1, seed=3)[0]
    for label, warned in (("KIWI", "'KIWI' and 'Kiwi';"), ("Pear", None)):
        caplog.clear()
        added = shitu("index", "add", lib, extra, "--label", label, "--model", models[128],
                      "--allow-duplicates")  # fmt: skip
        assert added.returncode == 0, added.stderr
        # the library's Apple and apple, added before, are not said again
        assert ("differ only in case" in caplog.text) == (warned is not None)
        assert warned is None or f"kept apart: {warned}" in caplog.text
    # A photo the library has, added again under another case, is not added: no label
    # 'pear' comes to be, so none is said to be kept apart from 'Pear'
    caplog.clear()
    again = shitu("index", "add", lib, extra, "--label", "pear", "--model", models[128])
    assert again.returncode == 1, again.stderr  # none of its images could be added
    assert "could not add" in again.stderr + caplog.text
    assert "differ only in case" not in again.stderr + caplog.text
    # relabel: onto another label's spelling in another case is said; a label's own case
    # changed, or a merge into the very spelling, is not
    steps = [
        ("KIWI", "kiwi", [], "'Kiwi' and 'kiwi';"),
        ("kiwi", "Kiwi", ["--merge"], None),
        ("Pear", "pear", [], None),
        ("pear", " APPLE ", [], "'APPLE', 'Apple' and 'apple';"),  # stored stripped
    ]
    for old, new, merge, warned in steps:
        caplog.clear()
        relabelled = shitu("index", "relabel", lib, old, new, *merge)
        assert relabelled.returncode == 0, relabelled.stderr
        assert ("differ only in case" in caplog.text) == (warned is not None), caplog.text
        assert warned is None or f"kept apart: {warned}" in caplog.text


def test_a_library_given_after_the_images_is_told_to_come_first(models, tmp_path):
    """`index add PHOTOS LIB` and `index search PHOTOS LIB`: the photos were refused as no
    library, or the library as no images, neither saying that the order is the mistake."""
    photos = tmp_path / "photos"
    make_images(photos / "Kiwi", 1)
    lib = tmp_path / "lib"
    assert shitu("index", "build", photos, "--out", lib, "--model", models[128]).returncode == 0
    before = shitu("index", "list", lib, "--images").stdout
    for command, extra in (("add", ["--label", "Kiwi"]), ("search", [])):
        swapped = shitu("index", command, photos, lib, "--model", models[128], *extra)
        assert swapped.returncode == 2 and swapped.stderr == (
            f"error: {photos}: not a gallery library, and {lib} is one: the library comes "
            f"first, `shitu index {command} {lib} {photos}` (and the options as before)\n"
        )
    assert shitu("index", "list", lib, "--images").stdout == before


def test_listing_a_library_of_no_images_says_so(models, tmp_path):
    """`index list` of a library whose images were all removed printed nothing at all, as
    if it had failed unseen; stdout stays empty, for scripts, and stderr says why."""
    make_images(tmp_path / "photos" / "Kiwi", 1)
    lib = tmp_path / "lib"
    assert (
        shitu(
            "index", "build", tmp_path / "photos", "--out", lib, "--model", models[128]
        ).returncode
        == 0
    )
    assert shitu("index", "remove", lib, "--label", "Kiwi").returncode == 0
    for options in ([], ["--images"], ["--format", "jsonl"]):
        listed = shitu("index", "list", lib, *options)
        assert listed.returncode == 0 and listed.stdout == ""
        assert listed.stderr == f"note: {lib} holds no images\n"


def test_leaf_labels_without_a_folder_is_said_to_be_unused(models, gallery_list, tmp_path, caplog):
    """`--leaf-labels` with only a label file (or image files) was dropped without a word:
    the labels were the file's, not the folders' the flag named."""
    lib = tmp_path / "lib"
    built = shitu("index", "build", gallery_list, "--leaf-labels", "--model", models[128],
                  "--out", lib)  # fmt: skip
    assert built.returncode == 0, built.stderr
    assert "--leaf-labels (leaf_labels=True in Python) is not used: it labels" in caplog.text
    caplog.clear()
    make_images(tmp_path / "tree" / "Fruit" / "Kiwi", 1)
    added = shitu("index", "add", lib, gallery_list, tmp_path / "tree", "--leaf-labels",
                  "--model", models[128])  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert "(leaf_labels=True in Python) is not used" not in caplog.text


def test_a_label_that_cannot_be_stored_is_refused_as_the_option(models, tmp_path):
    """`--label ""` (`"$LABEL"` unset) was refused as the first image's ('add
    photos/a/1.png: the label is empty'), after a warning that it gave the images of
    several folders one label; a tab, the same. Now `--label` is named, before any scan."""
    make_images(tmp_path / "photos" / "a", 1)
    make_images(tmp_path / "photos" / "b", 1)
    lib = tmp_path / "lib"
    for label, problem in [("", "the label is empty"), ("a\tb", "must not contain tabs")]:
        for command in (("build", "--out", lib), ("add", lib)):
            given = shitu("index", *command, tmp_path / "photos", "--label", label)
            assert given.returncode == 2 and given.stderr.startswith(
                "error: --label (label= in Python): "
            )
            assert problem in given.stderr and given.stderr.count("\n") == 1, given.stderr
    assert not lib.exists()


def test_a_tree_grouped_by_category_builds_a_label_per_product_with_leaf_labels(models, tmp_path):
    """`index build` and `index add` label each image by the folder it is in with
    --leaf-labels (the Grocery Store Dataset's Fruit/Apple/Golden-Delicious/), and refuse
    it beside --label."""
    tree = tmp_path / "train"
    make_images(tree / "Fruit" / "Apple" / "Golden-Delicious", 1)
    make_images(tree / "Fruit" / "Pear", 1, seed=1)
    make_images(tmp_path / "more" / "Vegetables" / "Leek", 1, seed=2)
    lib = tmp_path / "lib"
    common = ("--model", models[128], "--leaf-labels")
    built = shitu("index", "build", tree, "--out", lib, *common)
    assert built.returncode == 0, built.stderr
    added = shitu("index", "add", lib, tmp_path / "more", *common)
    assert added.returncode == 0, added.stderr
    listed = shitu("index", "list", lib).stdout.split()
    assert listed == ["1", "Golden-Delicious", "1", "Leek", "1", "Pear"]
    both = shitu("index", "add", lib, tree, "--label", "Fruit", *common)
    assert both.returncode == 2 and "give one or the other" in both.stderr


def test_build_from_unreadable_images_leaves_nothing_and_says_why(models, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    listing = tmp_path / "gallery.txt"
    listing.write_text(f"{broken}\tFanta\n", encoding="utf-8-sig")
    out = tmp_path / "lib"
    result = shitu("index", "build", "--gallery", listing, "--model", models[128], "--out", out)
    assert result.returncode == 1  # none could be read, as `index add` and `recognize` say
    assert "broken.jpg" in result.stderr
    assert f"error: {out}: not built, none of the 1 images was added" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.jpg", "gallery.txt"]
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage and the reason, exit 2
        main(["index", "build", "--gallery", str(listing), "--out", str(out), "--ef-search", "0"])
    assert exit_info.value.code == 2
    assert (
        "--ef-search: expected a whole number from 1 to 2147483647, got 0"
        in capsys.readouterr().err
    )


def test_a_label_file_written_from_the_working_directory_is_refused_saying_so(
    models, gallery_list, tmp_path, monkeypatch
):
    """Paths in a label file are relative to its folder; one written relative to where the
    command runs would fail image by image with 'No such file', the convention unsaid."""
    image = Path(gallery_list.read_text().splitlines()[0].split("\t")[0])
    (tmp_path / "photos").mkdir()
    shutil.copy(image, tmp_path / "photos" / "a.jpg")
    listing = tmp_path / "lists" / "gallery.txt"
    listing.parent.mkdir()
    listing.write_text("# from the project folder\nphotos/a.jpg\tapple\n")
    monkeypatch.chdir(tmp_path)
    result = shitu("index", "build", "--gallery", listing, "--model", models[128], "--out", "lib")
    assert result.returncode == 2
    assert f"gallery.txt:2: photos/a.jpg is not in {listing.parent}" in result.stderr
    assert "relative to its folder" in result.stderr and not (tmp_path / "lib").exists()


def test_index_commands_refuse_what_they_cannot_store_or_find(models, gallery_list, tmp_path):
    lib, model = tmp_path / "lib", models[128]
    staging = {}
    for name in ("dead", "live"):  # a build killed with SIGKILL, and one still running
        staging[name] = tmp_path / f".lib.building-{len(staging) + 1}"
        staging[name].mkdir()
        (staging[name] / "gallery.sqlite").write_bytes(b"features")
        Path(f"{staging[name]}.lock").touch()
    died_early = tmp_path / ".lib.building-3.lock"  # killed before it made its folder
    died_early.touch()
    with open(f"{staging['live']}.lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as the running build holds it
        built = shitu("index", "build", "--gallery", gallery_list, "--model", model, "--out", lib)
    assert built.returncode == 0, built.stderr
    assert not staging["dead"].exists() and staging["live"].exists()
    assert sorted(p.name for p in tmp_path.glob(".lib.*")) == [
        ".lib.building-2",
        ".lib.building-2.lock",
    ]

    first = gallery_list.read_text().splitlines()[0]
    three_columns = tmp_path / "ids.txt"  # an evaluation listing: path, label, id
    three_columns.write_text(f"{first}\t7\t\n")
    again = shitu("index", "add", lib, three_columns, "--model", model)  # the id is ignored
    assert again.returncode == 0 and "skipped 1 duplicate" in again.stdout, again.stderr
    image = first.split("\t")[0]
    broken = shitu("index", "add", lib, image, "--label", "two\nlines", "--model", model)
    assert broken.returncode == 2 and "line breaks" in broken.stderr
    mixed = shitu("index", "add", lib, gallery_list, "--label", "X", "--model", model)
    assert mixed.returncode == 2 and "carries its own labels" in mixed.stderr
    archive = tmp_path / "photos.zip"  # photos zipped to send: no label file, no image
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.write(image, "a.jpg")
    zipped_photos = shitu("index", "add", lib, archive, "--label", "X", "--model", model)
    assert zipped_photos.returncode == 2, zipped_photos.stderr
    assert "is for images and folders of images, and this is neither" in (zipped_photos.stderr)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    unread = shitu("index", "add", lib, tmp_path / "broken.jpg", "--label", "X", "--model", model)
    assert unread.returncode == 1 and "added 0 images" in unread.stdout  # a failure, not 0
    assert "could not add" in unread.stderr

    missing = shitu("index", "relabel", lib, "Nope", CLASSES[1])  # not "would merge"
    assert missing.returncode == 2 and "no images labelled 'Nope'" in missing.stderr
    listed = shitu("index", "list", lib, "--label", "Nope")
    assert listed.returncode == 2 and "no images labelled 'Nope'" in listed.stderr

    index_file = next(lib.glob("index-*.faiss"))
    index_file.unlink()  # lost, say, to a disk error
    lost = shitu("index", "search", lib, image, "--model", model)
    assert lost.returncode == 2 and f"`shitu index rebuild {lib}`" in lost.stderr
    checked = shitu("index", "verify", lib)  # a failed check, not a failed command
    assert checked.returncode == 1, checked.stderr
    assert f"problem: {index_file}: index file is missing" in checked.stdout
    assert checked.stdout.endswith(f"{lib}: FAILED\n")
    assert shitu("index", "verify", tmp_path / "nothing").returncode == 2
    rebuilt = shitu("index", "rebuild", lib)
    assert rebuilt.returncode == 0 and "6 images, Flat" in rebuilt.stdout
    # Search settings are set again on a rebuild, checked against the index type it makes.
    wrong = shitu("index", "rebuild", lib, "--ef-search", "128")
    assert wrong.returncode == 2 and "--ef-search: only with --index-type HNSW32 (not Flat)" in (
        wrong.stderr
    )
    hnsw = shitu("index", "rebuild", lib, "--index-type", "HNSW32", "--ef-search", "128")
    assert hnsw.returncode == 0 and "6 images, HNSW32" in hnsw.stdout
    stats = json.loads(shitu("index", "stats", lib).stdout)
    assert stats["index_type"] == "HNSW32" and stats["backend_options"] == {"ef_search": 128}
    assert shitu("index", "rebuild", lib, "--ef-search", "64").returncode == 0  # same type
    assert json.loads(shitu("index", "stats", lib).stdout)["backend_options"]["ef_search"] == 64
    assert shitu("index", "rebuild", lib, "--index-type", "Flat").returncode == 0
    assert shitu("index", "verify", lib).returncode == 0
    assert f"{CLASSES[0]} (1.000" in shitu("index", "search", lib, image, "--model", model).stdout


def test_a_rebuild_to_another_type_drops_the_settings_it_does_not_read(tmp_path):
    """An IVF library's nprobe was kept on a rebuild to HNSW32 (and an ef_search on one to
    IVF or Flat): shown by `index stats` as the library's settings, read by nothing, and in
    force again, unasked, on a rebuild back to IVF."""
    make_images(tmp_path / "photos" / "apple", 2)
    lib = tmp_path / "lib"
    built = shitu("index", "build", tmp_path / "photos", "--out", lib, "--index-type", "IVF",
                  "--nprobe", "4")  # fmt: skip
    assert built.returncode == 0, built.stderr

    def options() -> dict:
        return json.loads(shitu("index", "stats", lib).stdout)["backend_options"]

    ivfpq = shitu("index", "rebuild", lib, "--index-type", "IVFPQ")  # reads nprobe too
    assert ivfpq.returncode == 0 and "dropped" not in ivfpq.stderr, ivfpq.stderr
    assert options() == {"nprobe": 4}
    hnsw = shitu("index", "rebuild", lib, "--index-type", "HNSW32", "--ef-search", "100")
    assert hnsw.returncode == 0, hnsw.stderr
    assert "note: dropped the settings HNSW32 does not read: nprobe 4" in hnsw.stderr
    assert options() == {"ef_search": 100}
    ivf = shitu("index", "rebuild", lib, "--index-type", "IVF")
    assert "note: dropped the settings IVF does not read: ef_search 100" in ivf.stderr
    assert options() == {}  # IVF's default nprobe, not the 4 set before HNSW32
    assert shitu("index", "verify", lib).returncode == 0


def test_one_photo_listed_under_two_labels_is_reported_not_silently_dropped(
    models, gallery_list, tmp_path
):
    """The file listed again was said to be 'the same photo as' itself; a copy of it
    elsewhere is named with the path of the one added."""
    image = gallery_list.read_text().splitlines()[0].split("\t")[0]
    copy = shutil.copy(image, tmp_path / "copy.jpg")
    twice = tmp_path / "twice.txt"
    twice.write_text(f"{image}\tapple\n{image}\tpear\n{image}\tapple\n{copy}\tplum\n")
    lib = tmp_path / "lib"
    built = shitu("index", "build", "--gallery", twice, "--model", models[128], "--out", lib)
    assert built.returncode == 0 and "added 1 image" in built.stdout
    assert "skipped 1 duplicate" in built.stdout  # the same photo under the same label
    assert f"could not add {image}: listed before, labelled 'apple'; it keeps" in built.stderr
    assert f"could not add {copy}: the same photo as {image}, labelled 'apple'; it" in (
        built.stderr
    )


def library_of_the_first(models: dict, tmp_path: Path, count: int) -> tuple[list[Path], Path]:
    """`count` photos and an unreadable broken.png in tmp_path/photos, and a library at
    tmp_path/lib holding the first photo, labelled 'old'."""
    photos = make_images(tmp_path / "photos", count)
    (tmp_path / "photos" / "broken.png").write_bytes(b"not an image")
    lib = tmp_path / "lib"
    built = shitu("index", "build", photos[0], "--label", "old", "--model", models[128],
                  "--out", lib)  # fmt: skip
    assert built.returncode == 0, built.stderr
    return photos, lib


def test_search_names_a_photo_the_model_gives_nan_and_searches_the_rest(
    models, tmp_path, monkeypatch
):
    """As an unreadable photo is named, and the others searched: the search refused them
    all with `search: query rows 1 contain NaN or inf`, a row of the photos read."""
    from shitu.inference import FeatureExtractor

    photos, lib = library_of_the_first(models, tmp_path, 3)
    overflows = photos[1].rename(photos[1].with_name("inf.png"))
    extract_files = FeatureExtractor.extract_files

    def overflowing(self, paths, *args, **kwargs):  # as an int8 or fp16 runtime might
        result = extract_files(self, paths, *args, **kwargs)
        result.features[[Path(p).name == "inf.png" for p in result.paths], 0] = float("nan")
        return result

    monkeypatch.setattr(FeatureExtractor, "extract_files", overflowing)
    search = shitu("index", "search", lib, photos[0], overflows, photos[2], "--model", models[128])
    assert search.returncode == 0, search.stderr
    assert [line.split("\t")[0] for line in search.stdout.splitlines()] == [
        str(photos[0]),
        str(photos[2]),
    ]
    assert f"warning: could not search {overflows}: {gallery_module.NOT_FINITE}" in search.stderr
    alone = shitu("index", "search", lib, overflows, "--model", models[128])
    assert alone.returncode == 1 and alone.stdout == ""


def test_a_min_score_no_cosine_similarity_reaches_is_refused(models, tmp_path):
    """`--min-score 5` (a percentage meant, say) in a library of cosine similarities
    printed 'no match' for every photo, without a word."""
    photos, lib = library_of_the_first(models, tmp_path, 1)
    for score, passing in (("5", "no hit"), ("-1.5", "every hit")):
        search = shitu(
            "index", "search", lib, photos[0], "--model", models[128], "--min-score", score
        )
        assert search.returncode == 2 and search.stdout == ""
        assert search.stderr == (
            f"error: --min-score {float(score)}: the scores of {lib} are cosine similarities, "
            f"from -1 to 1, so {passing} would pass it\n"
        )
    kept = shitu("index", "search", lib, photos[0], "--model", models[128], "--min-score", "0.5")
    assert kept.returncode == 0 and "old (1.000, id 1)" in kept.stdout, kept.stderr


def test_every_image_that_could_not_be_added_is_named(models, tmp_path):
    """Past 10 images that could not be added, the rest were '... 12 images failed in
    all': which ones the library lacks could not be told. Each is named, then counted."""
    lib = library_of_the_first(models, tmp_path, 1)[1]
    broken = [tmp_path / "photos" / f"broken{n:02}.png" for n in range(12)]
    for n, path in enumerate(broken):
        path.write_bytes(b"not an image %d" % n)  # each its own: not one file's duplicates
    added = shitu("index", "add", lib, *broken, "--label", "x", "--model", models[128])
    assert added.returncode == 1, added.stderr
    for path in broken:
        assert f"warning: could not add {path}: " in added.stderr
    assert added.stderr.endswith("warning: 12 images could not be added\n")


def test_an_add_written_in_parts_reports_as_one_add(models, tmp_path, monkeypatch):
    """`index add` writes the library a part at a time, and says what one write says: the
    totals, a photo listed again under another label in a later part refused as in one
    part, duplicates of the library and of the list, unreadable files."""
    photos, lib = library_of_the_first(models, tmp_path, 6)
    rows = [(photos[0], "x"), (photos[1], "x"), (photos[2], "x"), (photos[1], "y"),
            (tmp_path / "photos" / "broken.png", "x"), (photos[3], "x"), (photos[2], "x"),
            (tmp_path / "missing.png", "x"), (photos[4], "x"), (photos[5], "x")]  # fmt: skip
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{path}\t{label}\n" for path, label in rows))
    shutil.copytree(lib, tmp_path / "copy")
    one = shitu("index", "add", tmp_path / "copy", listing, "--model", models[128])
    monkeypatch.setattr(index_cli, "ADD_PART", 2)
    parts = shitu("index", "add", lib, listing, "--model", models[128])
    assert parts.returncode == one.returncode == 0, parts.stderr
    assert parts.stdout == one.stdout.replace(str(tmp_path / "copy"), str(lib))
    assert parts.stderr == one.stderr.replace(str(tmp_path / "copy"), str(lib))
    assert f"added 5 images to {lib} (now 6 images of 2 labels)" in parts.stdout
    assert "skipped 1 duplicate" in parts.stdout  # photo 2
    assert f"could not add {photos[1]}: listed before, labelled 'x'" in parts.stderr
    assert f"could not add {photos[0]}: the library has this photo as image 1" in parts.stderr
    assert "broken.png" in parts.stderr and "missing.png" in parts.stderr
    with Gallery.open(lib) as gallery:
        assert gallery.generation_on_disk() == 1 + 3  # 6 to embed, in parts of 2: 3 writes


def test_a_photo_the_library_has_under_another_label_is_named_with_that_label(models, tmp_path):
    """Adding it under another label is a mistake, or meant to move it: it was skipped as a
    plain duplicate, and the user left thinking it now had the new label."""
    photos, lib = library_of_the_first(models, tmp_path, 2)
    moved = shitu("index", "add", lib, photos[0], "--label", "new", "--model", models[128])
    assert moved.returncode == 1 and "added 0 images" in moved.stdout
    assert "duplicate" not in moved.stdout
    assert moved.stderr == (
        f"warning: could not add {photos[0]}: the library has this photo as image 1, labelled "
        f"'old'; it keeps that label (to label it 'new' instead, remove it, `shitu index "
        f"remove {lib} --id 1`, and add it again)\n"
    )
    again = shitu("index", "add", lib, photos[0], "--label", " old ", "--model", models[128])
    assert again.returncode == 0 and "skipped 1 duplicate" in again.stdout, again.stderr
    assert again.stderr == ""


def test_remove_missing_drops_the_images_whose_files_are_gone(models, tmp_path):
    """Photos deleted or moved since they were added: `--missing` removes them (and nothing
    else), so that `reembed`, which refuses unreadable images, can run again."""
    photos, lib = library_of_the_first(models, tmp_path, 3)
    added = shitu("index", "add", lib, photos[1], photos[2], "--label", "new", "--model",
                  models[128])  # fmt: skip
    assert added.returncode == 0, added.stderr
    none = shitu("index", "remove", lib, "--missing")
    assert none.returncode == 0, none.stderr
    assert none.stdout == f"removed no images from {lib}: no image's file is gone\n"
    with Gallery.create(tmp_path / "vectors", embedding_dim=8, model_fingerprint="m") as kept:
        kept.add(clustered(2, 8), ["a", "b"])  # as vectors: no file, none gone
    vectors = shitu("index", "remove", tmp_path / "vectors", "--missing")
    assert vectors.stdout.endswith(": no image's file is gone\n"), vectors.stderr
    photos[0].unlink()
    photos[2].rename(tmp_path / "moved.png")
    refused = shitu("index", "reembed", lib, "--model", models[128])
    assert refused.returncode == 2 and "or `--missing` for files that are gone" in refused.stderr
    verified = shitu("index", "verify", lib)  # the library itself is whole: said, not failed
    assert verified.returncode == 0 and "OK (3 images)" in verified.stdout
    # Where they were, named: a folder on a disk not mounted, say, is seen for what it is
    gone = f"the files of 2 images are gone from where they were added from, {photos[0].parent} ("
    assert f"note: {gone}" in verified.stderr
    assert f"until `shitu index remove {lib} --missing` removes them" in verified.stderr
    removed = shitu("index", "remove", lib, "--missing", "--id", "1")  # id 1 is gone too
    assert removed.returncode == 0 and removed.stdout == (
        f"removed 2 images from {lib}\nthe files that were gone were in {photos[0].parent}\n"
    )
    listed = shitu("index", "list", lib, "--images")
    assert [line.split("\t")[2] for line in listed.stdout.splitlines()] == [str(photos[1])]
    assert shitu("index", "reembed", lib, "--model", models[128]).returncode == 0
    assert "--id, --label and/or --missing" in shitu("index", "remove", lib).stderr


def test_remove_missing_refuses_where_a_whole_folder_or_every_file_is_gone(models, tmp_path):
    """A disk not mounted, or a photo folder moved, makes every file of it look gone:
    `--missing` removed all those images, each to be embedded again once the disk was back.
    It now removes nothing, naming the folder that is not there and the ways on (mount it,
    `reembed --moved`, or `--force`); files deleted from a folder that is there go as
    before."""
    disk = tmp_path / "disk"  # a mount point: an empty folder while its disk is unplugged
    make_images(disk / "photos" / "apple", 2, seed=1)
    make_images(disk / "photos" / "pear", 2, seed=2)
    kept = make_images(tmp_path / "local", 2, seed=3)
    lib = tmp_path / "lib"
    built = shitu("index", "build", disk / "photos", tmp_path / "local", "--label", "x",
                  "--model", models[128], "--out", lib)  # fmt: skip
    assert built.returncode == 0 and "added 6 images" in built.stdout, built.stderr
    listed = shitu("index", "list", lib, "--images").stdout
    (disk / "photos").rename(tmp_path / "unplugged")
    kept[0].unlink()  # deleted on purpose, from a folder that is there
    refused = shitu("index", "remove", lib, "--missing")
    assert refused.returncode == 2, refused.stderr
    folder = f"the folder {disk / 'photos'}, where the files of 4 images were, is not there ("
    assert f"remove --missing: {folder}" in refused.stderr
    assert "nothing was removed" in refused.stderr
    assert f"`shitu index reembed {lib} --moved {disk / 'photos'} NEW --model MODEL`" in (
        refused.stderr
    )
    assert "add --force" in refused.stderr
    assert shitu("index", "list", lib, "--images").stdout == listed  # nothing removed
    with_id = shitu("index", "remove", lib, "--missing", "--id", "6")  # refused as a whole
    assert with_id.returncode == 2 and shitu("index", "list", lib, "--images").stdout == listed
    alone = shitu("index", "remove", lib, "--id", "6", "--force")
    assert alone.returncode == 2 and "--force is only for --missing" in alone.stderr
    forced = shitu("index", "remove", lib, "--missing", "--force")
    assert forced.returncode == 0 and "removed 5 images" in forced.stdout, forced.stderr
    listed = shitu("index", "list", lib, "--images").stdout
    assert [line.split("\t")[2] for line in listed.splitlines()] == [str(kept[1])]
    # Every file gone, from a folder that is there (a mount point holding files, unmounted)
    kept[1].unlink()
    emptied = shitu("index", "remove", lib, "--missing")
    assert emptied.returncode == 2, emptied.stderr
    gone = f"every file its images were added from is gone (1 image), from {kept[1].parent} ("
    assert gone in emptied.stderr
    assert shitu("index", "list", lib, "--images").stdout == listed
    assert shitu("index", "remove", lib, "--missing", "--force").stdout.startswith("removed 1 ")


def test_remove_missing_offers_the_reembed_without_model_for_a_shipped_model_library(tmp_path):
    """The way on for a moved folder was `reembed ... --model MODEL (MODEL the library's
    model)`: a library of the shipped model has no MODEL to give, and takes no --model."""
    make_images(tmp_path / "photos" / "apple", 1)
    lib = tmp_path / "lib"
    assert shitu("index", "build", tmp_path / "photos", "--out", lib).returncode == 0
    (tmp_path / "photos").rename(tmp_path / "moved")
    refused = shitu("index", "remove", lib, "--missing")
    assert refused.returncode == 2, refused.stderr
    assert (
        f"`shitu index reembed {lib} --moved {tmp_path / 'photos'} NEW` (no --model: the "
        "library's is the model shipped with shitu) records where its files are now"
    ) in refused.stderr


def add_in_parts_of_two(lib: Path, photos: Path, model: Path, *options: str) -> list[str]:
    """The command line of `shitu index add LIB PHOTOS --label new` writing every 2 images."""
    parts_of_two = "import sys, shitu.cli.index as i, shitu.cli.main as m; i.ADD_PART = 2; "
    run = parts_of_two + "sys.exit(m.main(sys.argv[1:]))"
    add = ["index", "add", str(lib), str(photos), "--label", "new", "--model", str(model)]
    return [sys.executable, "-c", run, *add, *options]


def test_an_add_written_in_parts_draws_one_progress_bar(models, tmp_path):
    """At a terminal: one bar over the whole add, its unreadable files counted together."""
    photos, lib = library_of_the_first(models, tmp_path, 7)
    command = add_in_parts_of_two(lib, tmp_path / "photos", models[128])
    status, lines = run_in_terminal(command)
    assert status == 0, lines
    bars = [line for line in lines if "img/s" in line or "img]" in line]
    assert len(bars) == 1 and " 7/7 " in bars[0] and "skipped=1" in bars[0], lines
    (tmp_path / "photos" / "broken.png").unlink()
    photos[0].unlink()  # the library's, labelled 'old': not added as 'new'
    status, lines = run_in_terminal(command)  # again: nothing new to embed, and no bar
    assert status == 0 and "skipped 6 duplicates" in "\n".join(lines), lines
    assert not [line for line in lines if "it/s" in line or "img" in line], lines


def test_hashing_a_large_add_or_build_draws_a_bar_before_the_embeddings(models, tmp_path):
    """At a terminal, an add or a build of HASH_BAR_MIN_FILES files or more (lowered to 5
    here) shows the hashing that reads every file before any is embedded, its unreadable
    files counted as skipped, and so does a re-embedding of as many (it records each file's
    hash again); a smaller one (the test above) and --no-progress show none."""
    photos, lib = library_of_the_first(models, tmp_path, 7)
    listing = tmp_path / "list.txt"
    rows = [*photos[1:], tmp_path / "missing.png"]
    listing.write_text("".join(f"{path}\tnew\n" for path in rows))
    hash_bar_from_5 = (
        "import sys, shitu.index.gallery as g, shitu.cli.main as m; g.HASH_BAR_MIN_FILES = 5; "
        "sys.exit(m.main(sys.argv[1:]))"
    )
    model = ["--model", str(models[128])]
    commands = {
        "add": ["index", "add", str(lib), str(listing), *model],
        "build": ["index", "build", str(listing), "--out", str(tmp_path / "built"), *model],
    }
    for name, command in commands.items():
        status, lines = run_in_terminal([sys.executable, "-c", hash_bar_from_5, *command])
        assert status == 0, lines
        bars = [line for line in lines if "img/s" in line or "img]" in line]
        assert len(bars) == 2, (name, lines)
        assert bars[0].startswith("hashing: 100%") and " 7/7 " in bars[0], (name, lines)
        assert "skipped=1" in bars[0], (name, lines)
        assert bars[1].startswith("embedding: 100%") and " 6/6 " in bars[1], (name, lines)
    reembed = ["index", "reembed", str(lib), *model]
    status, lines = run_in_terminal([sys.executable, "-c", hash_bar_from_5, *reembed])
    bars = [line for line in lines if "img/s" in line or "img]" in line]
    assert status == 0 and len(bars) == 2, lines
    assert bars[0].startswith("hashing: 100%") and " 7/7 " in bars[0], lines
    quiet = [*commands["add"][:-2], "--allow-duplicates", *model, "--no-progress"]
    status, lines = run_in_terminal([sys.executable, "-c", hash_bar_from_5, *quiet])
    assert status == 0 and not [line for line in lines if "img" in line], lines


@pytest.mark.parametrize("allow_duplicates", [False, True])
def test_an_interrupted_add_keeps_the_parts_written(models, tmp_path, allow_duplicates):
    """Ctrl-C after the first part was written: those images stay, the command says how
    many, and the same command again adds the rest, unless it allows duplicates (then it
    says that it would add them again, as it does)."""
    photos = make_images(tmp_path / "photos", 200)
    lib = tmp_path / "lib"
    built = shitu("index", "build", photos[0], "--label", "old", "--model", models[128],
                  "--out", lib)  # fmt: skip
    assert built.returncode == 0, built.stderr
    command = add_in_parts_of_two(
        lib, tmp_path / "photos", models[128], "--threads", "1", "--batch-size", "1"
    )
    command += ["--allow-duplicates"] if allow_duplicates else []
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while json.loads(shitu("index", "stats", lib).stdout)["generation"] == 1:
        assert time.monotonic() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)  # the first part is written: Ctrl-C
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and err.endswith("interrupted\n"), err
    with Gallery.open(lib) as gallery:
        kept = len(gallery) - 1
    to_add = 200 if allow_duplicates else 199  # photo 0 is the library's
    assert 2 <= kept < to_add
    said = f"note: {kept} of the {to_add} images to add were added to {lib} before the add "
    assert said + "stopped, and are kept; " in err
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    if allow_duplicates:
        assert "would add them a second time (--allow-duplicates)" in err
        assert f"added 200 images to {lib} (now {1 + kept + 200} images" in again.stdout
    else:
        assert "the same command again adds the rest" in err
        assert f"added {199 - kept} images to {lib} (now 200 images of 2 labels)" in again.stdout
        assert f"skipped {count_of(kept, 'duplicate')}" in again.stdout
        assert f"could not add {photos[0]}: the library has this photo as image 1" in again.stderr


@pytest.mark.parametrize("allow_duplicates", [False, True])
def test_a_stop_just_after_a_write_commits_counts_that_write(
    models, tmp_path, monkeypatch, allow_duplicates
):
    """Ctrl-C while a committed part goes into the live index (on HNSW a second or so),
    before its write returns: the part is in the library, and the count says so."""
    photos = make_images(tmp_path / "photos", 6)
    lib = tmp_path / "lib"
    built = shitu("index", "build", photos[0], "--label", "old", "--model", models[128],
                  "--out", lib, "--index-type", "HNSW32")  # fmt: skip
    assert built.returncode == 0, built.stderr
    publish = FaissBackend.publish
    published = []

    def ctrl_c_in_the_second_publish(self: FaissBackend, manifest: object) -> None:
        publish(self, manifest)
        published.append(manifest)
        if len(published) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(FaissBackend, "publish", ctrl_c_in_the_second_publish)
    monkeypatch.setattr(index_cli, "ADD_PART", 2)
    stopped = shitu("index", "add", lib, tmp_path / "photos", "--label", "new", "--model",
                    models[128], *(["--allow-duplicates"] if allow_duplicates else []))  # fmt: skip
    assert stopped.returncode == 130, stopped.stderr
    to_add = 6 if allow_duplicates else 5  # photo 0 is the library's already
    assert f"note: 4 of the {to_add} images to add were added to {lib} before" in stopped.stderr
    monkeypatch.undo()
    with Gallery.open(lib) as gallery:
        assert len(gallery) == 1 + 4


def test_a_terminated_build_unwinds_and_ends_by_the_signal(models, grocery, tmp_path):
    """SIGTERM (kill, a job timeout) removes the staging folder like Ctrl-C, and the
    process still ends by the signal, as its caller or service manager expects."""
    lib = tmp_path / "lib"
    command = [sys.executable, "-m", "shitu", "index", "build", "--gallery", str(grocery / "train"),
               "--model", str(models[128]), "--out", str(lib), "--threads", "1"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".lib.building-*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # embedding photos
    process.terminate()
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_stats_prints_a_path_in_its_own_letters(tmp_path):
    """`index stats` printed a library named `Äpfel 梨` as "\\u00c4pfel \\u68a8", where
    `list --format jsonl` prints labels and paths as they are."""
    lib = tmp_path / "Äpfel 梨"
    Gallery.create(lib, embedding_dim=8, model_fingerprint="m").close()
    stats = shitu("index", "stats", lib)
    assert stats.returncode == 0 and f'"path": "{lib}"' in stats.stdout, stats.stdout


@pytest.mark.parametrize("backend", ["faiss", "milvus"])
def test_list_and_stats_read_the_rows_without_loading_the_index(tmp_path, monkeypatch, backend):
    """On a big library loading the index (a Faiss file read whole and checksummed, a
    Milvus collection loaded) costs far more than the rows these commands print."""
    if backend == "milvus":
        pytest.importorskip("milvus_lite", reason="the milvus extra is not installed")
    lib = tmp_path / "lib"
    photos = make_images(tmp_path / "photos", 5)
    with Gallery.create(lib, embedding_dim=8, model_fingerprint="m", backend=backend) as gallery:
        labels = ["pear", "apple", "pear", "fig", "pear"]
        gallery.add(clustered(5, 8), labels, [str(path) for path in photos])
        expected_stats, entries = gallery.stats(), gallery.entries("pear")
    monkeypatch.setattr(gallery_module, "open_backend", _no_index)
    stats = shitu("index", "stats", lib)
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout) == expected_stats
    listed = shitu("index", "list", lib)
    assert listed.stdout == "       1  apple\n       1  fig\n       3  pear\n", listed.stderr
    images = shitu("index", "list", lib, "--label", "pear")
    assert images.stdout.splitlines() == [
        f"{e.id}\t{e.label}\t{e.path}\t{e.added_at}" for e in entries
    ], images.stderr


def _no_index(*args: object, **kwargs: object) -> None:
    raise AssertionError("the index was loaded")


def test_a_milvus_failure_while_writing_is_one_line_and_leaves_no_half_library(
    models, tmp_path, monkeypatch
):
    """Milvus failing an insert (its server gone, its storage full): a build leaves nothing,
    an add keeps its committed rows and the collection is built again from them."""
    pytest.importorskip("milvus_lite", reason="the milvus extra is not installed")
    from pymilvus import MilvusClient
    from pymilvus.exceptions import MilvusException

    def disk_full(*args: object, **kwargs: object) -> None:
        raise MilvusException(message="simulated: disk full")

    make_images(tmp_path / "gallery" / "blocks", 4)
    lib = tmp_path / "lib"
    build = ("index", "build", "--gallery", tmp_path / "gallery", "--out", lib, "--backend",
             "milvus", "--model", models[128], "--no-progress")  # fmt: skip
    with monkeypatch.context() as failing:
        failing.setattr(MilvusClient, "insert", disk_full)
        refused = shitu(*build)
    assert refused.returncode == 2 and refused.stderr.splitlines()[-1] == (
        f"error: {lib}: not built: Milvus failed while adding vectors to collection "
        "'shitu_gallery' (simulated: disk full)"
    )
    assert "Traceback" not in refused.stderr
    assert not lib.exists() and not list(tmp_path.glob(".lib*"))  # no staging folder either

    assert shitu(*build).returncode == 0
    new = make_images(tmp_path / "new", 1, seed=1)[0]
    add = ("index", "add", lib, new, "--label", "new", "--model", models[128], "--no-progress")
    with monkeypatch.context() as failing:
        failing.setattr(MilvusClient, "insert", disk_full)
        refused = shitu(*add)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.splitlines()[-1].startswith(
        f"error: {lib}: Milvus failed while adding vectors to collection 'shitu_gallery' "
        "(simulated: disk full); the library keeps the change"
    )
    verified = shitu("index", "verify", lib)  # opening builds the stale collection again
    assert verified.returncode == 0 and "OK (5 images)" in verified.stdout, verified.stdout
    found = shitu("index", "search", lib, new, "--model", models[128], "-k", "1")
    assert "\tnew (1.000" in found.stdout, found.stdout


def milvus_build_outside_the_library(
    models: dict[int, Path], tmp_path: Path, lib: Path
) -> tuple[str | Path, ...]:
    """`shitu index build` arguments for a library `lib` of 4 images made under `tmp_path`,
    whose Milvus Lite file lies outside it (as a server's collection would)."""
    make_images(tmp_path / "gallery" / "blocks", 4)
    return ("index", "build", "--gallery", tmp_path / "gallery", "--out", lib, "--backend",
            "milvus", "--milvus-uri", tmp_path / "shared.db", "--model", models[128],
            "--no-progress")  # fmt: skip


def test_a_failed_build_leaves_no_vectors_in_a_milvus_outside_the_library(
    models, tmp_path, monkeypatch
):
    """On a server (or a Lite file outside the library) the collection outlives the build's
    staging folder: one that failed half-way through its inserts left vectors there, and a
    build again with that collection was refused as another library's."""
    pytest.importorskip("milvus_lite", reason="the milvus extra is not installed")
    from pymilvus import MilvusClient
    from pymilvus.exceptions import MilvusException

    from shitu.index.backends import milvus_backend

    lib = tmp_path / "lib"
    build = milvus_build_outside_the_library(models, tmp_path, lib)
    real_insert, inserts = MilvusClient.insert, []

    def fails_second(client: MilvusClient, *args: object, **kwargs: object) -> object:
        inserts.append(args)
        if len(inserts) == 2:
            raise MilvusException(message="simulated: connection lost")
        return real_insert(client, *args, **kwargs)

    with monkeypatch.context() as failing:
        failing.setattr(milvus_backend, "INSERT_BATCH", 2)
        failing.setattr(MilvusClient, "insert", fails_second)
        refused = shitu(*build)
    assert refused.returncode == 2 and not lib.exists() and len(inserts) == 2
    built = shitu(*build)
    assert built.returncode == 0, built.stderr
    verified = shitu("index", "verify", lib)
    assert verified.returncode == 0 and "OK (4 images)" in verified.stdout, verified.stdout


def test_a_build_that_adds_no_image_leaves_no_milvus_collection(models, tmp_path):
    """A build none of whose images can be read makes no library, and so keeps no
    collection of its own in a Milvus outside the library either."""
    pytest.importorskip("milvus_lite", reason="the milvus extra is not installed")
    from pymilvus import MilvusClient

    (tmp_path / "gallery" / "broken").mkdir(parents=True)
    (tmp_path / "gallery" / "broken" / "photo.jpg").write_bytes(b"not a jpeg")
    milvus = tmp_path / "shared.db"
    built = shitu("index", "build", "--gallery", tmp_path / "gallery", "--out", tmp_path / "lib",
                  "--backend", "milvus", "--milvus-uri", milvus, "--model", models[128],
                  "--no-progress")  # fmt: skip
    assert built.returncode == 1 and "none of the 1 images was added" in built.stderr
    assert not (tmp_path / "lib").exists()
    client = MilvusClient(str(milvus))
    try:
        assert client.list_collections() == []
    finally:
        client.close()


def test_a_milvus_collection_whose_library_was_deleted_is_replaced_on_request(
    models, tmp_path, caplog
):
    """A Lite file (or server) outside the library keeps the collection of a library deleted
    since (or of a build killed outright): building with it again was refused as another
    library's, and no shitu command could drop it."""
    pytest.importorskip("milvus_lite", reason="the milvus extra is not installed")
    lib = tmp_path / "lib"
    build = milvus_build_outside_the_library(models, tmp_path, lib)
    assert shitu(*build).returncode == 0
    shutil.rmtree(lib)
    refused = shitu(*build)
    assert refused.returncode == 2 and not lib.exists()
    assert "already holds vectors" in refused.stderr
    assert "--replace-collection in the CLI" in refused.stderr, refused.stderr
    replaced = shitu(*build, "--replace-collection")
    assert replaced.returncode == 0, replaced.stderr
    assert "dropping the vectors in Milvus collection 'shitu_gallery'" in caplog.text
    verified = shitu("index", "verify", lib)
    assert verified.returncode == 0 and "OK (4 images)" in verified.stdout, verified.stdout
    faiss = shitu("index", "build", "--gallery", tmp_path / "gallery", "--out", tmp_path / "f",
                  "--model", models[128], "--replace-collection")  # fmt: skip
    assert faiss.returncode == 2
    assert "--replace-collection: only with --backend milvus" in faiss.stderr


def test_list_and_search_keep_a_line_per_image_whose_file_name_has_a_tab_or_newline(
    models, tmp_path
):
    """`PATH` is a tab-separated field: a file named with a tab or a line break split its
    line, so a script reading the listing got wrong fields and lines. Such a path (and one
    starting with a quote) is written as a JSON string; --format jsonl gives objects."""
    photos = make_images(tmp_path / "photos", 5)
    # U+2028, a line separator: Python's splitlines() ends a line there
    names = ["tab\there.png", "line\nbreak.png", '"quoted".png', "plain.png", "u\u2028.png"]
    named = [photo.rename(photo.with_name(name)) for photo, name in zip(photos, names, strict=True)]
    lib = tmp_path / "lib"
    built = shitu("index", "build", tmp_path / "photos", "--label", "x", "--model", models[128],
                  "--out", lib)  # fmt: skip
    assert built.returncode == 0 and "added 5 images" in built.stdout, built.stderr
    listed = shitu("index", "list", lib, "--images")
    assert listed.returncode == 0, listed.stderr
    rows = [line.split("\t") for line in listed.stdout.splitlines()]
    assert [len(row) for row in rows] == [4, 4, 4, 4, 4]
    paths = [json.loads(path) if path.startswith('"') else path for _, _, path, _ in rows]
    assert sorted(paths) == sorted(str(path) for path in named)
    assert str(named[3]) in [row[2] for row in rows]  # a plain path stays as it is
    as_json = shitu("index", "list", lib, "--images", "--format", "jsonl")
    objects = [json.loads(line) for line in as_json.stdout.split("\n")[:-1]]
    assert sorted(o["path"] for o in objects) == sorted(str(path) for path in named)
    assert [o["id"] for o in objects] == [int(row[0]) for row in rows]
    labels = shitu("index", "list", lib, "--format", "jsonl")
    assert labels.stdout == '{"label": "x", "images": 5}\n', labels.stderr
    found = shitu("index", "search", lib, named[0], named[1], "--model", models[128], "-k", "1")
    assert found.returncode == 0, found.stderr
    queries = [line.split("\t")[0] for line in found.stdout.split("\n")[:-1]]
    assert [json.loads(query) for query in queries] == [str(named[0]), str(named[1])]


def test_reembed_reads_the_files_of_a_moved_folder_where_it_says_and_records_them_there(
    models, tmp_path
):
    """The library records where each file was added from: a user who moved the photo
    folder could only remove those images. `--moved OLD NEW` reads them from NEW and
    records the new paths; files missing are named, and nothing is changed then."""
    photos = make_images(tmp_path / "photos" / "fruit", 3)
    lib = tmp_path / "lib"
    built = shitu("index", "build", tmp_path / "photos", "--model", models[128], "--out", lib)
    assert built.returncode == 0, built.stderr
    before = shitu("index", "list", lib, "--images").stdout
    (tmp_path / "photos").rename(tmp_path / "moved")
    now = [tmp_path / "moved" / "fruit" / photo.name for photo in photos]
    # Added again from where they are now, they are duplicates: the way on is said
    again = shitu("index", "add", lib, tmp_path / "moved", "--model", models[128])
    assert again.returncode == 0 and "skipped 3 duplicates" in again.stdout, again.stderr
    assert again.stderr == (
        f"note: the files of 3 images of the library are gone from where they were added "
        f"from, {photos[0].parent}; if they moved, `shitu index reembed {lib} --moved OLD "
        f"NEW --model {models[128]}` records where they are now\n"
    )

    refused = shitu("index", "reembed", lib, "--model", models[512])
    assert refused.returncode == 2, refused.stderr
    assert all(f"{photo} (No such file or directory)" in refused.stderr for photo in photos)
    assert "`--moved OLD NEW`" in refused.stderr and "nothing was changed" in refused.stderr
    typo = shitu("index", "reembed", lib, "--moved", tmp_path / "fotos", tmp_path / "moved",
                 "--model", models[512])  # fmt: skip
    assert typo.returncode == 2
    assert (
        f"no image of the library was added from {tmp_path / 'fotos'}; the files that are "
        f"gone were in {tmp_path / 'photos' / 'fruit'}\n"
    ) in typo.stderr
    nowhere = shitu("index", "reembed", lib, "--moved", tmp_path / "photos", tmp_path / "gone",
                    "--model", models[512])  # fmt: skip
    assert nowhere.returncode == 2 and f"{tmp_path / 'gone'} is not a folder" in nowhere.stderr
    now[1].rename(tmp_path / "elsewhere.png")  # one file not in the moved folder: nothing changes
    moved = ["--moved", tmp_path / "photos", tmp_path / "moved", "--model", models[512]]
    partly = shitu("index", "reembed", lib, *moved)
    assert partly.returncode == 2 and f"ids 2: {now[1]} (No such file" in partly.stderr
    assert shitu("index", "list", lib, "--images").stdout == before
    assert json.loads(shitu("index", "stats", lib).stdout)["embedding_dim"] == 128

    (tmp_path / "elsewhere.png").rename(now[1])
    done = shitu("index", "reembed", lib, *moved)
    assert done.returncode == 0 and "re-embedded 3 images" in done.stdout, done.stderr
    # Another model than the library's, easily unmeant where the point was --moved: said
    assert "note: the library held model " in done.stderr
    assert f"; search it with --model {models[512]} from now on\n" in done.stderr
    same = shitu("index", "reembed", lib, "--model", models[512])
    assert same.returncode == 0 and same.stderr == "", same.stderr
    shipped = shitu("index", "reembed", lib, "--moved", tmp_path / "moved", tmp_path / "moved")
    assert shipped.returncode == 0, shipped.stderr
    assert "search it with no --model (the model shipped with shitu) from now" in shipped.stderr
    assert shitu("index", "reembed", lib, "--model", models[512]).returncode == 0
    listed = shitu("index", "list", lib, "--images")
    assert [line.split("\t")[2] for line in listed.stdout.splitlines()] == [str(p) for p in now]
    verified = shitu("index", "verify", lib)
    assert verified.returncode == 0 and verified.stderr == "", verified.stderr
    found = shitu("index", "search", lib, now[2], "--model", models[512], "-k", "1")
    assert found.stdout == f"{now[2]}\tfruit (1.000, id 3)\n", found.stderr


def test_build_out_a_link_to_a_folder_elsewhere_makes_the_library_there(models, tmp_path):
    """`--out gallery` where gallery links to a folder on another disk (empty, or not made
    yet): the build renamed the library onto the link, which failed once every image was
    embedded, saying the library had been built meanwhile by another process."""
    photos = make_images(tmp_path / "photos", 2)
    elsewhere = tmp_path / "disk"
    (elsewhere / "empty").mkdir(parents=True)
    for name, target in (("to_empty", elsewhere / "empty"), ("dangling", elsewhere / "new")):
        (tmp_path / name).symlink_to(target)
        built = shitu("index", "build", tmp_path / "photos", "--label", "x", "--model",
                      models[128], "--out", tmp_path / name)  # fmt: skip
        assert built.returncode == 0, built.stderr
        assert (target / "gallery.sqlite").is_file() and (tmp_path / name).is_symlink()
        listed = shitu("index", "list", tmp_path / name, "--images")
        assert [line.split("\t")[2] for line in listed.stdout.splitlines()] == [
            str(photo) for photo in photos
        ]
    again = shitu("index", "build", tmp_path / "photos", "--label", "x", "--model",
                  models[128], "--out", tmp_path / "dangling")  # fmt: skip
    assert again.returncode == 2 and "already exists and is not an empty folder" in again.stderr


@pytest.mark.parametrize(
    ("command", "named"),
    [
        (["index", "build", "", "--out", "LIB"], "SOURCE"),
        (["index", "build", "photos", "--gallery", "", "--out", "LIB"], "--gallery"),
        (["index", "build", "photos", "--out", ""], "--out"),
        (["index", "add", "", "photos"], "library"),
        (["index", "add", "LIB", ""], "sources"),
        (["index", "remove", "", "--id", "1"], "library"),
        (["index", "relabel", "", "a", "b"], "library"),
        (["index", "list", ""], "library"),
        (["index", "stats", ""], "library"),
        (["index", "verify", ""], "library"),
        (["index", "reembed", ""], "library"),
        (["index", "reembed", "LIB", "--moved", "", "photos"], "--moved"),
        (["index", "rebuild", ""], "library"),
        (["index", "search", "", "photos"], "library"),
        (["eval-pipeline", "--queries", ""], "--queries"),
        (["extract", "photos", "--out", ""], "--out"),
        (["convert", "", "--out", "w.safetensors"], "weights"),
        (["convert", "w.pdparams", "--out", ""], "--out"),
        (["average", "a.safetensors", "", "--out", "w.safetensors"], "weights"),
        (["average", "a.safetensors", "b.safetensors", "--out", ""], "--out"),
    ],
)
def test_an_empty_path_that_must_be_given_is_refused_naming_it(
    command, named, tmp_path, monkeypatch, capsys
):
    """`shitu index build "$PHOTOS" --out LIB` with the variable unset built a library of
    every image under the working directory, as Path("") names it (and `index stats
    "$LIB"` said `.` was no library): an empty source, library or required --out is
    refused, naming the argument, and nothing is written (`extract --out ""` was said to
    name a folder; `convert ""` and `average`'s empty --out to be `.`)."""
    make_images(tmp_path / "photos", 1)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        main(command)
    assert stopped.value.code == 2
    assert f"error: argument {named}: empty; give a path\n" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["photos"]


def test_an_empty_model_is_the_shipped_one(models, tmp_path):
    """`--model "$MODEL"` with the variable unset was Path(''), the working directory,
    refused as no exported model: it is none given, the shipped model, as in `recognize`,
    and a library built with another model says that no --model was given."""
    photos = make_images(tmp_path / "photos", 1)
    lib = tmp_path / "lib"
    built = shitu("index", "build", photos[0], "--label", "x", "--model", models[128], "--out", lib)
    assert built.returncode == 0, built.stderr
    searched = shitu("index", "search", lib, photos[0], "--model", "")
    assert (
        searched.returncode == 2 and "no --model (model= in Python) was given" in searched.stderr
    ), searched.stderr


def test_a_source_that_is_a_device_or_fifo_is_named_as_one_not_as_missing(tmp_path):
    """`shitu index build /dev/stdin --out LIB` (or a FIFO, eval-pipeline's --queries) said
    "no such file or folder" of a path that is there: what it is is said instead."""
    fifo = tmp_path / "gallery.fifo"
    os.mkfifo(fifo)
    for given, kind in ((fifo, "a FIFO (named pipe)"), ("/dev/null", "a character device")):
        said = f"error: {given}: {kind}, not an image, folder or label file\n"
        built = shitu("index", "build", given, "--out", tmp_path / "lib")
        assert (built.returncode, built.stderr) == (2, said)
        labelled = shitu("index", "build", given, "--label", "x", "--out", tmp_path / "lib")
        assert (labelled.returncode, labelled.stderr) == (2, said)
        queried = shitu("eval-pipeline", "--queries", given, "--gallery", tmp_path / "lib")
        assert (queried.returncode, queried.stderr) == (2, said)
    assert not (tmp_path / "lib").exists()


def test_a_library_given_as_a_device_or_fifo_is_named_as_one(tmp_path):
    """`shitu index stats /dev/null` was told to build a library from it first (`shitu
    index build /dev/null --out LIB`), as a label file is: it is named for what it is."""
    fifo = tmp_path / "lib.fifo"
    os.mkfifo(fifo)
    for given, kind in ((fifo, "a FIFO (named pipe)"), ("/dev/null", "a character device")):
        for command in ("stats", "verify"):
            opened = shitu("index", command, given)
            assert opened.returncode == 2
            assert opened.stderr == f"error: {given}: {kind}, not a gallery library\n"


def test_a_listed_image_that_is_a_fifo_is_skipped_not_waited_on(models, tmp_path):
    """A label file listing a FIFO (or /dev/zero) as an image: `index build` and
    `eval-pipeline` hashed it with a plain open(), which waited for a writer without end
    (/dev/zero: read for ever). It is skipped, named as what it is."""
    photos = make_images(tmp_path / "photos", 1)
    fifo = tmp_path / "photos" / "pipe.png"
    os.mkfifo(fifo)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{fifo}\tpipe\n{photos[0]}\tphoto\n")

    def hung(*_: object) -> None:
        raise RuntimeError("waited on the FIFO")

    before = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)  # a guard: without it, a regression hangs the test run
    try:
        built = shitu("index", "build", listing, "--model", models[128], "--out", tmp_path / "lib")
        queried = shitu("eval-pipeline", "--queries", listing, "--gallery", tmp_path / "lib",
                        "--model", models[128], "--no-progress")  # fmt: skip
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)
    skipped = f"{fifo}: a FIFO (named pipe), not an image file"
    assert built.returncode == 0 and f"could not add {skipped}" in built.stderr, built.stderr
    assert queried.returncode == 0 and f"skipped {skipped}" in queried.stderr, queried.stderr


def test_commands_suggested_for_a_path_with_spaces_quote_it(models, tmp_path):
    """`shitu index add My Gallery ...` suggested for a library in "My Gallery" is two
    words to the shell, and runs on a folder `My`: paths in suggested commands are quoted
    as the shell needs."""
    photos = make_images(tmp_path / "photos", 1)
    lib = tmp_path / "My Gallery"
    build = ["index", "build", photos[0], "--label", "x", "--model", models[128], "--out", lib]
    assert shitu(*build).returncode == 0
    again = shitu(*build)
    assert again.returncode == 2
    assert f"`shitu index add {shlex.quote(str(lib))} ...`" in again.stderr, again.stderr
    listing = tmp_path / "my photos.txt"
    listing.write_text(f"{photos[0]}\tx\n")
    opened = shitu("index", "stats", listing)
    assert f"`shitu index build {shlex.quote(str(listing))} --out LIB`" in opened.stderr
