"""`shitu extract`: image files or folders -> L2-normalised features (.npy) + their paths."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

from shitu.cli.common import (
    add_progress_argument,
    add_runtime_arguments,
    count_of,
    expand_images,
    output_path,
    positive_int,
    progress_wanted,
    refuse_owned_output,
    skip_reason,
    thread_count,
)
from shitu.errors import DataError
from shitu.fileio import (
    check_writable,
    folder_place,
    held_lock,
    name_within,
    remove_unfinished_writes,
    removed_if_left_empty,
    write_atomically,
    write_failure_reason,
)
from shitu.inference.choices import DEVICES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "extract",
        help="embed images with an exported model (features .npy + paths .txt)",
        description=(
            "Embed image files (folders are searched recursively for image files; a warning "
            "counts the other files, hidden files and sidecars such as .txt are left out "
            "quietly) "
            "with a `shitu export` folder. Writes PREFIX.npy (float32 [N, D], L2-normalised "
            "rows) and PREFIX.txt (the N embedded paths, one per line, same order, in the bytes "
            "the file system names them with). "
            "Unreadable files are reported on stderr and skipped."
        ),
    )
    parser.add_argument("inputs", nargs="+", metavar="IMAGES_OR_FOLDER")
    parser.add_argument(
        "--model", help="folder written by `shitu export` (default: the model shipped with shitu)"
    )
    parser.add_argument(
        "--out",
        type=_output_prefix,
        required=True,
        help="output prefix: writes PREFIX.npy, .txt (feats or feats.npy), replacing an earlier "
        "run's pair (one of the two alone is refused)",
    )
    add_runtime_arguments(parser, gpu=True)
    parser.set_defaults(runtime="auto", precision="fp32")
    parser.add_argument(
        "--device",
        default="cpu",
        choices=DEVICES,
        help="cpu (default); cuda, or gpu as in Global.device: a GPU, through onnxruntime's "
        "CUDA provider or torch (--precision fp16 and bf16 need it); auto: a GPU where torch "
        "sees one",
    )
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per model call")
    parser.add_argument(
        "--threads", type=thread_count, help="CPU threads for the model (default: the runtime's)"
    )
    add_progress_argument(parser)
    parser.set_defaults(func=run)


def _output_prefix(text: str) -> str:
    """--out as typed, a trailing / included (which `run` refuses as a folder); '' (`"$FEATS"`
    of an unset variable) is refused as `output_path` refuses it: it was said to name a
    folder, `--out : names a folder`."""
    output_path(text)
    return text


def run(args: argparse.Namespace) -> int:
    files, _ = expand_images(args.inputs, {"an exported model": "--model"})
    # Found in a folder of thousands, the file must be named for the user to rename it. A
    # lone \r ends a line too where the list is read as text (Python's universal newlines,
    # splitlines): every later path would be paired with the features of the one before.
    broken = next((f for f in files if "\n" in str(f) or "\r" in str(f)), None)
    if broken is not None:
        raise DataError(
            f"{str(broken)!r}: its name holds a line break, which the paths list (one path "
            "a line) cannot hold; rename the file or leave it out"
        )
    out = Path(args.out)
    if out.suffix.lower() in (".npy", ".txt"):  # a file name given for the prefix
        out = out.with_suffix("")
    targets = [out.parent / f"{out.name}{suffix}" for suffix in (".npy", ".txt")]
    if not out.name or any(target.is_dir() for target in targets):  # now, not after embedding
        raise DataError(f"--out {args.out}: names a folder; give a file prefix such as feats")
    # `--out feats/`: the files would go beside the folder, not into it (one not yet made
    # would never be: feats.npy and feats.txt would be written for it)
    if Path(args.out).is_dir() or args.out.endswith(("/", os.sep)):
        raise DataError(
            f"--out {args.out}: names a folder; give a file prefix in it, such as {out / 'feats'}"
        )
    _refuse_replacing_a_lone_file(targets, args.out)
    folders = [out.parent]  # the lock's, and each file's: written where a link there points
    for target in targets:  # one in a loop is refused now
        try:
            folders.append(folder_place(target).parent)
        except OSError as exc:
            raise DataError(f"--out {args.out}: {target}: {exc.strerror}") from None
    with contextlib.ExitStack() as made:  # made, then nothing written: removed
        for folder in dict.fromkeys(folders):
            refuse_owned_output(folder, f"--out {args.out}", "the features", DataError)
            made.enter_context(removed_if_left_empty(folder))
            check_writable(folder, f"--out {args.out}")
        with _sole_writer_of(out, args.out):
            # What a run killed outright while writing left (hidden temporary files, as
            # large as its features): no other extract writes them while this one holds
            # the output's lock.
            remove_unfinished_writes(out.parent, [target.name for target in targets])
            return _embed_and_write(args, files, out, targets)


def _refuse_replacing_a_lone_file(targets: list[Path], given: str) -> None:
    """A DataError where one of PREFIX.npy and PREFIX.txt exists without the other: an
    earlier run's output is a pair, and a lone file is someone's own (`--out train` in a
    dataset folder replaced its label list, train.txt, with the embedded paths)."""
    there = [target for target in targets if target.exists()]  # a link: where it points
    if len(there) == 1:
        (lone,) = there
        (other,) = [target for target in targets if target != lone]
        raise DataError(
            f"--out {given}: {lone} exists without {other} beside it, so it is no earlier "
            "output of extract, and this run would replace it; give another --out, or move "
            "it away"
        )


@contextlib.contextmanager
def _sole_writer_of(out: Path, given: str) -> Iterator[None]:
    """Hold `.PREFIX.extract.lock` beside the output (`held_lock`) until the output is
    written: another `shitu extract` to the same prefix meanwhile is refused, naming this
    one's process. Each replaces PREFIX.txt, then PREFIX.npy: two at once could leave one's
    features beside the other's paths. The lock file is removed at the end."""
    path = out.parent / f".{name_within(out.name, 14)}.extract.lock"

    def refused(holder: str) -> DataError:
        return DataError(
            f"--out {given}: another {holder or 'shitu extract'} is writing {out}.npy and "
            f"{out}.txt; wait for it to end, or give another --out"
        )

    with held_lock(path, f"shitu extract (process {os.getpid()})", refused):
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # while held: the next run locks a new file


