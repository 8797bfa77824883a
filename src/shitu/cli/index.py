"""`shitu index ...`: build and curate a gallery library (add, remove, relabel, search)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from shitu.cli.common import (
    add_leaf_labels_argument,
    add_progress_argument,
    add_runtime_arguments,
    bounded,
    count_of,
    expand_images,
    finite_float,
    given_path,
    output_path,
    positive_int,
    progress_wanted,
    refuse_owned_output,
    required_path,
    skip_reason,
    table_field,
    thread_count,
    warn_if_empty,
)
from shitu.errors import DataError, GalleryError, did_you_mean, first_few
from shitu.fileio import check_writable, folder_place, occupied, removed_if_left_empty
from shitu.index import (
    INDEX_TYPES,
    METRICS,
    AddReport,
    Catalog,
    Gallery,
    GalleryItem,
    Manifest,
    NothingAddedError,
    collect_items,
)
from shitu.index.embedder import Embedder
from shitu.index.gallery import (
    LIBRARY_FILE,
    NOT_FINITE,
    SHOWN_FILES,
    file_gone,
    gone_from,
)
from shitu.index.labels import warn_of_labels_apart_by_case
from shitu.index.manifest import LARGEST_COUNT
from shitu.index.metadata import ImageEntry, LibraryBusyError
from shitu.vectors import finite_rows

# Past this many images that could not be added, their count follows the warnings naming
# them (which run off the screen).
COUNTED_FAILURES = 10
# `index add` writes the library every ADD_PART images it embeds, so that an add stopped by
# Ctrl-C, a crash or a failed write keeps the parts it wrote, and the same command again adds
# the rest (the images written are skipped as duplicates); `index build` stays all or nothing.
# A part is well under a minute of embedding with the shipped model (100+ images/s on 2 CPU
# cores), and writing it costs little beside that, since a write keeps the Faiss index file
# until the rows added since pass a tenth of the library: 40,960 random 512-d vectors added
# in parts of 2,048 took at most 0.03 ms per vector more than in one write to Flat and HNSW32
# libraries, empty or of 100k (IVFPQ, empty: 0.3 ms, trained again as it grew 4x; 1 thread,
# 2-core Intel Xeon host), against some 10 ms per image of embedding.
ADD_PART = 2048
# The Milvus settings of `index build`, by the flags that give them.
MILVUS_FLAGS = {"uri": "--milvus-uri", "collection": "--milvus-collection"}
SEARCH_FLAGS = {"nprobe": "--nprobe", "ef_search": "--ef-search", "index_type": "--index-type"}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "index",
        help="build and edit a gallery library (labelled image features + vector index)",
        description="Build, edit, inspect and search a gallery library.",
    )
    commands = parser.add_subparsers(title="index commands", dest="index_command", metavar="CMD")
    commands.required = True

    build = commands.add_parser(
        "build",
        help="embed a gallery into a new library",
        usage="%(prog)s SOURCE [SOURCE ...] --out OUT [options]",
        description="Embed the images of label files or folder-per-label trees into a new "
        "library at --out, written once at the end (one stopped or failed leaves no library); "
        "unreadable images are named and left out, and a build that could add none leaves none.",
    )
    build.add_argument(
        "sources",
        type=required_path,
        nargs="*",
        metavar="SOURCE",
        help="label file(s) (`path<TAB>label`, paths relative to the file's folder) or "
        "folder-per-label tree(s); with --label, images and folders of images",
    )
    # The option form, as PaddleClas's gallery settings name it; SOURCE as `index add` takes it.
    build.add_argument(
        "--gallery",
        type=required_path,
        nargs="+",
        action="extend",
        default=[],
        help="SOURCE, given as an option",
    )
    build.add_argument(
        "--out",
        type=output_path,
        required=True,
        help="library folder to create (or an empty folder to fill; a symbolic link there "
        "is followed)",
    )
    build.add_argument("--label", help="label for every given image and folder (as `index add`)")
    add_leaf_labels_argument(build)
    build.add_argument(
        "--index-type",
        choices=INDEX_TYPES,
        default="Flat",
        help="Flat searches exactly; HNSW32, IVF and IVFPQ approximately, faster on large "
        "galleries (default %(default)s)",
    )
    build.add_argument(
        "--metric",
        choices=METRICS,
        default="ip",
        help="ip (inner product) or l2 (distance) of the normalised features; scores are "
        "cosine similarities either way (default %(default)s)",
    )
    build.add_argument(
        "--backend",
        choices=("faiss", "milvus"),
        default="faiss",
        help="faiss: an index file in the library; milvus: a Milvus Lite file or server "
        "(default %(default)s)",
    )
    build.add_argument(
        "--milvus-uri",
        help="Milvus server URI (http://host:19530; its token, if it needs one, from "
        "$SHITU_MILVUS_TOKEN) or Milvus Lite FILE.db (a relative path is inside the library); "
        "default: milvus.db in the library",
    )
    build.add_argument(
        "--milvus-collection",
        help="collection name, one per library: letters, digits and underscores, not "
        "starting with a digit (default shitu_gallery; one that holds vectors is refused)",
    )
    build.add_argument(
        "--replace-collection",
        action="store_true",
        help="drop the vectors the Milvus collection holds instead of refusing it: for one "
        "no library uses any more (its library was deleted, or a build was killed); one "
        "that a library on this host still uses is refused, naming it",
    )
    _add_search_arguments(build)
    _add_image_arguments(build)
    build.set_defaults(func=run_build)

    add = commands.add_parser(
        "add",
        help="add images (files, folders, label files)",
        description=f"Embed images and add them to a library, writing it every {ADD_PART:,} "
        "images: an add that is stopped keeps what it wrote, and the same command again adds "
        "the rest (it skips the images the library has, unless --allow-duplicates).",
    )
    add.add_argument("library", type=required_path)
    add.add_argument(
        "sources", type=required_path, nargs="+", help="images, folders or label files"
    )
    add.add_argument("--label", help="label for every given image and folder")
    add_leaf_labels_argument(add)
    _add_image_arguments(add)
    add.set_defaults(func=run_add)

    remove = commands.add_parser(
        "remove",
        help="remove images by id, by label or whose files are gone",
        description="Remove images by id (`index list --images` lists them), every image "
        "of a label, or every image whose file is gone (--missing).",
    )
    remove.add_argument("library", type=required_path)
    remove.add_argument(
        "--id",
        type=int,
        nargs="+",
        action="extend",
        default=[],
        dest="ids",
        help="ids (`index list --images`)",
    )
    remove.add_argument(
        "--label",
        nargs="+",
        action="extend",
        default=[],
        dest="labels",
        help="every image of these labels",
    )
    remove.add_argument(
        "--missing",
        action="store_true",
        help="every image whose file is gone (moved or deleted since it was added); those "
        "added as vectors, without a file, stay. Refused, removing nothing, where a folder "
        "they were added from is not there at all, or every file is gone: a disk not "
        "mounted or a folder moved, most likely",
    )
    remove.add_argument(
        "--force",
        action="store_true",
        help="with --missing: remove them even then (the folder, or every file, is gone for good)",
    )
    remove.set_defaults(func=run_remove)

    relabel = commands.add_parser(
        "relabel",
        help="rename a label",
        description="Rename label OLD to NEW; onto a label that has images only with --merge.",
    )
    relabel.add_argument("library", type=required_path)
    relabel.add_argument("old", metavar="OLD", help="the label to rename")
    relabel.add_argument("new", metavar="NEW", help="its new name")
    relabel.add_argument(
        "--merge", action="store_true", help="allow renaming onto a label that has images"
    )
    relabel.set_defaults(func=run_relabel)

    listing = commands.add_parser(
        "list",
        help="list labels with counts, or images (one label's, or all with --images)",
        description="List the labels with their image counts; with --label that label's "
        "images, with --images every image: `ID<TAB>LABEL<TAB>PATH<TAB>ADDED_AT` lines, a "
        "path that holds a tab, a line break or another control character (or starts with "
        '`"`) written as a JSON string (--format jsonl: a JSON object per line).',
    )
    listing.add_argument("library", type=required_path)
    listing.add_argument("--label", help="list this label's images")
    listing.add_argument("--images", action="store_true", help="list every image")
    listing.add_argument(
        "--format",
        choices=("table", "jsonl"),
        default="table",
        help='table: the lines above; jsonl: {"label", "images"} per label, or {"id", '
        '"label", "path", "added_at"} per image (for jq; default %(default)s)',
    )
    listing.set_defaults(func=run_list)

    stats = commands.add_parser(
        "stats",
        help="show counts, model and index facts",
        description="Print the library's image and label counts, model fingerprint, metric "
        "and index facts as JSON.",
    )
    stats.add_argument("library", type=required_path)
    stats.set_defaults(func=run_stats)

    verify = commands.add_parser(
        "verify",
        help="check checksums, counts and the database (exit status 1 on a problem)",
        description="Check the library's database, its index file's checksum and that the "
        "index holds the images the database lists; exit status 1 on a problem (each printed "
        "as `problem: ...`).",
    )
    verify.add_argument("library", type=required_path)
    verify.set_defaults(func=run_verify)

    reembed = commands.add_parser(
        "reembed",
        help="re-extract every image with a new model",
        description="Embed every image of the library again with --model (and --precision), "
        "which the library is then searched with: a model upgrade in one command. Every "
        "image's file is read from where it was added from, or from where --moved says its "
        "folder is now; one that cannot be read is named, and then nothing is changed.",
    )
    reembed.add_argument("library", type=required_path)
    reembed.add_argument(
        "--moved",
        nargs=2,
        type=required_path,
        action="append",
        default=[],
        metavar=("OLD", "NEW"),
        help="a folder of the images' files moved from OLD to NEW since they were added: "
        "they are read from NEW (the same paths below it), and recorded there; repeatable "
        "(to keep the library's model, give the --model that built it)",
    )
    _add_model_arguments(reembed)
    reembed.set_defaults(func=run_reembed)

    rebuild = commands.add_parser(
        "rebuild",
        help="rebuild the index (optionally another type)",
        description="Write the index again from the features stored in the library, as "
        "another --index-type or with other search settings; also mends a library whose "
        "index file was lost or damaged.",
    )
    rebuild.add_argument("library", type=required_path)
    rebuild.add_argument(
        "--index-type", choices=INDEX_TYPES, help="rebuild as this type (default: the same)"
    )
    _add_search_arguments(rebuild)
    rebuild.set_defaults(func=run_rebuild)

    search = commands.add_parser(
        "search",
        help="embed query images and print the top hits",
        description="Prints a line per image that could be read: `PATH<TAB>LABEL (SCORE, id ID); "
        "...`, best first, or `PATH<TAB>no match` (a PATH as `index list` writes it; --format "
        "jsonl: a JSON object); one the model gives NaN or inf features is named in a warning "
        "instead. Exit status 1 when no image could be read and searched.",
    )
    search.add_argument("library", type=required_path)
    search.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    search.add_argument("-k", type=positive_int, default=5, help="hits per image (default 5)")
    search.add_argument(
        "--min-score",
        type=finite_float,
        help="drop hits scoring below this (scores are cosine similarities in libraries from "
        "`index build`)",
    )
    search.add_argument(
        "--format",
        choices=("table", "jsonl"),
        default="table",
        help='table: PATH<TAB>hits; jsonl: {"image": PATH, "results": [{"label", "score", '
        '"image_id"}, ...]} per image, in the keys of `shitu recognize` (for jq; default '
        "%(default)s)",
    )
    _add_model_arguments(search)
    search.set_defaults(func=run_search)


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        type=given_path,
        help="exported model folder (default: the model shipped with shitu)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=32,
        help="images per model call (default %(default)s)",
    )
    parser.add_argument(
        "--threads", type=thread_count, help="CPU threads for the model (default: the runtime's)"
    )
    add_runtime_arguments(parser)
    add_progress_argument(parser)


def _add_search_arguments(parser: argparse.ArgumentParser) -> None:
    count = bounded(int, 1, LARGEST_COUNT, f"a whole number from 1 to {LARGEST_COUNT}")
    parser.add_argument(
        "--nprobe",
        type=count,
        help="IVF lists searched per query (default: a 16th of the lists, at least 8; Milvus: 16)",
    )
    parser.add_argument("--ef-search", type=count, help="HNSW search depth (default 64)")


def _search_options(args: argparse.Namespace, index_type: str) -> dict[str, int]:
    """The search settings given, each refused for an index type that never reads it (it
    would be stored and ignored): before the model loads, named as typed."""
    given = {"nprobe": args.nprobe, "ef_search": args.ef_search}
    options = {name: value for name, value in given.items() if value is not None}
    Manifest.check_typed_options(index_type, options, SEARCH_FLAGS)
    return options


def _add_image_arguments(parser: argparse.ArgumentParser) -> None:
    """For commands that add images: the model, and what to do with repeated content."""
    _add_model_arguments(parser)
    parser.add_argument(
        "--allow-duplicates", action="store_true", help="add images whose content is present"
    )


def _load_model(args: argparse.Namespace) -> Embedder:
    from shitu.inference import FeatureExtractor, default_model_dir

    return FeatureExtractor.load(
        args.model or default_model_dir(),
        args.runtime or "auto",
        args.threads,
        precision=args.precision or "fp32",
    )


def _open_for(args: argparse.Namespace, model: Embedder) -> Gallery:
    """The library for `model`'s features; a refusal says where the shipped model is involved."""
    from shitu.inference import default_model_fingerprint

    return Gallery.open_for(
        args.library,
        model,
        shipped_model=args.model is None,
        shipped_fingerprint=default_model_fingerprint(),
    )


