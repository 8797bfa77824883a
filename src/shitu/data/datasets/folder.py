"""A folder per class: `root/<class name>/**/image.jpg`."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, ClassVar

from shitu.data.datasets.base import Entry, ImageDataset, TransformOps, check_root
from shitu.errors import DataError
from shitu.fileio import RUN_LOCK
from shitu.image_files import (
    IMAGE_SUFFIXES,
    foreign_kind,
    scan_images,
    warn_if_grouped,
    warn_of_shared_folder_names,
)
from shitu.registry import DATASETS, ConfigPath

logger = logging.getLogger(__name__)
# A file suffix as `extensions` takes one, `.jpg` or `jpg`: no glob pattern or path.
_SUFFIX = re.compile(r"\.*[^\s.*?\[\]/\\]+")


@DATASETS.register("ImageFolderDataset")
class ImageFolderDataset(ImageDataset):
    """Every subfolder of `root` is a class (sorted names -> ids 0..C-1), its images the samples.

    Images are found recursively inside each class folder, in sorted order, by the scan
    every command uses (`shitu.image_files`): files with other extensions are left out with
    a warning, hidden folders are not classes. `extensions` (e.g. `[.jpg, .png]`) replaces
    the default image types. `leaf_labels` makes each image's class the folder it is in,
    for trees grouped by category (`Fruit/Apple/Golden-Delicious/`), as `shitu index build
    --leaf-labels` labels a gallery; without it such a tree is warned of. Unique ids are
    the sample indices.
    """

    # A label file's settings, left in a config whose dataset was swapped for this one
    _LISTING = (
        "a label file's setting, which a folder of class folders does not take (it reads "
        "root alone): remove it, or set it null where the dataset's name was overridden"
    )
    unknown_key_notes: ClassVar[dict[str, str]] = {
        "image_root": _LISTING,
        "cls_label_path": _LISTING,
    }

    def __init__(
        self,
        root: ConfigPath,
        transform_ops: TransformOps | None = None,
        extensions: list[str] | None = None,
        skip_corrupt: bool = False,
        leaf_labels: bool = False,
    ):
        where = f"image folder {root}"
        super().__init__(transform_ops, skip_corrupt, where)
        self.root = root
        self.check_params(extensions=extensions)
        check_root(root, where, key="root")
        suffixes = {"." + ext.lower().lstrip(".") for ext in extensions or IMAGE_SUFFIXES}
        # A gallery library in the tree (one may lie inside the folder it was built from,
        # `shitu index build photos/ --out photos/lib`) is skipped, as `index build` skips
        # it, rather than taken for a class of the images it keeps (those `shitu serve`
        # adds, in its `uploads` folder), which the class count then asked to be trained on.
        # Imported here: the index package is not loaded for training otherwise.
        from shitu.index.labels import gallery_libraries

        libraries = gallery_libraries()
        owner = foreign_kind(Path(root), libraries)  # `shitu index build --out`'s, given
        if owner is not None:
            raise DataError(
                f"{where}: {owner}, not a folder of class folders of photos; give the "
                "folder of photos it was built from (root/<class>/<image>)"
            )
        self.class_names = sorted(
            e.name
            for e in os.scandir(root)
            if e.is_dir()
            and not e.name.startswith(".")
            and foreign_kind(Path(e.path), libraries) is None
        )
        if not self.class_names:
            raise DataError(f"{where}: has no class subfolders (expected root/<class>/<image>)")
        runs = [name for name in self.class_names if (Path(root) / name / RUN_LOCK).exists()]
        if runs:  # `shitu train` refuses such an output_dir; an earlier run, detect-train's
            raise DataError(
                f"{where}: folder(s) {', '.join(runs)} hold a shitu training run's files "
                f"({RUN_LOCK}), not a class's images; move them out of {root}"
            )
        images = scan_images(Path(root), suffixes, loose=False, foreign=libraries)
        if leaf_labels:
            warn_of_shared_folder_names(Path(root), {image.parent for image in images})
            self.class_names = sorted({image.parent.name for image in images})
        else:
            warn_if_grouped(Path(root), images, "set `leaf_labels: true` in its dataset config")
        self.label_keys = self.class_names
        self.num_classes = len(self.class_names)
        ids = {name: label for label, name in enumerate(self.class_names)}
        entries: list[Entry] = []
        for image in images:
            path = str(image)
            name = image.parent.name if leaf_labels else image.relative_to(root).parts[0]
            entries.append(Entry(path, ids[name], len(entries), path))
        self._set_entries(entries)
        # Still classes (ids follow the folder names), so a head sized to the folders with
        # photos is refused as too small: say which ones have none.
        empty = sorted(set(self.class_names) - {self.class_names[e.label] for e in entries})
        if empty:
            shown = ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else "")
            logger.warning(
                "%s: no images in class folder(s) %s, which count as classes all the same",
                where,
                shown,
            )

    @staticmethod
    def check_params(extensions: list[str] | None = None, **_others: Any) -> None:
        """Also checked as a config loads (by the registry): the text "jpg", given in
        Python, was taken letter by letter (.j .p .g), and an empty suffix ('' or '.') or
        a pattern (`*.jpg`, a suffix is compared as it is) matches no file: no images were
        found, the warning saying why only in passing."""
        if isinstance(extensions, str) or not all(
            isinstance(ext, str) and _SUFFIX.fullmatch(ext) for ext in extensions or ()
        ):
            raise ValueError(
                f"extensions: expected a list of file suffixes, such as ['.jpg', '.png'], got "
                f"{extensions!r}"
            )