def _embed_and_write(
    args: argparse.Namespace, files: list[Path], out: Path, targets: list[Path]
) -> int:
    import numpy as np

    from shitu.inference import FeatureExtractor, default_model_dir

    extractor = FeatureExtractor.load(
        args.model or default_model_dir(),
        args.runtime,
        args.threads,
        device=args.device,
        precision=args.precision,
    )
    start = time.perf_counter()
    result = extractor.extract_files(
        files, batch_size=args.batch_size, progress=progress_wanted(args)
    )
    seconds = time.perf_counter() - start
    for path, reason in result.failures:
        print(f"warning: skipped {path}: {skip_reason(reason, 'extract', path)}", file=sys.stderr)
    if not result.paths:  # exit 1 like recognize and index search: the run produced nothing
        which = "the only file" if len(files) == 1 else f"none of the {len(files)} files"
        print(f"error: {which} could not be read, nothing written", file=sys.stderr)
        return 1

    # The names as the file system has them: one that is not UTF-8 (a Latin-1 name from an
    # old archive, say) has no text form, and is still a file the list must name.
    names = b"".join(os.fsencode(path) + b"\n" for path in result.paths)

    def save_features_then_names(tmp: Path) -> None:
        with tmp.open("wb") as handle:  # a file name would get a second .npy appended
            # By the handle's writes, not numpy's own (it writes to a file object with C's
            # fwrite): one refused says why, not numpy's "N requested and M written"
            np.lib.format.write_array(SimpleNamespace(write=handle.write), result.features)
        # Replaced while the new features wait to replace theirs: a write that fails (a
        # full disk) leaves the previous pair, not new features beside the old paths.
        write_atomically(targets[1], lambda names_tmp: names_tmp.write_bytes(names))

    try:
        write_atomically(targets[0], save_features_then_names)
    except OSError as exc:  # "File too large", with no file named
        raise DataError(
            f"cannot write {targets[0]} and {targets[1]}: {write_failure_reason(exc)}; "
            "neither was changed"
        ) from None
    rate = len(result.paths) / seconds if seconds > 0 else 0.0
    skipped = len(result.failures)  # each named in a warning above; none is no news
    print(
        f"embedded {count_of(len(result.paths), 'image')} ({extractor.embedding_size}-d, "
        f"{extractor.backend.name} {args.precision}, {rate:.1f} images/s) -> {out}.npy, "
        f"{out}.txt" + (f"; skipped {count_of(skipped, 'unreadable file')}" if skipped else "")
    )
    return 0