def _report(report: AddReport, library: Path, stats: dict[str, Any]) -> None:
    # The label count shows a folder given one level too high (its subfolders as labels).
    whole = f"{count_of(stats['images'], 'image')} of {count_of(stats['labels'], 'label')}"
    print(f"added {count_of(len(report.ids), 'image')} to {library} (now {whole})")
    _note_untrained(stats)
    if report.duplicates:
        skipped = count_of(len(report.duplicates), "duplicate")
        print(f"skipped {skipped} (same content already in the library)")
    _warn_failures(report)


def _note_untrained(stats: dict[str, Any]) -> None:
    """Say that a Faiss IVF or IVFPQ library is searched as Flat, and how many images it
    needs before it is not: 1,000 and 9,984, which a user sizing a gallery cannot guess."""
    built = stats["index"].get("built_type", stats["index_type"])
    if built != stats["index_type"]:
        from shitu.index.backends.faiss_backend import MIN_TRAIN

        needed = MIN_TRAIN[stats["index_type"]]
        print(
            f"note: too few images ({stats['images']}) to train the {stats['index_type']} "
            f"index (it needs {needed:,}); searching them exactly ({built}) until there are "
            "enough (the library switches by itself)"
        )


def _warn_failures(report: AddReport) -> None:
    """Name every image that could not be added, as extract and recognize name each file
    they skip: past the first 10, the rest were only counted, so which images the library
    lacks could not be told."""
    for path, reason in report.failures:
        print(f"warning: could not add {path}: {reason}", file=sys.stderr)
    if len(report.failures) > COUNTED_FAILURES:
        print(f"warning: {len(report.failures)} images could not be added", file=sys.stderr)


