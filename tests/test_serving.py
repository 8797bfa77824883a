"""`shitu serve` over real HTTP: a server process on a loopback port, the demo library, the
endpoints, their errors, the API key, metrics, and concurrent recognition and additions.

The tests share the module's server and run in file order: the listing test sees the library
as built, the later ones see the edits made before them."""

from __future__ import annotations

import asyncio
import base64
import codecs
import gzip
import hashlib
import io
import ipaddress
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import unicodedata
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import cv2
import httpx
import numpy as np
import pytest
from PIL import Image

from shitu.cli.main import main as shitu_main
from shitu.errors import ConfigError, DataError, GalleryError
from shitu.index import Gallery, collect_items, metadata
from shitu.inference.preprocess import read_rgb
from shitu.pipeline import Recognizer, load_pipeline_config
from shitu.serving import library as library_module
from shitu.serving.errors import BadRequest, Conflict, NotFound, ServiceUnavailable
from shitu.serving.http import PixelBudget, too_large
from shitu.serving.images import thumbnail_jpeg
from shitu.serving.library import SharedLibrary, Snapshot
from shitu.serving.service import RecognitionService
from shitu.serving.settings import ServeSettings
from tests.fifo_helpers import returns_beside_fifo
from tests.index_helpers import PixelEmbedder, make_images, other_process_holding
from tests.serving_helpers import STARTUP_S, DemoLibrary, PrefixProxy, ServerProcess

KEY = "test-key-0123"
WRITE = {"X-API-Key": KEY}
MAX_UPLOAD_MB = 2
MAX_MEGAPIXELS = 4


@pytest.fixture(scope="module")
def server(serving_library, tmp_path_factory):
    """One server for the module: API key from the environment, small upload limits."""
    process = ServerProcess(
        serving_library,
        tmp_path_factory.mktemp("server"),
        "--max-upload-mb", str(MAX_UPLOAD_MB), "--max-megapixels", str(MAX_MEGAPIXELS),
        env={"SHITU_API_KEY": KEY},
    )  # fmt: skip
    yield process
    process.stop()


@pytest.fixture(scope="module")
def reference(serving_library):
    """The pipeline in this process, configured as the server is: what it must answer."""
    config = load_pipeline_config(
        None,
        [
            f"IndexProcess.index_dir={serving_library.gallery}",
            f"Global.rec_inference_model_dir={serving_library.model}",
            "Global.det_inference_model_dir=plain-background",
        ],
    )
    with Recognizer.from_config(config) as recognizer:
        yield recognizer


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield http


def photo(path: Path) -> tuple[str, bytes, str]:
    return (path.name, path.read_bytes(), "image/jpeg")


def png_bytes(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def form_body(path: Path) -> bytes:
    """A whole multipart/form-data body (boundary `b`) that sends `path` as the image."""
    head = (
        f'--b\r\nContent-Disposition: form-data; name="image"; filename="{path.name}"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    )
    return head.encode() + path.read_bytes() + b"\r\n--b--\r\n"


def shelf(serving_library: DemoLibrary, number: int = 0) -> tuple[Path, list[str]]:
    return serving_library.demo.shelves[number]


# ------------------------------------------------------------------------------ inference


def test_recognize_matches_the_pipeline_and_finds_every_product(serving_library, reference, client):
    path, products = shelf(serving_library)
    expected = [r.to_dict() for r in reference.recognize(read_rgb(path))]

    uploaded = client.post("/v1/recognize", files={"image": photo(path)})
    assert uploaded.status_code == 200, uploaded.text
    assert uploaded.json() == {"results": expected}
    assert sorted(r["label"] for r in expected) == sorted(products)

    encoded = base64.b64encode(path.read_bytes()).decode()
    wrapped = base64.encodebytes(path.read_bytes()).decode()  # as `base64 FILE`: 76 a line
    data_urls = (f"data:image/jpeg;base64,{encoded}", f"data:image/jpeg;BASE64,{encoded}")
    for text in (encoded, *data_urls, wrapped):  # RFC 2397's "base64" in any case
        as_json = client.post("/v1/recognize", json={"image": text})
        assert as_json.status_code == 200, as_json.text
        assert as_json.json() == {"results": expected}

    # as Python's json reads it, and FastAPI's other routes: PowerShell writes UTF-8 with a BOM
    document = json.dumps({"image": encoded})
    for body in (codecs.BOM_UTF8 + document.encode(), document.encode("utf-16")):
        as_json = client.post(
            "/v1/recognize", content=body, headers={"content-type": "application/json"}
        )
        assert as_json.status_code == 200, as_json.text
        assert as_json.json() == {"results": expected}


def test_extract_returns_the_models_normalised_embeddings(serving_library, reference, client):
    paths = [item for item, _ in serving_library.queries()[:3]]
    extractor = reference.extractor
    expected = extractor.extract_files([str(p) for p in paths]).features

    response = client.post("/v1/extract", files=[("image", photo(p)) for p in paths])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == extractor.fingerprint and body["dim"] == extractor.embedding_size
    vectors = np.asarray(body["embeddings"], np.float32)
    assert vectors.shape == expected.shape
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors, expected, atol=1e-5)

    one = client.post(
        "/v1/extract", json={"images": [base64.b64encode(paths[1].read_bytes()).decode()]}
    )
    assert one.status_code == 200
    np.testing.assert_allclose(one.json()["embeddings"], expected[1:2], atol=1e-5)


# ------------------------------------------------------------------------------ gallery


def test_gallery_listing_matches_the_library(serving_library, client):
    labels = client.get("/v1/gallery/labels").json()
    truth = Counter(label for _, label in serving_library.gallery_items())
    assert {row["label"]: row["count"] for row in labels["labels"]} == dict(truth)
    info = client.get("/v1/gallery").json()
    assert info["images"] == labels["images"] == sum(truth.values())
    assert info["labels"] == len(truth) and info["index_type"] == "Flat"

    page = client.get("/v1/gallery/labels/Lemon Soda", params={"offset": 1, "limit": 1}).json()
    assert page["count"] == 3 and page["offset"] == 1 and len(page["images"]) == 1
    assert page["remaining"] == 1
    image = page["images"][0]
    assert image["name"] == "lemon_soda_1.jpg"
    # The next page by the last id seen: one removed before it would move one out of reach.
    rest = client.get("/v1/gallery/labels/Lemon Soda", params={"after": image["id"]}).json()
    assert [i["name"] for i in rest["images"]] == ["lemon_soda_2.jpg"] and rest["remaining"] == 0
    assert client.get(f"/v1/gallery/images/{image['id']}").json() == image

    thumb = client.get(image["thumbnail"], params={"size": 64})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(thumb.content)) as small:
        assert max(small.size) == 64


def decomposed(label: str) -> str:
    """As macOS file names give it (NFD)."""
    return unicodedata.normalize("NFD", label)


def test_add_rename_remove_and_rebuild(serving_library, server, client):
    """The whole editing cycle; labels with spaces and slashes; files kept and cleaned up.
    Labels are answered as stored: trimmed, and NFC where a client sends NFD (macOS)."""
    query, true_label = serving_library.queries()[0]
    # already in the library, under another label: a duplicate, named with that label
    repeat, repeat_label = serving_library.gallery_items()[0]
    (blocks,) = make_images(server.work / "blocks", 1)  # no plain background: matched whole
    added = client.post(
        "/v1/gallery/images",
        data={"label": decomposed("  Mystère Snack ")},
        files=[
            ("image", photo(query)),
            ("image", photo(repeat)),
            ("image", photo(query)),
            ("image", (blocks.name, blocks.read_bytes(), "image/png")),
        ],
        headers=WRITE,
    )
    assert added.status_code == 201, added.text
    body = added.json()
    assert body["label"] == body["added"][0]["label"] == "Mystère Snack" and len(body["added"]) == 2
    assert body["duplicates"] == [repeat.name, query.name]
    ((name, stored_id, stored_label),) = [tuple(other.values()) for other in body["elsewhere"]]
    assert (name, stored_label) == (repeat.name, repeat_label)
    assert client.get(f"/v1/gallery/images/{stored_id}").json()["label"] == repeat_label
    new_id, blocks_id = (image["id"] for image in body["added"])
    # nothing created: 200, not 201, with every upload listed as a duplicate
    again = client.post(
        "/v1/gallery/images",
        data={"label": "Mystère Snack"},
        files=[("image", photo(query)), ("image", photo(repeat))],
        headers=WRITE,
    )
    assert again.status_code == 200, again.text
    assert again.json()["added"] == [] and again.json()["duplicates"] == [query.name, repeat.name]
    assert [other["name"] for other in again.json()["elsewhere"]] == [repeat.name]
    stored = server.gallery / "uploads" / body["added"][0]["name"]
    assert stored.read_bytes() == query.read_bytes()

    # The new image is searchable at once: its own bytes match it exactly.
    found = client.post(
        "/v1/recognize", files={"image": (blocks.name, blocks.read_bytes(), "image/png")}
    )
    (hit,) = found.json()["results"]
    assert hit["label"] == "Mystère Snack" and hit["image_id"] == blocks_id
    assert hit["score"] == pytest.approx(1.0, abs=1e-4)
    assert client.delete(f"/v1/gallery/images/{blocks_id}", headers=WRITE).status_code == 200

    listed = client.get("/v1/gallery/label", params={"label": decomposed("Mystère Snack")})
    assert listed.json()["label"] == "Mystère Snack"
    new = decomposed("Snacks/Mystère 2")
    renamed = client.patch(
        "/v1/gallery/label", params={"label": decomposed("Mystère Snack")}, json={"label": new},
        headers=WRITE,
    )  # fmt: skip
    assert renamed.json() == {"old": "Mystère Snack", "new": "Snacks/Mystère 2", "count": 1}
    assert client.get("/v1/gallery/labels/Mystère Snack").status_code == 404
    listed = client.get("/v1/gallery/labels/Snacks%2FMyst%C3%A8re%202").json()
    assert [image["id"] for image in listed["images"]] == [new_id]

    # as `shitu index relabel` without --merge: not asked to merge, the labels stay apart
    for not_asked in ({"label": true_label}, {"label": true_label, "merge": False}):
        kept_apart = client.patch(
            "/v1/gallery/labels/Snacks/Mystère 2", json=not_asked, headers=WRITE
        )
        assert kept_apart.status_code == 409
        assert kept_apart.json()["detail"] == (
            f"label '{true_label}' already has images: renaming 'Snacks/Mystère 2' onto it "
            "would merge the two (send merge: true to merge them)"
        )
        assert client.get("/v1/gallery/labels/Snacks/Mystère 2").json()["count"] == 1
    merged = client.patch(
        "/v1/gallery/labels/Snacks/Mystère 2",
        json={"label": true_label, "merge": True},
        headers=WRITE,
    )
    assert merged.status_code == 200
    assert client.get(f"/v1/gallery/labels/{true_label}").json()["count"] == 4

    assert client.delete(f"/v1/gallery/images/{new_id}", headers=WRITE).json() == {
        "removed": [new_id]
    }
    assert not stored.exists()
    assert client.get(f"/v1/gallery/images/{new_id}/thumbnail").status_code == 404
    assert client.delete(f"/v1/gallery/images/{new_id}", headers=WRITE).status_code == 404

    gone = client.delete("/v1/gallery/labels/Tomato Soup", headers=WRITE)
    assert gone.status_code == 200 and len(gone.json()["removed"]) == 3
    # Files added by other means (the CLI's gallery folder) are not deleted with their rows.
    assert all(
        path.exists() for path, label in serving_library.gallery_items() if label == "Tomato Soup"
    )

    rebuilt = client.post("/v1/gallery/rebuild", json={"index_type": "HNSW32"}, headers=WRITE)
    assert rebuilt.status_code == 200 and rebuilt.json()["index_type"] == "HNSW32"
    assert rebuilt.json()["images"] == 21
    path, products = shelf(serving_library, 1)
    found = client.post("/v1/recognize", files={"image": photo(path)}).json()["results"]
    labels = {r["label"] for r in found}
    assert "Tomato Soup" not in labels and set(products) - {"Tomato Soup"} <= labels

    # What the server wrote is a healthy library another process can open.
    with Gallery.open(server.gallery) as gallery:
        assert gallery.verify() == [] and len(gallery) == 21
        assert (
            gallery.manifest.index_type == "HNSW32" and "Tomato Soup" not in gallery.label_counts()
        )


def test_edits_by_another_process_show_up_while_serving(serving_library, server, client):
    """`shitu index relabel` on the served library, in this process: the server loads the
    new generation by itself (it looks at most once a second), searches and listings alike."""
    label = next(label for _, label in serving_library.gallery_items() if label != "Tomato Soup")

    def relabel_and_wait(old: str, new: str) -> None:
        assert shitu_main(["index", "relabel", str(server.gallery), old, new]) == 0
        deadline = time.monotonic() + 15
        while client.get(f"/v1/gallery/labels/{new}").status_code != 200:
            assert time.monotonic() < deadline, f"the server never showed {new!r}"
            time.sleep(0.2)
        assert client.get(f"/v1/gallery/labels/{old}").status_code == 404

    relabel_and_wait(label, "Renamed elsewhere")
    query = next(path for path, truth in serving_library.queries() if truth == label)
    found = client.post("/v1/recognize", files={"image": photo(query)}).json()["results"]
    assert found and found[0]["label"] == "Renamed elsewhere"
    relabel_and_wait("Renamed elsewhere", label)  # as the later tests expect it


def test_a_library_built_again_at_its_path_is_served_without_a_restart(serving_library, tmp_path):
    """`rm -r LIB` and `shitu index build ... --out LIB` beside a running server: it serves the
    new library (it answered from the deleted one until restarted). Edits meanwhile are
    refused (503) before they write anything: an add made the library's folder again for
    its upload, and the build was refused ("already exists")."""
    server = ServerProcess(serving_library, tmp_path)
    try:
        photos = [path for path, _ in serving_library.gallery_items()[:3]]
        listing = tmp_path / "rebuilt.txt"
        listing.write_text("".join(f"{path}\tRebuilt\n" for path in photos))
        shutil.rmtree(server.gallery)
        with httpx.Client(base_url=server.url, timeout=60) as http:
            new_photo = ("new.png", png_bytes(np.full((64, 64, 3), 77, np.uint8)), "image/png")
            added = http.post("/v1/gallery/images", data={"label": "x"}, files={"image": new_photo})
            rebuilt = http.post("/v1/gallery/rebuild")
        for refused in (added, rebuilt):
            assert refused.status_code == 503 and "Retry-After" in refused.headers, refused.text
            assert "edits are refused until one is built there" in refused.json()["detail"]
        assert not server.gallery.exists()
        build = ["index", "build", str(listing), "--out", str(server.gallery)]
        assert shitu_main([*build, "--model", str(serving_library.model)]) == 0
        with httpx.Client(base_url=server.url, timeout=60) as http:
            deadline = time.monotonic() + 15
            while http.get("/v1/gallery/labels/Rebuilt").status_code != 200:
                assert time.monotonic() < deadline, "the server never served the new library"
                time.sleep(0.2)
            assert [
                entry["label"] for entry in http.get("/v1/gallery/labels").json()["labels"]
            ] == ["Rebuilt"]
            found = http.post("/v1/recognize", files={"image": photo(photos[0])}).json()
            assert found["results"][0]["label"] == "Rebuilt"
        assert "was built again since the server opened it: now serving" in server.log.read_text()
    finally:
        server.stop()


def test_health_and_metrics_come_to_count_another_processs_edit(serving_library, tmp_path):
    """/healthz and the /metrics gauges never wait for the library, and answered from what
    was loaded: where no request read the library, a label `shitu index remove` took away
    was counted for good. They now start the check for other processes' writes, and a later
    answer has them."""
    server = ServerProcess(serving_library, tmp_path)
    try:
        with Gallery.open(server.gallery) as gallery:  # another process's write
            gallery.remove(labels=["Lemon Soda"])
            left = len(gallery)
        deadline = time.monotonic() + 30
        with httpx.Client(base_url=server.url, timeout=60) as http:
            while True:
                images = http.get("/healthz").json()["images"]
                scraped = re.search(
                    r"^shitu_gallery_images (\S+)$", http.get("/metrics").text, re.M
                )
                if images == left and float(scraped[1]) == left:
                    break
                assert time.monotonic() < deadline, f"still {images} and {scraped[1]}, not {left}"
                time.sleep(0.2)
    finally:
        server.stop()


