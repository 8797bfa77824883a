"""The recognition pipeline end to end on real Grocery Store photos: an ImageNet
EfficientNet-Lite0 export, a Faiss gallery of train images, val photos as queries, and
multi-object images composed of several products on one canvas."""

from __future__ import annotations

import csv
import inspect
import json
import logging
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFont

from shitu.cli.eval_pipeline import SHOWN_MISTAKES, sweep_table
from shitu.cli.main import main as shitu_main
from shitu.config import load_config, resolve_config_path
from shitu.data.transforms.ops import UnreadableImageError
from shitu.detection import load_detector
from shitu.detection.postprocess import box_iou
from shitu.errors import CheckpointError, ConfigError, DataError, GalleryError
from shitu.index import Gallery, GalleryItem
from shitu.inference import (
    FeatureExtractor,
    decode_rgb,
    default_model_dir,
    export_model,
    read_manifest,
    read_rgb,
)
from shitu.inference import default_model as default_model_module
from shitu.inference.export import MANIFEST, ExportError
from shitu.pipeline import (
    CaptionFonts,
    PipelineConfig,
    PipelineEvaluation,
    PlainBackgroundDetector,
    Recognizer,
    build_detector,
    evaluate_pipeline,
    load_pipeline_config,
)
from shitu.pipeline.defaults import SETTINGS
from tests.image_helpers import declared_png
from tests.terminal_helpers import run_in_terminal

CLASSES = (6, 7, 30, 45, 60, 71)  # banana, kiwi, juice, oat milk, aubergine, red pepper
GALLERY_PER_CLASS = 5
QUERIES_PER_CLASS = 3
GAP = 40  # plain canvas between composed products
CANVAS = (250, 250, 250)


def _items(root: Path, split: str, per_class: int, names: dict[int, str]) -> list[GalleryItem]:
    chosen: dict[int, list[GalleryItem]] = {c: [] for c in CLASSES}
    for line in (root / f"{split}.txt").read_text().splitlines():
        path, fine, _ = (part.strip() for part in line.split(","))
        if int(fine) in chosen and len(chosen[int(fine)]) < per_class:
            chosen[int(fine)].append(GalleryItem(root / path, names[int(fine)]))
    return [item for c in CLASSES for item in chosen[c]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, grocery) -> dict:
    """Export, gallery (IP) of train photos, val queries; labels with spaces."""
    work = tmp_path_factory.mktemp("pipeline")
    config = load_config(
        "GroceryStore_EfficientNetLite0",
        ["Arch.BackboneStopLayer.name=flatten", "Arch.Neck=null", "Arch.Head=null"],
    )
    model_dir = export_model(config, None, work / "model")
    with (grocery / "classes.csv").open() as handle:
        names = {int(row[1]): row[0].replace("-", " ") for row in list(csv.reader(handle))[1:]}
    gallery_items = _items(grocery, "train", GALLERY_PER_CLASS, names)
    queries = _items(grocery, "val", QUERIES_PER_CLASS, names)
    extractor = FeatureExtractor.load(model_dir, num_threads=1)
    with Gallery.create_for(work / "gallery", extractor) as gallery:
        gallery.add_files(extractor, gallery_items)
    label_file = work / "queries.txt"
    label_file.write_text("".join(f"{q.path}\t{q.label}\n" for q in queries))
    return {
        "work": work,
        "model": model_dir,
        "extractor": extractor,
        "library": work / "gallery",
        "queries": queries,
        "label_file": label_file,
    }


@pytest.fixture
def recognizer(setup):
    opened: list[Gallery] = []  # a library passed in stays the caller's to close

    def make(detector=None, **options) -> Recognizer:
        gallery = Gallery.open(setup["library"], embedder=setup["extractor"])
        opened.append(gallery)
        return Recognizer(setup["extractor"], gallery, detector, **options)

    yield make
    for gallery in opened:
        gallery.close()


class FixedBoxes:
    """A detector that reports given boxes (the boxes are the test's input, not its subject)."""

    def __init__(self, boxes: list[tuple[int, int, int, int]]) -> None:
        self.boxes = boxes

    def detect(self, image, score_threshold=0.3, max_boxes=5):
        rows = [[0, 0.9, *box] for box in self.boxes[:max_boxes]]
        return np.asarray(rows, np.float32).reshape(-1, 6)


def compose(paths: list[Path], sizes: list[int]) -> tuple[np.ndarray, list[tuple], list]:
    """Product photos resized side by side on a plain canvas: the image, boxes, tiles."""
    import cv2

    tiles = [
        cv2.resize(read_rgb(p), (s, s), interpolation=cv2.INTER_AREA)
        for p, s in zip(paths, sizes, strict=True)
    ]
    height = max(sizes) + 2 * GAP
    width = sum(sizes) + GAP * (len(sizes) + 1)
    canvas = np.full((height, width, 3), CANVAS, np.uint8)
    boxes, x = [], GAP
    for tile, size in zip(tiles, sizes, strict=True):
        canvas[GAP : GAP + size, x : x + size] = tile
        boxes.append((x, GAP, x + size, GAP + size))
        x += size + GAP
    return canvas, boxes, tiles


def test_whole_image_pipeline_agrees_with_direct_retrieval(setup, recognizer):
    """Without a detector and threshold, the top result is exactly the retrieval top-1."""
    queries = setup["queries"]
    features = setup["extractor"].extract_files([q.path for q in queries]).features
    with Gallery.open(setup["library"]) as gallery:
        direct = gallery.search(features, k=1)
    direct_right = np.mean(
        [d == q.label for d, q in zip(direct.labels[:, 0], queries, strict=True)]
    )
    with recognizer(score_thres=-1.0) as rec:
        found = list(rec.recognize_files([q.path for q in queries]))
        report = evaluate_pipeline(rec, queries)
    assert [f.results[0].label for f in found] == list(direct.labels[:, 0])
    np.testing.assert_allclose([f.results[0].score for f in found], direct.scores[:, 0], atol=1e-5)
    assert all(f.results[0].bbox[:2] == (0, 0) and len(f.results) == 1 for f in found)
    assert report.queries == len(queries) and report.recall_at_1 == pytest.approx(direct_right)
    assert direct_right >= 0.6  # ImageNet features do tell these six products apart


def test_l2_library_gives_the_same_scores_as_inner_product(setup, recognizer, tmp_path):
    with Gallery.open(setup["library"]) as ip:
        _, features = ip.features()
        labels = list(ip.search(features, k=1).labels[:, 0])
    with Gallery.create(
        tmp_path / "l2",
        embedding_dim=features.shape[1],
        model_fingerprint=setup["extractor"].fingerprint,
        metric="l2",
    ) as l2:
        l2.add(features, labels)
    paths = [q.path for q in setup["queries"][::3]]
    with recognizer(score_thres=-1.0) as rec:
        expected = [f.results[0] for f in rec.recognize_files(paths)]
    with (
        Gallery.open(tmp_path / "l2", embedder=setup["extractor"]) as l2_gallery,
        Recognizer(setup["extractor"], l2_gallery, score_thres=-1.0) as rec,
    ):
        got = [f.results[0] for f in rec.recognize_files(paths)]
    assert [g.label for g in got] == [e.label for e in expected]
    np.testing.assert_allclose([g.score for g in got], [e.score for e in expected], atol=1e-4)
    # Without normalisation an L2 library scores by distance: no threshold fits it.
    with (
        Gallery.create(
            tmp_path / "raw",
            embedding_dim=features.shape[1],
            model_fingerprint=setup["extractor"].fingerprint,
            metric="l2",
            normalize=False,
        ) as raw,
        pytest.raises(ConfigError, match="an L2 library without normalisation scores by"),
    ):
        Recognizer(setup["extractor"], raw)


def test_the_recogniser_names_what_it_cannot_take(setup, recognizer):
    """Inputs a caller can get wrong: one error naming the problem, not numpy's or OpenCV's."""
    rec = recognizer()
    photo = read_rgb(setup["queries"][0].path)
    for images, problem in (
        ([Image.fromarray(photo)], "got JpegImageFile|got Image .np.asarray"),
        ([np.zeros((0, 10, 3), np.uint8)], r"the image is empty \(10x0 pixels\)"),
        (photo, r"got one image array \(\d+, \d+, 3\): pass \[image\]"),
        (
            [photo[:, :, 0]],
            r"HxWx3 image, got uint8 \(\d+, \d+\) \(grey: np.dstack\(\[image\] \* 3\)",
        ),
        ([photo[:, :, :1]], r"got uint8 \(\d+, \d+, 1\) \(grey: np.dstack"),
        (
            [np.dstack([photo, photo[:, :, :1]])],
            r", 4\) \(RGBA: image\[:, :, :3\] drops the alpha\)$",
        ),
        ([photo / 255.0], r"got float64 .*\(image \* 255\).round\(\).astype\(np.uint8\)"),
        # a tensor's layouts, channels first and a batch of one
        ([photo.transpose(2, 0, 1)], r", \d+\) \(channels first: image.transpose\(1, 2, 0\) "),
        ([photo[None]], r", 3\) \(a batch of one: image\[0\] is the image\)$"),
        ([setup["queries"][0].path], r"got PosixPath \(an image file: shitu.inference.read_rgb"),
        ([b"\xff\xd8"], r"got bytes \(an encoded image: shitu.inference.decode_rgb\(data\)"),
    ):
        with pytest.raises(UnreadableImageError, match=problem):
            rec.recognize_batch(images)
    # one of several is named by its place, which the message alone did not say
    grey = r"image 2 \(from 0\) of 3: expected an RGB uint8 HxWx3 image, got uint8 \(\d+, \d+\)"
    for embed in (rec.recognize_batch, rec.extractor.extract_images):
        with pytest.raises(UnreadableImageError, match=rf"^{grey} \(grey: "):
            embed([photo, photo, photo[:, :, 0]])
    with pytest.raises(UnreadableImageError, match=r"^expected an RGB uint8 HxWx3 image"):
        rec.extractor.extract_images([photo[:, :, 0]])  # alone: no place to name
    # as the hints say: taken
    rec.recognize(np.dstack([photo[:, :, 0]] * 3))
    rec.recognize((photo / 255.0 * 255).round().astype(np.uint8))
    path = setup["queries"][0].path
    assert rec.recognize(read_rgb(path)) == rec.recognize(decode_rgb(path.read_bytes()))
    with pytest.raises(DataError, match="expected a list of image paths, got the single path"):
        list(rec.recognize_files(str(setup["queries"][0].path)))
    # A bytes path (os.listdir(b".")) is the file it names, not the text "b'...'".
    as_bytes = os.fsencode(path)
    with pytest.raises(DataError, match=f"got the single path '{re.escape(str(path))}'"):
        list(rec.recognize_files(as_bytes))
    (found,) = rec.recognize_files([as_bytes])
    assert found.error is None and found.path == str(path)
    for nothing in (None, 3):  # not a TypeError ('NoneType' object is not iterable)
        with pytest.raises(DataError, match=f"^expected a list of image paths, got .* {nothing}$"):
            list(rec.recognize_files(nothing))
    assert found.results == rec.recognize(read_rgb(path))
    with pytest.raises(ConfigError, match="batch_size: expected a whole number >= 1, got 0"):
        recognizer(batch_size=0)
    for threshold in (2.0, float("nan")):
        with pytest.raises(ConfigError, match="score_thres: expected a cosine similarity"):
            recognizer(score_thres=threshold)


def test_the_plain_background_detector_names_what_it_cannot_take(setup):
    """Used alone (not behind a Recognizer, which checks first), it refuses as Detector does,
    not with OpenCV's colour-conversion error or an AttributeError."""
    photo = read_rgb(setup["queries"][0].path)
    detector = PlainBackgroundDetector()
    for image, problem in (
        (photo[:, :, 0], r"got uint8 \(\d+, \d+\) \(grey: np.dstack"),
        (photo / 255.0, r"HxWx3 image, got float64"),
        (Image.fromarray(photo), r"got Image .np.asarray"),
        (str(setup["queries"][0].path), "numpy array, got str"),
    ):
        with pytest.raises(UnreadableImageError, match=problem):
            detector.detect(image)
    assert detector.detect(photo).shape[1] == 6


def test_the_plain_background_detector_finds_boxes_in_a_phone_sized_photo_in_little_memory(
    setup,
):
    """A 12-megapixel photo (4000x3000) is searched in a smaller copy: the boxes come back
    in the photo's pixels, within a few of each product's, and the float copies the mask
    is found in stay small (at full size they took over 300 MB, and seconds)."""
    import tracemalloc

    import cv2

    picks = [setup["queries"][i] for i in (0, 3)]
    canvas, boxes, _ = compose([p.path for p in picks], [300, 200])
    scale = 4000 / canvas.shape[1]
    photo = cv2.resize(canvas, (4000, round(canvas.shape[0] * scale)), cv2.INTER_LINEAR)
    tracemalloc.start()
    try:
        found = PlainBackgroundDetector().detect(photo)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100 * 2**20
    expected = np.asarray(boxes, np.float64) * scale
    assert found.shape == (2, 6)
    assert np.abs(found[:, 2:] - expected).max() < 2 * scale  # a canvas pixel or two