def run_build(args: argparse.Namespace) -> int:
    given = {"uri": args.milvus_uri, "collection": args.milvus_collection}
    milvus = {name: value for name, value in given.items() if value is not None}
    if args.backend != "milvus":  # else refused as faiss options it never named
        flags = [MILVUS_FLAGS[name] for name in milvus]
        flags += ["--replace-collection"] if args.replace_collection else []
        if flags:
            raise GalleryError(f"{' and '.join(flags)}: only with --backend milvus")
    Manifest.check_backend_options("milvus", milvus, MILVUS_FLAGS)  # named as typed
    sources = [*args.sources, *args.gallery]
    if not sources:
        raise DataError(
            "index build: nothing to embed; give the gallery: label files or folder-per-label "
            "trees (shitu index build my_products/ --out my_gallery)"
        )
    search_options = _search_options(args, args.index_type)
    place = folder_place(args.out)  # where a link given as --out points
    if occupied(place):  # an empty folder made for it is filled
        library = (place / LIBRARY_FILE).is_file()  # else `index add` would refuse it too
        out = shlex.quote(str(args.out))  # a command to copy: a path with spaces quoted
        add = f" or add to it with `shitu index add {out} ...`" if library else ""
        raise GalleryError(
            f"{args.out}: already exists and is not an empty folder; choose a new --out{add}"
        )
    refuse_owned_output(place.parent, f"--out {args.out}", "the library", GalleryError)
    # A build that fails or is stopped leaves no library, nor the folders made for it
    with removed_if_left_empty(place.parent):
        check_writable(place.parent, f"--out {args.out}")
        items = collect_items(sources, label=args.label, leaf_labels=args.leaf_labels)
        warn_of_labels_apart_by_case(args.out, (item.label for item in items))
        model = _load_model(args)
        options = milvus | search_options
        try:
            report = Gallery.build(
                args.out,
                model,
                items,
                batch_size=args.batch_size,
                progress=progress_wanted(args),
                allow_duplicates=args.allow_duplicates,
                metric=args.metric,
                index_type=args.index_type,
                backend=args.backend,
                backend_options=options,
                replace_collection=args.replace_collection,
            )
        except NothingAddedError as exc:  # status 1, as `index add` and `recognize`
            _warn_failures(exc.report)
            print(f"error: {exc}", file=sys.stderr)
            return 1
    with Catalog(args.out) as catalog:
        _report(report, args.out, catalog.stats())
    return 0


