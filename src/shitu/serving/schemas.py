"""Request and response bodies of the HTTP API (they also make the OpenAPI document)."""

from __future__ import annotations

from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    # strict: JSON's own types only; lax, `"merge": "yes"` (or 1, "on") merged two labels.
    model_config = ConfigDict(extra="forbid", strict=True)


# --------------------------------------------------------------------------- JSON uploads
BASE64_HELP = (
    "base64 of the image file (line breaks allowed), or a data URL (data:image/jpeg;base64,...)"
)


class RecognizeJSON(_Body):
    image: str = Field(description=BASE64_HELP)


class ExtractJSON(_Body):
    image: str | None = Field(default=None, description=BASE64_HELP)
    images: list[str] | None = Field(default=None, description="several images, " + BASE64_HELP)


class AddImagesJSON(ExtractJSON):
    label: str = Field(description="the label every image gets")


class RenameLabel(_Body):
    label: str = Field(description="the new label (one that has images: only with merge)")
    merge: bool = Field(
        False,
        description="whether a new label that has images takes this one's (the two cannot be "
        "told apart afterwards); false: 409 instead, as `shitu index relabel` without --merge",
    )


class RebuildRequest(_Body):
    index_type: str | None = Field(
        None, description="rebuild as this type (Flat, HNSW32, IVF, IVFPQ); null: keep it"
    )


# --------------------------------------------------------------------------- responses
class RecognitionOut(BaseModel):
    bbox: list[int] = Field(description="x1, y1, x2, y2 in image pixels")
    label: str
    score: float = Field(description="cosine similarity to the best gallery image")
    image_id: int = Field(description="that gallery image's id")


class RecognizeResponse(BaseModel):
    results: list[RecognitionOut] = Field(description="recognised objects, best first")


class ExtractResponse(BaseModel):
    model: str = Field(description="fingerprint of the embedding model")
    dim: int
    embeddings: list[list[float]] = Field(description="one L2-normalised vector per image")


class ImageOut(BaseModel):
    id: int
    label: str
    name: str = Field(description="file name of the stored image")
    added_at: str
    thumbnail: str | None = Field(
        description="path of a small JPEG of the image (under --root-path, behind a proxy); "
        "null where the server has no file of it (added as a vector, or its file deleted)"
    )


class LabelOut(BaseModel):
    label: str
    count: int


class LabelsResponse(BaseModel):
    images: int
    labels: list[LabelOut]


class LabelImagesResponse(BaseModel):
    label: str
    count: int = Field(description="images with this label (all, not only this page)")
    offset: int
    remaining: int = Field(description="images of the label after this page")
    images: list[ImageOut]


class StoredElsewhereOut(BaseModel):
    name: str = Field(description="the upload's name")
    image_id: int = Field(description="the gallery image that has its content")
    label: str = Field(description="that image's label, which it keeps")


class AddImagesResponse(BaseModel):
    label: str
    added: list[ImageOut]
    duplicates: list[str] = Field(description="uploads skipped: the library already has them")
    elsewhere: list[StoredElsewhereOut] = Field(
        description="those of the duplicates that the library has under another label (to "
        "give one this label, delete that image, then add the upload again)"
    )


class RemovedResponse(BaseModel):
    removed: list[int] = Field(description="ids of the removed images")


class RenamedResponse(BaseModel):
    old: str
    new: str
    count: int = Field(description="images relabelled")


class GalleryInfo(BaseModel):
    images: int
    labels: int
    model_fingerprint: str
    embedding_dim: int
    metric: str
    backend: str
    index_type: str
    generation: int
    updated_at: str | None = None

    @classmethod
    def of(cls, stats: dict[str, Any]) -> Self:
        return cls.model_validate({k: v for k, v in stats.items() if k in cls.model_fields})


class RebuildResponse(GalleryInfo):
    dropped_settings: dict[str, int] = Field(
        default_factory=dict,
        description="the stored search settings the new index type does not read, dropped "
        '(an IVF library\'s {"nprobe": 8} on a rebuild as HNSW32); empty where none was',
    )


class Limits(BaseModel):
    """What one request may hold (clients such as the web page split larger uploads)."""

    max_upload_bytes: int = Field(description="the largest request body, in bytes")
    max_upload_mb: float = Field(description="the same limit in MB, as the server was given it")
    max_images_per_request: int = Field(description="images one add or extract may send")
    max_megapixels: float = Field(description="the largest image")
    max_megapixels_per_request: float = Field(
        description="what the images of one request may hold together: 4 times the largest "
        "image, or the server's limit on decoded pixels in flight where that is smaller"
    )


class Health(BaseModel):
    status: str
    images: int
    model: str
    limits: Limits


class ErrorOut(BaseModel):
    detail: str