def test_a_rebuild_answers_the_settings_the_new_index_type_drops(serving_library, tmp_path):
    """A rebuild as another type drops the stored search settings it does not read (an IVF
    nprobe on HNSW32), as `shitu index rebuild` does with a note: the answer did not say so."""
    server = ServerProcess(serving_library, tmp_path)
    try:
        with Gallery.open(server.gallery) as gallery:  # another process's write: loaded
            gallery.rebuild("IVF", nprobe=4)
        with httpx.Client(base_url=server.url, timeout=60) as http:
            rebuilt = http.post("/v1/gallery/rebuild", json={"index_type": "HNSW32"})
            assert rebuilt.status_code == 200, rebuilt.text
            assert rebuilt.json()["index_type"] == "HNSW32"
            assert rebuilt.json()["dropped_settings"] == {"nprobe": 4}
            again = http.post("/v1/gallery/rebuild")
            assert again.status_code == 200 and again.json()["dropped_settings"] == {}
            spec = http.get("/openapi.json").json()["components"]["schemas"]
            assert "dropped_settings" in spec["RebuildResponse"]["properties"]
        with Gallery.open(server.gallery) as gallery:
            assert gallery.manifest.index_type == "HNSW32"
            assert gallery.manifest.backend_options == {}
    finally:
        server.stop()


# ------------------------------------------------------------------------------ bad input


# The start of an iPhone's HEIC photo: an ISO media file of major brand `heic`.
HEIC_START = b"\0\0\0\x18ftypheic\0\0\0\0mif1heic"