def _refuse_a_library_given_last(args: argparse.Namespace, given: list, command: str) -> None:
    """Refuse `shitu index COMMAND IMAGES LIB`, the library given after the images: the
    images were said not to be a library, or the library not to be images, neither naming
    the way out, the order."""
    if (Path(args.library) / LIBRARY_FILE).is_file():
        return
    library = next((path for path in given if (Path(path) / LIBRARY_FILE).is_file()), None)
    if library is not None:
        others = [args.library, *(path for path in given if path is not library)]
        order = " ".join(shlex.quote(str(path)) for path in (library, *others))
        raise GalleryError(
            f"{args.library}: not a gallery library, and {library} is one: the library comes "
            f"first, `shitu index {command} {order}` (and the options as before)"
        )


def run_add(args: argparse.Namespace) -> int:
    _refuse_a_library_given_last(args, args.sources, "add")
    items = collect_items(args.sources, label=args.label, leaf_labels=args.leaf_labels)
    model = _load_model(args)
    with _open_for(args, model) as gallery:
        report = _add_in_parts(args, gallery, model, items)
        stats = gallery.stats()
        # Adding a moved photo folder again finds its photos in the library: the way to
        # say where they are now is reembed's --moved (a stat per image, only then)
        gone = _files_gone(gallery) if report.duplicates else []
    _report(report, args.library, stats)
    if gone:  # with this add's model, which is the library's: it opened for it
        model_flags = f" --model {shlex.quote(str(args.model))}" if args.model else ""
        model_flags += f" --precision {args.precision}" if args.precision else ""
        print(
            f"note: the files of {count_of(len(gone), 'image')} of the library are gone from "
            f"where they were added from, {gone_from(gone)}; if they moved, `shitu index "
            f"reembed {shlex.quote(str(args.library))} --moved OLD NEW{model_flags}` records "
            "where they are now",
            file=sys.stderr,
        )
    return 1 if report.failures and not len(report.ids) else 0  # nothing could be added


