"""The manifest: what a library's vectors mean (model, dimension, metric) and where its index is.

It is stored as one JSON document inside the library's SQLite file, so it commits in the
same transaction as the image rows it describes: there is no moment at which the rows and
the manifest (index file name, checksum, generation) disagree.
"""

from __future__ import annotations

import json
import numbers
import re
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, get_origin, get_type_hints

from shitu.errors import GalleryError, did_you_mean
from shitu.values import is_whole_number

FORMAT_VERSION = 1
METRICS = ("ip", "l2")
INDEX_TYPES = ("Flat", "HNSW32", "IVF", "IVFPQ")
BACKENDS = ("faiss", "milvus")
# Backend options that count something (lists, probes, search depth): 0 or less breaks search.
COUNT_OPTIONS = ("nlist", "nprobe", "ef_search")
# The largest count Faiss and Milvus take: they keep these as 32-bit integers (a larger
# nprobe failed every IVF search inside Faiss, a larger ef_search found fewer hits).
LARGEST_COUNT = 2**31 - 1
# The options each backend reads, and what they hold: counts (above) or text.
BACKEND_OPTIONS = {
    "faiss": ("ef_search", "nprobe"),
    "milvus": ("ef_search", "nprobe", "nlist", "uri", "collection"),
}
# The index types that read each setting: a rebuild to another type drops it (stored, it
# would be carried along unread, and come back into force on a rebuild to its type).
TYPED_OPTIONS = {"nprobe": ("IVF", "IVFPQ"), "nlist": ("IVF", "IVFPQ"), "ef_search": ("HNSW32",)}

# Where a library's vectors are kept: chosen when it is made (rebuild takes the others).
LOCATION_OPTIONS = ("uri", "collection")
# A Milvus server's rule for collection names; Milvus Lite also takes others (hyphens, spaces),
# which a server then refuses, so a library could not move from one to the other.
MILVUS_COLLECTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")