def test_a_detector_architecture_without_a_detector_model_is_warned_about(caplog):
    """--det-arch shapes a .pdparams detector only: given with none, or plain-background,
    it is named in a warning rather than dropped while whole images are recognised."""
    for detector, why in (("none", "no detector is given"), ("plain-background", "no model")):
        caplog.clear()
        config = load_pipeline_config(None, [f"Global.det_inference_model_dir={detector}"])
        config.Global.det_arch = "picodet_s"
        built = build_detector(config)
        assert (built is None) == (detector == "none")
        assert "Global.det_arch (--det-arch) 'picodet_s' is not used" in caplog.text
        assert why in caplog.text
    caplog.clear()
    assert build_detector(load_pipeline_config(None)) is None and not caplog.text


def test_detector_settings_no_detector_reads_are_warned_about(caplog):
    """`-o Global.threshold=0.5` without --detector changed nothing, without a word: a
    detector setting given away from its default is named where no detector reads it
    (plain-background reads max_det_results, not threshold)."""
    settings = ["Global.threshold=0.5", "Global.max_det_results=2"]
    config = load_pipeline_config(None, settings)
    assert build_detector(config) is None
    assert "Global.threshold 0.5 is not used: no detector is given (--detector)" in caplog.text
    assert "Global.max_det_results 2 is not used: no detector is given" in caplog.text
    caplog.clear()
    plain = load_pipeline_config(
        None, [*settings, "Global.det_inference_model_dir=plain-background"]
    )
    assert build_detector(plain) is not None
    assert "Global.threshold 0.5 is not used: plain-background scores every region" in caplog.text
    assert "max_det_results" not in caplog.text


def test_the_plain_background_detector_finds_boxes_in_a_wide_panorama(setup):
    """A shelf at the end of a photo 8 times as wide: a copy only 1024 px long would leave
    its products a few dozen pixels high; a megapixel copy keeps them large enough."""
    picks = [setup["queries"][i] for i in (0, 3)]
    canvas, boxes, _ = compose([p.path for p in picks], [300, 200])
    pad = 7 * canvas.shape[1]
    photo = np.pad(canvas, ((0, 0), (pad, 0), (0, 0)), "edge")
    found = PlainBackgroundDetector().detect(photo)
    expected = np.asarray(boxes, np.float64) + np.array([pad, 0, pad, 0])
    assert found.shape == (2, 6)
    found = found[np.argsort(found[:, 2])]  # left to right, as `boxes`
    expected = expected[np.argsort(expected[:, 0])]
    assert np.abs(found[:, 2:] - expected).max() < 4  # a pixel or two of the smaller copy


def test_the_recogniser_and_its_parts_describe_themselves(setup, grocery):
    """A notebook or a log shows what a recogniser runs with, not `<... object at 0x...>`."""
    extractor = setup["extractor"]
    with Gallery.open(setup["library"], embedder=extractor) as gallery:
        recognizer = Recognizer(extractor, gallery, PlainBackgroundDetector(), score_thres=0.4)
        size = extractor.embedding_size
        assert repr(extractor) == (
            f"FeatureExtractor(backend='onnxruntime', embedding_size={size}, "
            f"fingerprint='{extractor.fingerprint[:12]}...', score_thres=None)"
        )
        library = (
            f"<Gallery {str(setup['library'])!r}: {len(gallery)} images, faiss Flat, ip, {size}-d>"
        )
        assert repr(gallery) == library
        assert repr(recognizer) == (
            f"Recognizer(extractor={extractor!r}, gallery={library}, "
            "detector=PlainBackgroundDetector(), score_thres=0.4)"
        )
    assert repr(gallery) == f"<Gallery {str(setup['library'])!r}, closed>"
    onnx = grocery.parent.parent / "models" / "picodet_s_coco" / "picodet_s_320_coco.onnx"
    assert repr(load_detector(onnx)) == "OnnxDetector(input_size=320x320, classes=80)"