def _add_in_parts(
    args: argparse.Namespace, gallery: Gallery, model: Embedder, items: list[GalleryItem]
) -> AddReport:
    """`items` embedded and added ADD_PART at a time, each part one write, under one
    progress bar and reported as one add; stopped (Ctrl-C, an error), it says what the
    parts written keep and how to add the rest."""
    from shitu.progress import ImageProgress

    checked = gallery.check_files(items, args.allow_duplicates, progress_wanted(args))
    report = checked.report()
    files = checked.files
    # Of the labels that will be given: a photo the library has under another label keeps
    # it, and a label none of whose photos is added does not come to be
    labels = (item.label for item, _ in files)
    warn_of_labels_apart_by_case(args.library, labels, gallery.label_counts())
    images_before = _images_on_disk(args.library) if args.allow_duplicates else 0
    try:
        # No bar where nothing is to be embedded (all duplicates), as one write draws none
        with ImageProgress(len(files), progress_wanted(args) and bool(files), "embedding") as bar:
            for start in range(0, len(files), ADD_PART):
                part = files[start : start + ADD_PART]
                written = gallery.add_checked_files(
                    model, part, args.batch_size, bar, args.allow_duplicates
                )
                report.include(written)
    except BaseException:
        added = _added_before_the_stop(args, gallery, files, images_before, len(report.ids))
        if added:
            _say_what_is_kept(args, added, len(files))
        raise
    return report