def test_bad_uploads_get_clear_errors(serving_library, client):
    good = serving_library.queries()[0][0]

    ppm = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(ppm, "PPM")
    ppm = ppm.getvalue()
    float_tiff = cv2.imencode(".tiff", np.full((8, 8, 3), 0.5, np.float32))[1].tobytes()

    def add_labelled(label: str) -> httpx.Response:
        files = {"image": photo(good)}
        return client.post("/v1/gallery/images", data={"label": label}, files=files, headers=WRITE)

    cases = {
        "corrupt": (
            client.post(
                "/v1/recognize", files={"image": ("x.jpg", b"not an image at all", "image/jpeg")}
            ),
            400,
            "not an image file",
        ),
        "truncated": (
            client.post(
                "/v1/recognize", files={"image": ("t.jpg", good.read_bytes()[:2000], "image/jpeg")}
            ),
            400,
            "corrupt JPEG image",
        ),
        "empty": (
            client.post("/v1/recognize", files={"image": ("e.jpg", b"", "image/jpeg")}),
            400,
            "empty",
        ),
        # one of the dozens Pillow reads: it was kept as an `.img` file no tool took for an image
        "format": (
            client.post(
                "/v1/recognize", files={"image": ("x.ppm", ppm, "image/x-portable-pixmap")}
            ),
            415,
            "x.ppm: PPM images are not accepted (expected JPEG, PNG, WebP, BMP, TIFF or GIF)",
        ),
        # a TIFF of float32 colour, which Pillow cannot decode: an image all the same
        "pixel format": (
            client.post("/v1/recognize", files={"image": ("f.tif", float_tiff, "image/tiff")}),
            415,
            "f.tif: a TIFF image in a pixel format Pillow cannot decode (unknown pixel mode; "
            "floating-point colour, say): save it with 8-bit samples, as JPEG or PNG",
        ),
        # an iPhone's photo: Pillow cannot read it, but it is an image, and says which
        "heic": (
            client.post(
                "/v1/recognize",
                files={"image": ("IMG_0001.HEIC", HEIC_START + b"\0" * 64, "image/heic")},
            ),
            415,
            "IMG_0001.HEIC: HEIC images are not accepted (expected JPEG, PNG, WebP, BMP, TIFF or "
            "GIF)",
        ),
        "part type": (
            client.post("/v1/recognize", files={"image": ("a.txt", b"hello", "text/plain")}),
            415,
            "the part is text/plain",
        ),
        "body type": (
            client.post(
                "/v1/recognize", content=good.read_bytes(), headers={"content-type": "image/jpeg"}
            ),
            415,
            "unsupported content type 'image/jpeg'",
        ),
        # the part cut short was dropped: "missing field 'image'" (or one image fewer)
        "truncated body": (
            client.post(
                "/v1/recognize",
                content=form_body(good)[: -len(b"\r\n--b--\r\n")],
                headers={"content-type": "multipart/form-data; boundary=b"},
            ),
            400,
            "truncated multipart body: it ends before its closing boundary",
        ),
        "malformed body": (
            client.post(
                "/v1/recognize",
                content=b"not a form",
                headers={"content-type": "multipart/form-data; boundary=b"},
            ),
            400,
            "malformed multipart body: Invalid multipart data.",
        ),
        "no image": (
            client.post("/v1/recognize", files={"other": ("a.jpg", b"1", "image/jpeg")}),
            400,
            "unexpected file field 'other'",
        ),
        # as JSON's extra fields: a parameter the endpoint does not take is not dropped
        "form field": (
            client.post("/v1/recognize", data={"k": "3"}, files={"image": photo(good)}),
            400,
            "unexpected field 'k': the form takes 'image'",
        ),
        # read as it came: "Invalid JSON: expected value at line 1 column 1"
        "gzipped json": (
            client.post(
                "/v1/recognize",
                content=gzip.compress(json.dumps({"image": "abc"}).encode()),
                headers={"content-type": "application/json", "content-encoding": "gzip"},
            ),
            415,
            "the request body is compressed (gzip, its Content-Encoding), which this server "
            "does not take: send it uncompressed",
        ),
        # a valid body: not "malformed multipart body: Too many fields. Maximum number ..."
        "many fields": (
            client.post(
                "/v1/recognize",
                data={f"k{n}": "3" for n in range(20)},
                files={"image": photo(good)},
            ),
            400,
            "too many form fields sent (over 16); the form takes 'image'",
        ),
        "two labels": (
            client.post(
                "/v1/gallery/images",
                data={"label": ["Lemon Soda", "Other"]},
                files={"image": photo(good)},
                headers=WRITE,
            ),
            400,
            "field 'label' is given more than once",
        ),
        "misspelt label": (
            client.post(
                "/v1/gallery/images",
                data={"lable": "x"},
                files={"image": photo(good)},
                headers=WRITE,
            ),
            400,
            "unexpected field 'lable': the form takes 'image', 'label'",
        ),
        # read as Latin-1: a GBK label was stored garbled ("¿ÉÀÖ" for "可乐")
        "label encoding": (
            client.post(
                "/v1/gallery/images",
                files={"label": (None, "可乐".encode("gbk")), "image": photo(good)},
                headers=WRITE,
            ),
            400,
            "field 'label' is not UTF-8 text: send text fields as UTF-8",
        ),
        "text image": (
            client.post("/v1/recognize", files={"image": (None, "abc")}),
            400,
            "field 'image' must be a file upload",
        ),
        # a photo's bytes as a text field (curl -F image=<photo.jpg): not "not UTF-8 text"
        "photo as text": (
            client.post("/v1/recognize", files={"image": (None, good.read_bytes())}),
            400,
            "field 'image' must be a file upload, not text (curl: -F image=@photo.jpg)",
        ),
        "two images": (
            client.post("/v1/recognize", files=[("image", photo(good)), ("image", photo(good))]),
            400,
            "too many images sent; at most 1 per request",
        ),
        "json field": (
            client.post("/v1/recognize", json={"picture": "abc"}),
            400,
            "image: Field required",
        ),
        "base64": (client.post("/v1/recognize", json={"image": "%%%"}), 400, "not valid base64"),
        # as an empty file part: not "missing field 'image'", which it was sent
        "empty base64": (
            client.post("/v1/recognize", json={"image": ""}),
            400,
            "image 1: the upload is empty (0 bytes)",
        ),
        # counted before any is decoded: millions of them in 20 MB took the server seconds
        "json count": (
            client.post("/v1/extract", json={"images": ["%%%"] * 33}),
            400,
            "33 images sent; at most 32 per request",
        ),
        # a JSON body's images may come as 'images', which was left unsaid
        "json no images": (
            client.post("/v1/extract", json={"images": []}),
            400,
            "no image in the request: send 'image', or 'images' with at least one",
        ),
        "json syntax": (
            client.post(
                "/v1/recognize", content=b"{", headers={"content-type": "application/json"}
            ),
            400,
            "invalid JSON body",
        ),
        "no label": (
            client.post("/v1/gallery/images", files={"image": photo(good)}, headers=WRITE),
            400,
            "missing field 'label'",
        ),
        "bad label": (add_labelled("a\tb"), 400, "control characters"),
        # splitlines() breaks label files on a line separator
        "line separator label": (add_labelled("a\u2028b"), 400, "control characters"),
        "index type": (
            client.post("/v1/gallery/rebuild", json={"index_type": "LSH"}, headers=WRITE),
            400,
            "unknown index type 'LSH': choose one of Flat, HNSW32, IVF, IVFPQ",
        ),
        "index type case": (
            client.post("/v1/gallery/rebuild", json={"index_type": "flat"}, headers=WRITE),
            400,
            "unknown index type 'flat' (did you mean 'Flat'?)",
        ),
        # the routes whose body or parameters FastAPI checks answer alike
        "rename field": (
            client.patch("/v1/gallery/labels/Lemon Soda", json={}, headers=WRITE),
            400,
            "invalid JSON body: label: Field required",
        ),
        # a JSON boolean: "yes" (or 1) was taken as true, and merged two labels
        "rename merge": (
            client.patch(
                "/v1/gallery/labels/Lemon Soda", json={"label": "x", "merge": "yes"}, headers=WRITE
            ),
            400,
            "invalid JSON body: merge: Input should be a valid boolean",
        ),
        "rename type": (
            client.patch(
                "/v1/gallery/labels/Lemon Soda",
                content=b"New name",
                headers={**WRITE, "content-type": "text/plain"},
            ),
            415,
            "unsupported content type 'text/plain': send application/json",
        ),
        "rebuild syntax": (
            client.post(
                "/v1/gallery/rebuild",
                content=b"{",
                headers={**WRITE, "content-type": "application/json"},
            ),
            400,
            "invalid JSON body: body: JSON decode error",
        ),
        "path": (
            client.get("/v1/gallery/images/first"),
            400,
            "invalid path: image_id: Input should be a valid integer",
        ),
        "query": (
            client.get("/v1/gallery/labels/Lemon Soda", params={"offset": -1}),
            400,
            "invalid query: offset: Input should be greater than or equal to 0",
        ),
        # FastAPI takes the last: `DELETE ...?label=a&label=b` removed b alone
        "query twice": (
            client.get("/v1/gallery/label", params=[("label", "Lemon Soda"), ("label", "x")]),
            400,
            "invalid query: label: given more than once; send one value",
        ),
        "size twice": (
            client.get("/v1/gallery/images/1/thumbnail", params=[("size", 16), ("size", 32)]),
            400,
            "invalid query: size: given more than once",
        ),
        # FastAPI ignores it: a misspelt `limit` gave the default page as if asked for it
        "unknown query": (
            client.get("/v1/gallery/labels/Lemon Soda", params={"limt": 1}),
            400,
            "invalid query: unexpected parameter 'limt' (this endpoint takes 'after', 'limit', "
            "'offset')",
        ),
        "query on the path's label": (
            client.delete("/v1/gallery/labels/No Such", params={"label": "x"}, headers=WRITE),
            400,
            "unexpected parameter 'label' (this endpoint takes none)",
        ),
        # answered as if the threshold had been set; a form field of that name is refused
        "query on recognize": (
            client.post("/v1/recognize", params={"score_thres": 0.9}, files={"image": photo(good)}),
            400,
            "invalid query: unexpected parameter 'score_thres' (this endpoint takes none)",
        ),
        "query on an add": (
            client.post(
                "/v1/gallery/images",
                params={"label": "x"},
                files={"image": photo(good)},
                headers=WRITE,
            ),
            400,
            "invalid query: unexpected parameter 'label' (this endpoint takes none)",
        ),
    }
    for name, (response, status, message) in cases.items():
        assert response.status_code == status, (name, response.text)
        assert message in response.json()["detail"], (name, response.text)
    whole = client.post(
        "/v1/recognize",
        content=form_body(good),
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    assert whole.status_code == 200, whole.text


def test_json_that_does_not_parse_is_named_once(client):
    """Pydantic's message already holds the reason, which was repeated in parentheses."""
    cases = {
        b"{": "EOF while parsing an object at line 1 column 1",
        b"": "EOF while parsing a value at line 1 column 0",
    }
    for body, reason in cases.items():
        response = client.post(
            "/v1/recognize", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400
        assert response.json() == {"detail": f"invalid JSON body: body: Invalid JSON: {reason}"}


def test_a_json_body_the_framework_cannot_read_is_named_or_counted_as_the_client_leaving(
    server, client
):
    """The routes whose JSON body FastAPI reads (a rename, a rebuild) answered a body that
    is not UTF-8 text, or nests too deeply for Python's parser, with "There was an error
    parsing the body", and counted a client that left before its body came as a 400, an
    error of the request's, where the upload routes count it as 499."""
    cases = {
        b'{"label": "\xff"}': "'utf-8' codec can't decode byte 0xff in position 11",
        b'{"label": ' + b"[" * 100_000 + b"]" * 100_000 + b"}": "maximum recursion depth",
    }
    route = ("PATCH", "/v1/gallery/labels/{label:path}")
    before = requests_counted(client.get("/metrics").text)
    headers = {**WRITE, "content-type": "application/json"}
    for body, reason in cases.items():
        for method, path in (("PATCH", "/v1/gallery/labels/x"), ("POST", "/v1/gallery/rebuild")):
            response = client.request(method, path, content=body, headers=headers)
            assert response.status_code == 400
            assert response.json()["detail"].startswith(f"invalid JSON body: {reason}")

    def counted(status: str) -> float:
        return requests_counted(client.get("/metrics").text).get((*route, status), 0)

    url = httpx.URL(server.url)
    with socket.create_connection((url.host, url.port)) as leaving:
        leaving.sendall(
            f"PATCH /v1/gallery/labels/x HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{".encode()
        )
    deadline = time.monotonic() + 60  # until the server has seen it go
    while counted("499") == before.get((*route, "499"), 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert counted("499") == before.get((*route, "499"), 0) + 1
    assert counted("400") == before.get((*route, "400"), 0) + len(cases)


def test_unknown_labels_and_images_are_404(client):
    for method, path in [
        ("GET", "/v1/gallery/labels/No Such Thing"),
        ("DELETE", "/v1/gallery/labels/No Such Thing"),
        ("GET", "/v1/gallery/images/999999"),
        ("DELETE", "/v1/gallery/images/999999"),
        ("GET", "/v1/gallery/images/999999/thumbnail"),
    ]:
        response = client.request(method, path, headers=WRITE)
        assert response.status_code == 404, (method, path, response.text)
        assert "no gallery image" in response.json()["detail"]
    rename = client.patch("/v1/gallery/labels/No Such Thing", json={"label": "x"}, headers=WRITE)
    assert rename.status_code == 404


AWKWARD_LABELS = [".", "..", "a//b", "../x", "#1", "?", "50% off", "a+b", "/", " é / 食品 "]


def test_every_label_is_reachable_with_the_label_in_the_query(server, client):
    """A URL path cannot carry '.' or '..' (clients resolve them away) nor '//' (proxies merge
    it): /v1/gallery/label?label=NAME reaches every label, to list, rename and remove it."""
    images = make_images(server.work / "awkward", len(AWKWARD_LABELS), seed=41)
    for label, image in zip(AWKWARD_LABELS, images, strict=True):
        files = {"image": (image.name, image.read_bytes(), "image/png")}
        added = client.post("/v1/gallery/images", data={"label": label}, files=files, headers=WRITE)
        assert added.status_code == 201 and added.json()["label"] == label.strip(), added.text
        label = label.strip()
        listed = client.get("/v1/gallery/label", params={"label": label})
        assert listed.status_code == 200, (label, listed.text)
        assert listed.json()["label"] == label and listed.json()["count"] == 1
        renamed = client.patch(
            "/v1/gallery/label", params={"label": label}, json={"label": f"{label}!"}, headers=WRITE
        )
        assert renamed.json() == {"old": label, "new": f"{label}!", "count": 1}, label
        removed = client.delete("/v1/gallery/label", params={"label": f"{label}!"}, headers=WRITE)
        assert len(removed.json()["removed"]) == 1, (label, removed.text)
    assert client.get("/v1/gallery/label", params={"label": "."}).status_code == 404
    assert (
        client.get("/v1/gallery/label").json()["detail"] == "invalid query: label: Field required"
    )


def test_browsers_check_a_kept_thumbnail_against_the_file_it_shows(server, client):
    """Ids start at 1 in every library, so a thumbnail kept for a day showed another library's
    (or an earlier build's) image under this one's id: now the browser asks each time, by
    ETag, and gets 304 while the file is the same, the new picture once it is not."""
    first, second = make_images(server.work / "replaced", 2, seed=53)
    files = {"image": (first.name, first.read_bytes(), "image/png")}
    added = client.post("/v1/gallery/images", data={"label": "T"}, files=files, headers=WRITE)
    (image,) = added.json()["added"]
    thumbnail = f"/v1/gallery/images/{image['id']}/thumbnail"
    try:
        shown = client.get(thumbnail)
        assert shown.headers["cache-control"] == "private, no-cache"
        kept = {"If-None-Match": shown.headers["etag"]}
        same = client.get(thumbnail, headers=kept)
        assert same.status_code == 304 and not same.content
        stored = server.gallery / "uploads" / image["name"]
        stored.write_bytes(second.read_bytes())  # another image where this one's file was
        changed = client.get(thumbnail, headers=kept)
        assert changed.status_code == 200 and changed.content != shown.content
        assert changed.headers["etag"] != shown.headers["etag"]
    finally:
        client.delete(f"/v1/gallery/images/{image['id']}", headers=WRITE).raise_for_status()


def test_a_failure_of_the_server_is_answered_as_json_and_logged(server, client):
    """The server's own failures (here the upload folder turned into a file under it) are
    a 500 with a JSON detail, as every other error (it was plain text); the log has why."""
    (image,) = make_images(server.work / "failing", 1, seed=47)
    uploads, aside = server.gallery / "uploads", server.work / "uploads-aside"
    if uploads.exists():
        uploads.rename(aside)
    uploads.write_text("in the way")
    try:
        files = {"image": (image.name, image.read_bytes(), "image/png")}
        failed = client.post("/v1/gallery/images", data={"label": "F"}, files=files, headers=WRITE)
    finally:
        uploads.unlink()
        if aside.exists():
            aside.rename(uploads)
    assert failed.status_code == 500
    assert failed.json() == {"detail": "the server failed: File exists (its log has the details)"}
    deadline = time.monotonic() + 30  # the traceback is logged once the answer is sent
    while "FileExistsError" not in server.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "FileExistsError" in server.log.read_text()
    assert client.get("/v1/gallery/label", params={"label": "F"}).status_code == 404


def test_size_and_pixel_limits(server, client):
    limit = MAX_UPLOAD_MB << 20
    noise = np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
    big = png_bytes(noise) * 2  # about 6 MB, over the 2 MB limit
    assert len(big) > limit
    # Repeated: a server that closes with the body unread loses a few replies to resets.
    for _ in range(300):
        declared = client.post("/v1/recognize", files={"image": ("big.png", big, "image/png")})
        assert declared.status_code == 413 and "2 MB limit" in declared.json()["detail"]

    def chunks():  # no Content-Length: the server counts what arrives
        boundary = b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        yield boundary + b"Content-Type: image/png\r\n\r\n"
        step = 1 << 16
        for start in range(0, len(big), step):
            yield big[start : start + step]
        yield b"\r\n--b--\r\n"

    chunked = client.post(
        "/v1/recognize",
        content=chunks(),
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    assert chunked.status_code == 413 and "2 MB limit" in chunked.json()["detail"]
    # The same for a JSON body that FastAPI parses itself (it would answer 400).
    padding = b'{"label": "' + b"x" * (limit + 1024) + b'"}'
    chunked_json = client.post(
        "/v1/gallery/rebuild",
        content=(padding[start : start + (1 << 16)] for start in range(0, len(padding), 1 << 16)),
        headers={"content-type": "application/json", **WRITE},
    )
    assert chunked_json.status_code == 413 and "2 MB limit" in chunked_json.json()["detail"]

    # "Expect: 100-continue" (curl, large uploads): refused before any body is sent.
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        head = (
            f"POST /v1/recognize HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {len(big)}\r\nExpect: 100-continue\r\n\r\n"
        )
        connection.sendall(head.encode())
        reply = connection.recv(4096)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:80]

    wide = png_bytes(np.zeros((1000, 4100, 3), np.uint8))  # 4.1 MP, tiny file
    response = client.post("/v1/recognize", files={"image": ("wide.png", wide, "image/png")})
    assert response.status_code == 413
    assert (
        response.json()["detail"]
        == "wide.png: 4100x1000 pixels (4.1 megapixels); the limit is 4 megapixels"
    )
    # Among several files, the one over the limit is named.
    small = png_bytes(np.zeros((100, 100, 3), np.uint8))
    files = [
        ("image", ("small.png", small, "image/png")),
        ("image", ("wide.png", wide, "image/png")),
    ]
    several = client.post("/v1/gallery/images", data={"label": "Wide"}, files=files, headers=WRITE)
    assert several.status_code == 413
    assert several.json()["detail"].startswith("wide.png: 4100x1000 pixels")
    # Each image within the limit, five together over 4 times it (16 megapixels).
    near = png_bytes(np.zeros((1000, 3500, 3), np.uint8))
    files = [("image", (f"near{i}.png", near, "image/png")) for i in range(5)]
    together = client.post("/v1/extract", files=files)
    assert together.status_code == 413
    assert "images hold 17.5 megapixels together; the limit is 16" in together.text
    assert client.post("/v1/extract", files=files[:4]).status_code == 200
    # Refused before routing, each still counted under its route.
    text = client.get("/metrics").text
    assert re.search(
        r'^shitu_http_requests_total\{method="POST",route="/v1/gallery/rebuild",status="413"\} 1',
        text,
        re.M,
    )
    assert re.search(r'route="/v1/recognize",status="413"\} [1-9][0-9]{2}', text)


# ------------------------------------------------------------------------------ access


def test_a_fractional_upload_limit_is_enforced_to_the_byte_and_reported_as_given(
    serving_library, tmp_path
):
    """0.3 MB is 314572.8 bytes: a body of 314572 gets through, one more byte does not, and
    the 413 names the limit the operator gave (not 0.299999 MB, its bytes converted back)."""
    server = ServerProcess(serving_library, tmp_path, "--max-upload-mb", "0.3")
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            for size, status in [(314572, 400), (314573, 413)]:
                body = b'{"image": "' + b"A" * (size - 13) + b'"}'
                assert len(body) == size
                response = http.post(
                    "/v1/extract", content=body, headers={"content-type": "application/json"}
                )
                assert response.status_code == status, (size, response.text)
    finally:
        server.stop()
    assert response.json()["detail"] == "request body is larger than the 0.3 MB limit"


@pytest.mark.parametrize(
    ("limit_mb", "shown"),
    [(5e6, "5000000"), (1e16, "10000000000000000"), (1 / (1 << 20), "0.00000095367431640625")],
)
def test_the_413_limit_is_written_out_in_plain_digits(limit_mb, shown):
    assert str(too_large(limit_mb)) == f"request body is larger than the {shown} MB limit"


@pytest.mark.parametrize(
    "option, value, expected",
    [
        ("--max-upload-mb", "0", "a number of MB above 0 (one byte or more), got 0.0"),
        ("--max-upload-mb", "1e-9", "a number of MB above 0 (one byte or more), got 1e-09"),
        ("--max-upload-mb", "nan", "a number of MB above 0 (one byte or more), got nan"),
        ("--max-upload-mb", "inf", "a number of MB above 0 (one byte or more), got inf"),
        ("--max-megapixels", "-1", "a number of megapixels above 0 (one pixel or more), got -1.0"),
        (
            "--max-megapixels-in-flight",
            "0",
            "a number of megapixels above 0 (one pixel or more), got 0.0",
        ),
        ("--max-batch", "0", "a whole number >= 1, got 0"),
        ("--max-connections", "-5", "a whole number >= 1, got -5"),
        ("--read-timeout", "0", "a number of seconds above 0 (a millisecond or more), got 0.0"),
        ("--root-path", "shitu", "a URL path starting with '/', got shitu"),
        (
            "--host",
            "",
            "a host name or address (127.0.0.1, 0.0.0.0, ::), got an empty one (a variable "
            "that is not set?)",
        ),
        (
            "--allowed-host",
            "https://shop.example/",
            "a host name (shop.example), without a scheme, port or path: 'https://shop.example/'",
        ),
    ],
)
def test_limits_that_let_nothing_through_are_usage_errors(option, value, expected, capsys):
    """Refused before anything loads; 1e-9 MB is under one byte, nan and inf no limit."""
    with pytest.raises(SystemExit) as exit_:
        shitu_main(["serve", "--gallery", "unused", option, value])
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == f"shitu serve: error: argument {option}: expected {expected}"


@pytest.mark.parametrize(
    "options, expected",
    [
        (
            ["--max-megapixels", "150"],
            "--max-megapixels 150 (max_pixels) is over the 100 megapixels shitu decodes; set "
            "SHITU_MAX_MEGAPIXELS to at least that too",
        ),
        (
            ["--max-megapixels-in-flight", "30"],
            "--max-megapixels 50 (max_pixels) is over --max-megapixels-in-flight 30 "
            "(max_pixels_in_flight), which every request's images must fit in: lower the one "
            "or raise the other",
        ),
    ],
)
def test_a_max_megapixels_that_could_never_be_decoded_is_refused_at_start(
    options, expected, monkeypatch, capsys, tmp_path
):
    """Uploads between the limits would pass the server's check and then be refused by the
    decoder as corrupt, or as too many pixels together: the server does not start, and says
    what to set; settings built in Python are refused the same way."""
    monkeypatch.setenv("SHITU_MAX_MEGAPIXELS", "100")
    assert shitu_main(["serve", "--gallery", "unused", *options]) == 2
    assert capsys.readouterr().err == f"error: {expected}\n"
    megapixels = dict(zip(options[::2], map(float, options[1::2]), strict=True))
    with pytest.raises(ConfigError) as refused:
        ServeSettings(
            upload_dir=tmp_path,
            max_pixels=int(megapixels.get("--max-megapixels", 50) * 1e6),
            max_pixels_in_flight=int(megapixels.get("--max-megapixels-in-flight", 400) * 1e6),
        )
    assert str(refused.value) == expected


def shop_library(serving_library: DemoLibrary, shop: Path) -> Path:
    """`shop/gallery`, a folder-per-label tree of some of the demo's gallery photos, and
    the library built from it beside it, `shop/lib` (returned)."""
    for path, label in serving_library.gallery_items()[:6]:
        (shop / "gallery" / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, shop / "gallery" / label)
    library = shop / "lib"
    build = ["index", "build", str(shop / "gallery"), "--out", str(library), "--no-progress"]
    assert shitu_main([*build, "--model", str(serving_library.model)]) == 0
    return library


def test_an_upload_folder_inside_the_gallery_tree_is_refused_at_start(serving_library, tmp_path):
    """Images added over HTTP into a folder of the tree the gallery was built from were
    taken for gallery photos (of a label named after the upload folder) by the next
    `shitu index add` or build of that tree. A folder beside the tree is served."""
    library = shop_library(serving_library, tmp_path / "shop")
    uploads = tmp_path / "shop" / "gallery" / "uploads"
    model = ["--model", str(serving_library.model), "--detector", "plain-background"]
    serve = [sys.executable, "-m", "shitu.cli.main", "serve", "--gallery", str(library), *model]
    # a process: served, it would not return
    refused = subprocess.run(
        [*serve, "--port", "0", "--upload-dir", str(uploads)],
        capture_output=True,
        text=True,
        timeout=STARTUP_S,
    )
    assert refused.returncode == 2 and refused.stderr == (
        f"error: --upload-dir {uploads}: is inside {uploads.parent.resolve()}, which the "
        "gallery's images came from, where adding that folder to the gallery again (`shitu "
        "index add`) would take the images added over HTTP for gallery photos: choose a "
        "folder outside it\n"
    )
    assert not uploads.exists()
    beside = tmp_path / "shop" / "uploads"
    shop = DemoLibrary(serving_library.model, library, serving_library.demo)
    server = ServerProcess(shop, tmp_path / "work", "--upload-dir", str(beside))
    try:
        (path, _label), *_ = serving_library.queries()
        files = {"image": photo(path)}
        added = httpx.post(f"{server.url}/v1/gallery/images", data={"label": "New"}, files=files)
        assert added.status_code == 201, added.text
    finally:
        server.stop()
    assert len(list(beside.iterdir())) == 1


def test_save_vis_beside_a_library_that_holds_uploads_is_not_refused(serving_library, tmp_path):
    """The images `shitu serve` keeps in the library's own folder came from no folder of the
    gallery's: counted as if they had, the folder holding the library and the gallery's
    tree was taken for the tree's root, and --save-vis anywhere in it was refused."""
    library = shop_library(serving_library, tmp_path / "shop")
    config = load_pipeline_config(
        None,
        [
            f"IndexProcess.index_dir={library}",
            f"Global.rec_inference_model_dir={serving_library.model}",
            "Global.det_inference_model_dir=plain-background",
        ],
    )
    (path, _label), *_ = serving_library.queries()
    with RecognitionService(config, ServeSettings(upload_dir=library / "uploads")) as service:
        features = np.stack([f.result() for f in service.extract([read_rgb(path)])])
        assert service.add("New", [("new.jpg", path.read_bytes())], features).added
    vis = tmp_path / "shop" / "vis"
    recognize = ["recognize", str(path), "--gallery", str(library), "--save-vis", str(vis)]
    assert shitu_main([*recognize, "--model", str(serving_library.model), "--no-progress"]) == 0
    assert (vis / path.name).with_suffix(".jpg").is_file()


def answer_once(url: str, status: int) -> httpx.Response:
    """The first answer from `url` with `status`, asked again until it comes (up to a
    minute): what the server has seen of other connections is not known from outside."""
    deadline = time.monotonic() + 60
    while (response := httpx.get(url, timeout=10)).status_code != status:
        assert time.monotonic() < deadline, f"no {status} in 60 s: {response.text}"
        time.sleep(0.05)
    return response


def test_requests_over_the_limit_in_progress_get_a_json_503_with_retry_after(
    serving_library, tmp_path
):
    """Two uploads still being sent fill --max-connections 2: the next request is refused
    as every error is, JSON naming the limit (was uvicorn's text "Service Unavailable"), and
    told when to retry; once they end, requests go through again. Health checks and metrics
    scrapes are answered meanwhile: a liveness probe's 503 had a busy server restarted."""
    server = ServerProcess(serving_library, tmp_path, "--max-connections", "2")
    host, port = httpx.URL(server.url).host, httpx.URL(server.url).port
    stalled = [socket.create_connection((host, port)) for _ in range(2)]
    try:
        try:
            for connection in stalled:  # a body of 100 bytes, one sent
                connection.sendall(
                    b"POST /v1/recognize HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
                )
            busy = answer_once(f"{server.url}/v1/gallery", 503)  # both are reading their bodies
            answered = [
                httpx.get(f"{server.url}{path}", timeout=10) for path in ("/healthz", "/metrics")
            ]
            answered.append(httpx.head(f"{server.url}/healthz", timeout=10))
        finally:
            for connection in stalled:
                connection.close()
        answer_once(f"{server.url}/v1/gallery", 200)  # once the server has seen them close
    finally:
        server.stop()
    assert busy.headers["retry-after"] == "1"
    assert busy.json() == {
        "detail": "the server is busy: 2 requests in progress, its limit "
        "(--max-connections); retry in a moment"
    }
    assert [response.status_code for response in answered] == [200] * 3


def closed_by_server(connection: socket.socket) -> bytes:
    """What the server sends on `connection` before closing it (at most 30 s)."""
    connection.settimeout(30)
    received = b""
    while chunk := connection.recv(65536):
        received += chunk
    return received


def answered_whole(connection: socket.socket) -> bytes:
    """The answer on `connection`, read until its JSON body has come whole (the server may
    keep the connection open after it)."""
    answer = b""
    while not re.search(rb"\r\n\r\n\{.*\}$", answer, re.S):
        answer += connection.recv(65536)
    return answer


def raw_answer(connection: socket.socket) -> tuple[int, dict[str, str], dict]:
    """The status, headers and JSON body of the answer on `connection`, read until the
    server closes it."""
    head, _, body = closed_by_server(connection).partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines)
    assert len(headers) == len(lines), f"a header given twice: {lines}"
    return int(status.split()[1]), headers, json.loads(body)


def test_a_client_that_stops_sending_its_body_is_dropped(serving_library, tmp_path):
    """A body declared and not sent (or sent a byte at a time) held the server's only
    request slot for ever: after --read-timeout it gets 408, naming what came, and the
    connection is closed; one declared over the upload limit gets its 413 (the server no
    longer waits to discard a body that never comes). The slot then serves others."""
    server = ServerProcess(
        serving_library, tmp_path, "--max-connections", "1", "--read-timeout", "0.5",
        "--max-upload-mb", "1",
    )  # fmt: skip
    url = httpx.URL(server.url)
    head = (
        "POST /v1/recognize HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {}\r\n"
        "Content-Length: {}\r\n\r\n"
    )
    try:
        part = b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
        with socket.create_connection((url.host, url.port)) as stalled:
            stalled.sendall(head.format("multipart/form-data; boundary=b", 1000).encode() + part)
            status, headers, body = raw_answer(stalled)
        assert (status, headers["connection"]) == (408, "close")
        assert body == {
            "detail": f"the request body stopped arriving ({len(part)} of its 1000 bytes "
            "came): the server waits 0.5 s for a body, and a second more for every 500 bytes "
            "(--read-timeout)"
        }
        with socket.create_connection((url.host, url.port)) as trickling:
            trickling.sendall(head.format("application/json", 100_000).encode() + b"{")
            for _ in range(300):  # a byte every 0.1 s until the server answers (at most 30 s)
                if select.select([trickling], [], [], 0.1)[0]:
                    break
                trickling.sendall(b" ")
            status, headers, body = raw_answer(trickling)
        assert (status, headers["connection"]) == (408, "close")
        assert body["detail"].startswith("the request body stopped arriving (")
        with socket.create_connection((url.host, url.port)) as oversized:
            oversized.sendall(head.format("application/json", 10 * 2**20).encode())
            status, headers, body = raw_answer(oversized)
        assert (status, headers["connection"]) == (413, "close")
        assert body == {"detail": "request body is larger than the 1 MB limit"}
        assert httpx.get(f"{server.url}/v1/gallery", timeout=10).status_code == 200
    finally:
        server.stop()


def test_a_client_that_does_not_send_its_request_headers_is_dropped(serving_library, tmp_path):
    """A connection that sent nothing, half a request line, or half a request after its
    first was answered was held open for ever (a file descriptor each): it is closed after
    --read-timeout, with nothing to answer."""
    server = ServerProcess(serving_library, tmp_path, "--read-timeout", "0.5")
    url = httpx.URL(server.url)
    try:
        with socket.create_connection((url.host, url.port)) as silent:
            assert closed_by_server(silent) == b""
        with socket.create_connection((url.host, url.port)) as halting:
            halting.sendall(b"GET /heal")
            assert closed_by_server(halting) == b""
        with socket.create_connection((url.host, url.port)) as kept:
            kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert answered_whole(kept).startswith(b"HTTP/1.1 200 ")
            kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: 12")
            assert closed_by_server(kept) == b""
        assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
    finally:
        server.stop()


def requests_counted(text: str) -> dict[tuple[str, str, str], float]:
    """shitu_http_requests_total of a /metrics text, by (method, route, status)."""
    pattern = r'^shitu_http_requests_total\{method="(.*?)",route="(.*?)",status="(.*?)"\} (\S+)$'
    return {tuple(m[:3]): float(m[3]) for m in re.findall(pattern, text, re.M)}


def requests_counted_but_gets(server: ServerProcess) -> dict[tuple[str, str, str], float]:
    """`requests_counted` of the server's /metrics, less the GETs: ServerProcess's /healthz,
    as it waited for the server, and the /metrics."""
    counted = requests_counted(httpx.get(f"{server.url}/metrics", timeout=10).text)
    return {key: n for key, n in counted.items() if key[0] != "GET"}


def test_errors_answered_before_the_app_are_counted_in_the_metrics(serving_library, tmp_path):
    """Requests that are not valid HTTP (400, 431), a request whose headers stopped coming
    (its connection closed: 408, as nginx logs it) and a body that stopped coming (408)
    are counted in shitu_http_requests_total as every other error is: the server's layer
    under the app answered them unseen, and a client flooding it with them showed no
    errors. A connection that began no request (a browser's preconnect) is none, and the
    rest of a body that stops coming after its request was answered is not counted again."""
    server = ServerProcess(serving_library, tmp_path, "--read-timeout", "0.5")
    url = httpx.URL(server.url)
    invalid = (
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Long: " + b"a" * 20_000,
    )
    try:
        for head in invalid:
            with socket.create_connection((url.host, url.port)) as connection:
                connection.sendall(head)
                closed_by_server(connection)
        for sent in (b"", b"GET /healthz HTTP/1.1\r\nHost: 12"):
            with socket.create_connection((url.host, url.port)) as stalled:
                stalled.sendall(sent)
                assert closed_by_server(stalled) == b""
        with socket.create_connection((url.host, url.port)) as stalled:
            stalled.sendall(
                b"POST /v1/recognize HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
            )
            assert raw_answer(stalled)[0] == 408
        # answered (404) before its body was read; the rest stops coming mid-chunk: once
        with socket.create_connection((url.host, url.port)) as stalled:
            stalled.sendall(
                b"POST /v1/recognise HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n1"
            )
            assert closed_by_server(stalled).startswith(b"HTTP/1.1 404 ")
        counted = requests_counted_but_gets(server)
    finally:
        server.stop()
    assert counted == {
        ("other", "unmatched", "400"): 2,
        ("other", "unmatched", "431"): 1,
        ("other", "unmatched", "408"): 1,
        ("POST", "/v1/recognize", "408"): 1,
        ("POST", "unmatched", "404"): 1,
    }


def test_a_malformed_chunked_body_is_answered_and_counted_once(serving_library, tmp_path):
    """A chunked body that turns out not to be valid HTTP once the app has its request is
    answered 400 naming why, and counted once, as that 400 of its route: it was also
    counted as a 499 (the app took the connection's closing for the client leaving). One
    sent on after its request was answered (a 404) is not answered again: it closes the
    connection, where a traceback went to the log."""
    server = ServerProcess(serving_library, tmp_path)
    url = httpx.URL(server.url)
    head = b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    head += b"Transfer-Encoding: chunked\r\n\r\n"
    try:
        for body in (b"zz\r\n", b"3\r\nabcXX\r\n"):
            with socket.create_connection((url.host, url.port)) as connection:
                connection.sendall(head % b"/v1/recognize" + body)
                status, headers, answer = raw_answer(connection)
            assert (status, headers["connection"]) == (400, "close")
            assert answer["detail"].startswith("invalid HTTP request: ")
        with socket.create_connection((url.host, url.port)) as connection:
            connection.sendall(head % b"/v1/recognise" + b"1\r\n{\r\n")
            assert answered_whole(connection).startswith(b"HTTP/1.1 404 ")
            connection.sendall(b"zz\r\n")
            assert closed_by_server(connection) == b""
        counted = requests_counted_but_gets(server)
    finally:
        server.stop()
    assert counted == {
        ("POST", "/v1/recognize", "400"): 2,
        ("POST", "unmatched", "404"): 1,
    }
    assert "Traceback" not in server.log.read_text()


def test_connections_past_the_open_file_limit_wait_and_are_logged_in_one_line(
    serving_library, tmp_path
):
    """Out of file descriptors, asyncio logged a traceback for each try to accept a
    connection, 2048 of them a second (megabytes of log in seconds). One line says so, and
    the connections are served once others close."""
    server = ServerProcess(serving_library, tmp_path, open_files=64)
    url = httpx.URL(server.url)
    warning = "warning: new connections wait: they cannot be accepted (Too many open files)"
    try:
        held = [socket.create_connection((url.host, url.port)) for _ in range(100)]
        deadline = time.monotonic() + 60  # until the server has tried to accept them all
        while warning not in server.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        for connection in held:
            connection.close()
        assert httpx.get(f"{server.url}/healthz", timeout=30).status_code == 200
    finally:
        server.stop()
    log = server.log.read_text()
    assert warning in log and "Traceback" not in log


def test_a_client_that_leaves_mid_upload_is_no_server_error(serving_library, tmp_path):
    """An upload cancelled, or a network lost, while the body was coming: the server logged
    "Exception in ASGI application" with a traceback and counted a 500, an error of its own
    for what the client did (alerts on 5xx fired). It is counted as 499, nginx's "client
    closed request", and the log says nothing."""
    server = ServerProcess(serving_library, tmp_path)
    url = httpx.URL(server.url)
    head = "POST /v1/recognize HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {}\r\n"
    head += "Content-Length: 1000\r\n\r\n"
    part = b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
    try:
        for kind, begun in (
            ("application/json", b'{"image": "'),
            ("multipart/form-data; boundary=b", part),
        ):
            with socket.create_connection((url.host, url.port)) as leaving:
                leaving.sendall(head.format(kind).encode() + begun)
        deadline = time.monotonic() + 60  # until the server has seen both go
        while True:
            text = httpx.get(f"{server.url}/metrics", timeout=10).text
            counted = requests_counted(text).get(("POST", "/v1/recognize", "499"), 0)
            if counted == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        server.stop()
    assert counted == 2 and ("POST", "/v1/recognize", "500") not in requests_counted(text)
    assert "Traceback" not in server.log.read_text()


def decoded_pixels(http: httpx.Client) -> float:
    """The pixels the server's requests in progress hold, as /metrics says."""
    found = re.search(r"^shitu_decoded_pixels (\S+)$", http.get("/metrics").text, re.M)
    assert found, "no shitu_decoded_pixels gauge"
    return float(found.group(1))


def wait_until_held(http: httpx.Client, pixels: float) -> None:
    deadline = time.monotonic() + 60
    while decoded_pixels(http) != pixels:
        assert time.monotonic() < deadline, f"{decoded_pixels(http)} pixels held, not {pixels}"
        time.sleep(0.05)


def wait_until_embedded(http: httpx.Client, images: int) -> None:
    """Until the server's model has embedded `images` images for /v1/extract and adds."""
    pattern = r'^shitu_inference_batch_size_sum\{kind="extract"\} (\S+)$'
    deadline = time.monotonic() + 60
    while True:
        found = re.search(pattern, http.get("/metrics").text, re.M)
        if found and float(found.group(1)) >= images:
            return
        assert time.monotonic() < deadline, f"not {images} images embedded in 60 s"
        time.sleep(0.05)


def png(width: int, height: int, shade: int = 0) -> bytes:
    return png_bytes(np.full((height, width, 3), shade, np.uint8))


def test_an_add_waiting_for_another_process_holds_no_pixels(serving_library, tmp_path):
    """--max-megapixels-in-flight 3: an add that waits for another process's write (an
    `index rebuild`, up to a minute) gives back its 2 decoded megapixels once embedded, so a
    2-megapixel photo is recognised meanwhile (it waited 5 s, then got 503); an add whose
    client left while it waited is still made."""
    server = ServerProcess(
        serving_library, tmp_path, "--max-megapixels-in-flight", "3", "--max-megapixels", "3",
        env={"SHITU_API_KEY": KEY},
    )  # fmt: skip

    def image(name: str, data: bytes) -> dict:
        return {"image": (name, data, "image/png")}

    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            add = http.build_request(
                "POST", "/v1/gallery/images", data={"label": "Held"},
                files=image("gone.png", png(1000, 1000, 7)), headers=WRITE,
            )  # fmt: skip
            with other_process_holding(server.gallery, "BEGIN IMMEDIATE") as other:
                holding = ThreadPoolExecutor(1).submit(
                    httpx.post,
                    f"{server.url}/v1/gallery/images",
                    data={"label": "Held"},
                    files=image("held.png", png(2000, 1000)),
                    headers=WRITE,
                    timeout=120,
                )
                wait_until_embedded(http, 1)
                shown = http.post("/v1/recognize", files=image("more.png", png(1000, 2000)))
                assert shown.status_code == 200, shown.text
                # A client that sends an add, and leaves while it waits for the library.
                host, port = httpx.URL(server.url).host, httpx.URL(server.url).port
                with socket.create_connection((host, port)) as leaving:
                    head = f"POST {add.url.raw_path.decode()} HTTP/1.1\r\n"
                    head += "".join(f"{k}: {v}\r\n" for k, v in add.headers.items()) + "\r\n"
                    leaving.sendall(head.encode() + add.read())
                    wait_until_embedded(http, 2)
                wait_until_held(http, 0)
                assert not holding.done() and other.poll() is None  # the adds still wait
            assert holding.result().status_code == 201, holding.result().text
            deadline = time.monotonic() + 60  # the left one is written after it
            while http.get("/v1/gallery/labels/Held").json()["count"] != 2:
                assert time.monotonic() < deadline, "the left client's add was not made"
                time.sleep(0.05)
    finally:
        server.stop()


def test_decoded_pixels_in_flight_bound_each_request_and_are_given_back(serving_library, tmp_path):
    """--max-megapixels-in-flight 3: a request whose images together hold more gets 413, as
    /healthz tells clients;
    every path gives its pixels back, the corrupt upload's too, so one that takes the whole
    budget goes through after them. (The 503 for one that does not fit beside the requests
    in progress: test_a_thumbnail_takes_the_pixels_it_decodes_from_the_budget.)"""
    server = ServerProcess(
        serving_library, tmp_path, "--max-megapixels-in-flight", "3", "--max-megapixels", "3"
    )
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            limits = http.get("/healthz").json()["limits"]  # what clients can split by
            assert limits["max_megapixels_per_request"] == 3  # not 4 x 3
            halves = [("image", (f"{n}.png", png(2000, 1000, n), "image/png")) for n in (1, 2)]
            over = http.post("/v1/extract", files=halves)
            assert over.status_code == 413
            assert over.json()["detail"] == (
                "the request's images hold 4.0 megapixels together; the limit is 3 "
                "(send fewer or smaller images per request)"
            )
            jpeg = io.BytesIO()
            Image.fromarray(np.full((1000, 3000, 3), 128, np.uint8)).save(jpeg, "JPEG")
            cut = {"image": ("cut.jpg", jpeg.getvalue()[:2000], "image/jpeg")}
            corrupt = http.post("/v1/recognize", files=cut)  # its header: 3 megapixels
            assert corrupt.status_code == 400 and "corrupt JPEG image" in corrupt.text
            assert decoded_pixels(http) == 0
            whole = {"image": ("whole.png", png(3000, 1000), "image/png")}
            assert http.post("/v1/recognize", files=whole).status_code == 200
            assert decoded_pixels(http) == 0
    finally:
        server.stop()


def test_browsing_does_not_wait_behind_an_edit_that_waits_for_another_process(
    serving_library, tmp_path
):
    """The page lists labels and a label's images, and shows their thumbnails, while an add
    through the server waits for another process's write (an `index rebuild`, up to a
    minute): they answer from the generation loaded, as searches do, and need no check for
    newer writes behind the edit (listings waited out the edit: the page hung)."""
    server = ServerProcess(serving_library, tmp_path, env={"SHITU_API_KEY": KEY})
    try:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            first = http.get("/v1/gallery/labels").json()["labels"][0]["label"]
            image_id = http.get("/v1/gallery/label", params={"label": first}).json()
            image_id = image_id["images"][0]["id"]
            with other_process_holding(server.gallery, "BEGIN IMMEDIATE") as other:
                adding = ThreadPoolExecutor(1).submit(
                    httpx.post,
                    f"{server.url}/v1/gallery/images",
                    data={"label": "Waiting"},
                    files={"image": ("new.png", png_bytes(np.full((64, 64, 3), 9, np.uint8)))},
                    headers=WRITE,
                    timeout=120,
                )
                wait_until_embedded(http, 1)  # then queued for the library's thread
                time.sleep(1.5)  # and a check for other writes is due
                shown = http.get(f"/v1/gallery/images/{image_id}/thumbnail")
                assert shown.status_code == 200 and shown.headers["content-type"] == "image/jpeg"
                for listing in ("/v1/gallery/labels", f"/v1/gallery/labels/{first}", "/v1/gallery"):
                    assert http.get(listing, timeout=30).status_code == 200, listing
                assert not adding.done() and other.poll() is None  # it did not wait them out
            assert adding.result().status_code == 201, adding.result().text
    finally:
        server.stop()


def test_requests_wait_their_turn_for_pixels_and_leave_the_queue_when_cancelled():
    """First come, first served: a small request that would fit waits behind a large one
    (which would otherwise wait forever under a stream of small ones); one cancelled while
    it waits leaves the queue without taking pixels; a waiting one goes in as pixels are
    given back; one that waits out the budget's wait is refused and holds nothing."""

    async def scenario() -> None:
        mp = 1_000_000
        budget = PixelBudget(3 * mp, wait_s=60)

        async def settle() -> None:
            for _ in range(5):
                await asyncio.sleep(0)

        first = budget.hold(2 * mp)
        await first.__aenter__()
        large = budget.hold(2 * mp)
        large_in = asyncio.create_task(large.__aenter__())
        await settle()
        small_in = asyncio.create_task(budget.hold(1 * mp).__aenter__())
        await settle()
        assert budget.held == 2 * mp and not large_in.done() and not small_in.done()
        small_in.cancel()
        await settle()
        assert small_in.cancelled() and budget.held == 2 * mp
        await first.__aexit__(None, None, None)
        await large_in
        assert budget.held == 2 * mp
        budget.wait_s = 0
        with pytest.raises(ServiceUnavailable, match="hold 2.0 of its 3 decoded megapixels"):
            async with budget.hold(2 * mp):
                pass
        async with budget.hold(1 * mp):  # fits at once
            assert budget.held == 3 * mp
        await large.__aexit__(None, None, None)
        assert budget.held == 0

    asyncio.run(scenario())


def test_writes_need_the_api_key(serving_library, client):
    good = serving_library.queries()[1][0]
    writes = [
        ("POST", "/v1/gallery/images", {"data": {"label": "x"}, "files": {"image": photo(good)}}),
        ("DELETE", "/v1/gallery/images/1", {}),
        ("DELETE", "/v1/gallery/labels/Lemon Soda", {}),
        ("PATCH", "/v1/gallery/labels/Lemon Soda", {"json": {"label": "y"}}),
        ("POST", "/v1/gallery/rebuild", {}),
    ]
    for method, path, body in writes:
        missing = client.request(method, path, **body)
        assert missing.status_code == 401, (path, missing.text)
        assert missing.headers["www-authenticate"] == "Bearer"
        assert "need the API key" in missing.json()["detail"]
        wrong = client.request(method, path, headers={"Authorization": "Bearer nope"}, **body)
        assert wrong.status_code == 403 and wrong.json()["detail"] == "wrong API key"
        # A page of another site can post a form without a key: what a browser says where
        # a request comes from counts, key or not.
        for site in ("cross-site", "same-site"):
            other = client.request(method, path, headers={**WRITE, "Sec-Fetch-Site": site}, **body)
            assert other.status_code == 403, (path, site, other.text)
            assert "cannot come from another web site's page" in other.json()["detail"]
    assert client.get("/v1/gallery/labels/Lemon Soda").json()["count"] == 3  # nothing changed
    bearer = client.post("/v1/gallery/rebuild", headers={"Authorization": f"Bearer {KEY}"})
    assert bearer.status_code == 200
    own_page = {**WRITE, "Sec-Fetch-Site": "same-origin"}
    assert client.post("/v1/gallery/rebuild", headers=own_page).status_code == 200
    for path in ("/v1/gallery", "/v1/gallery/labels", "/metrics"):
        assert client.get(path).status_code == 200  # reads are open without --protect-reads


def test_writes_from_another_origin_are_refused_where_no_sec_fetch_site_is_sent(server, client):
    """Browsers without Sec-Fetch-Site (Safari before 16.4) still send Origin with a POST,
    PATCH or DELETE: a form another site's page posts is refused by it, key or not, and
    this server's own page (its Origin this server's address) is let through."""
    host = server.url.removeprefix("http://")
    others = ["http://evil.example", "null", f"http://{host.split(':')[0]}:1", f"ftp://{host}"]
    for origin in others:
        other = client.post("/v1/gallery/rebuild", headers={**WRITE, "Origin": origin})
        assert other.status_code == 403, (origin, other.text)
        detail = other.json()["detail"]
        assert detail.startswith("changes to the gallery cannot come from another web site's")
        assert f"(Origin {origin}, not this server's address, {host};" in detail
        removed = client.delete(
            "/v1/gallery/labels/Lemon Soda", headers={**WRITE, "Origin": origin}
        )
        assert removed.status_code == 403
    assert client.get("/v1/gallery/labels/Lemon Soda").json()["count"] == 3  # nothing changed
    own_page = client.post("/v1/gallery/rebuild", headers={**WRITE, "Origin": server.url})
    assert own_page.status_code == 200, own_page.text
    # A browser's Sec-Fetch-Site is what counts where it sends one (a proxy may have given
    # the server another Host than the page's address)
    trusted = {**WRITE, "Origin": "https://shop.example", "Sec-Fetch-Site": "same-origin"}
    assert client.post("/v1/gallery/rebuild", headers=trusted).status_code == 200
    # reads are not refused: a page cannot read their answers
    assert client.get("/v1/gallery/labels", headers={"Origin": "http://evil.example"}).is_success


def test_requests_addressed_to_another_name_are_refused_on_loopback(
    serving_library, server, client, tmp_path
):
    """DNS rebinding: a page at http://evil.example:PORT whose name then resolves to
    127.0.0.1 is the browser's same origin as a server on loopback (Sec-Fetch-Site
    same-origin, Origin its own), and could read and empty the gallery; the server refuses
    requests addressed to names other than localhost's, unless allowed (a proxy's)."""
    port = urlsplit(server.url).port
    for host in (f"evil.example:{port}", "evil.example", f"localhost.evil.example:{port}"):
        rebound = {
            **WRITE,
            "Host": host,
            "Origin": f"http://{host}",
            "Sec-Fetch-Site": "same-origin",
        }
        for method, path in (
            ("GET", "/v1/gallery/labels"),
            ("DELETE", "/v1/gallery/labels/Lemon Soda"),
        ):
            refused = client.request(method, path, headers=rebound)
            assert refused.status_code == 403, (host, path, refused.text)
            detail = refused.json()["detail"]
            assert f"not to '{host}'" in detail and "--allowed-host NAME" in detail
    assert client.get("/v1/gallery/labels/Lemon Soda").json()["count"] == 3  # nothing removed
    # a name in its fully qualified form, `localhost.`, is the same name
    ours = (f"localhost:{port}", f"127.0.0.1:{port}", f"shop.localhost:{port}", "[::1]")
    for host in (*ours, f"localhost.:{port}", "shop.localhost."):
        assert client.get("/v1/gallery/labels", headers={"Host": host}).status_code == 200, host
    proxied = ServerProcess(serving_library, tmp_path, "--allowed-host", "Shop.Example.")
    try:
        for name in ("shop.example", "shop.example."):
            address = {"Host": f"{name}:{urlsplit(proxied.url).port}"}
            answer = httpx.get(f"{proxied.url}/v1/gallery/labels", headers=address)
            assert answer.status_code == 200, name
        other = httpx.get(f"{proxied.url}/v1/gallery/labels", headers={"Host": "evil.example"})
        assert other.status_code == 403
    finally:
        proxied.stop()
    # --host in capitals is loopback too: it was taken for another host (no guard, and a
    # warning to set an API key)
    capitals = ServerProcess(serving_library, tmp_path / "capitals", "--host", "LOCALHOST")
    try:
        other = httpx.get(f"{capitals.url}/v1/gallery/labels", headers={"Host": "evil.example"})
        assert other.status_code == 403
    finally:
        capitals.stop()
    assert "without an API key" not in capitals.log.read_text()


def test_a_host_that_resolves_to_loopback_is_loopback(serving_library, tmp_path):
    """Whether the server is on loopback is judged by the address --host resolved to: a name
    that /etc/hosts maps to loopback (the machine's own name, Debian's 127.0.1.1), or
    `shop.localhost` where the resolver answers for `*.localhost`, was taken for another
    host, without the guard against DNS rebinding (and with a needless warning to set an
    API key); so was loopback's IPv4 address mapped into IPv6."""
    hosts = ["::ffff:127.0.0.1"]
    machine = socket.gethostname()
    try:
        if ipaddress.ip_address(socket.gethostbyname(machine)).is_loopback:
            hosts.append(machine)
    except OSError:  # a machine whose resolver does not know its name
        pass
    for number, host in enumerate(hosts):
        loopback = ServerProcess(serving_library, tmp_path / str(number), "--host", host)
        try:
            other = httpx.get(f"{loopback.url}/v1/gallery/labels", headers={"Host": "evil.example"})
            assert other.status_code == 403, (host, other.text)
            # the name it was told to listen on is its own
            name = f"[{host}]" if ":" in host else host.upper()
            own = {"Host": f"{name}:{urlsplit(loopback.url).port}"}
            assert httpx.get(f"{loopback.url}/v1/gallery/labels", headers=own).is_success, host
        finally:
            loopback.stop()
        assert "without an API key" not in loopback.log.read_text(), host


# ------------------------------------------------------------------------------ service


def test_page_and_docs_load_nothing_from_elsewhere(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    for path in ("/", "/docs", "/redoc"):
        html = client.get(path).text
        sources = re.findall(r"""(?:src|href|spec-url)\s*=\s*["']([^"']+)""", html)
        sources += re.findall(r"""(?:url|openapi_url)\s*:\s*["']([^"']+)""", html)
        assert sources, path
        # this server's own paths: the page's relative to it (for a proxy's prefix)
        assert not any(urlsplit(s).scheme or urlsplit(s).netloc for s in sources), (path, sources)
    for asset in (
        "/static/app.js",
        "/static/style.css",
        "/static-offline-docs/swagger-ui-bundle.js",
    ):
        assert client.get(asset).status_code == 200, asset
    spec = client.get("/openapi.json").json()
    assert {"/v1/recognize", "/v1/extract", "/v1/gallery/images", "/healthz"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/v1/recognize"]["post"]["requestBody"]["content"]
    answers = [set(op["responses"]) for path in spec["paths"].values() for op in path.values()]
    assert not any("422" in codes for codes in answers)  # invalid requests get 400
    assert "400" in spec["paths"]["/v1/gallery/images/{image_id}"]["get"]["responses"]
    assert {"408", "413"} <= set(spec["paths"]["/v1/recognize"]["post"]["responses"])
    assert {"200", "201"} <= set(spec["paths"]["/v1/gallery/images"]["post"]["responses"])
    for path in ("/metrics", "/v1/gallery", "/v1/gallery/labels"):  # refused without a key
        assert {"401", "403"} <= set(spec["paths"][path]["get"]["responses"]), path

    def image_field(path: str) -> dict:
        body = spec["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]
        return body["schema"]["properties"]["image"]

    assert image_field("/v1/recognize")["format"] == "binary"  # one photo
    for many in ("/v1/extract", "/v1/gallery/images"):  # the docs page can send several
        assert image_field(many)["type"] == "array"
        assert image_field(many)["items"] == {"type": "string", "format": "binary"}


def test_the_page_is_checked_for_a_new_version_on_each_load(client):
    """Without Cache-Control a browser kept the page's script for a tenth of its file's age
    (days, for an installed package) and ran it, after an upgrade, against the new server."""
    for path in ("/", "/static/app.js", "/static/style.css"):
        assert client.get(path).headers["cache-control"] == "no-cache", path
    script = client.get("/static/app.js")
    again = client.get("/static/app.js", headers={"If-None-Match": script.headers["etag"]})
    assert again.status_code == 304


def test_unknown_paths_and_methods_are_named_with_what_to_use(client):
    """Starlette's bare "Not Found" and "Method Not Allowed" named neither the path nor what
    the endpoint takes: a misspelt `/v1/recognise` left the client to guess."""
    for path in ("/v1/recognise", "/static/nope.js"):
        missing = client.post(path) if path.startswith("/v1") else client.get(path)
        assert missing.status_code == 404, path
        assert missing.json() == {
            "detail": f"nothing is served at {path}: the API's endpoints are listed at /docs"
        }
    refused = client.put("/v1/recognize")
    assert (refused.status_code, refused.headers["allow"]) == (405, "POST")
    assert refused.json() == {"detail": "PUT is not allowed on /v1/recognize: it takes POST"}
    listed = client.delete("/v1/gallery/labels", headers=WRITE)
    assert listed.json() == {
        "detail": "DELETE is not allowed on /v1/gallery/labels: it takes GET, HEAD"
    }
    # every method the path takes, not only the first route's (GET): its image and label
    # are also removed with DELETE, and a label renamed with PATCH
    for path, takes in (
        ("/v1/gallery/images/1", "DELETE, GET, HEAD"),
        ("/v1/gallery/labels/Lemon Soda", "DELETE, GET, HEAD, PATCH"),
        ("/v1/gallery/label?label=Lemon Soda", "DELETE, GET, HEAD, PATCH"),
    ):
        refused = client.post(path, headers=WRITE)
        assert (refused.status_code, refused.headers["allow"]) == (405, takes), path
        assert refused.json()["detail"].endswith(f": it takes {takes}"), path
    static = client.post("/static/app.js")
    assert (static.status_code, static.headers["allow"]) == (405, "GET, HEAD")


def test_a_request_for_a_whole_url_is_answered_as_one_for_its_path(server):
    """`GET http://HOST/PATH`, as clients send requests to a proxy, which RFC 9112 has
    servers accept: uvicorn took the URL for the path ("nothing is served at
    /http://..."). The URL's host is the one the request is addressed to, as the RFC says,
    and is checked as a Host header is (on loopback: refused for another name)."""
    url = httpx.URL(server.url)
    answers = []
    for target in (f"http://127.0.0.1:{url.port}/healthz", "http://shop.example/healthz"):
        with socket.create_connection((url.host, url.port)) as connection:
            connection.sendall(
                f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
            )
            answers.append(raw_answer(connection))
    (status, _, body), (refused, _, why) = answers
    assert (status, body["status"]) == (200, "ok")
    assert refused == 403 and "not to 'shop.example'" in why["detail"]


@pytest.mark.parametrize(
    "head, status, detail",
    [
        (
            b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n",
            400,
            "invalid HTTP request: bad Content-Length",
        ),
        (
            b"GET /healthz HTTP/1.1\r\n\r\n",
            400,
            "invalid HTTP request: Missing mandatory Host: header",
        ),
        (
            b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Long: " + b"a" * 20_000,
            431,
            "the request's headers are too large: 16 KB came and they had not ended",
        ),
        (  # HTTP/2 without TLS: was 404 "nothing is served at /*"
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            505,
            "invalid HTTP request: HTTP/2.0 is not served: this server speaks HTTP/1.1 (have "
            "the client or proxy use it)",
        ),
    ],
)
def test_a_request_that_is_not_valid_http_is_answered_as_json_naming_why(
    server, head, status, detail
):
    """uvicorn answered these with a plain-text 400, "Invalid HTTP request received.", the
    one error not answered as JSON, and without the reason."""
    url = httpx.URL(server.url)
    with socket.create_connection((url.host, url.port)) as connection:
        connection.sendall(head)
        answer = raw_answer(connection)
    assert answer == (status, {**answer[1], "content-type": "application/json"}, {"detail": detail})
    assert answer[1]["connection"] == "close"


def test_the_page_answers_head_as_uptime_monitors_check_it(client):
    page, head = client.get("/"), client.head("/")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == page.headers["content-length"]


def test_every_get_answers_head_as_link_checkers_and_monitors_send_it(client):
    """RFC 9110: a server that answers GET answers HEAD; the API's routes, the docs and the
    metrics answered 405 to `curl -I`; a 405 names HEAD among the methods allowed."""
    for path in ("/healthz", "/docs", "/metrics", "/v1/gallery", "/v1/gallery/labels"):
        got, head = client.get(path, headers=WRITE), client.head(path, headers=WRITE)
        assert (head.status_code, head.content) == (200, b""), path
        assert head.headers["content-type"] == got.headers["content-type"], path
    assert client.head("/v1/gallery/images/999999").status_code == 404
    refused = client.head("/v1/recognize")
    assert refused.status_code == 405 and refused.headers["allow"] == "POST"
    listed = client.delete("/v1/gallery/labels", headers=WRITE)
    assert listed.status_code == 405 and listed.headers["allow"] == "GET, HEAD"
    assert (
        'method="HEAD",route="/v1/gallery/labels",status="200"'
        in client.get("/metrics", headers=WRITE).text
    )


def test_the_openapi_document_is_made_without_warnings(serving_library, tmp_path):
    """One route for GET and HEAD gave two operations one id, and FastAPI warned of it in
    the server's log at each /openapi.json: HEAD is answered by a middleware instead."""
    from shitu.serving.app import create_app

    config = local_config(serving_library, tmp_path / "gallery")
    with RecognitionService(config, ServeSettings(upload_dir=tmp_path / "uploads")) as service:
        app = create_app(service)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            spec = app.openapi()
    assert list(spec["paths"]["/healthz"]) == ["get"]


def test_health_and_metrics(serving_library, reference, client):
    health = client.get("/healthz").json()
    head = client.head("/healthz")  # as load balancers and monitors check it
    assert head.status_code == 200 and head.content == b""
    assert health["status"] == "ok" and health["model"] == reference.extractor.fingerprint
    assert health["limits"] == {
        "max_upload_bytes": MAX_UPLOAD_MB << 20,
        "max_upload_mb": MAX_UPLOAD_MB,
        "max_images_per_request": 32,
        "max_megapixels": MAX_MEGAPIXELS,
        "max_megapixels_per_request": 4 * MAX_MEGAPIXELS,
    }
    client.post("/v1/recognize", files={"image": photo(serving_library.queries()[0][0])})
    client.get("/v1/gallery/images/999999")
    for made_up in ("ZZZ1", "ZZZ2"):  # methods clients invent share one series
        client.request(made_up, "/nowhere")
    text = client.get("/metrics").text
    assert "ZZZ" not in text
    assert re.search(r'^shitu_http_requests_total\{method="other",route="unmatched"', text, re.M)
    assert re.search(
        r'^shitu_http_requests_total\{method="POST",route="/v1/recognize",status="200"\} [1-9]',
        text,
        re.M,
    )
    assert re.search(
        r'^shitu_http_requests_total\{method="GET",route="/v1/gallery/images/\{image_id\}",status="404"\} [1-9]',
        text,
        re.M,
    )
    assert re.search(r'^shitu_inference_batch_size_count\{kind="recognize"\} [1-9]', text, re.M)
    images = client.get("/v1/gallery").json()["images"]
    assert re.search(rf"^shitu_gallery_images {images}\.0$", text, re.M)


def test_concurrent_recognition_and_additions_lose_nothing(serving_library, client):
    """Recognisers and writers at once: every answer right, every added image listed."""
    shelf_path, products = shelf(serving_library, 0)
    # Writers add copies of a product that is not on the shelf, under new labels, so the
    # shelf's answers must stay the same while the gallery grows.
    elsewhere = next(
        path for path, label in serving_library.gallery_items() if label not in products
    )
    base = np.asarray(Image.open(elsewhere).convert("RGB"))
    before = client.get("/v1/gallery").json()["images"]
    errors: list[str] = []
    added: list[int] = []
    lock = threading.Lock()

    def recognise(rounds: int) -> None:
        with httpx.Client(base_url=client.base_url, timeout=120) as http:
            for _ in range(rounds):
                response = http.post("/v1/recognize", files={"image": photo(shelf_path)})
                labels = sorted(r["label"] for r in response.json().get("results", []))
                if response.status_code != 200 or labels != sorted(products):
                    with lock:
                        errors.append(f"recognize: {response.status_code} {labels}")

    def add(writer: int, count: int) -> None:
        with httpx.Client(base_url=client.base_url, timeout=120) as http:
            for number in range(count):
                pixels = base.copy()
                pixels[0, :3] = (writer, number, 7)  # unique bytes, same product
                response = http.post(
                    "/v1/gallery/images",
                    data={"label": f"Concurrent {writer}"},
                    files={"image": (f"{writer}-{number}.png", png_bytes(pixels), "image/png")},
                    headers=WRITE,
                )
                if response.status_code != 201 or len(response.json()["added"]) != 1:
                    with lock:
                        errors.append(f"add: {response.status_code} {response.text}")
                    continue
                with lock:
                    added.append(response.json()["added"][0]["id"])

    writers, per_writer = 2, 3
    threads = [threading.Thread(target=recognise, args=(3,)) for _ in range(4)]
    threads += [threading.Thread(target=add, args=(w, per_writer)) for w in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not errors, errors[:5]
    assert len(set(added)) == writers * per_writer
    assert client.get("/v1/gallery").json()["images"] == before + writers * per_writer
    for writer in range(writers):
        listed = client.get(f"/v1/gallery/labels/Concurrent {writer}").json()["images"]
        assert len(listed) == per_writer
    # Concurrent requests shared model calls: fewer batches than photos recognised.
    text = client.get("/metrics").text
    photos = float(
        re.search(r'^shitu_inference_batch_size_sum\{kind="recognize"\} (\S+)', text, re.M)[1]
    )
    batches = float(
        re.search(r'^shitu_inference_batch_size_count\{kind="recognize"\} (\S+)', text, re.M)[1]
    )
    assert batches < photos


def local_config(
    serving_library: DemoLibrary, gallery: Path, detector: str | Path = "plain-background"
):
    """The pipeline config of a service in this process, on a copy of the demo library."""
    shutil.copytree(serving_library.gallery, gallery)
    return load_pipeline_config(
        None,
        [
            f"IndexProcess.index_dir={gallery}",
            f"Global.rec_inference_model_dir={serving_library.model}",
            f"Global.det_inference_model_dir={detector}",
        ],
    )


@pytest.fixture
def picodet_config(serving_library, grocery, tmp_path):
    """`local_config` with the real PicoDet-S, a detector that holds an onnxruntime session."""
    model = grocery.parent.parent / "models" / "picodet_s_coco" / "picodet_s_320_coco.onnx"
    return local_config(serving_library, tmp_path / "gallery", model)


def test_closing_the_service_releases_the_model_detector_and_library_once(picodet_config, tmp_path):
    with RecognitionService(picodet_config, ServeSettings(upload_dir=tmp_path / "up")) as service:
        gallery = service.library.gallery
        service.recognize(np.zeros((64, 64, 3), np.uint8)).result()
        service.close()  # as the app's shutdown does, before the block ends
    assert "closed" in repr(service.extractor)
    assert repr(service.recognizer.detector) == "OnnxDetector(closed)"
    assert repr(gallery).endswith(", closed>")


@pytest.mark.parametrize(
    "refused, error",
    [("upload folder", "is a file, not a folder"), ("batch size", "max_batch must be at least 1")],
)
def test_a_service_refused_at_start_releases_the_model_it_loaded(
    picodet_config, tmp_path, monkeypatch, refused, error
):
    """Checked once the recogniser is loaded: refusing the settings closes it."""
    loaded: list[Recognizer] = []
    load = Recognizer.from_config

    def load_and_keep(config):
        loaded.append(load(config))
        return loaded[-1]

    monkeypatch.setattr(Recognizer, "from_config", load_and_keep)
    blocker = tmp_path / "a file"
    blocker.write_text("in the way")
    settings = (
        ServeSettings(upload_dir=blocker / "uploads")
        if refused == "upload folder"
        else ServeSettings(upload_dir=tmp_path / "uploads", max_batch=0)
    )
    with pytest.raises((DataError, ValueError), match=error):
        RecognitionService(picodet_config, settings)
    (recognizer,) = loaded
    assert "closed" in repr(recognizer.extractor)
    assert repr(recognizer.detector) == "OnnxDetector(closed)"
    assert repr(recognizer.gallery).endswith(", closed>")


def test_a_failed_add_leaves_no_upload_file_behind(serving_library, tmp_path):
    """The service in this process: when the library write fails (disk full, lock timeout),
    the files written for the uploads go too, so no file is kept without its row."""
    config = local_config(serving_library, tmp_path / "gallery")
    uploads_dir = tmp_path / "uploads"
    (path, _label), *_ = serving_library.queries()
    data = path.read_bytes()
    upload = [("new product.jpg", data)]
    with RecognitionService(config, ServeSettings(upload_dir=uploads_dir, max_batch=2)) as service:
        before = len(service.library.snapshot.by_id)
        features = np.stack([f.result() for f in service.extract([read_rgb(path)])])

        def disk_full(_change):
            raise OSError("No space left on device")

        real_write, service.library.write = service.library.write, disk_full
        with pytest.raises(OSError, match="No space left"):
            service.add("New product", upload, features)
        assert not uploads_dir.exists() or not any(uploads_dir.iterdir())
        service.library.write = real_write
        outcome = service.add("New product", upload, features)  # the same upload, now stored
        assert len(outcome.added) == 1 and Path(outcome.added[0].path).parent == uploads_dir
        assert len(service.library.snapshot.by_id) == before + 1


def test_an_upload_file_that_cannot_be_deleted_does_not_fail_its_removal(
    serving_library, tmp_path, caplog
):
    """Removing an image whose stored upload cannot be deleted (open in another program on
    Windows; here a folder in its place) removes it from the library and says so; the file
    left over is a warning in the log (was an error: 500 for a removal that was made)."""
    config = local_config(serving_library, tmp_path / "gallery")
    uploads_dir = tmp_path / "uploads"
    (path, _label), *_ = serving_library.queries()
    with RecognitionService(config, ServeSettings(upload_dir=uploads_dir)) as service:
        features = np.stack([f.result() for f in service.extract([read_rgb(path)])])
        (added,) = service.add("Kept open", [("open.jpg", path.read_bytes())], features).added
        stored = Path(added.path)
        stored.unlink()
        (stored / "in the way").mkdir(parents=True)  # a folder is not deleted as a file
        with caplog.at_level("WARNING", logger="shitu.serving.service"):
            assert service.remove_image(added.id) == added
        assert added.id not in service.library.snapshot.by_id
    assert stored.is_dir()
    assert f"could not delete {stored}, which the library no longer lists" in caplog.text


def test_removing_an_image_keeps_its_upload_file_while_another_row_lists_it(
    serving_library, tmp_path
):
    """An upload that `shitu index add --allow-duplicates` also added, under another label:
    removing the uploaded image (or its label) over HTTP deleted the file the other row
    still lists, whose thumbnail and re-embedding then failed. The file goes with
    the last row that lists it."""
    config = local_config(serving_library, tmp_path / "gallery")
    (path, _label), *_ = serving_library.queries()
    with RecognitionService(config, ServeSettings(upload_dir=tmp_path / "uploads")) as service:
        features = np.stack([f.result() for f in service.extract([read_rgb(path)])])
        (added,) = service.add("Uploaded", [("shared.jpg", path.read_bytes())], features).added
        stored = Path(added.path)
        # as `shitu index add LIB LIB/uploads/... --label Also --allow-duplicates` adds it
        report = service.library.write(
            lambda gallery: gallery.add(features, ["Also"], [stored], allow_duplicates=True)
        )
        (also,) = report.ids
        assert service.remove_image(added.id) == added
        assert stored.is_file() and service.image(int(also)).path == str(stored)
        report = service.library.write(
            lambda gallery: gallery.add(features, ["Again"], [stored], allow_duplicates=True)
        )
        assert service.remove_label("Again") == [int(i) for i in report.ids]
        assert stored.is_file()
        service.remove_image(int(also))  # the last row that lists it
        assert not stored.exists()


def test_an_upload_another_process_adds_first_is_answered_as_a_duplicate(serving_library, tmp_path):
    """Content another process adds between the service's look at the library and its
    write is skipped by the write: the answer names it a duplicate (it was in neither list)."""
    config = local_config(serving_library, tmp_path / "gallery")
    (path, _label), *_ = serving_library.queries()
    data = path.read_bytes()
    with RecognitionService(config, ServeSettings(upload_dir=tmp_path / "uploads")) as service:
        vector = np.zeros((1, service.extractor.embedding_size), np.float32)
        vector[0, 0] = 1
        real_write = service.library.write

        def after_another_process(mutate):
            with Gallery.open(tmp_path / "gallery") as writer:
                writer.add(vector, ["Elsewhere"], hashes=[hashlib.sha256(data).hexdigest()])
            return real_write(mutate)

        service.library.write = after_another_process
        outcome = service.add("New product", [("same photo.jpg", data)], vector)
        assert outcome.added == [] and outcome.duplicates == ["same photo.jpg"]
        assert not any((tmp_path / "uploads").iterdir())  # its file went with it


def test_an_upload_the_model_gives_nan_features_is_named_and_nothing_is_added(
    serving_library, tmp_path
):
    """An add whose model gave one upload NaN features failed on the library's refusal,
    naming a row of the request's vectors and not the upload; nothing may be kept of it."""
    config = local_config(serving_library, tmp_path / "gallery")
    (first, _), (second, _), *_ = serving_library.queries()
    with RecognitionService(config, ServeSettings(upload_dir=tmp_path / "uploads")) as service:
        features = np.stack([f.result() for f in service.extract(map(read_rgb, (first, second)))])
        features[1, 3] = np.nan
        before = len(service.library.snapshot.by_id)
        upload = [("good.jpg", first.read_bytes()), ("broken.jpg", second.read_bytes())]
        with pytest.raises(BadRequest) as refused:
            service.add("New product", upload, features)
        assert str(refused.value).startswith("cannot add broken.jpg: the model gave NaN")
        assert str(refused.value).endswith("; nothing was added")
        assert len(service.library.snapshot.by_id) == before
    assert not (tmp_path / "uploads").exists() or not any((tmp_path / "uploads").iterdir())


def test_edits_check_the_library_as_another_process_left_it(serving_library, tmp_path, monkeypatch):
    """Within a second of its last look (here: never again), a server's listing may lag
    another process's writes, but its edits must not: removing what the other process
    removed is 404 (was a 500), and an image it added can be removed (was 404)."""
    monkeypatch.setattr(library_module, "SYNC_INTERVAL_S", 3600.0)
    config = local_config(serving_library, tmp_path / "gallery")
    settings = ServeSettings(upload_dir=tmp_path / "uploads")
    with RecognitionService(config, settings) as service:
        gone, *_ = service.library.snapshot.by_id.values()
        with Gallery.open(tmp_path / "gallery") as writer:
            writer.remove(ids=[gone.id])
            writer.remove(labels=["Lemon Soda"])
            vector = np.zeros((1, service.extractor.embedding_size), np.float32)
            vector[0, 0] = 1
            (new_id,) = writer.add(vector, ["Added elsewhere"]).ids
        assert gone.id in service.library.snapshot.by_id  # not synced yet
        with pytest.raises(NotFound, match=f"no gallery image with id {gone.id}"):
            service.remove_image(gone.id)
        for edit in (service.remove_label, lambda label: service.rename_label(label, "New")):
            with pytest.raises(NotFound, match="no gallery images labelled 'Lemon Soda'"):
                edit("Lemon Soda")
        assert service.remove_image(int(new_id)).label == "Added elsewhere"
        first, second = list(service.library.snapshot.by_label)[:2]
        with pytest.raises(Conflict, match=f"label '{second}' already has images"):
            service.rename_label(first, second)  # merged only when asked, as in the API and CLI


def test_an_edit_that_waits_out_another_writer_is_a_503_to_retry(
    serving_library, tmp_path, monkeypatch
):
    """Another process holding the library's write lock past the wait (an `index rebuild`
    of a big library) is no fault of the server's (was 500): 503 with Retry-After, saying
    what to wait for; the same edit goes through once the other write is done."""
    from shitu.serving.app import create_app

    monkeypatch.setattr(metadata, "LOCK_WAIT_S", 0.2)
    config = local_config(serving_library, tmp_path / "gallery")

    async def delete(app, image_id: int) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shitu") as client:
            return await client.delete(f"/v1/gallery/images/{image_id}")

    with RecognitionService(config, ServeSettings(upload_dir=tmp_path / "uploads")) as service:
        app, image_id = create_app(service), next(iter(service.library.snapshot.by_id))
        with other_process_holding(tmp_path / "gallery", "BEGIN IMMEDIATE"):
            refused = asyncio.run(delete(app, image_id))
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) > 0
        assert "another process has been writing to it" in refused.json()["detail"]
        assert asyncio.run(delete(app, image_id)).status_code == 200


def test_edits_queued_behind_one_that_waited_out_another_writer_are_refused_at_once(
    serving_library, tmp_path, monkeypatch
):
    """Three edits sent together while another process holds the library's write lock:
    each waited the whole wait in turn (the third three minutes); those queued while the
    first waited get its 503 at once, and once the other write is done edits go through."""
    from shitu.serving.app import create_app

    monkeypatch.setattr(metadata, "LOCK_WAIT_S", 2.0)  # time for the others to queue
    config = local_config(serving_library, tmp_path / "gallery")

    async def delete_all(app, image_ids: list[int]) -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shitu") as client:
            return await asyncio.gather(
                *(client.delete(f"/v1/gallery/images/{image_id}") for image_id in image_ids)
            )

    with RecognitionService(config, ServeSettings(upload_dir=tmp_path / "uploads")) as service:
        app, image_ids = create_app(service), list(service.library.snapshot.by_id)[:3]
        with other_process_holding(tmp_path / "gallery", "BEGIN IMMEDIATE"):
            refused = asyncio.run(delete_all(app, image_ids))
        assert [answer.status_code for answer in refused] == [503] * 3
        details = (answer.json()["detail"] for answer in refused)
        waited, *queued = sorted(details, key=lambda detail: "edit before this one" in detail)
        assert "another process has been writing to it for over 2 s" in waited
        for detail in queued:
            assert "the edit before this one waited for it in vain" in detail
        assert [a.status_code for a in asyncio.run(delete_all(app, image_ids))] == [200] * 3


def test_a_server_told_to_stop_answers_its_edits_waiting_for_another_process(
    serving_library, tmp_path
):
    """SIGTERM while an edit waits for another process's write (an `index rebuild`, up to a
    minute): the edit is answered at once, a JSON 503 to retry, and the server stops. uvicorn
    waited its grace period (10 s) for the edit, then cut it off with a plain-text 500, and
    the server went on waiting, up to a minute, for the library's thread."""
    server = ServerProcess(serving_library, tmp_path)
    try:
        with other_process_holding(server.gallery, "BEGIN IMMEDIATE") as other:
            with httpx.Client(base_url=server.url, timeout=120) as http:
                adding = ThreadPoolExecutor(1).submit(
                    http.post,
                    "/v1/gallery/images",
                    data={"label": "Waiting"},
                    files={"image": ("new.png", png_bytes(np.full((64, 64, 3), 9, np.uint8)))},
                )
                wait_until_embedded(http, 1)  # then it waits for the library
                server.process.send_signal(signal.SIGTERM)
                answer = adding.result()
            assert answer.status_code == 503 and int(answer.headers["Retry-After"]) > 0
            assert (
                "stopped waiting for it as it is closing; nothing was changed"
                in (answer.json()["detail"])
            )
            server.process.wait(timeout=30)  # while the other process still holds the lock
            assert other.poll() is None
    finally:
        server.stop()
    with Gallery.open(server.gallery) as gallery:
        assert "Waiting" not in gallery.label_counts()


def test_a_request_the_server_cuts_off_as_it_stops_gets_a_json_503(serving_library, tmp_path):
    """A request still running after the server's grace period for stopping (here an upload
    whose body stops coming; a long edit on the server's own thread) is cut off: uvicorn
    answered it with a plain-text 500."""
    server = ServerProcess(serving_library, tmp_path)
    try:
        url = httpx.URL(server.url)
        with socket.create_connection((url.host, url.port)) as stalled:
            stalled.sendall(
                b"POST /v1/extract HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                b'\r\nContent-Length: 1000\r\n\r\n{"image": "'
            )
            # Answered after the server has read what came before it on the other connection.
            assert httpx.get(f"{server.url}/healthz").status_code == 200
            server.process.send_signal(signal.SIGTERM)
            stalled.settimeout(60)
            answer = b""
            while chunk := stalled.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 "), answer
        assert b"content-type: application/json" in head.lower()
        assert b"retry-after: 10" in head.lower()
        # an extraction changes nothing: no "an edit it asked for may still be made"
        assert json.loads(body)["detail"] == (
            "the server is stopping and did not wait for this request to finish; retry it"
        )
        server.process.wait(timeout=60)
    finally:
        server.stop()


def milvus_config(serving_library: DemoLibrary, gallery: Path):
    """`local_config`, on a Milvus Lite copy of the demo library (its features, as stored)."""
    pytest.importorskip("milvus_lite", reason="the milvus extra is not installed")
    with Gallery.open(serving_library.gallery) as demo:
        _, features = demo.features()
        labels = [entry.label for entry in demo.entries()]
        model = demo.manifest
    with Gallery.create(gallery, embedding_dim=model.embedding_dim,
                        model_fingerprint=model.model_fingerprint,
                        preprocessing=model.preprocessing, backend="milvus") as milvus:  # fmt: skip
        milvus.add(features, labels)
    return load_pipeline_config(
        None,
        [
            f"IndexProcess.index_dir={gallery}",
            f"Global.rec_inference_model_dir={serving_library.model}",
        ],
    )


def test_a_rebuild_as_an_index_type_the_backend_lacks_is_a_400(serving_library, tmp_path):
    """IVFPQ on a Milvus Lite library: the client's choice, refused with what to choose
    instead, was a 500 (a failure of the server's, logged as one)."""
    from shitu.serving.app import create_app

    config = milvus_config(serving_library, tmp_path / "gallery")

    async def rebuild(app, index_type: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shitu") as client:
            return await client.post("/v1/gallery/rebuild", json={"index_type": index_type})

    with RecognitionService(config, ServeSettings(upload_dir=tmp_path / "uploads")) as service:
        refused = asyncio.run(rebuild(create_app(service), "IVFPQ"))
        assert refused.status_code == 400
        assert refused.json()["detail"].startswith("Milvus Lite has no IVFPQ index; choose Flat")
        assert asyncio.run(rebuild(create_app(service), "HNSW32")).status_code == 200


def test_a_search_the_milvus_server_fails_is_a_503_to_retry(serving_library, tmp_path, monkeypatch):
    """A Milvus server gone or restarting fails the searches: no fault of the request nor
    of this server (was 500), 503 with Retry-After, and the same request goes through once
    it is back."""
    from pymilvus import MilvusClient
    from pymilvus.exceptions import MilvusException

    from shitu.serving.app import create_app

    config = milvus_config(serving_library, tmp_path / "gallery")
    query, label = serving_library.queries()[0]

    async def recognize(app) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shitu") as client:
            return await client.post("/v1/recognize", files={"image": photo(query)})

    def gone(*args: object, **kwargs: object) -> None:
        raise MilvusException(message="simulated: connection refused")

    with RecognitionService(config, ServeSettings(upload_dir=tmp_path / "uploads")) as service:
        with monkeypatch.context() as down:
            down.setattr(MilvusClient, "search", gone)
            refused = asyncio.run(recognize(create_app(service)))
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) > 0
        assert (
            "Milvus failed while searching collection 'shitu_gallery' (simulated"
            in (refused.json()["detail"])
        )
        answered = asyncio.run(recognize(create_app(service)))
    assert answered.status_code == 200 and answered.json()["results"][0]["label"] == label


def test_a_thumbnail_takes_the_pixels_it_decodes_from_the_budget(serving_library, tmp_path):
    """A thumbnail of a stored PNG decodes it whole (64 of a 50-megapixel one at once took
    tens of GB): its pixels come from the budget the uploads share, so with 2 of 3
    megapixels held, a 2-megapixel PNG's thumbnail is refused (503, here without waiting),
    while a JPEG's, decoded at a reduced scale, takes few and goes through."""
    from shitu.serving.app import create_app

    config = local_config(serving_library, tmp_path / "gallery")
    settings = ServeSettings(
        upload_dir=tmp_path / "uploads", max_pixels=3_000_000, max_pixels_in_flight=3_000_000
    )
    large = png_bytes(np.full((1000, 2000, 3), 9, np.uint8))

    async def scenario(app) -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shitu") as client:
            added = await client.post(
                "/v1/gallery/images",
                data={"label": "Large"},
                files={"image": ("large.png", large, "image/png")},
            )
            assert added.status_code == 201, added.text
            png_thumbnail = added.json()["added"][0]["thumbnail"]
            budget, size = app.state.pixel_budget, {"size": 512}
            budget.wait_s = 0
            async with budget.hold(2_000_000):
                refused = await client.get(png_thumbnail, params=size)
                jpeg = await client.get("/v1/gallery/images/1/thumbnail", params=size)
            assert budget.held == 0
            return [refused, jpeg, await client.get(png_thumbnail, params=size)]

    with RecognitionService(config, settings) as service:
        refused, jpeg, later = asyncio.run(scenario(create_app(service)))
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert "hold 2.0 of its 3 decoded megapixels" in refused.json()["detail"]
    assert jpeg.status_code == 200 and jpeg.headers["content-type"] == "image/jpeg"
    assert later.status_code == 200 and later.headers["content-type"] == "image/jpeg"


def test_an_ipv6_host_is_listened_on_in_brackets_too(serving_library, tmp_path, capsys):
    """`--host [::1]`, as a URL writes the address, failed to start ("Name or service not
    known"); a URL given for the host is a usage error that says so."""
    server = ServerProcess(serving_library, tmp_path, "--host", "[::1]")
    try:
        assert server.url.startswith("http://[::1]:")
    finally:
        server.stop()
    with pytest.raises(SystemExit):
        shitu_main(["serve", "--gallery", "unused", "--host", "http://127.0.0.1"])
    assert "--host: expected a host name or address (127.0.0.1, 0.0.0.0, ::), not a URL: " in (
        capsys.readouterr().err
    )


def _ipv6_only_loopback_name() -> str | None:
    """A name /etc/hosts gives ::1 alone (Debian's `ip6-localhost`), if any."""
    try:
        lines = Path("/etc/hosts").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        address, *names = line.split("#", 1)[0].split() or [""]
        for name in names if address == "::1" else ():
            try:
                found = {entry[4][0] for entry in socket.getaddrinfo(name, 0)}
            except socket.gaierror:
                continue
            if found == {"::1"}:
                return name
    return None


def test_a_host_name_of_an_ipv6_address_only_is_listened_on(serving_library, tmp_path):
    """A --host name without a colon was bound as IPv4, so one that resolves to ::1 alone
    failed to start ("Name or service not known")."""
    with socket.socket(socket.AF_INET6) as probe:
        try:
            probe.bind(("::1", 0))
        except OSError as exc:
            pytest.skip(f"this machine has no IPv6 loopback: {exc}")
    name = _ipv6_only_loopback_name()
    if name is None:
        pytest.skip("no name in /etc/hosts resolves to ::1 alone (Debian's ip6-localhost)")
    server = ServerProcess(serving_library, tmp_path, "--host", name)
    try:
        assert server.url.startswith("http://[::1]:")
        assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
    finally:
        server.stop()


def test_a_port_in_use_or_a_host_that_names_nothing_is_one_line_before_the_models_load(
    serving_library, capsys
):
    """The socket is bound before anything slow: a port another server holds, or a --host
    no address answers to, is a line naming it, at once, not a traceback from uvicorn."""
    args = ["serve", "--gallery", str(serving_library.gallery)]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert shitu_main([*args, "--port", str(port)]) == 2
    assert capsys.readouterr().err == (
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    )
    assert shitu_main([*args, "--host", "no-such-host.invalid"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: cannot listen on no-such-host.invalid:8000: ")
    assert len(error.splitlines()) == 1


def test_a_key_http_headers_cannot_carry_is_refused_at_start(serving_library, capsys):
    args = ["serve", "--gallery", str(serving_library.gallery), "--api-key", "clé"]
    assert shitu_main(args) == 2
    assert "API key must be printable ASCII" in capsys.readouterr().err
    assert shitu_main([*args[:-1], " padded-key"]) == 2


def test_an_empty_api_key_is_refused_not_taken_for_none(serving_library, monkeypatch, capsys):
    """`--api-key "$KEY"` with KEY unset served without a key: anyone could edit the
    gallery, unsaid on loopback. $SHITU_API_KEY set but empty still means none."""
    monkeypatch.setenv("SHITU_API_KEY", "from-the-environment")
    args = ["serve", "--gallery", str(serving_library.gallery), "--protect-reads"]
    assert shitu_main([*args, "--api-key", ""]) == 2
    assert capsys.readouterr().err == (
        "error: --api-key is empty (a variable that is not set?): give the key, or leave the "
        "option out (and $SHITU_API_KEY unset) to serve without one\n"
    )
    monkeypatch.setenv("SHITU_API_KEY", "")
    assert shitu_main(args) == 2
    assert "--protect-reads needs an API key" in capsys.readouterr().err


def test_an_upload_folder_that_cannot_be_written_is_refused_at_start(
    serving_library, tmp_path, capsys
):
    blocker = tmp_path / "a file"
    blocker.write_text("in the way")
    args = ["serve", "--gallery", str(serving_library.gallery), "--port", "0"]
    assert shitu_main([*args, "--upload-dir", str(blocker / "uploads")]) == 2
    assert capsys.readouterr().err == (
        f"error: the upload folder (--upload-dir): {blocker} is a file, not a folder\n"
    )


def test_an_image_the_model_cannot_resize_is_a_bad_upload(
    resize_short_library, thin_limit, tmp_path
):
    """A model that resizes the short side refuses an image too elongated for that (under
    the pixel limit, lowered here): every route that embeds answers 400
    naming the upload and why, as for a corrupt one (was 500); a normal image goes through."""
    from shitu.serving.app import create_app

    shutil.copytree(resize_short_library["gallery"], tmp_path / "gallery")
    config = load_pipeline_config(
        None,
        [
            f"IndexProcess.index_dir={tmp_path / 'gallery'}",
            f"Global.rec_inference_model_dir={resize_short_library['model']}",
        ],
    )
    thin = ("thin.png", png_bytes(np.zeros((400, 2, 3), np.uint8)), "image/png")
    normal = ("normal.png", png_bytes(np.zeros((40, 30, 3), np.uint8)), "image/png")

    async def post(app, *requests: tuple[str, list, dict]) -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shitu") as client:
            return [await client.post(r, files=f, data=d) for r, f, d in requests]

    uploads = tmp_path / "uploads"
    settings = ServeSettings(upload_dir=uploads, max_pixels=thin_limit)  # within it
    with RecognitionService(config, settings) as service:
        *refused, fine, mixed = asyncio.run(
            post(
                create_app(service),
                ("/v1/recognize", [("image", thin)], {}),
                ("/v1/extract", [("image", thin)], {}),
                ("/v1/gallery/images", [("image", thin)], {"label": "thin"}),
                ("/v1/recognize", [("image", normal)], {}),
                ("/v1/extract", [("image", normal), ("image", thin)], {}),
            )
        )
    for response in [*refused, mixed]:
        assert response.status_code == 400, response.text
        assert response.json()["detail"] == (
            "thin.png: image 2x400 is too elongated to resize its short side to 32: that makes "
            f"32x6400 pixels, over the limit of {thin_limit / 1e6:g} megapixels "
            "(SHITU_MAX_MEGAPIXELS)"
        )
    assert fine.status_code == 200, fine.text
    assert not uploads.exists() or not any(uploads.iterdir())


def test_an_image_over_pillows_own_limit_gets_the_413_without_a_warning():
    """100 megapixels is over Pillow's decompression-bomb warning (89.5): the server's
    limit answers for it, and the log stays free of Pillow's warning (here an error)."""
    code = (
        "from shitu.serving.images import read_header\n"
        "from tests.image_helpers import declared_png\n"
        "try:\n"
        "    read_header(declared_png(10_000, 10_000), 4_000_000)\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        cwd=Path(__file__).parents[1],  # the repository: `tests` is importable
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout == (
        "PayloadTooLarge image: 10000x10000 pixels (100.0 megapixels); the limit is 4 megapixels\n"
    )
    assert result.stderr == ""


def test_previews_of_large_stored_images(tmp_path):
    """The pixel limit holds for what a preview decodes: a large JPEG decodes at a reduced
    scale and gets one; a large PNG gets a 404 that says why, not a 413 for a GET."""
    pixels = np.random.default_rng(1).integers(0, 256, (2000, 3000, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "big.jpg", quality=80)
    Image.fromarray(pixels).save(tmp_path / "big.png")
    four_megapixels = 4_000_000
    with Image.open(
        io.BytesIO(thumbnail_jpeg(str(tmp_path / "big.jpg"), 64, four_megapixels))
    ) as t:
        assert max(t.size) == 64
    with pytest.raises(NotFound, match="no preview: the image is 3000x2000, over the server's 4"):
        thumbnail_jpeg(str(tmp_path / "big.png"), 64, four_megapixels)


def test_a_stored_image_that_is_a_fifo_has_no_preview_and_holds_no_thread(tmp_path):
    """Opening a FIFO waits for a writer: a thumbnail of a gallery image whose file had been
    replaced by one held a worker thread for good (and with enough such requests, every
    thread the server decodes uploads on). It is a 404 naming what is there."""
    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    refused: list[NotFound] = []

    def preview() -> None:
        try:
            thumbnail_jpeg(str(fifo), 64, 4_000_000)
        except NotFound as exc:
            refused.append(exc)

    assert returns_beside_fifo(fifo, preview)
    assert "a FIFO (named pipe), not an image file" in str(refused[0])


def test_images_the_server_has_no_file_of_are_listed_without_a_thumbnail(serving_library, tmp_path):
    """An image added as a vector, or whose file was deleted since, is listed with thumbnail
    null, not an address that answers 404; asked for all the same, the 404 says why."""
    from shitu.serving.app import create_app

    config = local_config(serving_library, tmp_path / "gallery")
    (kept, gone) = make_images(tmp_path / "elsewhere", 2, seed=61)
    with Gallery.open(tmp_path / "gallery") as gallery:
        vectors = np.eye(3, gallery.manifest.embedding_dim, dtype=np.float32)
        gallery.add(vectors[:1], ["No file"])
        gallery.add(vectors[1:], ["No file"] * 2, paths=[str(kept), str(gone)])
    gone.unlink()

    async def scenario(app) -> tuple[httpx.Response, list[httpx.Response]]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shitu") as client:
            listed = await client.get("/v1/gallery/label", params={"label": "No file"})
            ids = [image["id"] for image in listed.json()["images"]]
            thumbnails = [await client.get(f"/v1/gallery/images/{i}/thumbnail") for i in ids]
            return listed, thumbnails

    with RecognitionService(config, ServeSettings(upload_dir=tmp_path / "uploads")) as service:
        listed, (no_file, shown, deleted) = asyncio.run(scenario(create_app(service)))
    vector_id, kept_id, _ = (image["id"] for image in listed.json()["images"])
    assert [image["thumbnail"] for image in listed.json()["images"]] == [
        None,
        f"/v1/gallery/images/{kept_id}/thumbnail",
        None,
    ]
    assert shown.status_code == 200
    assert no_file.status_code == 404
    assert (
        no_file.json()["detail"]
        == f"gallery image {vector_id} was added as a vector, without a file"
    )
    assert deleted.status_code == 404
    assert deleted.json()["detail"] == f"the image file is missing from the server ({gone})"


@pytest.fixture
def written_since(tmp_path):
    """A shared library serving 20 vectors labelled "old", and the library's path, where
    another writer has since added 10 labelled "new" (not loaded yet); all 30 vectors."""
    path = tmp_path / "lib"
    vectors = np.random.default_rng(2).normal(size=(30, 8)).astype(np.float32)
    with Gallery.create(path, embedding_dim=8, model_fingerprint="m") as gallery:
        gallery.add(vectors[:20], ["old"] * 20)
    shared = SharedLibrary()
    try:
        shared.attach(shared.run(lambda: Gallery.open(path)))
        with Gallery.open(path) as writer:
            writer.add(vectors[20:], ["new"] * 10)
        yield shared, path, vectors
    finally:
        shared.close()


def test_the_first_request_after_another_process_writes_sees_the_write(written_since, monkeypatch):
    """An idle server does not answer its next request from the generation it had: the
    check for other processes' writes finishes before the answer."""
    shared, path, vectors = written_since
    monkeypatch.setattr(library_module, "SYNC_INTERVAL_S", 0.0)  # as after a quiet second
    assert shared.search(vectors[25:26], k=1).labels[0, 0] == "new"
    with Gallery.open(path) as writer:
        writer.remove(labels=["new"])
    assert set(shared.snapshot.by_label) == {"old"}


def test_a_library_re_embedded_with_another_model_is_logged_with_a_restart(tmp_path, caplog):
    """`shitu index reembed LIB --model NEW` while the server runs: the server keeps
    answering with its model and logs that the library holds another model's features,
    with a restart as the remedy, not a traceback advising the re-embedding just done."""
    path, model = tmp_path / "lib", PixelEmbedder()
    images = make_images(tmp_path / "imgs", 2)
    Gallery.build(path, model, collect_items(images, label="old"))
    shared = SharedLibrary()
    try:
        shared.attach(shared.run(lambda: Gallery.open(path, embedder=model)))
        newer = PixelEmbedder(fingerprint="pixels-4, retrained")
        with Gallery.open(path) as writer:
            writer.reembed(newer)
        shared.run(shared._sync)
        assert "holds the features of another model (pixels-4, retrained)" in caplog.text
        assert "restart the server with that model (--model)" in caplog.text
        assert "Traceback" not in caplog.text and "reembed" not in caplog.text
        assert set(shared.snapshot.by_label) == {"old"}  # still serving what it had
    finally:
        shared.close()


def test_the_server_retries_a_generation_that_failed_to_load(written_since, monkeypatch, caplog):
    """A newer generation that cannot load (here: its index file cut short, as while it is
    still being copied) is retried every RETRY_S, its failure logged once."""
    shared, path, vectors = written_since
    with Gallery.open(path) as reader:
        index_file = path / reader.manifest.index_state["file"]
    whole = index_file.read_bytes()
    index_file.write_bytes(whole[:64])
    monkeypatch.setattr(library_module, "RETRY_S", 3600.0)
    for _ in range(2):
        shared.run(shared._sync)
    assert caplog.text.count("could not load generation") == 1  # said once
    assert set(shared.snapshot.by_label) == {"old"}  # still serving what it had
    index_file.write_bytes(whole)
    shared.run(shared._sync)
    assert set(shared.snapshot.by_label) == {"old"}  # not yet: an hour to wait
    monkeypatch.setattr(library_module, "RETRY_S", 0.0)
    shared.run(shared._sync)
    assert set(shared.snapshot.by_label) == {"old", "new"}
    assert shared.search(vectors[25:26], k=1).labels[0, 0] == "new"


def test_a_library_built_again_at_its_path_while_served_is_served_in_its_place(
    written_since, caplog
):
    """`rm -r LIB` and `index build --out LIB` while a server runs: the server answered from
    the deleted library, refusing edits, until restarted (the new one's images never showed
    up). Until a library is there it says so once and answers from the one it has."""
    shared, path, vectors = written_since
    shared.run(shared._sync)
    old = shared.gallery
    assert "deleted or built again" not in caplog.text
    shutil.rmtree(path)
    for _ in range(2):
        shared.run(shared._sync)
    assert caplog.text.count(f"{path} was deleted or built again since the server opened") == 1
    assert shared.search(vectors[25:26], k=1).labels[0, 0] == "new"  # still the one it had
    with Gallery.create(path, embedding_dim=8, model_fingerprint="m") as rebuilt:
        rebuilt.add(vectors[:5], ["rebuilt"] * 5)
    shared.run(shared._sync)
    assert f"{path} was built again since the server opened it: now serving" in caplog.text
    assert shared.gallery is not old
    assert shared.search(vectors[25:26], k=1).labels[0, 0] == "rebuilt"
    assert set(shared.snapshot.by_label) == {"rebuilt"}
    with pytest.raises(GalleryError, match="the library is closed"):
        old.search(vectors[:1])  # released
    shared.write(lambda gallery: gallery.add(vectors[5:6], ["edited"]))  # edits go on
    with Gallery.open(path) as reader:
        assert len(reader) == 6


def test_a_search_that_took_the_library_before_it_was_replaced_finds_the_new_one(
    written_since, monkeypatch
):
    """A search that took the served library a moment before the check closed it in favour
    of the one built again at its path is answered from the new one, not failed."""
    shared, path, vectors = written_since
    old = shared.gallery
    shutil.rmtree(path)
    with Gallery.create(path, embedding_dim=8, model_fingerprint="m") as rebuilt:
        rebuilt.add(vectors[:5], ["rebuilt"] * 5)
    shared.run(shared._sync)
    monkeypatch.setattr(SharedLibrary, "gallery", property(lambda _: old))  # as it took it
    assert shared.search(vectors[:1], k=1).labels[0, 0] == "rebuilt"


def test_a_library_of_another_model_built_at_its_path_is_not_served(tmp_path, caplog, monkeypatch):
    """A library built again at the path with another model's features is not taken up:
    the server keeps answering from the one it has and says why, once; one of its model
    built there next is taken up at the next check, not after RETRY_S."""
    monkeypatch.setattr(library_module, "RETRY_S", 3600.0)
    model = PixelEmbedder()
    path = tmp_path / "lib"
    vectors = np.random.default_rng(4).normal(size=(4, model.embedding_size)).astype(np.float32)
    with Gallery.create_for(path, model) as gallery:
        gallery.add(vectors[:2], ["first"] * 2)
    shared = SharedLibrary()
    try:
        shared.attach(shared.run(lambda: Gallery.open(path, embedder=model)))
        shutil.rmtree(path)
        with Gallery.create(
            path, embedding_dim=model.embedding_size, model_fingerprint="another model"
        ) as other:
            other.add(vectors[2:], ["other"] * 2)
        for _ in range(2):
            shared.run(shared._sync)
        assert caplog.text.count("no library there can be served") == 1
        assert "another model" in caplog.text  # why
        assert shared.search(vectors[3:], k=1).labels[0, 0] == "first"
        shutil.rmtree(path)
        with Gallery.create_for(path, model) as again:
            again.add(vectors[2:], ["again"] * 2)
        shared.run(shared._sync)
        assert shared.search(vectors[3:], k=1).labels[0, 0] == "again"
    finally:
        shared.close()


def test_the_listing_follows_each_edit_as_reading_the_library_whole_gives_it(tmp_path, monkeypatch):
    """After an edit the server lists what reading every row gives, but has read only the
    rows the edit touched (every row: seconds a write with 200k images); after another
    process's write, which it does not know, or a failed one, it reads them all."""
    path = tmp_path / "lib"
    vectors = np.random.default_rng(3).normal(size=(40, 8)).astype(np.float32)
    files = [str(path / "uploads" / f"{i}.jpg") for i in range(40)]  # stored relative
    with Gallery.create(path, embedding_dim=8, model_fingerprint="m") as gallery:
        gallery.add(vectors[:30], [f"label {i % 4}" for i in range(30)], files[:30])
    read_whole = Snapshot.of
    reads: list[int] = []
    monkeypatch.setattr(
        Snapshot, "of", classmethod(lambda _, gallery: reads.append(1) or read_whole(gallery))
    )
    shared = SharedLibrary()

    def same_as_read_whole() -> None:
        whole = shared.run(lambda: read_whole(shared.gallery))
        assert list(shared.snapshot.by_id.items()) == list(whole.by_id.items())
        assert list(shared.snapshot.by_label.items()) == list(whole.by_label.items())
        assert shared.snapshot.stats == whole.stats

    try:
        shared.attach(shared.run(lambda: Gallery.open(path)))
        edits = [
            lambda g: g.add(vectors[30:33], ["label 1", "new", "Cafe\u0301"], files[30:33]),
            lambda g: g.remove(ids=[2, 7]),
            lambda g: g.relabel("label 2", "renamed"),
            lambda g: g.relabel("label 3", "label 1", merge=True),
            lambda g: g.remove(labels=["new", "label 0"]),
            lambda g: g.add(vectors[33:35], ["Caf\u00e9", "a first label"], hashes=["x", "y"]),
            lambda g: g.add(vectors[35:36], ["ignored"], hashes=["x"]),  # a duplicate: no write
            lambda g: g.relabel("Caf\u00e9", "zz last"),
            lambda g: g.rebuild("HNSW32"),
        ]
        for edit in edits:
            reads.clear()
            shared.write(edit)
            assert reads == []
            same_as_read_whole()
        with Gallery.open(path) as other:
            other.relabel("renamed", "elsewhere")
        shared.write(lambda g: g.add(vectors[36:], ["late"] * 4))
        same_as_read_whole()
        with pytest.raises(GalleryError):
            shared.write(lambda g: g.remove(labels=["no such label"]))
        same_as_read_whole()
        assert set(shared.snapshot.by_label) == {
            "a first label", "elsewhere", "label 1", "late", "zz last"
        }  # fmt: skip
    finally:
        shared.close()


def test_a_long_gallery_write_holds_up_neither_health_nor_other_requests(
    serving_library, tmp_path, monkeypatch
):
    """While the library's thread is busy (a write: seconds with 200k images, minutes for a
    rebuild) and the check for other processes' writes is due, a listing waits for it in a
    worker thread, not on the event loop: /healthz (which never waits for the library) and
    requests that do not touch the library are answered meanwhile (all waited: the event
    loop was blocked)."""
    import uvicorn

    from shitu.serving.app import create_app

    monkeypatch.setattr(library_module, "SYNC_INTERVAL_S", 0.0)
    config = local_config(serving_library, tmp_path / "gallery")
    settings = ServeSettings(upload_dir=tmp_path / "uploads")
    with RecognitionService(config, settings) as service:
        server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning"))
        sock = socket.create_server(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        serving = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
        serving.start()
        write_done = threading.Event()
        writing = threading.Thread(target=service.library.run, args=(write_done.wait,))
        try:
            while not server.started:
                time.sleep(0.05)
            writing.start()  # the library's thread is busy until write_done is set
            listing: list[httpx.Response] = []
            waiting = threading.Thread(
                target=lambda: listing.append(httpx.get(f"{url}/v1/gallery/labels", timeout=60))
            )
            waiting.start()
            time.sleep(0.5)  # the listing is waiting for the library's thread
            with httpx.Client(base_url=url, timeout=5) as client:
                assert client.get("/healthz").json()["status"] == "ok"
                assert client.get("/static/style.css").status_code == 200
            assert not listing  # still waiting for the write
            write_done.set()
            waiting.join(60)
            assert listing[0].status_code == 200
        finally:
            write_done.set()
            server.should_exit = True
            serving.join(30)
            if writing.is_alive():
                writing.join(30)


def test_serving_an_empty_library_warns_that_nothing_can_be_recognised(serving_library, tmp_path):
    """As `shitu recognize` does: every photo's answer would be a silent [] (a library whose
    images were all removed); the warning says how to add some."""
    shutil.copytree(serving_library.gallery, tmp_path / "emptied")
    with Gallery.open(tmp_path / "emptied") as gallery:
        gallery.remove(labels=sorted(gallery.label_counts()))
    emptied = DemoLibrary(serving_library.model, tmp_path / "emptied", serving_library.demo)
    server = ServerProcess(emptied, tmp_path / "server")
    server.stop()
    assert (
        f"warning: {server.gallery} holds no images: nothing can be recognised until some are "
        "added (on the web page, or POST /v1/gallery/images)"
    ) in server.log.read_text()
    served = ServerProcess(serving_library, tmp_path / "full")
    served.stop()
    assert "holds no images" not in served.log.read_text()


def test_the_start_line_counts_one_image_of_one_label_in_the_singular(serving_library, tmp_path):
    """ "serving LIB (1 images, 1 labels)" read wrong; `shitu index build` says "1 image"."""
    shutil.copytree(serving_library.gallery, tmp_path / "one")
    with Gallery.open(tmp_path / "one") as gallery:
        _kept, *others = gallery.entries()
        gallery.remove(ids=[entry.id for entry in others])
    one = DemoLibrary(serving_library.model, tmp_path / "one", serving_library.demo)
    server = ServerProcess(one, tmp_path / "server")
    server.stop()
    assert server.banner.startswith(f"serving {server.gallery} (1 image, 1 label) at http://")


def test_access_log_lists_each_request_in_shitus_log_format(serving_library, tmp_path):
    """--access-log without -v logs every request (uvicorn's access logger at the server's
    warning level dropped them all), in the `level: message` form of shitu's own lines."""
    server = ServerProcess(serving_library, tmp_path, "--access-log")
    try:
        assert httpx.get(f"{server.url}/v1/gallery/labels", timeout=10).status_code == 200
    finally:
        server.stop()
    log = server.log.read_text()
    assert re.search(r'^info: 127\.0\.0\.1:\d+ - "GET /v1/gallery/labels HTTP/1\.1" 200', log, re.M)
    assert "INFO:" not in log and "WARNING:" not in log


def test_served_under_a_reverse_proxys_prefix(serving_library, tmp_path):
    """Behind a proxy that serves it at /shitu/ and strips that (--root-path /shitu): the
    page's assets and calls, thumbnails and the API docs all resolve under the prefix, and
    the page's policy and the refusal of other sites' writes still hold."""
    server = ServerProcess(serving_library, tmp_path, "--root-path", "/shitu")
    proxy = PrefixProxy(server.url, "/shitu")
    try:
        with httpx.Client(timeout=60) as client:
            page = client.get(proxy.url)
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/")
            assert page.headers["content-security-policy"].startswith("default-src 'self'")
            assets = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)""", page.text)
            assert {"static/app.js", "static/style.css", "docs"} <= set(assets)
            for asset in assets:
                assert client.get(urljoin(proxy.url, asset)).status_code == 200, asset

            query, label = serving_library.queries()[0]
            recognized = client.post(
                urljoin(proxy.url, "v1/recognize"), files={"image": photo(query)}
            )
            assert recognized.status_code == 200, recognized.text
            assert recognized.json()["results"][0]["label"] == label

            images = client.get(urljoin(proxy.url, f"v1/gallery/labels/{label}")).json()["images"]
            thumbnail = images[0]["thumbnail"]
            assert thumbnail == f"/shitu/v1/gallery/images/{images[0]['id']}/thumbnail"
            thumb = client.get(urljoin(proxy.url, thumbnail))
            assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"

            for docs in ("docs", "redoc"):
                html = client.get(urljoin(proxy.url, docs)).text
                sources = re.findall(r"""(?:src|href|spec-url)\s*=\s*["']([^"']+)""", html)
                sources += re.findall(r"""(?:url|openapi_url)\s*:\s*["']([^"']+)""", html)
                assert "/shitu/openapi.json" in sources, (docs, sources)
                for source in sources:
                    loaded = client.get(urljoin(urljoin(proxy.url, docs), source))
                    assert loaded.status_code == 200, (docs, source)
            spec = client.get(urljoin(proxy.url, "openapi.json")).json()
            assert spec["servers"] == [{"url": "/shitu"}]  # where "Try it out" sends requests

            remove = urljoin(proxy.url, "v1/gallery/images/999999")
            other_site = client.delete(remove, headers={"Sec-Fetch-Site": "cross-site"})
            assert other_site.status_code == 403
            own_page = client.delete(remove, headers={"Sec-Fetch-Site": "same-origin"})
            assert own_page.status_code == 404  # let through: there is no such image
    finally:
        proxy.stop()
        server.stop()