def test_file_results_are_the_commands_json_lines(setup, recognizer, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a JPEG")
    good = setup["queries"][0].path
    with recognizer(score_thres=-1.0) as rec:
        found, skipped = rec.recognize_files([good, broken])
        lines = json.loads(json.dumps([found.to_dict(), skipped.to_dict()]))
        expected = [r.to_dict() for r in rec.recognize(read_rgb(good))]
    assert lines[0] == {"image": str(good), "results": expected} and expected
    assert lines[1] == {"image": str(broken), "results": [], "error": skipped.error}


def test_a_folder_given_to_recognize_files_is_named_as_one_with_how_to_pass_its_images(
    setup, recognizer, tmp_path
):
    """A folder among the paths was reported with the OS's bare "Is a directory"."""
    from shitu.image_files import scan_images

    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(setup["queries"][0].path, folder / "a.jpg")
    with recognizer(score_thres=-1.0) as rec:
        skipped, found = rec.recognize_files([folder, folder / "a.jpg"])
        assert skipped.results == [] and found.error is None and found.results
        assert skipped.error == (
            "a folder, not an image file: pass the images in it "
            "(shitu.image_files.scan_images(Path(folder)) lists them)"
        )
        # as the message says
        (scanned,) = rec.recognize_files(scan_images(Path(folder)))
        assert scanned.results == found.results


def test_one_recogniser_serves_several_threads_at_once(setup, recognizer):
    """As its docstring says: concurrent calls give what the same calls give one by one."""
    photos = [read_rgb(q.path) for q in setup["queries"]]
    with recognizer(PlainBackgroundDetector(), score_thres=-1.0) as rec:
        one_by_one = [rec.recognize(photo) for photo in photos]
        with ThreadPoolExecutor(4) as pool:
            concurrent = list(pool.map(rec.recognize, photos))
    assert [[(r.bbox, r.label, r.image_id) for r in found] for found in concurrent] == [
        [(r.bbox, r.label, r.image_id) for r in found] for found in one_by_one
    ]
    for found, alone in zip(concurrent, one_by_one, strict=True):
        np.testing.assert_allclose([r.score for r in found], [r.score for r in alone], atol=1e-5)


def test_closing_a_recogniser_leaves_a_library_it_was_given_open(setup):
    with Gallery.open(setup["library"], embedder=setup["extractor"]) as gallery:
        with Recognizer(setup["extractor"], gallery):
            pass
        assert gallery.label_counts()  # still open: the caller's to close


def test_a_closed_recogniser_says_so_when_used_again(setup, recognizer, tmp_path):
    photo = tmp_path / "photo.png"
    Image.new("RGB", (64, 48), "red").save(photo)
    image = read_rgb(photo)
    opened = Recognizer.open(setup["library"], model=setup["model"])
    given = recognizer()
    for rec in (opened, given):
        rec.recognize(image)
        with rec:
            pass
        rec.close()  # again: nothing more to do
        for call in (
            lambda rec=rec: rec.recognize(image),
            lambda rec=rec: list(rec.recognize_files([photo])),
            lambda rec=rec: rec.__enter__(),
        ):
            with pytest.raises(ValueError, match=r"^the Recognizer is closed \(by close\(\)"):
                call()
    assert given.extractor.extract_images([image]).shape[0] == 1  # its parts stay open
    assert len(given.gallery.search(given.extractor.extract_images([image]), k=1).ids) == 1


def test_a_recogniser_closed_from_another_thread_closes_nothing(setup):
    """The library is closed by the thread that opened it: refused elsewhere, the model
    was closed all the same and the library dropped from what close() closes, so that a
    close on the right thread then left it (and its database file) open."""
    image = np.zeros((48, 64, 3), np.uint8)
    rec = Recognizer.open(setup["library"], model=setup["model"])
    with (
        ThreadPoolExecutor(1) as pool,
        pytest.raises(GalleryError, match="used from the thread that opened it"),
    ):
        pool.submit(rec.close).result()
    rec.recognize(image)  # nothing was closed
    rec.close()
    assert repr(rec.gallery).endswith(", closed>") and "closed" in repr(rec.extractor)


def test_several_products_are_each_recognised_and_not_suppressed_by_the_whole_image(
    setup, recognizer
):
    """Three products on a plain canvas, the largest covering most of it: the detector
    finds each, each gets the label it gets alone, the whole image is no result."""
    picks = [setup["queries"][i] for i in (0, 3, 9)]
    canvas, boxes, tiles = compose([p.path for p in picks], [300, 120, 120])
    with recognizer(PlainBackgroundDetector(), score_thres=-1.0, rec_nms_thres=0.05) as rec:
        alone = [rec.recognize(tile)[0].label for tile in tiles]
        results = rec.recognize(canvas)
        whole = rec.recognize_batch([canvas])[0]
    assert len(results) == 3
    assert [r.score for r in results] == sorted((r.score for r in results), reverse=True)
    overlaps = box_iou(
        torch.tensor(boxes, dtype=torch.float64),
        torch.tensor([r.bbox for r in results], dtype=torch.float64),
    )
    for row, label in zip(overlaps, alone, strict=True):
        match = [r for r, overlap in zip(results, row, strict=True) if overlap > 0.9]
        assert len(match) == 1 and match[0].label == label
    assert (0, 0, canvas.shape[1], canvas.shape[0]) not in [r.bbox for r in results]
    assert whole == results  # one batch of several images gives the same answer


def test_a_detected_sliver_too_elongated_for_the_model_is_left_out_not_the_photo(
    resize_short_library, thin_limit
):
    """A detector box 2 pixels wide down a normal photo passes MIN_BOX_SIDE, but a model
    that resizes the short side cannot take it (under the pixel limit, lowered here): the
    box is left out like a thinner one, and the photo's other box is recognised (the
    sliver failed the photo, and in `shitu serve` the request, with a 500)."""
    product = read_rgb(resize_short_library["images"] / "img000.png")  # 32x32
    photo = np.full((200, 200, 3), 255, np.uint8)
    photo[50:146, 50:146] = np.kron(product, np.ones((3, 3, 1), np.uint8))
    extractor = FeatureExtractor.load(resize_short_library["model"], num_threads=1)
    detector = FixedBoxes([(0, 0, 2, 200), (50, 50, 146, 146)])
    with Gallery.open(resize_short_library["gallery"], embedder=extractor) as gallery:
        rec = Recognizer(extractor, gallery, detector, score_thres=-1)
        (candidates,) = rec.score_batch([photo])
        (found,) = rec.recognize_batch([photo])
    assert [box.bbox for box in candidates.boxes] == [(50, 50, 146, 146)]
    assert [(r.bbox, r.label) for r in found] == [((50, 50, 146, 146), "block img000")]


def test_a_crop_the_model_gives_nan_is_left_unrecognised_and_the_others_are_not(
    setup, recognizer, monkeypatch, caplog
):
    """A model giving one crop NaN features (broken, or its runtime overflowing) failed the
    whole photo (in `shitu serve` the request) with 'search: query rows 0 contain NaN or
    inf'; that crop is now left unrecognised, with a warning, and the rest are searched."""
    canvas, boxes, _ = compose([setup["queries"][0].path, setup["queries"][3].path], [120, 120])
    extractor = setup["extractor"]
    with recognizer(FixedBoxes(boxes), score_thres=-1.0) as rec:
        expected = rec.score_batch([canvas])[0]
        extract = extractor.extract_images

        def first_crop_broken(crops, batch_size=32):
            features = extract(crops, batch_size)
            features[0] = np.nan
            return features

        monkeypatch.setattr(extractor, "extract_images", first_crop_broken)
        with caplog.at_level(logging.WARNING, logger="shitu.pipeline.recognizer"):
            (candidates,) = rec.score_batch([canvas])
    assert candidates.boxes == [None, expected.boxes[1]]
    assert candidates.whole == expected.whole
    assert "1 of 3 crops left unrecognised: the model gave NaN or inf features" in caplog.text


def test_whole_image_is_the_fallback_when_no_box_is_recognised(setup, recognizer):
    photo = read_rgb(setup["queries"][0].path)
    height, width = photo.shape[:2]
    # A store photo has no plain border: no boxes, so the whole image is recognised.
    with recognizer(PlainBackgroundDetector(), score_thres=-1.0) as rec:
        assert [r.bbox for r in rec.recognize(photo)] == [(0, 0, width, height)]
    # An object box that is recognised excludes the whole image ...
    canvas, *_ = compose([setup["queries"][0].path], [200])
    blank = (0, 0, GAP - 5, GAP - 5)  # plain canvas: a poor match for any product
    full = (0, 0, canvas.shape[1], canvas.shape[0])
    with recognizer(FixedBoxes([blank]), score_thres=-1.0) as rec:
        (only,) = rec.recognize(canvas)
    with recognizer(score_thres=-1.0) as rec:
        (whole,) = rec.recognize(canvas)
    assert only.bbox == blank and whole.bbox == full and whole.score > only.score
    # ... but one that fails the threshold does not: the whole image competes instead.
    middle = (only.score + whole.score) / 2
    with recognizer(FixedBoxes([blank]), score_thres=middle) as rec:
        assert rec.recognize(canvas) == [whole]


def test_score_threshold_and_recognition_nms(setup, recognizer):
    picks = [setup["queries"][i] for i in (1, 4, 7)]
    canvas, boxes, _ = compose([p.path for p in picks], [160, 160, 160])
    x1, y1, x2, y2 = boxes[0]
    shifted = (x1 + 12, y1 + 12, x2 + 12, y2 + 12)  # IoU ~0.74 with the first product
    detector = FixedBoxes([*boxes, shifted])
    with recognizer(detector, score_thres=-1.0, rec_nms_thres=1.0) as rec:
        everything = rec.recognize(canvas)
    assert len(everything) == 4
    with recognizer(detector, score_thres=-1.0, rec_nms_thres=0.5) as rec:
        kept = rec.recognize(canvas)
    pair = [r for r in everything if r.bbox in (boxes[0], shifted)]
    assert len(kept) == 3 and max(pair, key=lambda r: r.score) in kept
    middle = sorted(r.score for r in kept)[1]
    with recognizer(detector, score_thres=middle, rec_nms_thres=0.5) as rec:
        assert [r.score for r in rec.recognize(canvas)] == sorted(
            (r.score for r in kept if r.score >= middle), reverse=True
        )
    with recognizer(detector, score_thres=1.0) as rec:
        assert rec.recognize(canvas) == []
        # A threshold given to select is checked as the recogniser's own is: 5 would
        # silently recognise nothing, NaN everything or nothing.
        (candidates,) = rec.score_batch([canvas])
        for wrong in (5.0, -1.5, float("nan")):
            with pytest.raises(ConfigError, match="a cosine similarity from -1 to 1"):
                rec.select(candidates, wrong)


def test_the_recogniser_refuses_keywords_its_config_would_refuse(setup, recognizer):
    """Built from parts, the recogniser checks its keywords as the pipeline config checks
    its keys: an NMS threshold of -1 would keep only the best result and a detector's
    threshold of 5 fail only on the first photo (never without a detector)."""
    wrong = {
        "rec_nms_thres": (-1.0, 1.5, float("nan"), "0.05"),
        "det_threshold": (5.0, -0.1, None),
        "max_det_results": (-1, 2.5, True),
        "score_thres": ("0.5",),
    }
    for keyword, values in wrong.items():
        for value in values:
            with pytest.raises(ConfigError, match=rf"^{keyword}: expected .*, got {value!r}"):
                recognizer(**{keyword: value})
    with recognizer(rec_nms_thres=0.0, det_threshold=1.0, max_det_results=0) as rec:
        assert rec.rec_nms_thres == 0.0 and rec.max_det_results == 0
    # Paths belong to Recognizer.open; here they are named, not an AttributeError
    with Gallery.open(setup["library"], embedder=setup["extractor"]) as gallery:
        for parts, named in (
            ((setup["extractor"], str(setup["library"])), "gallery"),
            ((setup["model"], gallery), "extractor"),
            ((setup["extractor"], gallery, "plain-background"), "detector"),
        ):
            with pytest.raises(ConfigError, match=rf"^{named}: .*Recognizer.open\(gallery"):
                Recognizer(*parts)
        # The parts in `open`'s order (the gallery first) are named, not an AttributeError
        with pytest.raises(ConfigError, match=r"^gallery: .*FeatureExtractor; the extractor"):
            Recognizer(gallery, setup["extractor"])
        # and parts that are none, not an AttributeError (the detector's on the first photo)
        for parts, message in (
            (
                (None, gallery),
                "extractor: expected a loaded model (FeatureExtractor.load(model_dir)), got "
                "NoneType",
            ),
            (
                (setup["extractor"], gallery, 3),
                "detector: expected one with a detect(image, ...) method (load_detector(path), "
                "PlainBackgroundDetector()), got int",
            ),
            (
                (setup["extractor"], gallery, PlainBackgroundDetector),
                "detector: expected an instance, PlainBackgroundDetector(), not the class",
            ),
        ):
            with pytest.raises(ConfigError) as caught:
                Recognizer(*parts)
            assert str(caught.value) == message
        # and loaded parts given to `open`, which takes paths, are named with where they go
        for keywords, named, got in (
            ({"gallery": gallery}, "gallery", "Gallery"),
            (
                {"gallery": setup["library"], "model": setup["extractor"]},
                "model",
                "FeatureExtractor",
            ),
            (
                {"gallery": setup["library"], "detector": PlainBackgroundDetector()},
                "detector",
                "Plain",
            ),
        ):
            with pytest.raises(ConfigError) as caught:
                Recognizer.open(**keywords)
            assert str(caught.value).startswith(
                f"{named}: Recognizer.open takes paths, got {got}"
            ) and str(caught.value).endswith("go to Recognizer(extractor, gallery, detector)")


def test_a_recogniser_loads_from_a_config_files_path(setup, tmp_path):
    config = tmp_path / "my_pipeline.yaml"
    config.write_text(
        f"Global:\n  rec_inference_model_dir: {setup['model']}\n"
        f"IndexProcess:\n  index_dir: {setup['library']}\n  score_thres: 0.3\n"
    )
    for given in (config, str(config)):
        with Recognizer.from_config(given) as rec:
            assert rec.score_thres == 0.3 and rec.gallery.root == setup["library"]


def test_open_takes_the_recognize_commands_flags_as_keywords(setup, recognizer):
    """`Recognizer.open(gallery, ...)` is `shitu recognize --gallery ...`: the same results
    as a recogniser built from parts, paths as Path or text, a bad value named with its
    keyword, and a keyword for every flag the command maps to a config key."""
    photo = read_rgb(setup["queries"][0].path)
    with recognizer(score_thres=0.3) as built:
        expected = built.recognize(photo)
    for library in (setup["library"], str(setup["library"])):
        with Recognizer.open(library, model=setup["model"], score_thres=0.3, threads=1) as rec:
            assert rec.recognize(photo) == expected and rec.detector is None
    with Recognizer.open(
        setup["library"], model=setup["model"], detector="plain-background"
    ) as rec:
        assert isinstance(rec.detector, PlainBackgroundDetector)
    # refused as the constructor and FeatureExtractor.load refuse them: text was taken for
    # the number it spells, and True (as 1.0, recognising nothing) is no threshold
    for keyword, value, said in (
        ("score_thres", 2, "score_thres: expected a cosine similarity from -1 to 1, got 2"),
        ("score_thres", "0.5", "score_thres: expected a cosine similarity from -1 to 1, got '0.5'"),
        ("score_thres", True, "score_thres: expected a cosine similarity from -1 to 1, got True"),
        ("threads", "2", "threads: expected a whole number >= 1, got '2'"),
        ("threads", True, "threads: expected a whole number >= 1, got True"),
    ):
        with pytest.raises(ConfigError) as refused:
            Recognizer.open(setup["library"], model=setup["model"], **{keyword: value})
        assert str(refused.value) == said
    with pytest.raises(
        ConfigError, match=r"^runtime=True \(Global.rec_backend\): expected a value"
    ):
        Recognizer.open(setup["library"], model=setup["model"], runtime=True)
    with pytest.raises(ConfigError) as refused:
        recognizer(score_thres="0.5")
    assert str(refused.value) == "score_thres: expected a cosine similarity from -1 to 1, got '0.5'"
    with pytest.raises(ConfigError, match=r"runtime='tensorrt' \(Global.rec_backend\)"):
        Recognizer.open(setup["library"], model=setup["model"], runtime="tensorrt")
    keywords = set(inspect.signature(Recognizer.open).parameters) - {"config"}
    assert keywords == set(SETTINGS)


def test_open_takes_a_loaded_pipeline_config_and_leaves_it_as_it_was(setup):
    """`config=` may be a `load_pipeline_config(...)` with overrides, as `from_config` takes
    one; the keywords go on a copy, so the caller's config does not take them."""
    config = load_pipeline_config("inference_general", ["IndexProcess.score_thres=0.3"])
    with Recognizer.open(setup["library"], model=setup["model"], config=config) as rec:
        assert rec.score_thres == 0.3 and rec.gallery.root == setup["library"]
    assert config.IndexProcess.index_dir is None and config.Global.rec_inference_model_dir is None
    # the library, as --gallery may, comes from the config's index_dir where not given
    config = load_pipeline_config(
        "inference_general", [f"IndexProcess.index_dir={setup['library']}"]
    )
    with Recognizer.open(model=setup["model"], config=config) as rec:
        assert rec.gallery.root == setup["library"]


def picodet_pipeline_config(setup, grocery, *overrides: str) -> PipelineConfig:
    """The shipped pipeline config with the test model, library and the real PicoDet-S."""
    model = grocery.parent.parent / "models" / "picodet_s_coco" / "picodet_s_320_coco.onnx"
    return load_pipeline_config(
        "inference_general",
        [
            f"Global.rec_inference_model_dir={setup['model']}",
            f"Global.det_inference_model_dir={model}",
            f"IndexProcess.index_dir={setup['library']}",
            *overrides,
        ],
    )


def test_close_closes_what_from_config_opened_and_leaves_parts_passed_in_open(
    setup, recognizer, grocery
):
    config = picodet_pipeline_config(setup, grocery)
    with Recognizer.from_config(config) as rec:
        rec.recognize(np.zeros((64, 64, 3), np.uint8))
    assert "closed" in repr(rec.extractor) and repr(rec.detector) == "OnnxDetector(closed)"
    assert "closed" in repr(rec.gallery)
    with recognizer() as given:  # the caller's extractor and library
        pass
    assert given.extractor.extract_images([np.zeros((64, 64, 3), np.uint8)]).shape[0] == 1
    assert "closed" not in repr(given.gallery)


def test_onnx_picodet_detector_boxes_feed_the_pipeline(setup, grocery):
    config = picodet_pipeline_config(
        setup, grocery, "IndexProcess.score_thres=-1", "Global.threshold=0.1"
    )
    picks = [setup["queries"][i] for i in (0, 12)]
    canvas, *_ = compose([p.path for p in picks], [200, 200])
    with Recognizer.from_config(config) as rec:
        dets = rec.detector.detect(canvas, 0.1, 5)
        results = rec.recognize(canvas)
    allowed = {tuple(int(v) for v in np.floor(d[2:4])) for d in dets} | {(0, 0)}
    assert len(dets) and results
    assert all(r.bbox[:2] in allowed for r in results)


def test_recognize_cli_jsonl_table_visualisations_and_unreadable_files(setup, tmp_path, capsys):
    picks = [setup["queries"][i] for i in (6, 15)]  # juice, pepper: labels with spaces
    folder = tmp_path / "photos"
    folder.mkdir()
    for q in picks:
        (folder / q.path.name).write_bytes(q.path.read_bytes())
    (folder / "broken.jpg").write_bytes(b"not an image")
    common = ["--gallery", str(setup["library"]), "--model", str(setup["model"]), "--no-progress"]
    link = tmp_path / "via_link"  # results name the files as the user reached them
    link.symlink_to(folder, target_is_directory=True)
    font = tmp_path / "pillow.ttf"  # a font file that every machine has: Pillow's own
    font.write_bytes(ImageFont.load_default(size=12).font_bytes)
    code = shitu_main(
        [
            "recognize",
            str(link),
            *common,
            "--score-thres",
            "-1",
            "--save-vis",
            str(tmp_path / "vis"),
            "--vis-font",
            str(font),
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["image"] for line in lines] == sorted(str(link / q.path.name) for q in picks)
    assert all(
        set(r) == {"bbox", "label", "score", "image_id"} for line in lines for r in line["results"]
    )
    assert any(" " in r["label"] for line in lines for r in line["results"])
    assert "broken.jpg" in err and "1 of 3 files could not be read" in err
    assert sorted(p.name for p in (tmp_path / "vis").iterdir()) == sorted(
        q.path.stem + ".jpg" for q in picks
    )
    assert (
        shitu_main(
            [
                "recognize",
                str(setup["queries"][0].path),
                *common,
                "--format",
                "table",
                "--score-thres",
                "0.9999",
            ]
        )
        == 0
    )
    assert "(nothing recognised)" in capsys.readouterr().out


def test_recognize_table_keeps_a_line_per_path_whose_file_name_has_a_line_break(
    setup, tmp_path, capsys
):
    """The table gives each image's path a line of its own, its results indented below: a
    file named with a line break or tab split that line, so a reader saw a path that is
    not there. Such a path is written as a JSON string, as `index list` writes one."""
    folder = tmp_path / "photos"
    folder.mkdir()
    names = ["line\nbreak.jpg", "tab\there.jpg", "u\u2028.jpg", "plain.jpg"]
    for name, query in zip(names, setup["queries"], strict=False):
        (folder / name).write_bytes(query.path.read_bytes())
    (folder / "bro\nken.jpg").write_bytes(b"not an image")
    common = ["--gallery", str(setup["library"]), "--model", str(setup["model"]), "--no-progress"]
    code = shitu_main(["recognize", str(folder), *common, "--format", "table"])
    out = capsys.readouterr().out
    assert code == 0
    paths = [line for line in out.splitlines() if not line.startswith("  ")]
    read = [json.loads(path) if path.startswith('"') else path for path in paths]
    assert sorted(read) == sorted(str(folder / name) for name in [*names, "bro\nken.jpg"])
    assert str(folder / "plain.jpg") in paths  # a plain path stays as it is


def test_a_labelled_list_given_as_an_image_is_called_a_text_file(setup, capsys):
    """A `path<TAB>label` list passed to recognize or extract is not "unknown or corrupt":
    the warning says it is text, and which command reads labelled lists."""
    label_file = str(setup["label_file"])
    hint = "takes image files and folders; for a labelled list of `path<TAB>label` lines, use "
    hint += "`shitu eval-pipeline --queries LIST`)"
    model = ["--model", str(setup["model"]), "--no-progress"]
    commands = {
        "recognize": ["recognize", label_file, "--gallery", str(setup["library"])],
        "extract": ["extract", label_file, "--out", str(setup["work"] / "never")],
    }
    reason = "cannot decode image: a text file, not an image"
    for name, command in commands.items():
        assert shitu_main([*command, *model]) == 1
        err = capsys.readouterr().err
        assert f"warning: skipped {label_file}: {reason} ({name} {hint}" in err
    # Text under a photo's name (a download's HTML error page) is no list: no advice.
    page = setup["work"] / "downloads" / "photo.jpg"
    page.parent.mkdir(exist_ok=True)
    page.write_text("<html><body>404 Not Found</body></html>\n")
    assert (
        shitu_main(["recognize", str(page.parent), "--gallery", str(setup["library"]), *model]) == 1
    )
    assert f"warning: skipped {page}: {reason}\n" in capsys.readouterr().err


def test_recognize_cli_fails_clearly_when_there_is_nothing_to_recognise(setup, tmp_path, capsys):
    common = ["--gallery", str(setup["library"]), "--model", str(setup["model"]), "--no-progress"]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\x00not an image")
    assert shitu_main(["recognize", str(broken), *common]) == 1
    err = capsys.readouterr().err
    assert "the only file could not be read" in err and "unknown or corrupt format" in err
    assert "BytesIO" not in err
    iphone = tmp_path / "IMG_0001.HEIC"  # the start of an iPhone's photo: no corrupt file
    iphone.write_bytes(b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 64)
    assert shitu_main(["recognize", str(iphone), *common]) == 1
    assert "HEIC images are not supported: convert it to JPEG or PNG" in capsys.readouterr().err
    logo = tmp_path / "logo.svg"  # an image, named as one: not "a text file" to list
    logo.write_text('<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>\n')
    assert shitu_main(["recognize", str(logo), *common]) == 1
    said = "cannot decode image: SVG (vector) images are not supported: convert it to PNG\n"
    assert f"warning: skipped {logo}: {said}" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert shitu_main(["recognize", str(tmp_path / "empty"), *common]) == 2
    assert f"error: {tmp_path / 'empty'}: no images in this folder" in capsys.readouterr().err
    photo = str(setup["queries"][0].path)
    assert shitu_main(["recognize", photo, "--no-progress"]) == 2  # --gallery forgotten
    err = capsys.readouterr().err
    assert "no gallery library given: pass --gallery LIB" in err and "shitu index build" in err
    with pytest.raises(ConfigError, match=r"--gallery LIB \(in Python, Recognizer.open\(LIB\)"):
        Recognizer.from_config(load_pipeline_config())  # and how a Python caller gives one
    # A file (or a device) where the folder goes, or where a parent goes: named, in words,
    # as for every output folder (check_writable), not as an errno ("File exists").
    assert shitu_main(["recognize", photo, *common, "--save-vis", str(broken)]) == 2
    assert f"--save-vis {broken}: {broken} is a file, not a folder\n" in capsys.readouterr().err
    assert shitu_main(["recognize", photo, *common, "--save-vis", str(broken / "sub")]) == 2
    err = capsys.readouterr().err
    assert f"--save-vis {broken / 'sub'}: {broken} is a file, not a folder\n" in err
    assert shitu_main(["recognize", photo, *common, "--save-vis", "/dev/null"]) == 2
    err = capsys.readouterr().err
    assert "error: --save-vis /dev/null: /dev/null is a character device, not a folder\n" in err
    # A folder that cannot be made: named by the folder that refused it.
    if Path("/proc/self").is_dir():
        assert shitu_main(["recognize", photo, *common, "--save-vis", "/proc/self/new"]) == 2
        err = capsys.readouterr().err
        assert "error: --save-vis /proc/self/new: cannot make the folder in /proc/self (" in err
    # A folder no one may write in (procfs's: root may not either), refused before any photo.
    if Path("/proc/self").is_dir():
        assert shitu_main(["recognize", photo, *common, "--save-vis", "/proc/self"]) == 2
        out, err = capsys.readouterr()
        assert out == "" and "error: --save-vis /proc/self: cannot write in /proc/self (" in err
    for flag, value, reason in (
        ("--score-thres", "5", "a cosine similarity from -1 to 1"),
        ("--threads", "0", "a thread count from 1 to 1024"),
    ):
        with pytest.raises(SystemExit):
            shitu_main(["recognize", photo, *common, flag, value])
        assert f"{flag}: expected {reason}" in capsys.readouterr().err


def test_a_missing_library_from_a_config_file_names_the_file_and_key(
    setup, tmp_path, capsys, monkeypatch
):
    """`no such gallery library` for a path the user never typed: where it was read from."""
    config = tmp_path / "my_pipeline.yaml"
    config.write_text(f"Global:\n  rec_inference_model_dir: {setup['model']}\n"
                      "IndexProcess:\n  index_dir: my_lib\n")  # fmt: skip
    monkeypatch.chdir(tmp_path)
    photo = str(setup["queries"][0].path)
    assert shitu_main(["recognize", photo, "-c", str(config)]) == 2
    assert capsys.readouterr().err == (
        f"error: {config}: IndexProcess.index_dir: my_lib: no such gallery library (build one "
        f"with `shitu index build`) (read from the working directory {tmp_path})\n"
    )
    gone = tmp_path / "gone"
    assert (
        shitu_main(["recognize", photo, "-c", str(config), "-o", f"IndexProcess.index_dir={gone}"])
        == 2
    )
    assert capsys.readouterr().err == (
        f"error: {config}: IndexProcess.index_dir: {gone}: no such gallery library (build one "
        f"with `shitu index build`) (set by -o IndexProcess.index_dir={gone})\n"
    )
    assert shitu_main(["recognize", photo, "-c", str(config), "--gallery", str(gone)]) == 2
    assert capsys.readouterr().err == (  # the path given on the command line: as it was
        f"error: {gone}: no such gallery library (build one with `shitu index build`)\n"
    )


def test_a_missing_model_or_detector_from_a_config_file_names_the_file_and_key(
    setup, tmp_path, capsys, monkeypatch
):
    """As for the library: a PaddleClas config's model and detector paths, relative to the
    working directory, were named as if given by --model and --detector, with no word of
    the file they came from."""
    config = tmp_path / "inference_general.yaml"
    config.write_text("Global:\n  rec_inference_model_dir: ./models/rec\n"
                      "  det_inference_model_dir: ./models/det.onnx\n")  # fmt: skip
    monkeypatch.chdir(tmp_path)
    photo = str(setup["queries"][0].path)
    common = ["-c", str(config), "--gallery", str(setup["library"])]
    assert shitu_main(["recognize", photo, *common, "--model", str(setup["model"])]) == 2
    assert capsys.readouterr().err == (
        f"error: {config}: Global.det_inference_model_dir: ./models/det.onnx: no such file; "
        "give a detector file (.onnx, .pt or .pdparams), 'none' or 'plain-background' (read "
        f"from the working directory {tmp_path})\n"
    )
    assert shitu_main(["recognize", photo, *common, "--detector", "none"]) == 2
    assert capsys.readouterr().err.startswith(
        f"error: {config}: Global.rec_inference_model_dir: model models/rec: no such folder"
    )
    assert shitu_main(["recognize", photo, *common, "--detector", "gone.onnx"]) == 2
    assert capsys.readouterr().err.startswith(  # the path given on the command line: as it was
        "error: Global.det_inference_model_dir (--detector): gone.onnx: no such file; "
    )
    # A library of another model than the (shipped) one asked for, from the file.
    config.write_text(f"IndexProcess:\n  index_dir: {setup['library']}\n")
    assert shitu_main(["recognize", photo, "-c", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {config}: IndexProcess.index_dir: {setup['library']}: ")
    assert "pass the --model export that built the library" in err and err.count("\n") == 1


def test_an_unreadable_detector_file_is_named_by_its_key_and_config_file(
    setup, tmp_path, capsys, monkeypatch
):
    """A detector file that is there but cannot be read (not ONNX) was 'error: det.onnx
    cannot be opened by onnxruntime: ...', with no word of the key, or of the config file
    that named it; a missing one said both."""
    (tmp_path / "det.onnx").write_text("not a model")
    config = tmp_path / "pipeline.yaml"
    config.write_text("Global:\n  det_inference_model_dir: det.onnx\n")
    monkeypatch.chdir(tmp_path)
    photo = str(setup["queries"][0].path)
    common = ["--gallery", str(setup["library"]), "--model", str(setup["model"])]
    assert shitu_main(["recognize", photo, *common, "-c", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: {config}: Global.det_inference_model_dir: det.onnx cannot be opened by "
        "onnxruntime: "
    )
    assert err.endswith(f" (read from the working directory {tmp_path})\n")
    assert shitu_main(["recognize", photo, *common, "--detector", "det.onnx"]) == 2
    assert capsys.readouterr().err.startswith(
        "error: Global.det_inference_model_dir (--detector): det.onnx cannot be opened by "
    )


def test_a_library_given_as_the_model_is_told_of_the_shipped_model_once(setup, capsys):
    """`--model LIB` was told to give it as --gallery, 'and as --model the export that built
    it, or none for the shipped model', then '(set it to null, or give no --model, for the
    model shipped with shitu)' again; a model path that is not there keeps that way out,
    even one whose name says "shipped model" (the words of the error once decided it)."""
    photo, lib = str(setup["queries"][0].path), str(setup["library"])
    assert shitu_main(["recognize", photo, "--gallery", lib, "--model", lib]) == 2
    err = capsys.readouterr().err
    assert "is a gallery library, not an exported model: give it as --gallery" in err
    assert "set it to null" not in err
    # Told by the error, not by its words: a path that says "shipped model" keeps it too.
    for missing in ["no_such_model", "my shipped model"]:
        assert shitu_main(["recognize", photo, "--gallery", lib, "--model", missing]) == 2
        assert capsys.readouterr().err.endswith(
            "no such folder (set it to null, or give no --model, for the model shipped with "
            "shitu)\n"
        )


def test_recognize_cli_skips_an_image_over_the_pixel_limit(setup, tmp_path, capsys):
    """An image over the pixel limit (here over OpenCV's own too) is refused from its
    header: the file is reported with its size and the limit, and the batch goes on."""
    folder = tmp_path / "photos"
    folder.mkdir()
    photo = setup["queries"][0].path
    (folder / photo.name).write_bytes(photo.read_bytes())
    (folder / "huge.png").write_bytes(declared_png(40_000, 40_000))  # 1.6 Gpx, over 2^30
    common = ["--gallery", str(setup["library"]), "--model", str(setup["model"]), "--no-progress"]
    assert shitu_main(["recognize", str(folder), *common, "--score-thres", "-1"]) == 0
    out, err = capsys.readouterr()
    lines = {
        Path(line["image"]).name: line["results"] for line in map(json.loads, out.splitlines())
    }
    assert list(lines) == [photo.name] and lines[photo.name]
    assert (
        f"skipped {folder / 'huge.png'}: image 40000x40000 is 1600 megapixels, over the limit "
        "of 250 megapixels (SHITU_MAX_MEGAPIXELS raises it); not decoded"
    ) in err


def test_a_file_too_elongated_for_the_model_is_skipped_as_unreadable(
    resize_short_library, thin_limit, tmp_path, capsys
):
    """With a model that resizes the short side, a file too thin for that (under the pixel
    limit, lowered here) is reported as unreadable, as a corrupt one is, and the files
    beside it are recognised (it stopped the run); extract_files (`shitu extract`, `index
    build` and `add`) skips it alike."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in sorted(resize_short_library["images"].iterdir())[:2]:
        shutil.copy(path, folder)
    Image.fromarray(np.zeros((400, 2, 3), np.uint8)).save(folder / "thin.png")
    (folder / "broken.jpg").write_bytes(b"\x00not an image")
    paths = sorted(str(p) for p in folder.iterdir())  # broken, img000, img001, thin
    thin = str(folder / "thin.png")
    too_thin = "image 2x400 is too elongated to resize its short side to 32"
    extractor = FeatureExtractor.load(resize_short_library["model"], num_threads=1)
    with Gallery.open(resize_short_library["gallery"], embedder=extractor) as gallery:
        found = list(Recognizer(extractor, gallery, score_thres=-1).recognize_files(paths))
    assert [f.path for f in found] == paths
    errors = {Path(f.path).name: f.error for f in found}
    assert "unknown or corrupt format" in errors["broken.jpg"]
    assert errors["thin.png"].startswith(too_thin)
    labels = [f.results[0].label for f in found if f.error is None]
    assert labels == ["block img000", "block img001"]
    assert dict(extractor.extract_files(paths).failures)[thin] == errors["thin.png"]
    common = ["--gallery", str(resize_short_library["gallery"]), "--no-progress"]
    args = ["recognize", str(folder), *common, "--model", str(resize_short_library["model"])]
    assert shitu_main(args) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 2
    assert f"skipped {thin}: {too_thin}" in err and "2 of 4 files could not be read" in err


def test_save_vis_refuses_the_folder_of_the_input_photos(setup, grocery, tmp_path, capsys):
    """Annotated copies take the photos' names: written into the photos' own folder they
    replaced the user's photos with the annotated copies; written inside a folder given as
    input they were read as photos by the next run."""
    folder = tmp_path / "photos"
    folder.mkdir()
    photo = folder / "photo.jpg"
    original = setup["queries"][0].path.read_bytes()
    photo.write_bytes(original)
    common = ["--gallery", str(setup["library"]), "--model", str(setup["model"]), "--no-progress"]
    detector = grocery.parent.parent / "models" / "picodet_s_coco" / "picodet_s_320_coco.onnx"
    for command in (["recognize", *common], ["detect", "--model", str(detector)]):
        for vis in (folder, tmp_path / "photos" / ".." / "photos"):
            assert shitu_main([*command, str(folder), "--save-vis", str(vis)]) == 2
            err = capsys.readouterr().err
            assert f"error: --save-vis {vis}: holds input images ({photo})" in err
    assert photo.read_bytes() == original and list(folder.iterdir()) == [photo]
    inside = folder / "vis"  # the next scan of the folder would take the copies for photos
    assert shitu_main(["recognize", *common, str(folder), "--save-vis", str(inside)]) == 2
    err = capsys.readouterr().err
    assert f"error: --save-vis {inside}: is inside the input folder {folder}" in err
    assert list(folder.iterdir()) == [photo]
    # the photo named as a file: no folder is scanned, so a folder beside it is fine
    assert shitu_main(["recognize", *common, str(photo), "--save-vis", str(inside)]) == 0
    assert photo.read_bytes() == original and (inside / "photo.jpg").is_file()


def test_save_vis_refuses_a_folder_the_gallery_images_came_from(setup, tmp_path, capsys):
    """Annotated copies written inside the folder-per-label tree a gallery was built from
    were taken for gallery photos (of a label named after the --save-vis folder) by the
    next `shitu index add` of that tree."""
    products = tmp_path / "products"
    for item in setup["queries"][:4]:
        (products / item.label).mkdir(parents=True, exist_ok=True)
        shutil.copy(item.path, products / item.label)
    library, model = tmp_path / "library", str(setup["model"])
    build = ["index", "build", str(products), "--out", str(library), "--model", model]
    assert shitu_main([*build, "--no-progress"]) == 0
    photo = str(setup["queries"][5].path)
    common = ["recognize", photo, "--gallery", str(library), "--model", model, "--no-progress"]
    capsys.readouterr()
    for vis in (products / "vis", products / setup["queries"][0].label / "vis"):
        assert shitu_main([*common, "--save-vis", str(vis)]) == 2
        assert capsys.readouterr().err == (
            f"error: --save-vis {vis}: is inside {products.resolve()}, which the gallery's "
            "images came from, where adding that folder to the gallery again (`shitu index "
            "add`) would take the annotated copies for gallery photos: choose a folder outside "
            "it\n"
        )
        assert not vis.exists()
    assert shitu_main([*common, "--save-vis", str(tmp_path / "vis")]) == 0
    assert (tmp_path / "vis" / Path(photo).name).is_file()
    # a folder named after its one label, given with --label: that folder, not the one it is in
    kiwi, library = tmp_path / "Kiwi", tmp_path / "kiwi-library"
    kiwi.mkdir()
    shutil.copy(setup["queries"][0].path, kiwi)
    build = ["index", "build", str(kiwi), "--label", "Kiwi", "--out", str(library)]
    assert shitu_main([*build, "--model", model, "--no-progress"]) == 0
    common = ["recognize", photo, "--gallery", str(library), "--model", model, "--no-progress"]
    assert shitu_main([*common, "--save-vis", str(kiwi / "vis")]) == 2
    assert (
        f"--save-vis {kiwi / 'vis'}: is inside {kiwi.resolve()}, which" in capsys.readouterr().err
    )
    assert shitu_main([*common, "--save-vis", str(tmp_path / "vis2")]) == 0
    # a tree grouped by category (--leaf-labels): its root, above the categories
    tree, library = tmp_path / "tree", tmp_path / "tree-library"
    for folder, item in zip(("Fruit/Apple/Golden", "Fruit/Pear", "Vegetables/Leek"),
                            setup["queries"], strict=False):  # fmt: skip
        (tree / folder).mkdir(parents=True)
        shutil.copy(item.path, tree / folder)
    build = ["index", "build", str(tree), "--leaf-labels", "--out", str(library)]
    assert shitu_main([*build, "--model", model, "--no-progress"]) == 0
    common = ["recognize", photo, "--gallery", str(library), "--model", model, "--no-progress"]
    capsys.readouterr()
    assert shitu_main([*common, "--save-vis", str(tree / "vis")]) == 2
    assert (
        f"--save-vis {tree / 'vis'}: is inside {tree.resolve()}, which" in capsys.readouterr().err
    )


def test_save_vis_refuses_a_gallery_library_or_an_exported_model(setup, tmp_path, capsys):
    """--save-vis given the library or the model folder beside it on the command line (a
    slip of the shell's completion) wrote the annotated JPEGs among their files."""
    library = shutil.copytree(setup["library"], tmp_path / "library")
    model = shutil.copytree(setup["model"], tmp_path / "model")
    before = {folder: sorted(folder.iterdir()) for folder in (library, model)}
    photo = str(setup["queries"][0].path)
    common = ["--gallery", str(setup["library"]), "--model", str(setup["model"]), "--no-progress"]
    for vis, what in ((library, "a gallery library"), (model, "an exported model")):
        assert shitu_main(["recognize", photo, *common, "--save-vis", str(vis)]) == 2
        assert capsys.readouterr().err == (
            f"error: --save-vis {vis}: is {what}'s folder, not one for annotated copies: "
            "choose another folder\n"
        )
    assert before == {folder: sorted(folder.iterdir()) for folder in (library, model)}


def test_save_vis_copies_of_photos_with_the_longest_names_are_written(setup, tmp_path, capsys):
    """A photo's name of up to 255 bytes took `.jpg` (or `.png.jpg` beside a `.jpg` of the
    same name) past the file system's limit: 'File name too long' stopped the run there.
    The copies' names are cut to fit, each its own."""
    folder = tmp_path / "photos"
    folder.mkdir()
    long = "d" * 251
    shutil.copy(setup["queries"][0].path, folder / f"{long}.jpg")
    Image.open(setup["queries"][1].path).save(folder / f"{long}.png")
    bare = shutil.copy(setup["queries"][2].path, tmp_path / ("e" * 255))  # given by name
    common = ["--gallery", str(setup["library"]), "--model", str(setup["model"]), "--no-progress"]
    vis = tmp_path / "vis"
    given = [str(folder), str(bare), *common, "--save-vis", str(vis), "--format", "table"]
    assert shitu_main(["recognize", *given]) == 0, capsys.readouterr().err
    written = sorted(path.name for path in vis.rglob("*") if path.is_file())
    assert len(set(written)) == 3 and all(len(name) <= 255 for name in written)
    assert f"{long}.jpg" in written and f"{'e' * 251}.jpg" in written


def test_save_vis_keeps_the_sub_folders_so_same_named_photos_keep_their_copies(
    setup, tmp_path, capsys
):
    """`a/x.jpg` and `b/x.jpg` (shelves photographed by one camera's numbering) get a copy
    each, where the user finds them by the photo's path; `x.png` beside `x.jpg` keeps its
    suffix. Before, all went into one folder, the second as `x_2.jpg`, whichever it was."""
    folder = tmp_path / "photos"
    for sub, query in (("a", 0), ("b", 1), ("b/deeper", 2)):
        (folder / sub).mkdir(parents=True)
        shutil.copy(setup["queries"][query].path, folder / sub / "x.jpg")
    Image.open(setup["queries"][3].path).save(folder / "a" / "x.png")
    common = ["--gallery", str(setup["library"]), "--model", str(setup["model"]), "--no-progress"]
    vis = tmp_path / "vis"
    assert shitu_main(["recognize", str(folder), *common, "--save-vis", str(vis)]) == 0
    written = sorted(str(p.relative_to(vis)) for p in vis.rglob("*") if p.is_file())
    assert written == ["a/x.jpg", "a/x.png.jpg", "b/deeper/x.jpg", "b/x.jpg"]
    assert "replaced" not in capsys.readouterr().err
    # a/, then b/ into one folder: b's x.jpg replaces a's, which is said
    again = tmp_path / "again"
    for sub in ("a", "b"):
        assert shitu_main(["recognize", str(folder / sub), *common, "--save-vis", str(again)]) == 0
    assert f"note: 1 file already in {again} replaced by this run's annotated copies" in (
        capsys.readouterr().err
    )
    # files named one by one from two folders: the same layout
    photos = [str(folder / "a" / "x.jpg"), str(folder / "b" / "x.jpg")]
    assert shitu_main(["recognize", *photos, *common, "--save-vis", str(tmp_path / "two")]) == 0
    written = sorted(str(p.relative_to(tmp_path / "two")) for p in (tmp_path / "two").rglob("*"))
    assert written == ["a", "a/x.jpg", "b", "b/x.jpg"]
    # a copy that would land beside its photo (the inputs' common folder given) is refused
    original = (folder / "a" / "x.jpg").read_bytes()
    assert shitu_main(["recognize", *photos, *common, "--save-vis", str(folder)]) == 2
    assert f"error: --save-vis {folder}: holds input images ({photos[0]})" in (
        capsys.readouterr().err
    )
    assert (folder / "a" / "x.jpg").read_bytes() == original


def test_an_interrupted_annotated_copy_leaves_no_truncated_file(
    setup, tmp_path, monkeypatch, capsys
):
    """Ctrl-C while a copy is written: no half JPEG under the copy's name, no stray file."""
    photo = setup["queries"][0].path
    vis = tmp_path / "vis"
    real_write_bytes = Path.write_bytes

    def write_half_then_stop(path, data):
        real_write_bytes(path, data[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_bytes", write_half_then_stop)
    common = ["--gallery", str(setup["library"]), "--model", str(setup["model"]), "--no-progress"]
    assert shitu_main(["recognize", str(photo), *common, "--save-vis", str(vis)]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not vis.exists()  # nor the folder made for the copies, left empty


def test_an_annotated_copy_the_disk_cannot_take_whole_is_an_error_not_a_cut_short_jpeg(
    setup, tmp_path
):
    """Pillow's JPEG encoder took a short write (a full disk, the file size limit) for a
    whole one: the command went on, status 0, leaving a copy cut off at the limit."""
    import resource

    photo = setup["queries"][0].path
    vis = tmp_path / "vis"
    limit = 4096  # below any annotated photo's JPEG

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    command = [sys.executable, "-m", "shitu", "recognize", str(photo), "--gallery",
               str(setup["library"]), "--model", str(setup["model"]), "--save-vis", str(vis)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, preexec_fn=limit_file_size)
    assert result.returncode == 2
    assert result.stderr == f"error: cannot write {vis / photo.name}: File too large\n"
    assert not vis.exists()


def test_recognize_cli_warns_that_an_empty_library_recognises_nothing(setup, tmp_path, capsys):
    shutil.copytree(setup["library"], tmp_path / "library")
    with Gallery.open(tmp_path / "library") as gallery:
        gallery.remove(labels=sorted(gallery.label_counts()))
    photo = str(setup["queries"][0].path)
    common = ["--model", str(setup["model"]), "--no-progress"]
    assert shitu_main(["recognize", photo, "--gallery", str(tmp_path / "library"), *common]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["results"] == []
    assert f"warning: {tmp_path / 'library'} holds no images: nothing can be recognised" in err
    assert shitu_main(["recognize", photo, "--gallery", str(setup["library"]), *common]) == 0
    assert "holds no images" not in capsys.readouterr().err


def test_eval_pipeline_cli_reports_the_pipeline_recall(setup, recognizer, capsys):
    with recognizer() as rec:
        expected = evaluate_pipeline(rec, setup["queries"]).to_dict()
    code = shitu_main(
        ["eval-pipeline", "--queries", str(setup["label_file"]), "--gallery", str(setup["library"]),
         "--model", str(setup["model"]), "--json", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == expected


def test_eval_pipeline_draws_a_bar_over_hashing_a_large_query_set(setup, tmp_path):
    """Every query is read whole for its hash (is it a gallery image?) before any is
    recognised: at a terminal, a query set of HASH_BAR_MIN_FILES or more (lowered to 3
    here) shows a `hashing` bar there, as `index add` does, then the `recognizing` bar;
    a smaller one shows only the recognition's."""
    labels = tmp_path / "queries.txt"
    rows = [f"{q.path}\t{q.label}\n" for q in setup["queries"][:4]]
    hash_bar_from_3 = (
        "import sys, shitu.index.gallery as g, shitu.cli.main as m; g.HASH_BAR_MIN_FILES = 3; "
        "sys.exit(m.main(sys.argv[1:]))"
    )
    command = [sys.executable, "-c", hash_bar_from_3, "eval-pipeline", "--queries", str(labels)]
    command += ["--gallery", str(setup["library"]), "--model", str(setup["model"])]
    recognizing = "recognizing: 100%"
    for queries, bars_drawn in ((4, ["hashing: 100%", recognizing]), (2, [recognizing])):
        labels.write_text("".join(rows[:queries]))
        status, lines = run_in_terminal(command)
        assert status == 0, lines
        bars = [line for line in lines if "img/s" in line or "img]" in line]
        assert len(bars) == len(bars_drawn) and f" {queries}/{queries} " in bars[-1], lines
        starts = [bar[: len(start)] for bar, start in zip(bars, bars_drawn, strict=True)]
        assert starts == bars_drawn, lines


def test_eval_pipeline_cli_flags_gallery_photos_and_fails_when_nothing_was_measured(
    setup, tmp_path, capsys
):
    with Gallery.open(setup["library"]) as gallery:
        stored = gallery.entries()[0]
    copy = tmp_path / "copy_of_a_gallery_photo.jpg"
    copy.write_bytes(Path(stored.path).read_bytes())
    query = setup["queries"][0]
    labels = tmp_path / "queries.txt"
    labels.write_text(
        f"{stored.path}\t{stored.label}\n{copy}\t{stored.label}\n{query.path}\t{query.label}\n"
    )
    common = ["--gallery", str(setup["library"]), "--model", str(setup["model"]), "--no-progress"]
    assert shitu_main(["eval-pipeline", "--queries", str(labels), *common, "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["in_gallery"] == 2  # the file itself and its copy
    assert "2 of 3 query images are gallery images themselves" in captured.err

    labels.write_text(f"{tmp_path / 'missing.jpg'}\t{stored.label}\n")
    assert shitu_main(["eval-pipeline", "--queries", str(labels), *common]) == 1
    captured = capsys.readouterr()
    assert "the query could not be read" in captured.err and "missing.jpg" in captured.err

    labels.write_text(f"{query.path}\tNot In The Gallery\n")  # unknown queries only
    assert shitu_main(["eval-pipeline", "--queries", str(labels), *common, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["recall@1"] is None and report["balanced_accuracy"] is None
    assert shitu_main(["eval-pipeline", "--queries", str(labels), *common, "--sweep", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "no query has a label in the gallery" in out
    assert "recall@1: - (no query it applies to)" in out and "None" not in out
    assert shitu_main(["eval-pipeline", "--queries", str(labels), *common, "--score-thres=-1"]) == 0
    wrong = capsys.readouterr().out.splitlines()[0]  # at -1 it is recognised as something
    assert "expected nothing ('Not In The Gallery' is not in the gallery), got '" in wrong

    # Queries without labels: the advice is what eval-pipeline takes (it has no --label).
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copy(query.path, loose / "photo.jpg")
    for unlabelled in (loose, loose / "photo.jpg"):
        assert shitu_main(["eval-pipeline", "--queries", str(unlabelled), *common]) == 2
        err = capsys.readouterr().err
        assert "`path<TAB>label` file" in err and "--label" not in err, err

    # Queries grouped by category: --leaf-labels labels each by the folder it is in.
    product = tmp_path / "grouped" / "Category" / query.label
    product.mkdir(parents=True)
    shutil.copy(query.path, product / "photo.jpg")
    labels.write_text(f"{product / 'photo.jpg'}\t{query.label}\n")
    assert shitu_main(["eval-pipeline", "--queries", str(labels), *common, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    grouped = ["--queries", str(tmp_path / "grouped"), "--leaf-labels", "--json"]
    assert shitu_main(["eval-pipeline", *grouped, *common]) == 0
    assert json.loads(capsys.readouterr().out) == listed


def test_eval_pipeline_cli_names_each_unreadable_query_in_a_warning(setup, tmp_path, capsys):
    """As every command names the inputs it skipped on stderr; the report only counts them,
    and --json's names none."""
    query = setup["queries"][0]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    labels = tmp_path / "queries.txt"
    labels.write_text(f"{query.path}\t{query.label}\n{broken}\t{query.label}\n")
    common = ["eval-pipeline", "--queries", str(labels), "--gallery", str(setup["library"]),
              "--model", str(setup["model"]), "--no-progress"]  # fmt: skip
    for output in ([], ["--json"]):
        assert shitu_main([*common, *output]) == 0
        captured = capsys.readouterr()
        assert f"warning: skipped {broken}: cannot decode image" in captured.err
        assert str(broken) not in captured.out


def test_eval_pipeline_cli_refuses_the_library_as_its_queries(setup, capsys):
    """`--queries LIB`, the library given for the queries, was refused as 'a folder of
    gallery images', with the advice to give the images it holds: queries of themselves."""
    library = str(setup["library"])
    code = shitu_main(["eval-pipeline", "--queries", library, "--gallery", library,
                       "--model", str(setup["model"]), "--no-progress"])  # fmt: skip
    assert code == 2
    assert capsys.readouterr().err == (
        f"error: --queries {library}: a gallery library, not query photos; give labelled "
        "query photos (a folder of label folders, or a `path<TAB>label` file), and the library "
        "as --gallery\n"
    )


def test_eval_pipeline_cli_counts_the_wrong_answers_it_does_not_list(setup, capsys):
    common = ["eval-pipeline", "--queries", str(setup["label_file"]), "--gallery",
              str(setup["library"]), "--model", str(setup["model"]), "--no-progress"]  # fmt: skip
    assert shitu_main([*common, "--score-thres", "1"]) == 0  # no cosine reaches 1: all wrong
    wrong = [line for line in capsys.readouterr().out.splitlines() if line.startswith("wrong:")]
    assert len(setup["queries"]) > SHOWN_MISTAKES
    assert len(wrong) == SHOWN_MISTAKES + 1
    assert all(line.endswith(", got nothing") for line in wrong[:-1])
    hidden = len(setup["queries"]) - SHOWN_MISTAKES
    assert wrong[-1] == f"wrong: ... and {hidden} more (the first {SHOWN_MISTAKES} listed)"


def test_eval_pipeline_cli_lists_a_wrong_answer_a_line_each_whatever_the_file_name(
    setup, tmp_path, capsys
):
    """A query of a folder-per-label tree may be named with a line break: its `wrong:`
    line was split in two, the second a line the report does not have. Such a path is
    written as a JSON string, as `index list` writes one."""
    query = setup["queries"][0]
    names = ["line\nbreak.jpg", "tab\there.jpg", "plain.jpg"]
    for name in names:
        (tmp_path / "queries" / query.label).mkdir(parents=True, exist_ok=True)
        (tmp_path / "queries" / query.label / name).write_bytes(query.path.read_bytes())
    common = ["eval-pipeline", "--queries", str(tmp_path / "queries"), "--gallery",
              str(setup["library"]), "--model", str(setup["model"]), "--no-progress"]  # fmt: skip
    assert shitu_main([*common, "--score-thres", "1"]) == 0  # no cosine reaches 1: all wrong
    lines = capsys.readouterr().out.splitlines()
    wrong = [line.removeprefix("wrong: ") for line in lines if line.startswith("wrong: ")]
    paths = [line.rsplit(": expected ", 1)[0] for line in wrong]
    read = [json.loads(path) if path.startswith('"') else path for path in paths]
    assert sorted(read) == sorted(str(tmp_path / "queries" / query.label / n) for n in names)
    assert all(line.startswith(("wrong: ", " ")) for line in lines)


def test_eval_pipeline_cli_warns_when_no_query_label_is_in_the_gallery(setup, tmp_path, capsys):
    """Labels written otherwise than the gallery's (here in lower case) make every query
    unknown; the numbers alone would not say why."""
    labels = tmp_path / "queries.txt"
    labels.write_text("".join(f"{q.path}\t{q.label.lower()}\n" for q in setup["queries"]))
    common = ["eval-pipeline", "--queries", str(labels), "--gallery", str(setup["library"]),
              "--model", str(setup["model"]), "--no-progress", "--json"]  # fmt: skip
    assert shitu_main(common) == 0
    err = capsys.readouterr().err
    first = sorted({q.label for q in setup["queries"]})[0]
    assert f"warning: no query's label is in the gallery, so all {len(setup['queries'])}" in err
    assert f"(the queries' labels: {first.lower()!r}, " in err
    assert f"; the gallery's: {first!r}, " in err
    labels.write_text("".join(f"{q.path}\t{q.label}\n" for q in setup["queries"]))
    assert shitu_main(common) == 0
    assert "no query's label" not in capsys.readouterr().err


UNKNOWN = "Not In The Gallery"


def _open_set(queries: list[GalleryItem]) -> list[GalleryItem]:
    """The queries, those of the first product relabelled to a label the gallery lacks."""
    return [GalleryItem(q.path, UNKNOWN) if q.label == queries[0].label else q for q in queries]


def test_open_set_evaluation_and_its_threshold_sweep_agree_with_the_pipeline(setup, recognizer):
    queries = _open_set(setup["queries"])
    with recognizer(score_thres=0.5) as rec:
        report = evaluate_pipeline(rec, queries, sweep=[0.9, -1.0, 0.7, 1.0])
        assert [p.score_thres for p in report.sweep] == [-1.0, 0.7, 0.9, 1.0]
        for point in [report, *report.sweep]:  # each against `recognize` at that threshold
            rec.score_thres = point.score_thres
            firsts = [f.results[0].label if f.results else "" for f in rec.recognize_files(
                [q.path for q in queries])]  # fmt: skip
            known = [
                (q.label, got) for q, got in zip(queries, firsts, strict=True) if q.label != UNKNOWN
            ]
            unknown = [got for q, got in zip(queries, firsts, strict=True) if q.label == UNKNOWN]
            assert point.unknown_queries == len(unknown) == QUERIES_PER_CLASS
            assert point.unknown_rejected == unknown.count("")
            assert point.correct == sum(truth == got for truth, got in known)
            assert point.no_result == sum(got == "" for _, got in known)
            assert point.recall_at_1 == pytest.approx(point.correct / len(known))
            assert point.open_set_accuracy == pytest.approx(
                (point.correct + point.unknown_rejected) / len(queries)
            )
            assert len(point.mistakes) == len(queries) - point.correct - point.unknown_rejected
    everything, nothing = report.sweep[0], report.sweep[-1]
    assert everything.rejection == 0.0 and everything.no_result == 0
    assert nothing.rejection == 1.0 and nothing.correct == 0  # no cosine similarity reaches 1
    top = max(p.balanced_accuracy for p in report.sweep)  # None only when no better than 0.5
    best = report.best_threshold()
    assert (best.balanced_accuracy == top > 0.5) if best is not None else top <= 0.5
    assert report.to_dict()["rejection"] == round(report.rejection, 5)
    # A sweep where no threshold beats rejecting everything names no best threshold.
    useless = PipelineEvaluation(0.5, sweep=[PipelineEvaluation(t) for t in (0.2, 0.9)])
    for point, (correct, rejected) in zip(useless.sweep, [(4, 0), (0, 4)], strict=True):
        point.queries, point.unknown_queries = 8, 4
        point.correct, point.unknown_rejected = correct, rejected
    assert [p.balanced_accuracy for p in useless.sweep] == [0.5, 0.5]
    assert useless.best_threshold() is None
    useless.sweep[1].correct = 1  # 0.9 now keeps a known query: better than chance
    assert useless.best_threshold() is useless.sweep[1]
    ragged = PipelineEvaluation(0.5, queries=23, correct=16)  # 16 / 23 = 0.695652...
    assert ragged.to_dict()["recall@1"] == 0.69565  # which .4f would print as 0.6956
    row = sweep_table(PipelineEvaluation(0.5, sweep=[ragged])).splitlines()[1]
    assert row.split()[:2] == ["0.5", "0.6957"]
    with recognizer() as rec:  # without unknown labels: no rejection figures, no best threshold
        closed = evaluate_pipeline(rec, setup["queries"], sweep=np.float32([0.0, 0.5]))
        # queries from a generator count as a list's (each query is read more than once)
        generated = evaluate_pipeline(rec, iter(setup["queries"]), sweep=np.float32([0.0, 0.5]))
    assert closed.rejection is None and closed.best_threshold() is None
    assert generated.to_dict() == closed.to_dict() and generated.queries == len(setup["queries"])
    assert json.loads(json.dumps([p.to_dict() for p in closed.sweep]))[1]["score_thres"] == 0.5
    assert "rejection" not in closed.to_dict()
    # a folder's path or (path, label) pairs failed on "object has no attribute 'path'"
    query = setup["queries"][0]
    with recognizer() as rec:
        for given, got in [(str(query.path), "the string"), ([(query.path, query.label)], "tuple")]:
            with pytest.raises(GalleryError, match=rf"^evaluate_pipeline: expected .*got {got}"):
                evaluate_pipeline(rec, given)
        # one threshold alone failed on "'float' object is not iterable", once all were scored
        with pytest.raises(
            ConfigError, match=r"^sweep: expected a list of thresholds, got 0.5; pass \[0.5\]$"
        ):
            evaluate_pipeline(rec, setup["queries"], sweep=0.5)


def test_thresholds_tied_on_balanced_accuracy_choose_the_lower() -> None:
    """2 known and 6 unknown queries: 2/2 right and 2/6 turned away ties 1/2 and 5/6 (both
    2/3), which summed as floats came out 0.6666666666666666 and ...67, so the higher
    threshold was named best against the documented rule (the lower, which turns fewer
    known queries away)."""
    swept = [
        PipelineEvaluation(threshold, queries=8, unknown_queries=6, correct=c, unknown_rejected=r)
        for threshold, c, r in [(0.5, 2, 2), (0.7, 1, 5)]
    ]
    report = PipelineEvaluation(0.6, sweep=swept)
    assert [point.balanced_accuracy for point in swept] == [2 / 3, 2 / 3]
    assert report.best_threshold() is swept[0]


def test_query_labels_are_compared_as_the_library_stores_them(setup, tmp_path):
    """A folder-per-label tree from macOS names a product in NFD (its accent a separate code
    point); the library stores NFC: the same product, not an unknown one."""
    shutil.copytree(setup["library"], tmp_path / "library")
    first = setup["queries"][0].label
    stored = unicodedata.normalize("NFC", f"Crème {first}")
    with Gallery.open(tmp_path / "library", embedder=setup["extractor"]) as gallery:
        gallery.relabel(first, stored)
        rec = Recognizer(setup["extractor"], gallery)
        relabelled = [
            GalleryItem(q.path, stored if q.label == first else q.label) for q in setup["queries"]
        ]
        expected = evaluate_pipeline(rec, relabelled)
        as_folders = [
            GalleryItem(q.path, unicodedata.normalize("NFD", q.label) + " ") for q in relabelled
        ]
        report = evaluate_pipeline(rec, as_folders)
    assert report.to_dict() == expected.to_dict() and report.unknown_queries == 0
    assert report.mistakes == expected.mistakes  # none "expected 'Crème X', got 'Crème X'"


def test_queries_match_labels_an_older_library_stored_decomposed(setup, tmp_path):
    """Rows stored before labels were normalised may hold a name in NFD; the library answers
    to it in any form (`index list --label`, `remove`), and so does the evaluation: such a
    product is known, and recognising it is right, as in a library that stores it in NFC."""
    shutil.copytree(setup["library"], tmp_path / "library")
    first = setup["queries"][0].label
    composed = unicodedata.normalize("NFC", f"Crème {first}")
    queries = [
        GalleryItem(q.path, composed if q.label == first else q.label) for q in setup["queries"]
    ]
    with Gallery.open(tmp_path / "library", embedder=setup["extractor"]) as gallery:
        gallery.relabel(first, composed)
        expected = evaluate_pipeline(Recognizer(setup["extractor"], gallery), queries)
    with sqlite3.connect(tmp_path / "library" / "gallery.sqlite") as conn:  # as stored before
        decomposed = unicodedata.normalize("NFD", composed)
        conn.execute("UPDATE images SET label = ? WHERE label = ?", (decomposed, composed))
    with Gallery.open(tmp_path / "library", embedder=setup["extractor"]) as gallery:
        assert decomposed in gallery.label_counts()
        report = evaluate_pipeline(Recognizer(setup["extractor"], gallery), queries)
    assert expected.correct > 0
    assert report.to_dict() == expected.to_dict() and report.unknown_queries == 0
    assert report.mistakes == expected.mistakes


def test_eval_pipeline_cli_sweep_reports_every_threshold_and_the_best(setup, tmp_path, capsys):
    import cv2

    # Known queries, plus things no gallery product resembles: plain and noise images.
    noise = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    for name, image in [
        ("black", np.zeros_like(noise)),
        ("grey", noise * 0 + 128),
        ("noise", noise),
    ]:
        cv2.imwrite(str(tmp_path / f"{name}.png"), image)
    rows = [f"{q.path}\t{q.label}\n" for q in setup["queries"]]
    rows += [f"{tmp_path / name}.png\t{UNKNOWN}\n" for name in ("black", "grey", "noise")]
    labels = tmp_path / "open_set.txt"
    labels.write_text("".join(rows))
    common = ["eval-pipeline", "--queries", str(labels), "--gallery", str(setup["library"]),
              "--model", str(setup["model"]), "--no-progress", "--sweep", "0.25"]  # fmt: skip
    assert shitu_main([*common, "--json"]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert [p["score_thres"] for p in report["sweep"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert report["unknown_queries"] == QUERIES_PER_CLASS and report["score_thres"] == 0.5
    best = max(report["sweep"], key=lambda p: p["balanced_accuracy"])  # lowest on ties
    assert report["best_score_thres"] == best["score_thres"] and best["balanced_accuracy"] > 0.5
    assert best["rejection"] == 1.0  # nothing like a product passes the best threshold
    assert shitu_main(common) == 0
    out = capsys.readouterr().out
    assert f"best balanced accuracy at score_thres {best['score_thres']}" in out
    assert "open_set_accuracy" in out and " unknown_rejected: 3" in out
    # 0 would never end; 1e-7 would run 10 million thresholds off its grid
    for step in ("0", "1e-7", "1.5"):
        with pytest.raises(SystemExit):
            shitu_main([*common[:-1], step])
        assert f"sweep step {step}: must be from 0.001 to 1" in capsys.readouterr().err


def test_a_threshold_recorded_in_the_model_applies_unless_the_config_sets_one(setup, tmp_path):
    config = load_config(
        "GroceryStore_EfficientNetLite0",
        ["Arch.BackboneStopLayer.name=flatten", "Arch.Neck=null", "Arch.Head=null"],
    )
    model = export_model(config, None, tmp_path / "model", score_thres=0.93)
    assert read_manifest(model)["score_thres"] == 0.93
    assert read_manifest(setup["model"])["score_thres"] is None
    # The threshold is not part of the features' fingerprint: the library accepts both.
    library = [f"IndexProcess.index_dir={setup['library']}"]

    def threshold(model_dir: Path, *overrides: str) -> float:
        options = [*library, f"Global.rec_inference_model_dir={model_dir}", *overrides]
        with Recognizer.from_config(load_pipeline_config("inference_general", options)) as rec:
            return rec.score_thres

    assert threshold(model) == 0.93
    with Recognizer(FeatureExtractor.load(model), Gallery.open(setup["library"])) as rec:
        assert rec.score_thres == 0.93  # built from parts too
    assert threshold(model, "IndexProcess.score_thres=0.2") == 0.2
    assert threshold(setup["model"]) == 0.5  # no calibration recorded: PP-ShiTuV2's 0.5
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    manifest = json.loads((broken / MANIFEST).read_text())
    (broken / MANIFEST).write_text(json.dumps(manifest | {"score_thres": "high"}))
    with pytest.raises(CheckpointError, match="score_thres must be a cosine similarity"):
        FeatureExtractor.load(broken)
    with pytest.raises(ExportError, match="score_thres 1.5"):
        export_model(config, None, tmp_path / "refused", score_thres=1.5)
    assert not (tmp_path / "refused").exists()


def test_demo_builds_a_gallery_and_recognises_every_product(setup, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = Path("demo")  # relative, as the default: the photos are named as the folders are
    assert shitu_main(["demo", "--out", str(out), "--model", str(setup["model"])]) == 0
    text = capsys.readouterr().out
    assert f"demo photos written to {out / 'images'}" in text and str(tmp_path) not in text
    photos = [line for line in text.splitlines() if line.endswith((".jpg", ".png"))]
    assert len(photos) == 8 and all(line.startswith(f"{out / 'images'}/") for line in photos)
    right, total = (
        int(v) for v in text.split("recognised ")[-1].split(" products")[0].split(" of ")
    )
    assert total == 16 and right >= 15
    assert len(list((out / "vis").glob("*.jpg"))) == 8
    # The demo's folder given for its library (advised to build one from it as images):
    # the library in it is named.
    photo = str(out / "images" / "queries" / "shelf_0.jpg")
    common = [photo, "--model", str(setup["model"]), "--no-progress"]
    assert shitu_main(["recognize", *common, "--gallery", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"error: {out}: not a gallery library, but holds one: give {out / 'gallery'}\n"
    )
    # Running it again reuses its own folder; any other folder is refused.
    assert shitu_main(["demo", "--out", str(out), "--model", str(setup["model"])]) == 0
    assert shitu_main(["demo", "--out", str(setup["work"]), "--model", str(setup["model"])]) == 2
    # A model that cannot load (here: no int8 file) stops the demo before it writes anything.
    fresh = tmp_path / "fresh"
    args = ["demo", "--out", str(fresh), "--model", str(setup["model"]), "--precision", "int8"]
    assert shitu_main(args) == 2 and not fresh.exists()
    # Nor does a detector that cannot load (it wrote the photos and the library first), and
    # a path from a config file is named with the file, as by `recognize`.
    config = tmp_path / "pipeline.yaml"
    config.write_text("Global:\n  det_inference_model_dir: ./det.onnx\n")
    capsys.readouterr()
    assert shitu_main([*args[:-2], "-c", str(config)]) == 2 and not fresh.exists()
    assert capsys.readouterr().err.startswith(
        f"error: {config}: Global.det_inference_model_dir: ./det.onnx: no such file; "
    )


def test_the_demo_loads_its_model_once_and_closes_it(setup, tmp_path, monkeypatch, capsys):
    """The demo loaded the model to check the settings, built the library with it and
    never closed it; the recogniser then loaded the same model a second time."""
    loaded: list[FeatureExtractor] = []
    load = FeatureExtractor.load.__func__

    def counting_load(cls, *args, **kwargs) -> FeatureExtractor:
        loaded.append(load(cls, *args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(FeatureExtractor, "load", classmethod(counting_load))
    out = tmp_path / "demo"
    assert shitu_main(["demo", "--out", str(out), "--model", str(setup["model"])]) == 0
    assert "recognised " in capsys.readouterr().out
    assert len(loaded) == 1
    assert repr(loaded[0]).startswith("FeatureExtractor(closed")


def test_the_demo_loads_a_detector_file_once_and_closes_it(
    setup, grocery, tmp_path, monkeypatch, capsys
):
    """The demo loaded an ONNX detector to check the settings and closed it; the recogniser
    then loaded the same file a second time."""
    import shitu.detection

    loaded = []

    def counting_load(*args, **kwargs):
        loaded.append(load_detector(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(shitu.detection, "load_detector", counting_load)
    onnx = grocery.parent.parent / "models" / "picodet_s_coco" / "picodet_s_320_coco.onnx"
    out = tmp_path / "demo"
    given = ["demo", "--out", str(out), "--model", str(setup["model"]), "--detector", str(onnx)]
    assert shitu_main(given) == 0
    assert "recognised " in capsys.readouterr().out
    assert len(loaded) == 1
    assert repr(loaded[0]) == "OnnxDetector(closed)"


def test_a_demo_photo_the_disk_cannot_take_whole_is_an_error_not_a_cut_short_jpeg(setup, tmp_path):
    """The demo's photos were saved by Pillow's JPEG encoder, which takes a short write (a
    full disk, the file size limit) for a whole one: a gallery photo cut off at the limit
    went on into the library (here the library's own write then failed, naming the
    database, not the photo)."""
    import resource

    out = tmp_path / "demo"
    limit = 4096  # below any demo photo's JPEG

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    command = [sys.executable, "-m", "shitu", "demo", "--out", str(out), "--model", str(setup["model"])]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, preexec_fn=limit_file_size)
    assert result.returncode == 2
    first = out / "images" / "gallery" / "sunrise_oat_flakes_0.jpg"
    assert result.stderr == f"error: cannot write {first}: File too large\n"
    assert not first.exists() and list(first.parent.iterdir()) == []


def test_quick_start_demo_with_the_shipped_model(tmp_path, monkeypatch, capsys):
    """The README's main command: the packaged compact model, its ONNX model built into
    the (here: empty) cache, every demo product recognised with a confident score."""
    monkeypatch.setenv("SHITU_CACHE_DIR", str(tmp_path / "cache"))
    assert shitu_main(["demo", "--out", str(tmp_path / "demo")]) == 0
    text = capsys.readouterr().out
    assert "recognised 16 of 16 products" in text
    assert list((tmp_path / "cache" / "exports").glob("*/model.onnx"))
    scores = [float(line.split()[0]) for line in text.splitlines() if line.startswith("   0.")]
    # one result per product, none extra, each clearly above the model's calibrated threshold
    threshold = read_manifest(default_model_dir())["score_thres"]
    assert threshold == 0.6 and len(scores) == 16 and min(scores) > threshold + 0.1


def test_pipeline_config_reads_paddleclas_files_and_overrides(tmp_path):
    paddle = tmp_path / "inference_general.yaml"
    paddle.write_text(
        "Global:\n  infer_imgs: ./images\n  det_inference_model_dir: ./det\n  rec_inference_model_dir: ./rec\n"
        "  rec_nms_thresold: 0.05\n  batch_size: 1\n  threshold: 0.2\n  max_det_results: 5\n"
        "  image_shape: [3, 640, 640]\n  labe_list:\n  - foreground\n"  # PaddleClas's spelling
        "  use_gpu: true\n  enable_mkldnn: true\n  cpu_num_threads: 10\n  enable_benchmark: true\n"
        "  use_fp16: false\n  ir_optim: true\n  use_tensorrt: false\n  gpu_mem: 8000\n"
        "  enable_profile: false\n"
        "DetPreProcess:\n  transform_ops: []\nDetPostProcess: {}\nRecPreProcess:\n  transform_ops: []\n"
        "RecPostProcess: null\nIndexProcess:\n  index_method: HNSW32\n  index_dir: ./index\n"
        "  dist_type: IP\n  return_k: 5\n  score_thres: 0.4\n"
    )
    config = load_pipeline_config(
        paddle, ["IndexProcess.score_thres=0.6", "Global.det_inference_model_dir=none"]
    )
    assert config.IndexProcess.score_thres == 0.6 and config.detector is None
    assert config.Global.rec_inference_model_dir == "./rec" and config.Global.cpu_num_threads == 10
    # `--detector "$DET" --model "$MODEL"` with both unset: none given (the detector was
    # "is a folder, not a file: " for the working directory; the model the shipped one,
    # but not said so where a library needed another)
    unset = ["Global.det_inference_model_dir=''", "Global.rec_inference_model_dir=''"]
    unset = load_pipeline_config(paddle, unset).Global
    assert unset.det_inference_model_dir is None and unset.rec_inference_model_dir is None
    assert load_pipeline_config("inference_general").IndexProcess.score_thres is None  # the model's
    with pytest.raises(ConfigError, match="expected a PipelineConfig .* got dict"):
        Recognizer.from_config({"IndexProcess": {"index_dir": "./index"}})
    # what is not a name, path or override: named, not a TypeError or AttributeError
    with pytest.raises(
        ConfigError, match=r"^expected a pipeline config's name or path, got int 3$"
    ):
        load_pipeline_config(3)
    with pytest.raises(
        ConfigError,
        match=r"^pipeline defaults: overrides: expected 'KEY=VALUE' strings, got NoneType",
    ):
        load_pipeline_config(None, [None])

    def detector(keyword: str) -> object:
        return build_detector(
            load_pipeline_config(None, [f"Global.det_inference_model_dir={keyword}"])
        )

    assert detector("NONE") is None  # keywords in any case
    assert isinstance(detector("Plain-Background"), PlainBackgroundDetector)
    with pytest.raises(ConfigError, match=r"Global.treshold: unknown key"):
        load_pipeline_config(paddle, ["Global.treshold=0.3"])
    with pytest.raises(ConfigError, match=r"score_thres.*set by -o IndexProcess.score_thres=2"):
        load_pipeline_config(None, ["IndexProcess.score_thres=2"])
    with pytest.raises(ConfigError, match=r"^pipeline defaults: Globl: unknown key.*set by -o"):
        load_pipeline_config(None, ["Globl.x=1"])  # a whole misspelt section
    with pytest.raises(
        ConfigError, match=r"inference_general.yaml: override 'Global.x' is not of the form"
    ):
        load_pipeline_config(paddle, ["Global.x"])
    with pytest.raises(ConfigError, match="pipeline config not found"):
        load_pipeline_config("no_such_config")
    # A training config, as the fine-tuning commands give it, by file or shipped name: said
    # to be one, not listed as a dozen unknown keys (nor as not found).
    training = tmp_path / "my_products.yaml"
    shutil.copy(resolve_config_path("GroceryStore_EfficientNetLite0"), training)
    for name in (training, "GroceryStore_EfficientNetLite0"):
        with pytest.raises(ConfigError, match=f"^{name}: a training config .* as --model DIR"):
            load_pipeline_config(name)


def test_a_library_of_an_export_searched_without_model_says_the_shipped_model_was_used(
    setup, capsys
):
    """Built with `--model EXPORT`, then used without it: the refusal says which
    model it got (the fingerprints alone do not); with a --model it says nothing of it."""
    photo, library = str(setup["queries"][0].path), str(setup["library"])
    note = (
        "no --model (model= in Python) was given, so this model is the one shipped with shitu; "
        "pass the --model export that built the library"
    )
    for command in (
        ["recognize", photo, "--gallery", library],
        ["index", "search", library, photo],
        ["index", "add", library, photo, "--label", "Banana"],
    ):
        assert shitu_main([*command, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {library}: library ") and err.rstrip().endswith(f"({note})")
    assert (
        shitu_main(["recognize", photo, "--gallery", library, "--model", str(setup["model"])]) == 0
    )
    assert note not in capsys.readouterr().err


def test_a_library_of_the_shipped_model_searched_with_a_model_says_to_give_none(
    setup, tmp_path, capsys
):
    """Built with the shipped model, then used with `--model EXPORT`: the refusal says in
    words that the library needs no --model (the fingerprints alone do not)."""
    photo, library = str(setup["queries"][0].path), str(tmp_path / "shipped")
    assert shitu_main(["index", "build", photo, "--label", "Banana", "--out", library]) == 0
    capsys.readouterr()
    note = "the library was built with the model shipped with shitu: give no --model (model= in "
    note += "Python)"
    model = ["--model", str(setup["model"]), "--no-progress"]
    for command in (
        ["recognize", photo, "--gallery", library],
        ["index", "search", library, photo],
        ["index", "add", library, photo, "--label", "Banana"],
    ):
        assert shitu_main([*command, *model]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {library}: library ") and err.rstrip().endswith(f"({note})")
    assert shitu_main(["recognize", photo, "--gallery", library, "--no-progress"]) == 0
    assert note not in capsys.readouterr().err


def test_default_model_dir_names_the_missing_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(default_model_module, "DEFAULT_MODEL_DIR", tmp_path / "default_model")
    with pytest.raises(CheckpointError, match="default model is missing.*--model"):
        default_model_dir()
    code = shitu_main(["recognize", "x.jpg", "--gallery", str(tmp_path)])
    assert code == 2 and "default model is missing" in capsys.readouterr().err
    (tmp_path / "default_model").mkdir()
    (tmp_path / "default_model" / "shitu_model.json").write_text("{}")
    assert default_model_dir() == tmp_path / "default_model"


def test_an_exported_recognition_model_given_as_the_detector_is_sent_to_model(setup, tmp_path):
    """`--detector` for `--model`, folder or its model.onnx: that said the folder was no file,
    or that the ONNX graph's outputs were not PicoDet's, with no word of --model."""
    model = setup["model"]
    for given in (model, model / "model.onnx"):
        settings = [f"Global.det_inference_model_dir={given}", f"IndexProcess.index_dir={tmp_path}"]
        with pytest.raises(ConfigError) as info:
            Recognizer.from_config(load_pipeline_config(None, settings))
        part = "" if given == model else "a file of "
        assert str(info.value) == (
            f"Global.det_inference_model_dir (--detector): {given} is {part}an exported "
            f"recognition model, not a detector: that goes to --model ({model}); give as "
            "--detector a detector file (.onnx, .pt or .pdparams), 'none' or 'plain-background'"
        )


def test_wrong_detector_and_model_settings_name_the_setting_and_the_way_out(tmp_path, capsys):
    with pytest.raises(ConfigError, match="bogus: no such file; .*'none' or 'plain-background'"):
        Recognizer.from_config(
            load_pipeline_config(
                None, ["Global.det_inference_model_dir=bogus", f"IndexProcess.index_dir={tmp_path}"]
            )
        )
    paddle_model = tmp_path / "paddle_model"  # e.g. a PaddleClas inference folder
    paddle_model.mkdir()
    with pytest.raises(
        ConfigError, match=r"\(--detector\): .*paddle_model is a folder, not a file; give"
    ):
        Recognizer.from_config(
            load_pipeline_config(
                None,
                [
                    f"Global.det_inference_model_dir={paddle_model}",
                    f"IndexProcess.index_dir={tmp_path}",
                ],
            )
        )
    run = tmp_path / "detect_run"  # `shitu detect-train --out`: the detectors it holds named
    run.mkdir()
    (run / "model.onnx").write_bytes(b"")
    settings = [f"Global.det_inference_model_dir={run}", f"IndexProcess.index_dir={tmp_path}"]
    with pytest.raises(ConfigError, match=re.escape(f"; it holds {run / 'model.onnx'}")):
        Recognizer.from_config(load_pipeline_config(None, settings))
    settings = [
        f"Global.rec_inference_model_dir={paddle_model}",
        f"IndexProcess.index_dir={tmp_path}",
    ]
    with pytest.raises(CheckpointError, match=r"rec_inference_model_dir \(--model\): .*null"):
        Recognizer.from_config(load_pipeline_config(None, settings))
    # PaddleClas's inference_general.yaml names PP-ShiTu's Paddle mainbody detector folder
    (paddle_model / "inference.pdiparams").write_bytes(b"")
    settings = [
        f"Global.det_inference_model_dir={paddle_model}",
        f"IndexProcess.index_dir={tmp_path}",
    ]
    with pytest.raises(ConfigError) as info:
        Recognizer.from_config(load_pipeline_config(None, settings))
    assert str(info.value) == (
        f"Global.det_inference_model_dir (--detector): {paddle_model} is a Paddle inference "
        "model, which shitu does not run; give the PicoDet weights it was made from "
        "(.pdparams, with --det-arch) or an ONNX export"
    )
    # PaddleDetection's own export (tools/export_model.py) names its files model.*
    paddle_detection = tmp_path / "picodet_export"
    paddle_detection.mkdir()
    for name in ("model.pdiparams", "model.pdmodel", "infer_cfg.yml"):
        (paddle_detection / name).write_bytes(b"")
    photo = tmp_path / "photo.png"
    Image.new("RGB", (64, 64)).save(photo)
    command = ["recognize", str(photo), "--gallery", str(tmp_path), "--detector"]
    assert shitu_main([*command, str(paddle_detection)]) == 2
    assert (
        f"error: Global.det_inference_model_dir (--detector): {paddle_detection} is a Paddle "
        "inference model, which shitu does not run; give the PicoDet weights it was made from "
        "(.pdparams, with --det-arch) or an ONNX export"
    ) in capsys.readouterr().err


def test_save_vis_shrinks_a_copy_wider_than_jpeg_holds_and_goes_on(setup, tmp_path, capsys):
    """A photo of over 65,500 pixels a side (a shelf panorama; well within the pixel limit)
    is recognised, but JPEG cannot hold its copy: the copy is shrunk to fit, where its
    encoder's refusal stopped the run and removed every copy made."""
    panorama = tmp_path / "photos" / "panorama.png"
    panorama.parent.mkdir()
    Image.new("RGB", (70_000, 40), "white").save(panorama)
    photo = tmp_path / "photos" / "photo.jpg"
    photo.write_bytes(setup["queries"][0].path.read_bytes())
    vis = tmp_path / "vis"
    code = shitu_main(
        [
            "recognize",
            str(panorama),
            str(photo),
            "--gallery",
            str(setup["library"]),
            "--model",
            str(setup["model"]),
            "--score-thres",
            "-1",
            "--save-vis",
            str(vis),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert len(capsys.readouterr().out.splitlines()) == 2
    with Image.open(vis / "panorama.jpg") as copy:
        assert copy.size == (65_500, 37)
    assert read_rgb(vis / "photo.jpg").shape == read_rgb(photo).shape


def test_saved_visualisations_are_drawn_on_the_photos_decoded_for_recognition(
    setup, recognizer, tmp_path
):
    """`recognize --save-vis` draws each photo as recognition decoded it instead of decoding
    the file a second time (a phone photo takes longer to decode than to recognise): a photo
    gone after recognition is drawn all the same. Without keep_images no photo is held."""
    from shitu.cli.common import VisualisationWriter

    photos = []
    for index, query in enumerate(setup["queries"][:3]):
        photos.append(tmp_path / f"photo{index}.jpg")
        shutil.copy(query.path, photos[-1])
    with recognizer(score_thres=-1.0) as rec:
        kept = list(rec.recognize_files(photos, keep_images=True))
        plain = list(rec.recognize_files(photos))
    assert all(found.image is None for found in plain)
    assert [found.results for found in kept] == [found.results for found in plain]
    for found, photo in zip(kept, photos, strict=True):
        assert np.array_equal(found.image, read_rgb(photo))
        photo.unlink()
    writer = VisualisationWriter(tmp_path / "vis")
    for found in kept:
        assert read_rgb(writer.save_recognition(found)).shape == found.image.shape


def test_a_detector_or_font_given_as_a_device_or_fifo_is_named_as_one(tmp_path):
    """`--detector /dev/null` (or a FIFO) was "no such file", `--vis-font` of one "not a
    file": each path is there, and named for what it is."""
    fifo = tmp_path / "det.fifo"
    os.mkfifo(fifo)
    for given, kind in ((fifo, "a FIFO (named pipe)"), ("/dev/null", "a character device")):
        settings = [f"Global.det_inference_model_dir={given}", f"IndexProcess.index_dir={tmp_path}"]
        with pytest.raises(ConfigError) as caught:
            Recognizer.from_config(load_pipeline_config(None, settings))
        assert str(caught.value).startswith(
            f"Global.det_inference_model_dir (--detector): {given} is {kind}, not a detector "
            "file; give a detector file"
        )
        with pytest.raises(DataError) as caught:
            CaptionFonts(Path(given))
        assert str(caught.value) == f"font {given}: {kind}, not a font file"


def test_an_override_of_a_paddleclas_key_shitu_ignores_is_warned_of(tmp_path, caplog):
    """PaddleClas keys that shitu ignores load quietly from its files, so that they load
    as they are; `-o IndexProcess.return_k=5` or `-o Global.use_gpu=true` asked for
    something nothing carried out, without a word. Each such override is warned of with
    why; a key shitu uses, or one only in the file, says nothing."""
    paddle = tmp_path / "inference_general.yaml"
    paddle.write_text("Global:\n  use_gpu: true\nIndexProcess:\n  return_k: 5\n")
    with caplog.at_level(logging.WARNING, logger="shitu.pipeline"):
        load_pipeline_config(paddle, ["Global.batch_size=4", "IndexProcess.score_thres=0.5"])
    assert caplog.messages == []
    overrides = ["IndexProcess.return_k=3", "Global.use_gpu=false", "RecPreProcess={}"]
    with caplog.at_level(logging.WARNING, logger="shitu.pipeline"):
        config = load_pipeline_config(paddle, overrides)
    assert config.Global.batch_size == 32
    assert caplog.messages == [
        "-o IndexProcess.return_k=3: PaddleClas's setting, which shitu ignores (`shitu index "
        "build` builds libraries, and only the top hit is used)",
        "-o Global.use_gpu=false: PaddleClas's setting, which shitu ignores (it steers "
        "Paddle's runtime)",
        "-o RecPreProcess={}: PaddleClas's setting, which shitu ignores (an export records "
        "its own preprocessing, and a detector its own)",
    ]