def _added_before_the_stop(
    args: argparse.Namespace,
    gallery: Gallery,
    files: list[tuple[GalleryItem, str]],
    images_before: int,
    reported: int,
) -> int:
    """How many of `files` a stopped add wrote. A stop after a write's commit but before
    its report (while the index takes the rows in: a second for a part on HNSW) leaves
    that part out of the reports, so they are counted in the library: by their content,
    new to it in an add that skips duplicates; with --allow-duplicates, by how much the
    library grew (another process adding meanwhile would be counted too)."""
    try:
        if args.allow_duplicates:
            return _images_on_disk(args.library) - images_before
        return len(gallery.stored_hashes([digest for _, digest in files]))
    except Exception:  # what stopped the add may keep the library from being read
        return reported


def _images_on_disk(library: Path) -> int:
    """Images the library has committed, read from its database (not this process's copy)."""
    with Catalog(library) as catalog:
        return int(catalog.stats()["images"])


def _say_what_is_kept(args: argparse.Namespace, added: int, total: int) -> None:
    """On stderr, before the command's `interrupted` or `error:` line."""
    if args.allow_duplicates:
        again = (
            "the same command again would add them a second time (--allow-duplicates): give "
            f"it the rest only (`shitu index list {shlex.quote(str(args.library))} --images` "
            "lists the library's images)"
        )
    else:
        again = "the same command again adds the rest (it skips the images the library has)"
    print(
        f"note: {added} of the {count_of(total, 'image')} to add were added to {args.library} "
        f"before the add stopped, and are kept; {again}",
        file=sys.stderr,
    )


def run_remove(args: argparse.Namespace) -> int:
    if not args.ids and not args.labels and not args.missing:
        raise GalleryError("remove: give --id, --label and/or --missing")
    if args.force and not args.missing:
        raise GalleryError("remove: --force is only for --missing")
    with Gallery.open(args.library) as gallery:
        entries = gallery.entries() if args.missing else []
        gone = [e for e in entries if file_gone(e)]
        if gone and not args.force:
            fingerprint = gallery.manifest.model_fingerprint
            _refuse_if_a_whole_source_is_gone(args.library, entries, gone, fingerprint)
        ids = list(args.ids) + [e.id for e in gone]  # an id given twice is removed once
        if not ids and not args.labels:
            # Images added as vectors have no file, so 'every file is there' said too much
            print(f"removed no images from {args.library}: no image's file is gone")
            return 0
        removed = gallery.remove(ids=ids, labels=args.labels)
    print(f"removed {count_of(len(removed), 'image')} from {args.library}")
    if gone:  # an unmounted disk's, say: seen now, they can be added again
        print(f"the files that were gone were in {gone_from(gone)}")
    return 0


def _files_gone(gallery: Gallery) -> list[ImageEntry]:
    """The library's images whose files are gone (moved or deleted since they were added)."""
    return [e for e in gallery.entries() if file_gone(e)]


def _refuse_if_a_whole_source_is_gone(
    library: Path, entries: list[ImageEntry], gone: list[ImageEntry], fingerprint: str
) -> None:
    """A GalleryError, before anything is removed, where the `gone` files look unplugged
    rather than deleted: a folder they were added from is not there at all, or every file
    of the library is gone. A disk not mounted made `--missing` remove all its images,
    each to be embedded again once it was back. The reembed it offers takes the --model of
    the library's `fingerprint`, none for the shipped model's."""
    from shitu.inference import default_model_fingerprint

    folders = {Path(e.path).parent for e in gone}
    roots = sorted({root for folder in folders if (root := _gone_root(folder)) is not None})
    if roots:
        shown = first_few(roots, SHOWN_FILES)
        held = sum(1 for e in gone if any(Path(e.path).is_relative_to(r) for r in roots))
        where = f"the files of {count_of(held, 'image')} were"
        what = (
            f"the folder {shown}, where {where}, is not there"
            if len(roots) == 1
            else f"the folders {shown}, where {where}, are not there"
        )
        moved = f"--moved {shlex.quote(str(roots[0]))} NEW"
    elif len(gone) == sum(1 for e in entries if e.path):
        what = (
            f"every file its images were added from is gone ({count_of(len(gone), 'image')}), "
            f"from {gone_from(gone)}"
        )
        moved = "--moved OLD NEW"
    else:
        return
    if fingerprint == default_model_fingerprint():  # "--model MODEL" was no way on
        model = "` (no --model: the library's is the model shipped with shitu)"
    else:
        model = " --model MODEL` (MODEL the library's model)"
    raise GalleryError(
        f"remove --missing: {what} (a disk not mounted, or a folder moved or renamed?); "
        "nothing was removed. Once the disk is mounted they are found again; for a folder "
        f"that moved, `shitu index reembed {shlex.quote(str(library))} {moved}{model} "
        "records where its files are now; to remove the images whose files are gone all the "
        "same, add --force"
    )