def unread_options(index_type: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of `options` that `index_type` never reads (an IVF `nprobe` on Flat);
    those TYPED_OPTIONS does not tie to types are read by every type."""
    return {
        name: value
        for name, value in options.items()
        if index_type not in TYPED_OPTIONS.get(name, (index_type,))
    }


def given_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of `options` that are given: one set to None is left out, as a flag
    not typed is (its default; in a rebuild, the value stored). Kept as null, Faiss failed
    on it after the write that stored it, and on every opening of the library since."""
    return {name: value for name, value in options.items() if value is not None}


class ModelMismatchError(GalleryError):
    """A library opened with another model's (or precision's) features than built it;
    `library_fingerprint` is the fingerprint of the model that built it."""

    def __init__(self, message: str, library_fingerprint: str) -> None:
        super().__init__(message)
        self.library_fingerprint = library_fingerprint


# Added to a ModelMismatchError where no model was named and the shipped one was used: the
# usual cause is a library built with `--model EXPORT`, then searched without it.
SHIPPED_MODEL_NOTE = (
    "no --model (model= in Python) was given, so this model is the one shipped with shitu; "
    "pass the --model export that built the library"
)
# Added where a --model was given but the library was built with the shipped model: the
# fingerprints alone do not tell that the way out is to give none.
SHIPPED_LIBRARY_NOTE = (
    "the library was built with the model shipped with shitu: give no --model (model= in Python)"
)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class Manifest:
    """Everything needed to interpret and check a library; `index_state` belongs to the backend."""

    embedding_dim: int
    model_fingerprint: str
    preprocessing: dict[str, Any] = field(default_factory=dict)
    metric: str = "ip"
    normalize: bool = True
    backend: str = "faiss"
    index_type: str = "Flat"
    backend_options: dict[str, Any] = field(default_factory=dict)
    generation: int = 0
    index_state: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    created_at: str = field(default_factory=now)
    updated_at: str = field(default_factory=now)

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise GalleryError(f"unknown metric '{self.metric}': choose one of {METRICS}")
        self.check_index_type(self.index_type)
        if self.backend not in BACKENDS:
            raise GalleryError(f"unknown backend '{self.backend}': choose one of {BACKENDS}")
        dim = self.embedding_dim
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
            raise GalleryError(f"embedding_dim must be a positive integer, got {dim!r}")
        self.embedding_dim = int(dim)  # a numpy integer, say, as JSON can store it
        # A null stored by an earlier shitu, which took None for a setting: its default
        self.backend_options = given_options(self.backend_options)
        if not isinstance(self.normalize, bool):  # "no" was stored, and normalised as true
            raise GalleryError(f"normalize must be True or False, got {self.normalize!r}")
        for key in COUNT_OPTIONS:
            value = self.backend_options.get(key)
            if key in self.backend_options and (type(value) is not int or value < 1):
                raise GalleryError(f"index option {key} must be a whole number >= 1, got {value!r}")

    @staticmethod
    def check_backend_options(
        backend: str, options: dict[str, Any], flags: Mapping[str, str] | None = None
    ) -> None:
        """Refuse options `backend` does not read (a misspelt one would be ignored), values
        of the wrong type and counts beyond LARGEST_COUNT (the rest of their checks are the
        manifest's). `flags` names options as the caller's user gave them (`collection`:
        `--milvus-collection`), for the errors to name what was typed."""
        valid = BACKEND_OPTIONS.get(backend, ())
        for name, value in options.items():
            if name not in valid:
                raise GalleryError(
                    f"unknown {backend} index option '{name}'"
                    f"{did_you_mean(str(name), list(valid))}: valid options are "
                    f"{', '.join(valid)}"
                )
            given = (flags or {}).get(name, f"index option {name}")
            if name in COUNT_OPTIONS and is_whole_number(value) and value > LARGEST_COUNT:
                raise GalleryError(f"{given} must be at most {LARGEST_COUNT}, got {value}")
            if name not in COUNT_OPTIONS and (not isinstance(value, str) or not value):
                raise GalleryError(f"{given} must be a non-empty string, got {value!r}")
            if name == "uri" and "://" not in value and not value.endswith(".db"):
                raise GalleryError(  # else refused after the library is made, by Milvus
                    f"{given} must be a server's http://host:port or a Milvus Lite "
                    f"file ending in .db, got {value!r}"
                )
            if name == "collection" and not MILVUS_COLLECTION_NAME.fullmatch(value):
                raise GalleryError(  # else refused by a server, or named `cannot be read`
                    f"{given} must be a letter or underscore followed by "
                    f"letters, digits and underscores, at most 255 in all, got {value!r}"
                )

    @staticmethod
    def check_index_type(index_type: str) -> None:
        """Refuse an index type no backend builds."""
        if index_type not in INDEX_TYPES:
            raise GalleryError(f"unknown index type '{index_type}': choose one of {INDEX_TYPES}")

    @staticmethod
    def check_typed_options(
        index_type: str, options: Mapping[str, Any], flags: Mapping[str, str] | None = None
    ) -> None:
        """Refuse a setting `index_type` never reads (an IVF `nprobe` on a Flat index): it
        would be stored and ignored. `flags` names the options, `index_type` among them, as
        the caller's user gave them (`nprobe`: `--nprobe`)."""
        named = flags or {}
        for name in unread_options(index_type, options):
            given = named.get(name, f"index option {name}")
            raise GalleryError(
                f"{given}: only with {named.get('index_type', 'index_type')} "
                f"{' or '.join(TYPED_OPTIONS[name])} (not {index_type})"
            )

    def to_json(self) -> str:
        """The manifest as the library stores it."""
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str) -> Manifest:
        """Parse `to_json`'s text; a GalleryError naming `source` for another format version,
        unknown or missing keys, or a value out of place (a damaged manifest failed on a
        TypeError or AttributeError, or was refused without naming the library)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise GalleryError(f"{source}: manifest is not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise GalleryError(f"{source}: manifest is not a JSON object: {text:.80}")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise GalleryError(
                f"{source}: library format version {version} is not supported "
                f"(this shitu reads version {FORMAT_VERSION})"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise GalleryError(f"{source}: manifest has unknown keys {unknown}")
        # Those with defaults are taken as their defaults where absent
        missing = [
            f.name
            for f in fields(cls)
            if f.default is MISSING and f.default_factory is MISSING and f.name not in data
        ]
        if missing:
            raise GalleryError(f"{source}: manifest lacks the keys {missing} (a damaged library)")
        hints = get_type_hints(cls)  # JSON's types: str, int, bool, dict
        for name, value in data.items():
            expected = get_origin(hints[name]) or hints[name]
            # a bool is an int to isinstance: a flag stored for a count, or a count for a flag
            if not isinstance(value, expected) or (type(value) is bool) != (expected is bool):
                raise GalleryError(
                    f"{source}: manifest: {name} is {value!r}, not {expected.__name__} "
                    "(a damaged library)"
                )
        try:
            return cls(**data)
        except GalleryError as exc:
            raise GalleryError(f"{source}: manifest: {exc}") from None

    def check_model(self, fingerprint: str, embedding_dim: int, source: str) -> None:
        """Refuse vectors from another model: mixing embedding spaces gives silent garbage.
        Said for an add or a re-embed as for a search: 'use', not 'search with', the model."""
        if embedding_dim != self.embedding_dim:
            raise ModelMismatchError(
                f"{source}: library holds {self.embedding_dim}-d features of model "
                f"{self.model_fingerprint} but this model, {fingerprint}, gives "
                f"{embedding_dim}-d; use the model that built it, or re-embed with "
                f"`shitu index reembed {source} --model ...`",
                self.model_fingerprint,
            )
        if fingerprint != self.model_fingerprint:
            raise ModelMismatchError(
                f"{source}: library was built with model {self.model_fingerprint} but this model "
                f"is {fingerprint} (another model, or another --precision); use the model "
                f"and precision that built it, or re-embed with `shitu index reembed "
                f"{source} --model ...`",
                self.model_fingerprint,
            )
