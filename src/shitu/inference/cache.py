"""The ONNX model of a compact export, rebuilt once into the user cache.

A compact export (float16 weights, no ONNX file) is how a model ships inside a package at
half the size; onnxruntime is the fast CPU path, so the first load builds the full export
from it, keyed by fingerprint, and later loads reuse it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from shitu.errors import CheckpointError, ShituError
from shitu.fileio import file_sha256, remove_dead_staging
from shitu.inference.manifest import MANIFEST, ExportError, read_manifest
from shitu.inference.preprocess import Preprocessing

logger = logging.getLogger(__name__)


def cache_root() -> Path:
    """$SHITU_CACHE_DIR, else $XDG_CACHE_HOME/shitu, else ~/.cache/shitu. A leading ~ in
    either is the home folder, as torch and Hugging Face read theirs: a Dockerfile's ENV, a
    systemd unit or a quoted shell value leave it unexpanded, which made a folder named ~
    in the current one."""
    if os.environ.get("SHITU_CACHE_DIR"):
        return Path(os.environ["SHITU_CACHE_DIR"]).expanduser()
    home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(home).expanduser() / "shitu"


# What a cached export must share with its compact source. The fingerprint covers all of
# it, but a manifest's fingerprint is only checked when its entry is built: keying on the
# recorded settings too means a hand-edited arch gets an entry (and a check) of its own
# instead of the unedited model's ONNX.
SAME_MODEL = ("fingerprint", "arch", "output_key", "preprocessing")


# A cache entry that no load has used for this many days is removed when another entry is
# built: each is a model's worth of files (32 MB for the shipped model's ONNX model and
# weights), one per compact model loaded on an ONNX runtime (the shipped model of each
# shitu release among them): without this the cache only grew.
UNUSED_DAYS = 30


def _cache_key(manifest: dict[str, Any]) -> str:
    same = {key: manifest[key] for key in SAME_MODEL}
    return hashlib.sha256(json.dumps(same, sort_keys=True).encode()).hexdigest()[:24]


def _usable(target: Path, manifest: dict[str, Any]) -> bool:
    """A cache entry of this very model, with every file as its manifest records."""
    try:
        cached = read_manifest(target)
    except CheckpointError:
        return False
    if any(cached.get(key) != manifest[key] for key in SAME_MODEL):
        return False
    files = cached.get("files", {})
    return bool(files) and all(
        (target / name).is_file() and file_sha256(target / name) == digest
        for name, digest in files.items()
    )


def _discard_without_manifest(entry: Path) -> None:
    """Remove what is left of a cache entry that lost its manifest: no export to replace,
    it would block the rebuild for good. An entry with one is replaced in one step by the
    rebuild instead, as another process may be loading it (or have just built it)."""
    if (entry / MANIFEST).is_file():
        return
    try:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    except FileNotFoundError:  # none, or another process removed it first
        pass


def _mark_used(entry: Path) -> None:
    """Record a use of a cache entry, in its manifest's time (`_remove_unused` reads it); a
    cache this process cannot write still serves."""
    with contextlib.suppress(OSError):
        os.utime(entry / MANIFEST)


def _remove_unused(exports: Path, keep: Path) -> None:
    """Remove the cache entries but `keep` that no load has used for UNUSED_DAYS, by their
    manifest's time. Staging folders (dot names) are remove_dead_staging's; an entry
    without a manifest, or that cannot be removed here (another user's), stays."""
    cutoff = time.time() - UNUSED_DAYS * 86_400
    try:
        entries = [e for e in exports.iterdir() if e != keep and not e.name.startswith(".")]
    except OSError:  # no cache yet
        return
    for entry in entries:
        try:
            if not entry.is_symlink() and (entry / MANIFEST).stat().st_mtime < cutoff:
                shutil.rmtree(entry)
        except OSError:
            continue


def full_export(model_dir: Path, manifest: dict[str, Any]) -> Path:
    """The cached full export (ONNX included) of compact export `model_dir`, built on first
    use, and built again if damaged; an ExportError, naming the cache, when it cannot be
    built there (the caller decides whether the torch backend serves instead)."""
    target = cache_root() / "exports" / _cache_key(manifest)
    # killed builds of any entry: otherwise removed only by a later build of that entry,
    # which a cache hit never makes
    remove_dead_staging(target.parent, doing="exporting")
    if (target / MANIFEST).is_file():
        _mark_used(target)  # before it is read: another process's build prunes by it
        if _usable(target, manifest):
            return target
    from shitu.inference.export import load_exported_model, write_export  # torch: built once

    logger.info("building the ONNX model of %s into %s (once)", model_dir, target)
    _remove_unused(target.parent, target)  # before the build: it may need their space
    model = load_exported_model(model_dir, manifest)
    try:
        _discard_without_manifest(target)
        write_export(
            model,
            manifest["arch"],
            manifest["output_key"],
            Preprocessing.from_dict(manifest["preprocessing"]),
            target,
            source=str(model_dir),
            format_version=manifest.get("format_version", 1),  # the same kind of fingerprint
        )
    except (OSError, ShituError) as exc:  # write_export names most failures in its errors
        raise ExportError(
            f"cannot build the ONNX model of {model_dir} into the cache ({exc}; "
            "SHITU_CACHE_DIR names another cache folder)"
        ) from None
    return target