def _gone_root(folder: Path) -> Path | None:
    """The outermost of `folder` and the folders above it that is not there (a disk's
    folder, unmounted), None where `folder` is there."""
    if folder.is_dir():
        return None
    while folder.parent != folder and not folder.parent.is_dir():
        folder = folder.parent
    return folder


def run_relabel(args: argparse.Namespace) -> int:
    with Gallery.open(args.library) as gallery:
        before = gallery.manifest.generation
        count = gallery.relabel(args.old, args.new, merge=args.merge)
        unchanged = gallery.manifest.generation == before
        if not unchanged:  # renamed onto another label's spelling in another case
            warn_of_labels_apart_by_case(args.library, [args.new.strip()], gallery.label_counts())
    if unchanged:
        print(f"'{args.new.strip()}' is already the label of {count_of(count, 'image')}: no change")
    else:
        print(f"relabelled {count_of(count, 'image')}: '{args.old}' -> '{args.new.strip()}'")
    return 0


def run_list(args: argparse.Namespace) -> int:
    with Catalog(args.library) as catalog:  # no index loaded: fast on a big library
        counts = catalog.label_counts()
        if not counts and args.label is None:  # all removed: the listing was no output at all
            print(f"note: {args.library} holds no images", file=sys.stderr)
        if args.label is None and not args.images:
            for label, count in counts.items():
                if args.format == "jsonl":
                    print(json.dumps({"label": label, "images": count}, ensure_ascii=False))
                else:
                    print(f"{count:>8}  {label}")
            return 0
        entries = catalog.entries(args.label)
        if args.label is not None and not entries:  # as remove and relabel say
            hint = did_you_mean(args.label, list(counts))
            raise GalleryError(f"{args.library}: no images labelled '{args.label}'{hint}")
        for entry in entries:
            if args.format == "jsonl":
                row = {
                    "id": entry.id,
                    "label": entry.label,
                    "path": entry.path,
                    "added_at": entry.added_at,
                }
                print(json.dumps(row, ensure_ascii=False))
            else:
                path = table_field(entry.path)  # a label is one line of text
                print(f"{entry.id}\t{entry.label}\t{path}\t{entry.added_at}")
    return 0


def run_stats(args: argparse.Namespace) -> int:
    with Catalog(args.library) as catalog:
        # Its path as typed (`Äpfel`), as `list --format jsonl` prints text: not `\u00c4pfel`
        print(json.dumps(catalog.stats(), indent=2, ensure_ascii=False))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    """Exit 1 with the problems for a library that is damaged, also one too damaged to
    open (a lost or corrupt index file); 2 where there is no library, or where another
    process keeps it from being checked (no problem found: it was not looked at)."""
    try:
        gallery = Gallery.open(args.library)
    except LibraryBusyError:
        raise
    except GalleryError as exc:
        if not (args.library / LIBRARY_FILE).is_file():
            raise
        problems, counted = [str(exc)], ""
    else:
        with gallery:
            problems = gallery.verify()
            counted = f" ({count_of(len(gallery), 'image')})"
            gone = _files_gone(gallery)
        if gone:  # the library is whole without their files, but cannot re-embed them
            print(
                f"note: the files of {count_of(len(gone), 'image')} are gone from where they "
                f"were added from, {gone_from(gone)} (moved, deleted, or on a disk not "
                f"mounted): `shitu index reembed` refuses to run "
                f"until `shitu index remove {shlex.quote(str(args.library))} --missing` removes "
                "them, or, for a folder that moved, is told where it is now (`--moved OLD NEW`)",
                file=sys.stderr,
            )
    for problem in problems:
        print(f"problem: {problem}")
    print(f"{args.library}: {'FAILED' if problems else 'OK'}{counted}")
    return 1 if problems else 0


