"""A folder per class: `root/<class name>/**/image.jpg`."""

from __future__ import annotations

import os

from shitu.data.datasets.base import Entry, ImageDataset, TransformOps, check_root
from shitu.errors import DataError
from shitu.registry import DATASETS

IMAGE_EXTENSIONS = [".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"]


@DATASETS.register("ImageFolderDataset")
class ImageFolderDataset(ImageDataset):
    """Every subfolder of `root` is a class (sorted names -> ids 0..C-1), its images the samples.

    Images are found recursively inside each class folder, in sorted order;
    files with other extensions are ignored. Unique ids are the sample indices.
    """

    def __init__(
        self,
        root: str,
        transform_ops: TransformOps | None = None,
        extensions: list[str] | None = None,
        skip_corrupt: bool = False,
    ):
        where = f"image folder {root}"
        super().__init__(transform_ops, skip_corrupt, where)
        self.root = root
        check_root(root, where, key="root")
        allowed = tuple(ext.lower() for ext in (extensions or IMAGE_EXTENSIONS))
        self.class_names = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not self.class_names:
            raise DataError(f"{where}: has no class subfolders (expected root/<class>/<image>)")
        self.num_classes = len(self.class_names)
        entries: list[Entry] = []
        for label, name in enumerate(self.class_names):
            for folder, subfolders, files in os.walk(os.path.join(root, name), followlinks=True):
                subfolders.sort()
                for file in sorted(files):
                    if file.lower().endswith(allowed):
                        path = os.path.join(folder, file)
                        entries.append(Entry(path, label, len(entries), path))
        if not entries:
            raise DataError(f"{where}: no images with extensions {', '.join(allowed)}")
        self._set_entries(entries)