def run_reembed(args: argparse.Namespace) -> int:
    model = _load_model(args)
    with Gallery.open(args.library) as gallery:
        before = gallery.manifest.model_fingerprint
        count = gallery.reembed(
            model, args.batch_size, progress=progress_wanted(args), moved=args.moved
        )
    print(f"re-embedded {count_of(count, 'image')} with model {model.fingerprint}")
    if before != model.fingerprint:  # easily unmeant: a reembed for --moved without --model
        # The model by its flag: "searched with it" read as the model it held before.
        given = (
            "no --model (the model shipped with shitu)"
            if args.model is None
            else f"--model {args.model}"
        )
        if args.precision:  # int8 features answer to that precision alone
            given += f" --precision {args.precision}"
        print(
            f"note: the library held model {before}'s features; search it with {given} from now on",
            file=sys.stderr,
        )
    return 0


def run_rebuild(args: argparse.Namespace) -> int:
    with Gallery.open(args.library, repair=True) as gallery:  # also mends a lost index file
        options = _search_options(args, args.index_type or gallery.manifest.index_type)
        changed = args.index_type not in (None, gallery.manifest.index_type) or options
        dropped: dict[str, Any] = {}
        if not gallery.repaired or changed:
            dropped = gallery.rebuild(args.index_type, **options)
        stats = gallery.stats()
    print(f"rebuilt {args.library}: {count_of(stats['images'], 'image')}, {stats['index_type']}")
    if dropped:  # set for the type it was, they would be kept unread
        settings = ", ".join(f"{name} {value}" for name, value in dropped.items())
        print(
            f"note: dropped the settings {stats['index_type']} does not read: {settings}",
            file=sys.stderr,
        )
    _note_untrained(stats)
    return 0


def _check_min_score(score: float | None, gallery: Gallery) -> None:
    """A GalleryError for a --min-score beyond -1 to 1 where the library's scores are
    cosine similarities (it normalises): every image was 'no match' (or no hit dropped),
    without a word, before any image was embedded."""
    if score is not None and gallery.manifest.normalize and not -1 <= score <= 1:
        passing = "no hit" if score > 1 else "every hit"
        raise GalleryError(
            f"--min-score {score}: the scores of {gallery.root} are cosine similarities, from "
            f"-1 to 1, so {passing} would pass it"
        )


def run_search(args: argparse.Namespace) -> int:
    _refuse_a_library_given_last(args, args.images, "search")
    model = _load_model(args)
    images, folder = expand_images(args.images, {"an exported model": "--model"})
    progress = progress_wanted(args) and (folder or len(images) > 1)  # as `shitu recognize`
    with _open_for(args, model) as gallery:
        _check_min_score(args.min_score, gallery)
        warn_if_empty(gallery, "no match can be found")
        extraction = model.extract_files([str(p) for p in images], args.batch_size, progress)
        # An image the model gives NaN or inf is named, as an unreadable one: the search
        # refused them all, naming a row of the images read
        usable = finite_rows(extraction.features)
        paths = [path for path, ok in zip(extraction.paths, usable, strict=True) if ok]
        # at most as wide as the gallery: a huge -k allocates nothing
        result = gallery.search(extraction.features[usable], args.k, min_score=args.min_score)
    for path, reason in extraction.failures:
        print(
            f"warning: could not read {path}: {skip_reason(reason, 'index search', path)}",
            file=sys.stderr,
        )
    for path, ok in zip(extraction.paths, usable, strict=True):
        if not ok:
            print(f"warning: could not search {path}: {NOT_FINITE}", file=sys.stderr)
    for path, hits in zip(paths, result.to_list(), strict=True):
        if args.format == "jsonl":
            print(json.dumps({"image": str(path), "results": hits}, ensure_ascii=False))
        else:
            shown = [f"{h['label']} ({h['score']:.3f}, id {h['image_id']})" for h in hits]
            print(f"{table_field(str(path))}\t{'; '.join(shown) or 'no match'}")
    return 0 if paths else 1  # no query could be read (or searched): fail, like recognize
