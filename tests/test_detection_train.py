"""Detector training: losses, SimOTA, datasets, COCO mAP and a tiny real training run."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from shitu import image_files
from shitu.cli.main import main
from shitu.detection import build_picodet, load_detector
from shitu.detection.assigner import simota_assign
from shitu.detection.coco_eval import evaluate_boxes
from shitu.detection.data import (
    CocoDetection,
    VocDetection,
    collate,
    random_crop,
    train_augment,
)
from shitu.detection.losses import distribution_focal_loss, giou, giou_loss, varifocal_loss
from shitu.detection.train import DetectionTrainConfig, DetectionTrainer, evaluate_detector
from shitu.engine.metrics_log import read_log
from shitu.engine.state import Progress, load_training_state, save_training_state
from shitu.errors import ConfigError, DataError
from tests.terminal_helpers import run_in_terminal

# ---------------------------------------------------------------- losses


def test_giou_of_known_boxes() -> None:
    a = torch.tensor([[0.0, 0, 2, 2], [0, 0, 1, 1], [0, 0, 2, 2]])
    b = torch.tensor([[1.0, 1, 3, 3], [2, 2, 3, 3], [0, 0, 2, 2]])
    # overlap 1, union 7, hull 9 -> 1/7 - 2/9; disjoint: 0 - (9-2)/9; identical: 1.
    expected = torch.tensor([1 / 7 - 2 / 9, -7 / 9, 1.0])
    torch.testing.assert_close(giou(a, b), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(giou_loss(a, b), 1 - expected, atol=1e-5, rtol=0)


def test_dfl_of_known_distribution() -> None:
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3]]))
    # target 1.25: 0.75 * -log(0.6) + 0.25 * -log(0.3)
    expected = 0.75 * -math.log(0.6) + 0.25 * -math.log(0.3)
    assert distribution_focal_loss(logits, torch.tensor([1.25])).item() == pytest.approx(expected)


def test_varifocal_two_elements() -> None:
    logits = torch.tensor([0.0, math.log(3.0)])  # p = 0.5 and 0.75
    target = torch.tensor([0.8, 0.0])
    pos = 0.8 * -(0.8 * math.log(0.5) + 0.2 * math.log(0.5))  # weight q, BCE with q
    neg = 0.75 * 0.75**2 * -math.log(0.25)  # weight alpha p^gamma, BCE with 0
    got = varifocal_loss(logits, target)
    assert got.tolist() == pytest.approx([pos, neg], rel=1e-5)


# ---------------------------------------------------------------- assignment


def test_simota_assigns_well_predicting_anchors_near_the_centre() -> None:
    # A 4x4 grid of stride-8 anchors over 32x32; one ground truth covering the left half.
    ys, xs = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    points = torch.stack([xs.flatten(), ys.flatten()], 1) * 8 + 4
    strides = torch.full((16,), 8.0)
    gt = torch.tensor([[0.0, 0.0, 16.0, 32.0]])
    boxes = torch.cat([points - 4, points + 4], 1)  # every anchor predicts its own cell
    good = [4, 8]  # (x=4, y=12) and (x=4, y=20): predict the ground truth exactly
    boxes[good] = gt
    scores = torch.full((16, 1), 0.1)
    assigned, ious = simota_assign(scores, boxes, points, strides, gt, torch.tensor([0]))
    # Candidates are inside the box (x < 16); the top-10 IoUs sum to 2 + 6 * 1/8 -> k = 2,
    # and the two exact predictions are the cheapest.
    assert sorted(torch.nonzero(assigned == 0).squeeze(1).tolist()) == good
    assert ious[good].tolist() == pytest.approx([1.0, 1.0])
    assert (assigned[[2, 3, 6, 7]] == -1).all()  # right half: never a candidate


def test_simota_without_ground_truth_is_all_background() -> None:
    assigned, _ = simota_assign(
        torch.rand(5, 2),
        torch.rand(5, 4),
        torch.rand(5, 2),
        torch.ones(5),
        torch.zeros(0, 4),
        torch.zeros(0, dtype=torch.long),
    )
    assert (assigned == -1).all()


# ---------------------------------------------------------------- COCO mAP


def test_coco_map_hand_computed() -> None:
    gt = [
        (np.array([[0, 0, 10, 10]], np.float32), np.array([0])),
        (np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32), np.array([0, 0])),
    ]
    # Ordered by score: TP (img0), FP (img1, no overlap), TP (img1 first box); 3 ground truths.
    dets = [
        np.array([[0, 0.9, 0, 0, 10, 10]], np.float32),
        np.array([[0, 0.8, 50, 50, 60, 60], [0, 0.7, 0, 0, 10, 10]], np.float32),
    ]
    # precision envelope: recall 1/3 -> 1.0, recall 2/3 -> 2/3, recall 1 unreachable.
    # 101 points: r in [0, 1/3] (34 points) -> 1, (1/3, 2/3] (33 points) -> 2/3, rest 0.
    expected = (34 * 1.0 + 33 * 2 / 3) / 101
    result = evaluate_boxes(dets, gt)
    assert result["AP50"] == pytest.approx(expected)
    assert result["mAP"] == pytest.approx(expected)  # exact boxes: same at every IoU
    shifted = [d.copy() for d in dets]
    shifted[0][0, 5] = 12.0  # IoU 10/12 = 0.833: a TP only up to threshold 0.8
    # Above it the order is FP, FP, TP: precision 1/3 up to recall 1/3 (34 points).
    assert evaluate_boxes(shifted, gt)["mAP"] == pytest.approx(
        (7 * expected + 3 * (34 / 3) / 101) / 10
    )


def test_coco_map_keeps_the_best_100_boxes_of_each_class_per_image() -> None:
    """pycocotools' maxDets limits an image's boxes class by class: 100 confident boxes of
    one class do not push another class's right box out of the count."""
    gt = [(np.array([[0, 0, 10, 10], [50, 50, 60, 60]], np.float32), np.array([0, 1]))]
    others = [[1, 0.9, 50, 50, 60, 60]] + [[1, 0.8, 100, 100, 110, 110]] * 100
    dets = [np.array([*others, [0, 0.1, 0, 0, 10, 10]], np.float32)]
    assert evaluate_boxes(dets, gt)["mAP"] == pytest.approx(1.0)  # both classes found first


def test_coco_map_ignores_detections_in_crowd_regions() -> None:
    """As pycocotools: a box that matches no object but lies in a crowd region of its class
    (a throng of people annotated as one) is neither right nor wrong, at the thresholds up
    to the share of it the region covers."""
    gt = [(np.array([[0, 0, 10, 10]], np.float32), np.array([0]))]
    crowd = [(np.array([[50, 50, 100, 100], [0, 50, 40, 100]], np.float32), np.array([0, 1]))]
    in_crowd = [0, 0.9, 60, 60, 70, 70]
    dets = [np.array([in_crowd, [0, 0.8, 0, 0, 10, 10]], np.float32)]
    assert evaluate_boxes(dets, gt)["mAP"] == pytest.approx(0.5)  # a wrong box, then the right
    assert evaluate_boxes(dets, gt, crowds=crowd)["mAP"] == pytest.approx(1.0)
    half_in = [0, 0.9, 46.3, 50, 56.3, 60]  # 63% inside: ignored up to IoU 0.6, wrong above
    dets = [np.array([half_in, [0, 0.8, 0, 0, 10, 10]], np.float32)]
    assert evaluate_boxes(dets, gt, crowds=crowd)["mAP"] == pytest.approx((3 + 7 * 0.5) / 10)
    other_class = [(crowd[0][0], np.array([1, 1]))]  # a crowd of another class: no excuse
    assert evaluate_boxes(dets, gt, crowds=other_class)["mAP"] == pytest.approx(0.5)


def test_coco_map_ignores_difficult_boxes() -> None:
    """As VOC's protocol (and PaddleDetection's VOC metric): a difficult box does not count
    towards recall, and detections on it, however many, are neither right nor wrong; one
    that misses it is wrong as ever."""
    gt = [(np.array([[0, 0, 10, 10], [50, 50, 60, 60]], np.float32), np.array([0, 0]))]
    hard = [np.array([False, True])]
    on_hard = [0, 0.9, 50, 50, 60, 60]
    dets = [np.array([on_hard, on_hard, [0, 0.8, 0, 0, 10, 10]], np.float32)]
    # As ordinary ground truth: right, wrong (a duplicate), right out of 2 -> (1 + 2/3) / 2
    # at 101 points: 51 points at 1, 50 at 2/3.
    assert evaluate_boxes(dets, gt)["mAP"] == pytest.approx((51 + 50 * 2 / 3) / 101)
    assert evaluate_boxes(dets, gt, difficult=hard)["mAP"] == pytest.approx(1.0)
    missed = [np.array([[0, 0.9, 80, 80, 90, 90], [0, 0.8, 0, 0, 10, 10]], np.float32)]
    assert evaluate_boxes(missed, gt, difficult=hard)["mAP"] == pytest.approx(0.5)
    # A class with difficult boxes only has no ground truth to average: the other's AP alone
    only_hard = [(gt[0][0], np.array([0, 1]))]
    dets = [np.array([[0, 0.8, 0, 0, 10, 10]], np.float32)]
    assert evaluate_boxes(dets, only_hard, difficult=hard)["mAP"] == pytest.approx(1.0)


def test_training_evaluation_scores_the_boxes_clipped_to_the_image(tmp_path: Path) -> None:
    """As detect gives them (and PaddleDetection evaluates): a box that runs past the photo's
    edges is cut at them before it is matched, so an object filling the photo is found; and
    one on a crowd region is ignored."""
    Image.new("RGB", (96, 64), "gray").save(tmp_path / "img0.png")
    dataset = CocoDetection(_write_coco(tmp_path, [[(0, 0, 96, 64, 0)]]), tmp_path)
    model = build_picodet("picodet_s_esnet", num_classes=2)
    reg_max = model.arch.reg_max
    with torch.no_grad():  # only the coarsest level fires, every side 7 strides from its cell
        for level, conv in enumerate(model.head.head_cls):
            conv.weight.zero_()
            conv.bias.zero_()
            conv.bias[:2] = 5.0 if level == len(model.head.head_cls) - 1 else -20.0
            conv.bias[2:].view(4, reg_max + 1)[:, reg_max] = 30.0
    result = evaluate_detector(model, dataset, 128)
    assert result == {"mAP": pytest.approx(1.0), "AP50": pytest.approx(1.0)}
    # A photo of a crowd (iscrowd), listed first: the box on it, scored as high, is ignored.
    Image.new("RGB", (96, 64), "gray").save(tmp_path / "crowd.png")
    data = json.loads((tmp_path / "instances.json").read_text())
    data["images"].insert(0, {"id": 100, "file_name": "crowd.png"})
    data["annotations"].append(
        {"id": 1, "image_id": 100, "bbox": [0, 0, 96, 64], "category_id": 7, "iscrowd": 1}
    )
    (tmp_path / "instances.json").write_text(json.dumps(data))
    dataset = CocoDetection(tmp_path / "instances.json", tmp_path)
    assert [len(boxes) for boxes in dataset.boxes] == [0, 1]  # not an object to train on
    assert [labels.tolist() for _, labels in dataset.crowds] == [[1], []]  # red, as "red"
    assert evaluate_detector(model, dataset, 128)["mAP"] == pytest.approx(1.0)
    agnostic = CocoDetection(tmp_path / "instances.json", tmp_path, class_agnostic=True)
    agnostic.use_class_order(("background", "foreground"))
    assert agnostic.crowds[0][1].tolist() == [1]  # renumbered with the boxes
    # A VOC photo with a difficult box besides: missed, as it is, it costs nothing.
    (tmp_path / "voc").mkdir()
    (tmp_path / "voc" / "img0.xml").write_text(
        "<annotation><filename>img0.png</filename>"
        + "".join(
            f"<object><name>red</name><difficult>{hard}</difficult><bndbox><xmin>0</xmin>"
            f"<ymin>0</ymin><xmax>{width}</xmax><ymax>{height}</ymax></bndbox></object>"
            for hard, width, height in ((0, 96, 64), (1, 20, 20))
        )
        + "</annotation>"
    )
    voc = VocDetection(tmp_path / "voc", tmp_path, class_names=("red", "blue"))
    assert evaluate_detector(model, voc, 128)["mAP"] == pytest.approx(1.0)
    # Its box drawn past the photo's edges, in a file that records no size to clip it to
    # as it loads: clipped when the photo is read, as the detection is.
    past_edges = CocoDetection(_write_coco(tmp_path, [[(-10, -5, 120, 80, 0)]]), tmp_path)
    assert evaluate_detector(model, past_edges, 128)["mAP"] == pytest.approx(1.0)


# ---------------------------------------------------------------- datasets


def _write_images(root: Path, count: int, size: int = 128, seed: int = 0) -> list[list]:
    """Noise images with 1-2 solid rectangles; returns per image [[x1, y1, x2, y2, cls], ...]."""
    rng = np.random.default_rng(seed)
    colours = [(230, 40, 40), (40, 60, 230)]
    annotations = []
    for i in range(count):
        pixels = rng.integers(60, 190, (size, size, 3), dtype=np.uint8)
        boxes = []
        for _ in range(1 + i % 2):
            w, h = rng.integers(30, 60, 2)
            x, y = rng.integers(0, size - w), rng.integers(0, size - h)
            cls = int(rng.integers(0, 2))
            pixels[y : y + h, x : x + w] = colours[cls]
            boxes.append([int(x), int(y), int(x + w), int(y + h), cls])
        Image.fromarray(pixels).save(root / f"img{i}.png")
        annotations.append(boxes)
    return annotations


def _write_coco(root: Path, annotations: list[list]) -> Path:
    data = {
        "images": [{"id": i + 1, "file_name": f"img{i}.png"} for i in range(len(annotations))],
        "categories": [{"id": 7, "name": "red"}, {"id": 3, "name": "blue"}],
        "annotations": [
            {
                "id": len(annotations) * 10 + j,
                "image_id": i + 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "category_id": (7, 3)[cls],
                "iscrowd": 0,
            }
            for i, boxes in enumerate(annotations)
            for j, (x1, y1, x2, y2, cls) in enumerate(boxes)
        ],
    }
    path = root / "instances.json"
    path.write_text(json.dumps(data))
    return path


def _write_voc(folder: Path, annotations: list[list]) -> Path:
    """`_write_coco`'s annotations as VOC XML files in `folder`, one per image."""
    folder.mkdir()
    for i, boxes in enumerate(annotations):
        objects = "".join(
            f"<object><name>{('red', 'blue')[cls]}</name><bndbox><xmin>{x1}</xmin>"
            f"<ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
            for x1, y1, x2, y2, cls in boxes
        )
        (folder / f"img{i}.xml").write_text(
            f"<annotation><filename>img{i}.png</filename>{objects}</annotation>"
        )
    return folder


def test_coco_and_voc_lists_written_on_windows_find_their_files(tmp_path: Path) -> None:
    """A COCO file or VOC list made on Windows names `images\\img0.png`: elsewhere every
    image was missing, as a gallery label file's would have been but is not."""
    (tmp_path / "images").mkdir()
    annotations = _write_images(tmp_path / "images", 2, size=64)
    coco = json.loads(_write_coco(tmp_path, annotations).read_text())
    for image in coco["images"]:
        image["file_name"] = "images\\" + image["file_name"]
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    dataset = CocoDetection(tmp_path / "instances.json", tmp_path)
    assert dataset.images == [tmp_path / "images" / f"img{i}.png" for i in range(2)]
    _write_voc(tmp_path / "Annotations", annotations)
    lines = [f"images\\img{i}.png Annotations\\img{i}.xml" for i in range(2)]
    (tmp_path / "trainval.txt").write_text("\n".join(lines))
    voc = VocDetection(tmp_path / "trainval.txt", tmp_path)
    assert voc.images == dataset.images and len(voc.boxes[1]) == len(annotations[1])


def test_coco_dataset_parsing(tmp_path: Path) -> None:
    annotations = _write_images(tmp_path, 2, size=64)
    dataset = CocoDetection(_write_coco(tmp_path, annotations), tmp_path)
    assert dataset.class_names == ("blue", "red")  # ordered by category id (3, 7)
    image, boxes, labels = dataset[1]
    assert image.size == (64, 64)
    np.testing.assert_allclose(boxes, np.array(annotations[1])[:, :4])
    assert labels.tolist() == [1 - c for *_, c in annotations[1]]
    agnostic = CocoDetection(tmp_path / "instances.json", tmp_path, class_agnostic=True)
    assert agnostic.class_names == ("foreground",) and agnostic[1][2].tolist() == [0, 0]


def test_detection_images_are_decoded_upright_as_inference_sees_them(tmp_path: Path) -> None:
    """A phone photo stored sideways with an EXIF rotation: its boxes are drawn on the photo
    as displayed, which is what training must see (and what the detector gets later)."""
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display": stored 300x100, shown 100x300
    Image.new("RGB", (300, 100), "red").save(tmp_path / "img0.png", exif=exif)
    dataset = CocoDetection(_write_coco(tmp_path, [[(10, 200, 60, 280, 0)]]), tmp_path)
    image, boxes, _ = dataset[0]
    assert image.size == (100, 300) and image.mode == "RGB"
    assert boxes[0, 2] <= image.width and boxes[0, 3] <= image.height  # inside the photo
    (tmp_path / "img0.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="img0.png: cannot decode image"):
        dataset[0]


def test_detection_images_and_annotations_are_read_only_as_regular_files(
    tmp_path: Path, monkeypatch
) -> None:
    """Detection datasets read images and annotation files with `path.read_bytes()`:
    `/dev/zero` (an image replaced by a link to it, an annotation file given as it) was
    read until memory ran out, a FIFO waited for a writer, and an image of any size was
    read whole. They are read as the recognition datasets read images: a device is named
    as one, an image over the size limit is refused before it is read."""
    dataset = CocoDetection(_write_coco(tmp_path, _write_images(tmp_path, 1, size=64)), tmp_path)
    monkeypatch.setattr(
        image_files, "MAX_IMAGE_FILE_BYTES", (tmp_path / "img0.png").stat().st_size - 1
    )
    with pytest.raises(
        DataError,
        match=r"cannot read image .*img0\.png: .* GiB an image file may hold \(.*\); not read$",
    ):
        dataset[0]
    monkeypatch.undo()
    (tmp_path / "img0.png").unlink()
    (tmp_path / "img0.png").symlink_to("/dev/null")  # replaced since the dataset was made
    said = f"cannot read image {tmp_path / 'img0.png'}: a character device, not an image file"
    with pytest.raises(DataError) as caught:
        dataset[0]
    assert str(caught.value) == said
    with pytest.raises(DataError) as caught:
        CocoDetection("/dev/null", tmp_path)
    assert str(caught.value) == (
        "cannot read COCO annotation file /dev/null: a character device, not a text file"
    )


def test_a_listed_image_that_is_a_folder_or_fifo_is_named_as_one_not_as_missing(
    tmp_path: Path,
) -> None:
    """A COCO file's image that is a folder or a FIFO (there, but no image file) was among
    those it "lists that do not exist" (is the image folder right?): each is named as what
    it is."""
    coco = _write_coco(tmp_path, _write_images(tmp_path, 3, size=64))
    for name in ("img0.png", "img1.png"):
        (tmp_path / name).unlink()
    (tmp_path / "img0.png").mkdir()
    os.mkfifo(tmp_path / "img1.png")
    with pytest.raises(DataError) as caught:
        CocoDetection(coco, tmp_path)
    assert str(caught.value) == (
        f"{coco}: 2 of the 3 images it lists are no files: {tmp_path / 'img0.png'} (a folder), "
        f"{tmp_path / 'img1.png'} (a FIFO (named pipe))"
    )


def test_an_image_whose_pixels_are_not_the_size_its_annotations_record_is_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A phone photo annotated sideways (its size recorded before the EXIF orientation that
    reading applies), or a resized copy: its boxes are in another frame than its pixels,
    which training would otherwise learn from without a word. The first one is named."""
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 300x100, read upright as 100x300
    Image.new("RGB", (300, 100), "red").save(tmp_path / "img0.png", exif=exif)
    Image.new("RGB", (64, 48), "red").save(tmp_path / "img1.png")  # recorded as 128x96
    Image.new("RGB", (50, 40), "red").save(tmp_path / "img2.png")  # recorded as it is
    path = _write_coco(tmp_path, [[(10, 10, 60, 60, 0)]] * 3)
    data = json.loads(path.read_text())
    sizes = [(300, 100), (128, 96), (50, 40)]
    for image, (width, height) in zip(data["images"], sizes, strict=True):
        image |= {"width": width, "height": height}
    path.write_text(json.dumps(data))
    dataset = CocoDetection(path, tmp_path)
    with caplog.at_level(logging.WARNING, logger="shitu.detection"):
        dataset.load_image(2)
        assert caplog.text == ""
        dataset.load_image(0)
    assert (
        f"{tmp_path / 'img0.png'}: read upright it is 100x300 pixels, but {path} records "
        "300x100 for it (width and height swapped: were its boxes drawn on the photo sideways"
    ) in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shitu.detection"):
        dataset.load_image(1)  # one named is enough: a resized set would name each image
    assert caplog.text == ""
    fresh = CocoDetection(path, tmp_path)
    with caplog.at_level(logging.WARNING, logger="shitu.detection"):
        fresh.load_image(1)
    assert "img1.png: read upright it is 64x48 pixels, but" in caplog.text
    assert "records 128x96 for it; its boxes were clipped" in caplog.text


def test_a_voc_image_of_another_size_than_its_xml_records_names_that_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The size comes from the image's own XML file, which the warning names (it named
    the annotation folder, where a user would look through every file)."""
    Image.new("RGB", (64, 48), "red").save(tmp_path / "img0.png")
    folder = _write_voc(tmp_path / "ann", [[(10, 10, 40, 40, 0)]])
    xml = folder / "img0.xml"
    xml.write_text(
        xml.read_text().replace(
            "</filename>", "</filename><size><width>128</width><height>96</height></size>"
        )
    )
    dataset = VocDetection(folder, tmp_path)
    with caplog.at_level(logging.WARNING, logger="shitu.detection"):
        dataset.load_image(0)
    assert f"but {xml} records 128x96 for it" in caplog.text


def test_boxes_wholly_outside_an_image_of_no_recorded_size_are_named_when_it_is_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Where the annotations record no size (COCO's width and height are optional), boxes
    outside the image can only be found once it is read: they were left out without the
    warning that those outside a recorded size get."""
    annotations = [[(10, 10, 40, 40, 0), (200, 200, 220, 230, 1)], [(300, 0, 320, 20, 0)]]
    for i in range(2):
        Image.new("RGB", (64, 48), "red").save(tmp_path / f"img{i}.png")
    dataset = CocoDetection(_write_coco(tmp_path, annotations), tmp_path)
    with caplog.at_level(logging.WARNING, logger="shitu.detection"):
        _, boxes, _ = dataset[0]
    assert len(boxes) == 1
    assert (
        f"{tmp_path / 'img0.png'}: 1 of its 2 boxes lie wholly outside it (64x48 pixels, "
        "read upright) and are left out"
    ) in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shitu.detection"):
        dataset[1]  # named once: a set drawn on other sizes would name every image
    assert caplog.text == ""


def test_voc_dataset_parsing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "ann").mkdir()
    Image.new("RGB", (40, 30)).save(tmp_path / "a.jpg")
    (tmp_path / "ann" / "a.xml").write_text(
        "<annotation><filename>a.jpg</filename>"
        "<object><name>cup</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>20</xmax>"
        "<ymax>25</ymax></bndbox></object>"
        "<object><name>box</name><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>9</xmax>"
        "<ymax>9</ymax></bndbox></object></annotation>"
    )
    dataset = VocDetection(tmp_path / "ann", tmp_path)
    assert dataset.class_names == ("box", "cup")
    _, boxes, labels = dataset[0]
    assert boxes.tolist() == [[1, 2, 20, 25], [5, 5, 9, 9]] and labels.tolist() == [1, 0]
    swapped = (tmp_path / "ann" / "a.xml").read_text().replace("<xmin>5", "<xmin>12")
    (tmp_path / "ann" / "a.xml").write_text(swapped)  # xmin 12 > xmax 9: no area
    with caplog.at_level(logging.WARNING, logger="shitu.detection"):
        assert VocDetection(tmp_path / "ann", tmp_path)[0][1].tolist() == [[1, 2, 20, 25]]
    assert f"{tmp_path / 'ann'}: 1 of the 2 boxes have no area" in caplog.text
    # VOC's difficult boxes: trained on, as PaddleDetection trains, and marked for the
    # evaluation to ignore (their flags following the boxes the filters keep)
    with_difficult = swapped.replace("<name>box", "<difficult>1</difficult><name>box")
    with_difficult = with_difficult.replace("<xmin>12", "<xmin>5")
    with_difficult = with_difficult.replace("<name>cup", "<difficult>0</difficult><name>cup")
    (tmp_path / "ann" / "a.xml").write_text(with_difficult)
    dataset = VocDetection(tmp_path / "ann", tmp_path)
    assert len(dataset[0][1]) == 2 and dataset.difficult[0].tolist() == [False, True]
    (tmp_path / "ann" / "a.xml").write_text(with_difficult.replace("<xmin>1<", "<xmin>21<"))
    with caplog.at_level(logging.WARNING, logger="shitu.detection"):
        assert VocDetection(tmp_path / "ann", tmp_path).difficult[0].tolist() == [True]
    (tmp_path / "ann" / "a.xml").write_text(
        with_difficult.replace("<difficult>1", "<difficult>yes")
    )
    with pytest.raises(DataError, match=r"object 2: <difficult> is 0 or 1, not 'yes'"):
        VocDetection(tmp_path / "ann", tmp_path)
    for value in ("nan", "inf"):  # as COCO's: NaN was left out as "no area", inf kept
        (tmp_path / "ann" / "a.xml").write_text(swapped.replace("<ymax>9", f"<ymax>{value}"))
        with pytest.raises(DataError, match=rf"object 2: its <bndbox> \[12.0, 5.0, 9.0, {value}\]"):
            VocDetection(tmp_path / "ann", tmp_path)
    not_numbers = {  # named by object and tag, not as "could not convert string to float"
        "<ymax>9": (r"<ymax>9,5", r"object 2's <ymax> '9,5' is not a number"),
        "<width>40": (r"<width>wide", r"<size>'s <width> 'wide' is not a number"),
    }
    for old, (new, message) in not_numbers.items():
        sized = swapped.replace("<filename>", "<size><width>40</width></size><filename>")
        (tmp_path / "ann" / "a.xml").write_text(sized.replace(old, new, 1))
        with pytest.raises(
            DataError, match=rf"a.xml is not a valid VOC annotation file \({message}\)$"
        ):
            VocDetection(tmp_path / "ann", tmp_path)
    (tmp_path / "ann" / "a.xml").write_text("<annotation><filename>a.jpg</filename></annotation>")
    expected = r": none of its 1 annotation files has an <object>, so there are no classes$"
    with pytest.raises(DataError, match=expected):
        VocDetection(tmp_path / "ann", tmp_path)
    (tmp_path / "ann" / "a.xml").write_text(swapped)
    with pytest.raises(DataError, match=r"^class_names: \['cup'\] are listed more than once"):
        VocDetection(tmp_path / "ann", tmp_path, class_names=["cup", "box", "cup"])
    (tmp_path / "ann" / "b.xml").write_text("<annotation><object>")
    with pytest.raises(DataError, match="b.xml"):
        VocDetection(tmp_path / "ann", tmp_path)
    for incomplete in ("<name>cup</name>", "<bndbox><xmin>1</xmin></bndbox><name>cup</name>"):
        (tmp_path / "ann" / "b.xml").write_text(
            f"<annotation><filename>a.jpg</filename><object>{incomplete}</object></annotation>"
        )
        with pytest.raises(DataError, match=r"b.xml is .* \(object 1 needs a <name> and a <bnd"):
            VocDetection(tmp_path / "ann", tmp_path)


def test_voc_filename_written_on_a_line_of_its_own_finds_its_image(tmp_path: Path) -> None:
    """A pretty-printed file's `<filename>` holds the name between newlines and indents: the
    image was looked for under that whole text, and missing."""
    annotations = _write_images(tmp_path, 1, size=64)
    xml = _write_voc(tmp_path / "ann", annotations) / "img0.xml"
    xml.write_text(xml.read_text().replace("img0.png", "\n    img0.png\n  "))
    dataset = VocDetection(tmp_path / "ann", tmp_path)
    assert dataset.images == [tmp_path / "img0.png"] and dataset[0][0].size == (64, 64)


def test_voc_annotation_files_with_an_upper_case_extension_are_read(tmp_path: Path) -> None:
    annotations = _write_images(tmp_path, 2, size=64)
    folder = _write_voc(tmp_path / "ann", annotations)
    (folder / "img1.xml").rename(folder / "img1.XML")
    dataset = VocDetection(folder, tmp_path)
    assert dataset.images == [tmp_path / "img0.png", tmp_path / "img1.png"]
    assert [len(boxes) for boxes in dataset.boxes] == [len(boxes) for boxes in annotations]


def test_voc_data_from_a_paddledetection_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """PaddleDetection's VOC layout keeps every split's XML files in one Annotations folder
    and lists each split in trainval.txt / test.txt (`image xml` lines, relative to the
    dataset's folder): such a list is the split, where the folder was every split at once."""
    torch.set_num_threads(2)
    (tmp_path / "JPEGImages").mkdir()
    annotations = _write_images(tmp_path / "JPEGImages", 6, size=64)
    _write_voc(tmp_path / "Annotations", annotations)
    lines = [f"JPEGImages/img{i}.png Annotations/img{i}.xml" for i in range(6)]
    (tmp_path / "trainval.txt").write_text("\n".join(["# split", *lines[:4], ""]))
    (tmp_path / "test.txt").write_text("\n".join(lines[4:]))
    train = VocDetection(tmp_path / "trainval.txt", tmp_path)
    assert train.images == [tmp_path / "JPEGImages" / f"img{i}.png" for i in range(4)]
    assert [boxes.tolist() for boxes in train.boxes] == [
        [box[:4] for box in image] for image in annotations[:4]
    ]
    command = ["detect-train", "--voc", str(tmp_path / "trainval.txt"), "--images",
               str(tmp_path), "--val-voc", str(tmp_path / "test.txt"), "--val-images",
               str(tmp_path), "--epochs", "1", "--batch-size", "2", "--input-size", "64",
               "--train-sizes", "64", "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(command) == 0
    assert set(json.loads(capsys.readouterr().out.splitlines()[-1])) == {"mAP", "AP50"}
    (tmp_path / "Annotations" / "img0 (copy).xml").write_bytes(
        (tmp_path / "Annotations" / "img0.xml").read_bytes()
    )
    expected = r"img0 \(copy\).xml and \S*img0.xml both annotate the image \S*img0.png; give"
    with pytest.raises(DataError, match=expected):
        VocDetection(tmp_path / "Annotations", tmp_path / "JPEGImages")
    (tmp_path / "trainval.txt").write_text("\n".join([lines[0], lines[0]]))  # oversampled
    assert len(VocDetection(tmp_path / "trainval.txt", tmp_path)) == 2
    missing = tmp_path / "tranval.txt"  # mistyped: not "no VOC annotation files in" it
    with pytest.raises(DataError, match=f"^VOC annotations {missing}: no such folder or list"):
        VocDetection(missing, tmp_path)
    # a device or a FIFO: NotADirectoryError's traceback, from listing it as a folder
    os.mkfifo(tmp_path / "voc.fifo")
    for given, kind in (
        (tmp_path / "voc.fifo", "a FIFO (named pipe)"),
        ("/dev/null", "a character device"),
    ):
        with pytest.raises(DataError) as caught:
            VocDetection(given, tmp_path)
        assert str(caught.value) == f"VOC annotations {given}: {kind}, not a folder or list file"
    # The list's paths are relative to the image folder: a wrong one is said as such, every
    # file that is not there counted (it was "cannot read VOC annotation file" of the first)
    expected = (
        rf"^{tmp_path / 'test.txt'}: 2 of the 2 annotation files it lists do not exist: "
        rf"{tmp_path / 'JPEGImages' / 'Annotations' / 'img4.xml'}, .*img5.xml \(is the image "
        r"folder right\?\)$"
    )
    with pytest.raises(DataError, match=expected):
        VocDetection(tmp_path / "test.txt", tmp_path / "JPEGImages")
    (tmp_path / "test.txt").write_text("JPEGImages/img4.png\n")
    with pytest.raises(DataError, match=r"test.txt:1: expected 'image xml' \(PaddleDetection"):
        VocDetection(tmp_path / "test.txt", tmp_path)


def test_a_voc_list_line_ends_only_where_files_end_lines(tmp_path: Path) -> None:
    """A form feed (a page break some tools write) or U+2028 ended a line for
    str.splitlines(): the lines after were counted one too many, and a bad one was named
    under a line number the file does not have. A line ends at \\n, \\r\\n or \\r only."""
    (tmp_path / "JPEGImages").mkdir()
    _write_voc(tmp_path / "Annotations", _write_images(tmp_path / "JPEGImages", 2, size=64))
    lines = [f"JPEGImages/img{i}.png Annotations/img{i}.xml" for i in range(2)]
    listing = tmp_path / "trainval.txt"
    listing.write_text(f"{lines[0]}\x0c\n{lines[1]}\u2028\n")
    assert len(VocDetection(listing, tmp_path)) == 2
    listing.write_text(f"{lines[0]}\x0c\nJPEGImages/img1.png\n")
    with pytest.raises(DataError, match=r"trainval.txt:2: expected 'image xml'"):
        VocDetection(listing, tmp_path)


def test_an_output_folder_whose_path_is_not_utf8_is_refused_before_training(
    tmp_path: Path, latin1_folder: Path
) -> None:
    """The run ends by writing model.onnx into --out, which torch's ONNX exporter takes by a
    UTF-8 path only: a folder named in Latin-1 is refused before the training, not after."""
    (tmp_path / "JPEGImages").mkdir()
    _write_voc(tmp_path / "Annotations", _write_images(tmp_path / "JPEGImages", 2, size=64))
    command = [sys.executable, "-m", "shitu", "detect-train", "--voc",
               str(tmp_path / "Annotations"), "--images", str(tmp_path / "JPEGImages"),
               "--epochs", "1", "--batch-size", "2", "--input-size", "64",
               "--train-sizes", "64", "--out", str(latin1_folder / "run")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: "), result.stderr
    assert "run: --out's path is not UTF-8 text" in result.stderr
    assert not any(latin1_folder.iterdir())  # nothing trained, nor a lock left


def test_missing_or_malformed_coco_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing.json"):
        CocoDetection(tmp_path / "missing.json", tmp_path)
    (tmp_path / "bad.json").write_text('{"images": []}')
    with pytest.raises(DataError, match=r"bad.json is not a valid COCO .* \(no 'categories' key\)"):
        CocoDetection(tmp_path / "bad.json", tmp_path)
    # COCO's results format, a list of detections: given for the annotations by mistake
    (tmp_path / "results.json").write_text('[{"image_id": 1, "bbox": [1, 2, 3, 4]}]')
    expected = r"\(a JSON list, not an object of images, annotations and categories\)$"
    with pytest.raises(DataError, match=rf"results.json is not a valid COCO .* {expected}"):
        CocoDetection(tmp_path / "results.json", tmp_path)
    # A file that is no UTF-8 or UTF-16 text is said to be so (an image given by mistake, a
    # legacy code page's JSON), not in the codec's words ("can't decode byte 0xff").
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(64))
    with pytest.raises(
        DataError, match=r"photo\.jpg is not a valid .* \(an image, not JSON text\)$"
    ):
        CocoDetection(tmp_path / "photo.jpg", tmp_path)
    (tmp_path / "cp1252.json").write_bytes(
        '{"categories": [{"id": 1, "name": "café"}]}'.encode("cp1252")
    )
    expected = r"\(not UTF-8 or UTF-16 text: save it as UTF-8\)$"
    with pytest.raises(DataError, match=rf"cp1252\.json is not a valid COCO .* {expected}"):
        CocoDetection(tmp_path / "cp1252.json", tmp_path)
    coco = _write_coco(tmp_path, _write_images(tmp_path, 2, size=64))
    data = json.loads(coco.read_text())
    broken = copy.deepcopy(data)  # not an object: it crashed naming it
    broken["annotations"][0] = 5
    coco.write_text(json.dumps(broken))
    with pytest.raises(DataError, match=r"file \(annotations\[0\] is 5, not an object\)$"):
        CocoDetection(coco, tmp_path)
    # A converter's output gone wrong, named: it failed in Python's words ("'int' object is
    # not subscriptable", "unhashable type: 'list'"), or an object of images read as none.
    for key, position, field, wrong, expected in (
        ("images", 1, None, 5, "images[1] is 5, not an object"),
        ("images", None, None, {}, "its 'images' is a JSON object, not a list"),
        ("annotations", None, None, "x", "its 'annotations' is a JSON string, not a list"),
        ("images", 0, "id", [1], "images[0]: its id [1] is not a number or text"),
        ("images", 1, "file_name", 5, "images[1]: its file_name 5 is not text"),
        ("categories", 1, "id", "3", "the categories' ids mix numbers and text (7, '3')"),
    ):
        broken = copy.deepcopy(data)
        if position is None:
            broken[key] = wrong
        elif field is None:
            broken[key][position] = wrong
        else:
            broken[key][position][field] = wrong
        coco.write_text(json.dumps(broken))
        with pytest.raises(
            DataError, match=rf"valid COCO annotation file \({re.escape(expected)}\)$"
        ):
            CocoDetection(coco, tmp_path)
    for key, wrong in (("image_id", 42), ("category_id", 99), ("category_id", [7])):
        broken = copy.deepcopy(data)
        broken["annotations"][0][key] = wrong
        coco.write_text(json.dumps(broken))
        what = key.removesuffix("_id")
        image = "42" if key == "image_id" else "1: img0.png"
        given = re.escape(repr(wrong))
        expected = rf"annotations\[0\] \(id 20, image {image}\): no {what} has its {key} {given}"
        with pytest.raises(DataError, match=rf"valid COCO annotation file \({expected}\)$"):
            CocoDetection(coco, tmp_path)
    for key, what in (("images", "image"), ("categories", "category")):
        # The second image's boxes would be drawn on the first's file (or the classes mixed).
        broken = copy.deepcopy(data)
        broken[key][1]["id"] = broken[key][0]["id"]
        coco.write_text(json.dumps(broken))
        expected = rf"two {what}s have the id {broken[key][0]['id']}; ids must be unique"
        with pytest.raises(DataError, match=rf"valid COCO annotation file \({expected}\)$"):
            CocoDetection(coco, tmp_path)
    broken = copy.deepcopy(data)  # one photo twice: each entry with some of its boxes
    broken["images"][1]["file_name"] = "./" + broken["images"][0]["file_name"]
    coco.write_text(json.dumps(broken))
    expected = r"the images 1 and 2 are both the file './img0.png'; list each photo once"
    with pytest.raises(DataError, match=rf"valid COCO annotation file \({expected}"):
        CocoDetection(coco, tmp_path)
    broken = copy.deepcopy(data)  # a string: truthy, it made every box a crowd region
    broken["annotations"][0]["iscrowd"] = "0"
    coco.write_text(json.dumps(broken))
    expected = r"annotations\[0\] \(id 20, image 1: img0.png\): its iscrowd '0' is not 0 or 1"
    with pytest.raises(DataError, match=rf"valid COCO annotation file \({expected}\)$"):
        CocoDetection(coco, tmp_path)
    for name in (5, " "):  # a number crashed the summary that joins the names
        broken = copy.deepcopy(data)
        broken["categories"][0]["name"] = name
        coco.write_text(json.dumps(broken))
        expected = rf"category 7: its name {name!r} is not a name"
        with pytest.raises(DataError, match=rf"valid COCO annotation file \({expected}\)$"):
            CocoDetection(coco, tmp_path)
    broken = copy.deepcopy(data)  # "red" twice: its boxes would all be one class's
    broken["categories"][1]["name"] = broken["categories"][0]["name"]
    coco.write_text(json.dumps(broken))
    expected = r"the categories 3 and 7 are both named 'red'; category names must be unique"
    with pytest.raises(DataError, match=rf"valid COCO annotation file \({expected}"):
        CocoDetection(coco, tmp_path)
    broken = copy.deepcopy(data)
    broken["annotations"][0]["bbox"] = [1, 2, float("nan"), 4]  # json writes NaN, reads it back
    coco.write_text(json.dumps(broken))
    expected = (
        r"annotations\[0\] \(id 20, image 1: img0.png\): its bbox \[1, 2, nan, 4\] is not fin"
    )
    with pytest.raises(DataError, match=rf"valid COCO annotation file \({expected}"):
        CocoDetection(coco, tmp_path)
    # The box's annotation named by its place, its id and its image, and strings refused:
    # a converter that wrote them was hidden, and a missing bbox was only "no 'bbox' key".
    for bbox, expected in (
        ([1, 2, 3], r"its bbox \[1, 2, 3\] is not \[x, y, w, h\] of numbers"),
        (["10", "20", "5", "5"], r"its bbox \['10', '20', '5', '5'\] is not \[x, y, w, h\] of"),
        (None, r"no 'bbox' key"),
    ):
        broken = copy.deepcopy(data)
        broken["annotations"][1]["bbox"] = bbox  # its id, 20, is the first one's too
        if bbox is None:
            del broken["annotations"][1]["bbox"]
        coco.write_text(json.dumps(broken))
        named = r"annotations\[1\] \(id 20, image 2: img1.png\)"
        with pytest.raises(DataError, match=rf"valid COCO annotation file \({named}: {expected}"):
            CocoDetection(coco, tmp_path)


def test_detection_images_that_do_not_exist_are_named_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    coco = _write_coco(tmp_path, _write_images(tmp_path, 7, size=64))
    elsewhere = str(tmp_path / "elsewhere")
    with pytest.raises(DataError, match=r": 7 of the 7 images .* exist: \S*img0.png, .* 2 more"):
        CocoDetection(coco, elsewhere)
    (tmp_path / "img3.png").unlink()
    with pytest.raises(DataError, match=r": 1 of the 7 images .* exist: \S*img3.png \(is the"):
        CocoDetection(coco, tmp_path)
    _write_images(tmp_path, 7, size=64)
    # A wrong --val-images is refused at once, not after the whole training run.
    out = tmp_path / "out"
    train = ["detect-train", "--coco", str(coco), "--images", str(tmp_path), "--epochs", "1"]
    val_coco = tmp_path / "val.json"  # which of the two sets it is: named by its file
    val_coco.write_bytes(coco.read_bytes())
    val = ["--val-coco", str(val_coco), "--val-images", elsewhere, "--out", str(out)]
    assert main([*train, *val]) == 2
    assert f"error: {val_coco}: 7 of the 7 images it lists do not exist" in (
        capsys.readouterr().err
    )
    assert not (out / "latest.pt").exists()


def test_random_crop_keeps_at_least_a_pixel_of_a_tiny_background_photo() -> None:
    background = (Image.new("RGB", (2, 2)), np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    for seed in range(20):
        random.seed(seed)
        image, boxes, _ = random_crop(background)
        assert image.width >= 1 and image.height >= 1 and len(boxes) == 0


def test_augment_and_collate_keep_boxes_on_the_objects(tmp_path: Path) -> None:
    annotations = _write_images(tmp_path, 1, size=96, seed=3)
    dataset = CocoDetection(_write_coco(tmp_path, annotations), tmp_path, transform=train_augment)
    for seed in range(5):
        random.seed(seed)
        image, boxes, labels = dataset[0]
        pixels = np.asarray(image)
        for x1, y1, x2, y2 in boxes.round().astype(int):
            inside = pixels[y1:y2, x1:x2].reshape(-1, 3).astype(float)
            assert inside.std(axis=0).max() < 1.0  # a solid rectangle, not noise
    images, targets = collate([(image, boxes, labels, 0)], 64)
    assert images.shape == (1, 3, 64, 64)
    scale = np.array([64 / image.size[0], 64 / image.size[1]] * 2)
    np.testing.assert_allclose(targets[0][:, 1:].numpy(), boxes * scale, rtol=1e-5)


# ---------------------------------------------------------------- training


def _trainer(root: Path, epochs: int, learning_rate: float) -> DetectionTrainer:
    dataset = CocoDetection(
        root / "instances.json", root, class_agnostic=True, transform=train_augment
    )
    config = DetectionTrainConfig(
        epochs=epochs,
        batch_size=4,
        learning_rate=learning_rate,
        warmup_epochs=2,
        train_sizes=(96, 128, 160),
        eval_size=128,
        output_dir=str(root / "run"),
        # Fixed, so the tests do not depend on what ran before them. The learning test's
        # 160 steps at lr 0.04 pass its checks with seeds 0-9 except 2 (AP50 0.58-1.0;
        # seed 2 stays at 0.12): the run is not tuned to one lucky seed.
        seed=0,
    )
    return DetectionTrainer(dataset, config)


def test_tiny_training_run_learns(tmp_path: Path) -> None:
    """160 steps from scratch on 4 drawn images: the loss falls, mAP on them rises."""
    torch.set_num_threads(2)
    _write_coco(tmp_path, _write_images(tmp_path, 4))
    trainer = _trainer(tmp_path, epochs=160, learning_rate=0.04)
    before = trainer.evaluate()
    losses = [h["loss"] for h in trainer.train()]
    after = trainer.evaluate()
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    print(f"loss {first:.3f} -> {last:.3f}; {before} -> {after}")
    assert len(losses) == 160 and last < 0.8 * first
    assert after["AP50"] > before["AP50"] + 0.2 and after["mAP"] > before["mAP"] + 0.05


def test_a_warm_up_as_long_as_the_run_names_detect_trains_option(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Not `shitu train`'s Global.epochs, which detect-train has no use for."""
    _write_coco(tmp_path, _write_images(tmp_path, 4))
    with caplog.at_level(logging.WARNING, logger="shitu.engine.lr"):
        _trainer(tmp_path, epochs=2, learning_rate=0.02)
    assert "a warm-up of 2 epochs is not shorter than the run's 2 (detect-train's --epochs)" in (
        caplog.text
    )


def test_resume_continues_identically(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    _write_coco(tmp_path, _write_images(tmp_path, 4))
    trainer = _trainer(tmp_path, epochs=6, learning_rate=0.02)
    trainer.train(max_steps=3)  # three one-batch epochs, checkpointed after each
    saved = tmp_path / "after3.pt"
    saved.write_bytes(trainer.checkpoint_path.read_bytes())
    expected = trainer.train(max_steps=2)[-2:]
    resumed = _trainer(tmp_path, epochs=6, learning_rate=0.02)
    resumed.resume(saved)
    assert resumed.progress.global_step == 3
    got = resumed.train(max_steps=2)
    assert [h["step"] for h in got] == [3, 4]
    for a, b in zip(got, expected, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    ema = resumed.ema.model.state_dict()
    for key, value in trainer.ema.model.state_dict().items():
        torch.testing.assert_close(ema[key], value, rtol=1e-4, atol=1e-5)


def test_checkpoints_every_so_many_steps_within_an_epoch(tmp_path: Path) -> None:
    """An epoch of a COCO-sized set takes an hour or more: with checkpoint_every_steps a run
    killed outright mid-epoch resumes from its last such step, not the epoch's start."""
    torch.set_num_threads(2)
    annotations = _write_images(tmp_path, 8, size=64)
    dataset = CocoDetection(_write_coco(tmp_path, annotations), tmp_path, transform=train_augment)
    config = DetectionTrainConfig(
        epochs=1,
        batch_size=2,  # 4 steps an epoch
        train_sizes=(64,),
        eval_size=64,
        output_dir=str(tmp_path / "run"),
        checkpoint_every_steps=2,
    )
    trainer = DetectionTrainer(dataset, config)
    trainer.train(max_steps=3)  # as if killed during the fourth step
    _, progress = load_training_state(trainer.checkpoint_path, kind="detector")
    assert (progress.global_step, progress.epoch, progress.batch_in_epoch) == (2, 0, 2)
    resumed = DetectionTrainer(dataset, config)
    resumed.resume(trainer.checkpoint_path)
    assert [record["step"] for record in resumed.train()] == [2, 3]


def test_a_resume_with_other_boxes_says_it_is_not_the_same_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    annotations = _write_images(tmp_path, 4)
    _write_coco(tmp_path, annotations)
    trainer = _trainer(tmp_path, epochs=3, learning_rate=0.02)
    trainer.train(max_steps=1)
    with caplog.at_level(logging.WARNING, logger="shitu.detection"):
        _trainer(tmp_path, epochs=3, learning_rate=0.02).resume(trainer.checkpoint_path)
        assert not caplog.records  # the same data
        annotations[0][0][2] -= 5  # one box redrawn
        _write_coco(tmp_path, annotations)
        _trainer(tmp_path, epochs=3, learning_rate=0.02).resume(trainer.checkpoint_path)
    (record,) = caplog.records
    assert record.getMessage() == (
        f"{trainer.checkpoint_path}: resuming with other training images, boxes or labels "
        "than the run had: it goes on from its step, but draws other batches than it would have"
    )


def test_detect_train_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.set_num_threads(2)
    coco = _write_coco(tmp_path, _write_images(tmp_path, 4, size=64))
    common = ["detect-train", "--coco", str(coco), "--images", str(tmp_path)]
    out = tmp_path / "out"
    args = [*common, "--class-agnostic", "--epochs", "2", "--batch-size", "2"]
    args += ["--lr", "0.01", "--input-size", "64", "--train-sizes", "64", "--out", str(out)]
    assert main([*args, "--val-coco", str(coco), "--val-images", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    # What the run is about to do, before hours of it: data, classes, steps, where it writes.
    summary = dict(re.split(r"  +", line, maxsplit=1) for line in captured.err.splitlines()[:12])
    assert summary["train images"] == "4 (6 boxes)" and summary["classes"] == "1 (foreground)"
    assert summary["steps per epoch"] == "2" and summary["validation images"] == "4"
    assert summary["start"] == "from scratch" and summary["output"] == str(out)
    # The first step of each epoch, counted as metrics.jsonl counts it (steps done).
    assert [line["step"] for line in lines[:2]] == [1, 3]
    assert set(lines[-1]) == {"mAP", "AP50"}
    detector = load_detector(lines[-2]["model"])
    assert detector.class_names == ("foreground",) and detector.input_size == (64, 64)
    assert lines[-2]["onnx"] == str(out / "model.onnx")  # the fast path, beside it
    with load_detector(lines[-2]["onnx"]) as onnx:
        assert onnx.class_names == ("foreground",) and onnx.input_size == (64, 64)
        image = np.asarray(Image.open(coco.parent / "img0.png").convert("RGB"))
        np.testing.assert_allclose(
            onnx.detect(image, 0.0, 5), detector.detect(image, 0.0, 5), rtol=1e-3, atol=1e-3
        )
    assert (out / "latest.pt").is_file()
    # The losses (each epoch's first step) and the mAP, kept beside the model.
    records = read_log(out / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in records] == [("train", 1), ("train", 3), ("eval", 4)]
    assert records[0]["loss"] == pytest.approx(lines[0]["loss"], abs=1e-5)  # JSON's rounded
    assert records[-1]["mAP"] == lines[-1]["mAP"]
    assert main(["detect", str(coco.parent / "img0.png"), "--model", str(out / "latest.pt")]) == 2
    assert (
        f"error: {out / 'latest.pt'} is a detector training checkpoint (for `shitu detect-train "
        "--resume`); give the model.pt its run wrote beside it instead"
    ) in capsys.readouterr().err
    # The advice fits every command that takes a detector, not only `detect`.
    assert main(["detect-export", str(out / "latest.pt"), "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert "give the model.pt its run wrote beside it instead" in err and "detect with" not in err
    resume = [*common, "--epochs", "3", "--batch-size", "2", "--resume", str(out / "latest.pt")]
    assert main(resume) == 2  # the checkpoint's detector has one class-agnostic label
    err = capsys.readouterr().err
    assert "was trained with a different detector (num_classes: 1 there, 2 here;" in err
    empty = tmp_path / "empty_val.json"  # no mAP to compute: said before training
    empty.write_text(json.dumps({**json.loads(coco.read_text()), "annotations": []}))
    assert main([*args[:-1], str(tmp_path / "no_val"), "--val-coco", str(empty), "--val-images",
                 str(tmp_path)]) == 2  # fmt: skip
    assert (
        f"error: --val-coco {empty}: its 4 images hold no boxes to evaluate against"
    ) in capsys.readouterr().err
    assert main([*common, "--val-coco", str(coco)]) == 2  # without --val-images
    assert "error: --val-images and --val-coco (or --val-voc) go together" in (
        capsys.readouterr().err
    )
    (tmp_path / "taken").write_text("")  # an --out that cannot be written: said at once
    assert main([*args[:-1], str(tmp_path / "taken")]) == 2
    out_err = capsys.readouterr()
    assert out_err.out == "" and f"--out {tmp_path / 'taken'}: " in out_err.err
    assert "is a file, not a folder" in out_err.err
    # The same detector, other batches: not a continuation of that run.
    other = [*args[:-2], "--lr", "0.02", "--out", str(out), "--resume", str(out)]
    other[other.index("--epochs") + 1] = "3"
    assert main(other) == 2
    assert "learning_rate: 0.01 there, 0.02 here" in capsys.readouterr().err
    # Fewer epochs than the run has done: it would train nothing and export the model as is.
    fewer = [*args[:-2], "--out", str(out), "--resume", str(out)]
    fewer[fewer.index("--epochs") + 1] = "1"
    assert main(fewer) == 2
    assert (
        f"error: {out}: its run has done 2 epochs, more than the 1 this one is "
        "set to; give at least 2"
    ) in capsys.readouterr().err
    with pytest.raises(SystemExit):  # PicoDet's neck needs sides that halve down to 1/32
        main([*common, "--train-sizes", "100"])
    assert "expected a positive multiple of 32, got 100" in capsys.readouterr().err
    for option, value, expected in (
        ("--lr", "0", "above 0"),
        ("--workers", "-1", ">= 0"),
        ("--seed", "-1", "from 0 to 2**63 - 1"),
    ):
        with pytest.raises(SystemExit):
            main([*common, option, value])
        assert f"expected a {'number' if option == '--lr' else 'whole number'} {expected}" in (
            capsys.readouterr().err
        )
    # A new run over the finished one would write over its files: refused (--output, the
    # option's name before it was --out as on other commands, still names the folder).
    assert main([*args[:-2], "--output", str(out)]) == 2
    assert f"--out {out}: holds an earlier run (latest.pt, model.pt, model.onnx)" in (
        capsys.readouterr().err
    )
    # Nor may a resumed run write over another run's files.
    other_run = tmp_path / "other_run"
    other_run.mkdir()
    (other_run / "model.pt").write_bytes(b"another run's detector")
    elsewhere = [*args[:-2], "--out", str(other_run), "--resume", str(out / "latest.pt")]
    assert main(elsewhere) == 2
    assert f"--out {other_run}: holds an earlier run (model.pt)" in capsys.readouterr().err
    assert (other_run / "model.pt").read_bytes() == b"another run's detector"
    # A detector's weights are not a recognition model's: not averaged as one.
    model = out / "model.pt"
    assert main(["average", str(model), str(model), "--out", str(tmp_path / "mean.pt")]) == 2
    assert f"{model} is a PicoDet detector checkpoint, not the weights" in capsys.readouterr().err
    # A recognition run's checkpoint is not a detector's.
    recognition = tmp_path / "recognition.pt"
    save_training_state(recognition, {"model": {}, "seed": 0}, Progress())
    fresh = [*args[:-2], "--out", str(tmp_path / "fresh")]
    assert main([*fresh, "--resume", str(recognition)]) == 2
    assert (
        f"--resume {recognition}: a recognition training checkpoint, not a detector one; "
        "resume it with `shitu train -o Global.checkpoints=...`"
    ) in capsys.readouterr().err


def test_detect_train_trains_the_mainbody_architecture_at_its_own_sizes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """PP-ShiTu's mainbody detector is a 640 model, trained at 576 to 704 as PaddleDetection's
    recipe does: without --input-size and --train-sizes it trained and exported at PicoDet-S's
    416 (352 to 480), a smaller detector than the one asked for, without a word."""
    torch.set_num_threads(2)
    coco = _write_coco(tmp_path, _write_images(tmp_path, 2, size=64))
    out = tmp_path / "out"
    command = ["detect-train", "--coco", str(coco), "--images", str(tmp_path), "--epochs", "1",
               "--batch-size", "2", "--arch", "picodet_lcnet_x2_5_mainbody", "--class-agnostic",
               "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(command) == 0
    summary = capsys.readouterr().err
    assert "input sizes        576 608 640 672 704 (evaluation, exports: 640)" in summary
    with load_detector(out / "model.onnx") as exported:
        assert exported.input_size == (640, 640)
    assert load_detector(out / "model.pt").input_size == (640, 640)


def test_a_diverging_detect_train_stops_with_an_error_not_a_model_of_nan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A learning rate far too high: the run went on to its last epoch writing NaN weights
    (or failed in the assigner with torch's "all elements of input should be between 0 and
    1"), where the recogniser's `shitu train` stops and says so. One step an epoch, so it
    diverges after a checkpoint: the advice names the folder, where a new run is refused."""
    torch.set_num_threads(2)
    coco = _write_coco(tmp_path, _write_images(tmp_path, 4, size=64))
    command = ["detect-train", "--coco", str(coco), "--images", str(tmp_path), "--epochs", "10",
               "--batch-size", "4", "--input-size", "64", "--train-sizes", "64", "--lr", "1e8",
               "--out", str(tmp_path / "run"), "--no-progress"]  # fmt: skip
    assert main(command) == 2
    expected = (
        r"error: the (network's outputs|loss) became .* at step \d+ \(epoch \d+\): training "
        r"diverged; train again with a learning rate below 1e\+08 \(detect-train's --lr\), into "
        f"another folder than {re.escape(str(tmp_path / 'run'))} \\(or remove it\\)"
    )
    assert re.search(expected, capsys.readouterr().err)
    assert not (tmp_path / "run" / "model.pt").exists()
    assert main([*command, "--lr", "0.01"]) == 2  # as that says
    assert "holds an earlier run (latest.pt)" in capsys.readouterr().err


def test_a_resumed_detect_train_goes_on_in_the_folder_of_the_run_it_continues(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--resume RUN/latest.pt` without --out: the run goes on writing to RUN, as the
    message of a stopped run suggests, not to a fresh output/detector of the working folder."""
    torch.set_num_threads(2)
    coco = _write_coco(tmp_path, _write_images(tmp_path, 4, size=64))
    common = ["detect-train", "--coco", str(coco), "--images", str(tmp_path), "--batch-size"]
    common += ["2", "--input-size", "64", "--train-sizes", "64"]
    run = tmp_path / "run"
    assert main([*common, "--epochs", "1", "--out", str(run)]) == 0
    # A save killed outright left its temporary file: the resumed run removes it.
    killed_save = run / ".latest.pt.k1lled_0"
    killed_save.write_bytes(b"half a checkpoint")
    monkeypatch.chdir(tmp_path)
    assert main([*common, "--epochs", "2", "--resume", str(run / "latest.pt")]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["model"] == str(run / "model.pt")
    assert not (tmp_path / "output").exists()
    assert not killed_save.exists()
    assert [record["step"] for record in read_log(run / "metrics.jsonl")] == [1, 3]


def test_a_detect_train_resumed_without_its_options_keeps_the_runs_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--resume RUN/latest.pt` alone (as the stopped run's message says): the options left
    out are the run's, from its checkpoint; it exported model.onnx and evaluated at the
    architecture's 416 rather than the run's 64, and trained on to 300 epochs. An option
    given changes the run's setting, and the summary says so."""
    torch.set_num_threads(2)
    coco = _write_coco(tmp_path, _write_images(tmp_path, 4, size=64))
    dataset = CocoDetection(coco, tmp_path, transform=train_augment)
    config = DetectionTrainConfig(
        epochs=3,
        batch_size=2,  # 2 steps an epoch
        learning_rate=0.01,
        train_sizes=(64,),
        eval_size=64,
        output_dir=str(tmp_path / "run"),
        seed=7,
    )
    trainer = DetectionTrainer(dataset, config)
    trainer.train(max_steps=2)  # stopped after its first epoch
    command = ["detect-train", "--coco", str(coco), "--images", str(tmp_path), "--no-progress",
               "--resume", str(trainer.checkpoint_path)]  # fmt: skip
    assert main(command) == 0
    captured = capsys.readouterr()
    summary = dict(re.split(r"  +", line, maxsplit=1) for line in captured.err.splitlines()[:12])
    assert summary["epochs"] == "3" and summary["batch size"] == "2" and summary["seed"] == "7"
    assert summary["input sizes"] == "64 (evaluation, exports: 64)"
    assert summary["start"] == f"resumed from {trainer.checkpoint_path} at step 2"
    assert [record["step"] for record in read_log(tmp_path / "run" / "metrics.jsonl")] == [3, 5]
    with load_detector(tmp_path / "run" / "model.onnx") as exported:
        assert exported.input_size == (64, 64)
    # Given, an option changes the run's setting: more epochs, another export size.
    assert main([*command, "--epochs", "4", "--input-size", "96"]) == 0
    summary = dict(
        re.split(r"  +", line, maxsplit=1) for line in capsys.readouterr().err.splitlines()[:12]
    )
    assert summary["start"] == (
        f"resumed from {trainer.checkpoint_path} at step 6, --epochs 4 (the run's: 3), "
        "--input-size 96 (the run's: 64)"
    )
    assert summary["input sizes"] == "64 (evaluation, exports: 96)"
    with load_detector(tmp_path / "run" / "model.onnx") as exported:
        assert exported.input_size == (96, 96)
    _, progress = load_training_state(trainer.checkpoint_path, kind="detector")
    assert progress.epoch == 4


def test_detect_train_evaluates_on_voc_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A VOC dataset's run measures its mAP on VOC data (--val-voc), as a COCO one's on
    COCO data: without it, a VOC user had no way to measure the detector. Its classes are
    matched to the training data's by name, before any training."""
    torch.set_num_threads(2)
    annotations = _write_images(tmp_path, 4, size=64)
    train = _write_voc(tmp_path / "train_xml", annotations)
    val = _write_voc(tmp_path / "val_xml", annotations[:2])
    command = ["detect-train", "--voc", str(train), "--images", str(tmp_path), "--epochs", "1",
               "--batch-size", "2", "--input-size", "64", "--train-sizes", "64",
               "--val-images", str(tmp_path)]  # fmt: skip
    assert main([*command, "--val-voc", str(val), "--out", str(tmp_path / "run")]) == 0
    assert set(json.loads(capsys.readouterr().out.splitlines()[-1])) == {"mAP", "AP50"}
    (val / "img0.xml").write_text((val / "img0.xml").read_text().replace("red", "green"))
    assert main([*command, "--val-voc", str(val), "--out", str(tmp_path / "other")]) == 2
    assert f"error: --val-voc {val}: the classes ['green'] are not among the model's" in (
        capsys.readouterr().err
    )
    (val / "img0.xml").write_text((val / "img0.xml").read_text().replace("green", "red"))
    for xml in val.glob("*.xml"):  # every box difficult: nothing the evaluation counts
        xml.write_text(xml.read_text().replace("<bndbox>", "<difficult>1</difficult><bndbox>"))
    assert main([*command, "--val-voc", str(val), "--out", str(tmp_path / "other")]) == 2
    assert f"error: --val-voc {val}: its 2 images hold no boxes to evaluate against" in (
        capsys.readouterr().err
    )
    assert main(command) == 2
    assert "error: --val-images and --val-coco (or --val-voc) go together" in (
        capsys.readouterr().err
    )


def test_detect_train_refuses_an_out_folder_another_run_is_training_in(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second run into a folder (a resume started while the run it resumes still goes
    on) wrote latest.pt beside it: the lock the running one holds, as `shitu train`'s,
    refuses it; a run with the folder to itself goes on."""
    import fcntl

    torch.set_num_threads(2)
    coco = _write_coco(tmp_path, _write_images(tmp_path, 4, size=64))
    run = tmp_path / "run"
    command = ["detect-train", "--coco", str(coco), "--images", str(tmp_path), "--batch-size",
               "2", "--input-size", "64", "--train-sizes", "64", "--epochs", "1",
               "--out", str(run)]  # fmt: skip
    run.mkdir()
    with open(run / ".shitu-train.lock", "a+") as held:  # as a running one holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("shitu detect-train (process 4321)")
        held.flush()
        assert main(command) == 2
        assert capsys.readouterr().err.startswith(
            f"error: --out {run}: another shitu detect-train (process 4321) is running in it; "
        )
    assert not (run / "latest.pt").exists()
    assert main(command) == 0
    assert (run / "model.pt").is_file()


def test_a_detect_train_that_fails_to_start_leaves_no_out_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bad data or a checkpoint that cannot be resumed: refused, and the folders made for
    the run gone with it, as `shitu train` leaves none."""
    coco = _write_coco(tmp_path, _write_images(tmp_path, 2, size=64))
    out = tmp_path / "runs" / "detector"
    common = ["--batch-size", "2", "--input-size", "64", "--train-sizes", "64", "--out", str(out)]
    missing = ["detect-train", "--coco", str(tmp_path / "missing.json"), "--images", str(tmp_path)]
    assert main([*missing, *common]) == 2
    assert "missing.json" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    other = tmp_path / "other"
    save_training_state(other / "latest.pt", {"model": {}, "seed": 0}, Progress())
    resume = ["detect-train", "--coco", str(coco), "--images", str(tmp_path), "--resume"]
    assert main([*resume, str(other), *common]) == 2
    assert "a recognition training checkpoint, not a detector one" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_val_image_that_cannot_be_read_after_the_run_says_how_to_evaluate_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Validation images are read after the whole run: one that cannot be read said nothing
    of the model saved, nor of the way to its mAP, a resume of the finished run, which
    exports and evaluates without training again."""
    torch.set_num_threads(2)
    annotations = _write_images(tmp_path, 6, size=64)
    data = json.loads(_write_coco(tmp_path, annotations).read_text())
    data["images"] = data["images"][4:]  # img4 and img5, ids 5 and 6
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] > 4]
    val = tmp_path / "val.json"
    val.write_text(json.dumps(data))
    train = _write_coco(tmp_path, annotations[:4])
    (tmp_path / "img5.png").write_bytes(b"not a png")
    run = tmp_path / "run"
    command = ["detect-train", "--coco", str(train), "--images", str(tmp_path), "--val-coco",
               str(val), "--val-images", str(tmp_path), "--epochs", "1", "--batch-size", "2",
               "--input-size", "64", "--train-sizes", "64", "--out", str(run)]  # fmt: skip
    assert main(command) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "img5.png") in err
    hint = err.split("the same command with ")[1].split(" evaluates it")[0]
    assert hint == f"--resume {run / 'latest.pt'}" and (run / "model.pt").is_file()
    _write_images(tmp_path, 6, size=64)  # put right
    assert main([*command, *shlex.split(hint)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and set(json.loads(lines[-1])) == {"mAP", "AP50"}  # no training


def test_detect_train_hints_hold_a_path_with_spaces_as_one_word(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`resume it with --resume .../My Drive/latest.pt` pasted into a shell was two words:
    the hint quotes the path where it needs it, and the pasted hint resumes."""
    torch.set_num_threads(2)
    coco = _write_coco(tmp_path, _write_images(tmp_path, 4, size=64))
    run = tmp_path / "My Drive" / "detector"
    command = ["detect-train", "--coco", str(coco), "--images", str(tmp_path), "--batch-size",
               "2", "--input-size", "64", "--train-sizes", "64", "--epochs", "1",
               "--out", str(run)]  # fmt: skip
    assert main(command) == 0
    capsys.readouterr()
    assert main(command) == 2  # the same folder again: the advice quotes it
    hint = capsys.readouterr().err.split("resume it with ")[1].split(", or give")[0]
    assert hint == f"--resume '{run / 'latest.pt'}'"
    assert main([*command, *shlex.split(hint)]) == 0


def test_detect_train_on_a_terminal_draws_progress_bars(tmp_path: Path) -> None:
    """Training takes hours and its evaluation minutes: on a terminal a bar shows the steps
    (with the epoch and loss) and one the images evaluated; the JSON lines each keep a line
    of their own. None with --no-progress."""
    coco = _write_coco(tmp_path, _write_images(tmp_path, 4, size=64))
    command = [sys.executable, "-m", "shitu", "detect-train", "--coco", str(coco),
               "--images", str(tmp_path), "--val-coco", str(coco), "--val-images",
               str(tmp_path), "--epochs", "2", "--batch-size", "2", "--input-size", "64",
               "--train-sizes", "64"]  # fmt: skip
    status, lines = run_in_terminal([*command, "--out", str(tmp_path / "shown")])
    assert status == 0, lines
    (training,) = [line for line in lines if line.startswith("training: ")]
    assert "4/4" in training and "epoch=2/2" in training
    (evaluating,) = [line for line in lines if line.startswith("evaluating: ")]
    assert "4/4" in evaluating
    records = [line for line in lines if '"step": ' in line or '"mAP": ' in line]
    assert len(records) == 3 and all(line.startswith("{") for line in records)
    status, lines = run_in_terminal([*command, "--out", str(tmp_path / "quiet"), "--no-progress"])
    assert status == 0, lines
    assert not any(line.startswith(("training", "evaluating")) for line in lines), lines


def test_detect_train_into_a_log_prints_a_line_every_20_steps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Where stderr is a file or a pipe no bar is drawn, and an epoch of a COCO-sized set
    takes an hour or more with one JSON line at its start: a line every 20 steps shows that
    the run goes on, and how fast. None with --no-progress."""
    torch.set_num_threads(2)
    coco = _write_coco(tmp_path, _write_images(tmp_path, 4, size=64))
    command = ["detect-train", "--coco", str(coco), "--images", str(tmp_path), "--epochs", "10",
               "--batch-size", "2", "--input-size", "64", "--train-sizes", "64"]  # fmt: skip
    assert main([*command, "--out", str(tmp_path / "logged")]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if re.match(r"epoch \d+/", line)]
    assert len(lines) == 1, err
    expected = r"epoch 10/10 step 20/20: loss \d+\.\d{4}, lr \S+, \d+\.\d images/s"
    assert re.fullmatch(expected, lines[0]), lines
    assert main([*command, "--out", str(tmp_path / "quiet"), "--no-progress"]) == 0
    assert not re.search(r"^epoch \d+/", capsys.readouterr().err, re.MULTILINE)


def test_detection_data_is_clipped_counted_and_matched_by_class_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    annotations = _write_images(tmp_path, 2, size=64)
    path = _write_coco(tmp_path, annotations)
    data = json.loads(path.read_text())
    for image in data["images"]:
        image["width"] = image["height"] = 64
    data["annotations"][0]["bbox"] = [40, 40, 100, 100]  # runs past the 64 px image
    path.write_text(json.dumps(data))
    dataset = CocoDetection(path, tmp_path)
    boxes, _ = dataset.targets(0)
    assert boxes.max() <= 64 and boxes[0].tolist() == [40, 40, 64, 64]
    assert not caplog.records  # clipped, nothing lost
    data["annotations"][-1]["bbox"] = [70, 10, 20, 20]  # wholly right of the image: left out
    path.write_text(json.dumps(data))
    assert sum(map(len, CocoDetection(path, tmp_path).boxes)) == len(data["annotations"]) - 1
    assert f"{path}: 1 of the 3 boxes lie wholly outside their image" in caplog.text
    caplog.clear()
    # A size written as text is read as its number; one that is not positive, as not given
    # (the boxes are clipped when the image is read): it cut away every box of its image.
    data["images"][0].update(width="64", height="64")
    data["images"][1].update(width=-1, height=64)
    path.write_text(json.dumps(data))
    # (the second image's box right of 64 px kept: no size to cut it at)
    assert [len(b) for b in CocoDetection(path, tmp_path).boxes] == [1, 2]
    data["images"][0]["width"] = "wide"
    path.write_text(json.dumps(data))
    expected = r"\(image 1: its width 'wide' and height '64' are not both numbers\)$"
    with pytest.raises(DataError, match=expected):
        CocoDetection(path, tmp_path)
    for image in data["images"]:
        image["width"] = image["height"] = 64
    caplog.clear()
    data["annotations"][-1]["bbox"] = [10, 10, -5, 20]  # drawn right to left: no area
    path.write_text(json.dumps(data))
    assert sum(map(len, CocoDetection(path, tmp_path).boxes)) == len(data["annotations"]) - 1
    assert f"{path}: 1 of the 3 boxes have no area (x2 <= x1 or y2 <= y1" in caplog.text
    assert "outside" not in caplog.text

    reordered = json.loads(path.read_text())  # the same classes, listed the other way round
    for category in reordered["categories"]:
        category["id"] = 10 - category["id"]
    for annotation in reordered["annotations"]:
        annotation["category_id"] = 10 - annotation["category_id"]
    (tmp_path / "val.json").write_text(json.dumps(reordered))
    val = CocoDetection(tmp_path / "val.json", tmp_path)
    assert val.class_names == ("red", "blue")
    val.use_class_order(dataset.class_names)
    assert val.class_names == dataset.class_names
    assert all((a == b).all() for a, b in zip(val.labels, dataset.labels, strict=True))
    val.use_class_order(("green", "red", "blue"))  # a model with one class more
    assert val.class_names == ("green", "red", "blue") and val.labels[0].min() >= 1
    with pytest.raises(DataError, match="are not among the model.s"):
        val.use_class_order(("cat", "dog"))

    for annotation in data["annotations"]:  # in another image's pixels, say: outside these
        annotation["bbox"] = [100, 100, 20, 20]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"^the training data's 2 images hold no boxes \(none"):
        DetectionTrainer(CocoDetection(path, tmp_path), DetectionTrainConfig())
    one_photo = CocoDetection(_write_coco(tmp_path, [[(10, 10, 30, 30, 0)]]), tmp_path)
    # Its one image at 32 or 64: the stride-64 level is one cell, its BatchNorm named.
    config = DetectionTrainConfig(batch_size=4, train_sizes=(96, 64, 32, 64), eval_size=64)
    with pytest.raises(ConfigError) as info:
        DetectionTrainer(one_photo, config)
    assert str(info.value) == (
        "batches of one image cannot train at input sizes [32, 64], where BatchNorm layer "
        "'neck.first_top_conv.bn1' gets a 1x1 feature map from the 64x64 training images, "
        "one value per channel, and BatchNorm cannot train on that; give sizes above 64, or "
        "a batch size and a training set of at least 2 images"
    )
    DetectionTrainer(one_photo, DetectionTrainConfig(batch_size=4, train_sizes=(96,)))
    data["images"], data["annotations"] = [], []
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: lists no images"):
        CocoDetection(path, tmp_path)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("train_sizes", (), "a positive multiple of 32"),
        ("train_sizes", (320, 100), "a positive multiple of 32"),
        ("eval_size", 0, "a positive multiple of 32"),
        ("epochs", 0, "a whole number >= 1"),
        ("batch_size", 2.0, "a whole number >= 1"),
        ("num_workers", -1, "a whole number >= 0"),
        ("learning_rate", float("nan"), "a number above 0"),
        ("weight_decay", -1e-4, "a number >= 0"),
        ("ema_decay", 1.0, "a number in [0, 1)"),
        ("checkpoint_every_steps", 0, "a whole number >= 1"),
        ("seed", -1, "a whole number from 0 to 2**63 - 1"),  # numpy's traceback, steps in
        ("seed", 2**64, "a whole number from 0 to 2**63 - 1"),
    ],
)
def test_detection_train_config_refuses_values_that_cannot_train(field, value, expected):
    """Python callers get the CLI's checks: an empty size list failed at the first batch."""
    with pytest.raises(
        ConfigError, match=rf"^DetectionTrainConfig\.{field}: expected {re.escape(expected)}"
    ):
        DetectionTrainConfig(**{field: value})


def test_an_out_folder_of_another_kind_of_run_is_not_offered_to_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An --out holding `shitu train`'s latest.pt, or a model.onnx alone, was refused with
    'resume it with --resume OUT/latest.pt', which --resume then refused (or which is not
    there)."""
    command = ["detect-train", "--coco", str(tmp_path / "none.json"), "--images", str(tmp_path)]
    recognition = tmp_path / "recognition_run"
    recognition.mkdir()
    save_training_state(recognition / "latest.pt", {"seed": 0, "model": {}}, Progress())
    assert main([*command, "--out", str(recognition)]) == 2
    err = capsys.readouterr().err
    assert f"--out {recognition}: holds an earlier run (latest.pt), but no detect-train run" in err
    assert "a recognition training checkpoint, not a detector one" in err
    assert "--resume" not in err
    exported = tmp_path / "exported"
    exported.mkdir()
    (exported / "model.onnx").write_bytes(b"a detector")
    assert main([*command, "--out", str(exported)]) == 2
    err = capsys.readouterr().err
    assert f"--out {exported}: holds an earlier run (model.onnx), with no latest.pt to" in err
    assert "--resume" not in err


def test_detect_train_refuses_a_seed_out_of_range_as_its_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A seed of 2**63 or more was refused as 'DetectionTrainConfig.seed', a name the user
    never typed, after the data was read; it is --seed's error, before anything runs."""
    command = ["detect-train", "--coco", str(tmp_path / "none.json"), "--images", str(tmp_path)]
    with pytest.raises(SystemExit) as stopped:
        main([*command, "--seed", str(2**63), "--out", str(tmp_path / "run")])
    assert stopped.value.code == 2
    assert (
        f"argument --seed: expected a whole number from 0 to 2**63 - 1, got {2**63}"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "run").exists()


def _live_children(pid: int) -> list[int]:
    """The processes whose parent is `pid`, but for those that have ended (zombies)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, parent = stat.read_text().rpartition(")")[2].split()[:2]
        except OSError:  # ended meanwhile
            continue
        if int(parent) == pid and state != "Z":
            children.append(int(stat.parent.name))
    return children


def test_an_image_that_cannot_be_loaded_mid_run_leaves_a_checkpoint_to_resume_from(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A photo corrupted while the run goes on (or unreadable from the start) stops it at the
    batch that holds it, naming it, with the steps before saved: mended, the run resumes
    there and takes the steps the whole run would have."""
    torch.set_num_threads(2)
    _write_coco(tmp_path, _write_images(tmp_path, 8))  # two batches of 4 an epoch
    whole = [h["loss"] for h in _trainer(tmp_path, epochs=2, learning_rate=0.02).train()]
    photo = tmp_path / "img3.png"
    pixels = photo.read_bytes()
    broken = _trainer(tmp_path, epochs=2, learning_rate=0.02)
    broken.train(max_steps=2)  # the first epoch
    photo.write_bytes(b"not a photo any more")
    with pytest.raises(DataError, match="img3.png: cannot decode image"):
        broken.train()
    assert f"the run so far is saved in {broken.checkpoint_path}" in caplog.text
    photo.write_bytes(pixels)
    resumed = _trainer(tmp_path, epochs=2, learning_rate=0.02)
    resumed.resume(broken.checkpoint_path)
    assert resumed.progress.global_step == broken.progress.global_step >= 2
    rest = [h["loss"] for h in resumed.train()]
    assert rest == pytest.approx(whole[broken.progress.global_step :], rel=1e-4)


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads processes in /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_to_the_process_group_stops_training_with_a_checkpoint_and_its_workers(
    tmp_path: Path, signum: signal.Signals
) -> None:
    """systemd, Slurm and `kill -- -PGID` send SIGTERM to the data loader's workers too, a
    terminal that closes SIGHUP: the run stops after its step with a checkpoint to resume,
    says so, ends its workers and exits 128 + the signal, without a traceback about the
    workers (SIGHUP killed them all outright)."""
    coco = _write_coco(tmp_path, _write_images(tmp_path, 16))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "shitu", "detect-train", "--coco", str(coco),
               "--images", str(tmp_path), "--epochs", "1000", "--batch-size", "4",
               "--workers", "2", "--out", str(out)]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert '"step": 1' in process.stdout.readline()  # training, its workers loading
        workers = _live_children(process.pid)
        assert len(workers) == 2
        os.killpg(process.pid, signum)
        stdout, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 128 + signum
    # Besides the summary and the step lines of a log, only the stop is said.
    assert (
        f"\nwarning: {signum.name}: stopping after this step, with a checkpoint (send it again to stop "
        "at once, without one)\n"
    ) in err
    assert err.count("warning") == 1 and "Traceback" not in err and "error" not in err
    # On stderr, as its last line: stdout holds JSON lines only, for a reader to parse.
    assert re.search(
        rf"\nstopped early after step \d+ \(0 of 1000 epochs done\); resume with --resume "
        rf"{re.escape(str(out / 'latest.pt'))}\n\Z",
        err,
    )
    assert all(json.loads(line)["step"] > 1 for line in stdout.splitlines())
    assert not set(workers) & {int(p.name) for p in Path("/proc").glob("[0-9]*")}


def test_a_run_whose_worker_fails_ends_with_its_workers(tmp_path: Path) -> None:
    """Workers leave stopping to the trainer (they ignore SIGTERM): a run that fails with
    them alive (an unreadable photo) must still end them, not hang at exit waiting."""
    coco = _write_coco(tmp_path, _write_images(tmp_path, 8))
    (tmp_path / "img5.png").write_text("junk")
    command = [sys.executable, "-m", "shitu", "detect-train", "--coco", str(coco),
               "--images", str(tmp_path), "--epochs", "2", "--batch-size", "4",
               "--workers", "2", "--train-sizes", "64", "--out", str(tmp_path / "out")]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 2, err
    assert "img5.png: cannot decode image" in err and "the run so far is saved in" in err


def test_a_signal_stops_training_after_its_step_with_a_checkpoint_to_resume_mid_epoch(
    tmp_path: Path,
) -> None:
    """Ctrl-C (SIGINT) during an epoch: the step under way ends, a checkpoint is written,
    and the run resumed from it takes the steps the whole run would have (it lost the epoch)."""
    torch.set_num_threads(2)
    _write_coco(tmp_path, _write_images(tmp_path, 8))  # two batches of 4 an epoch
    whole = [h["loss"] for h in _trainer(tmp_path, epochs=2, learning_rate=0.02).train()]

    def press_ctrl_c_during_the_first_step(record: dict[str, float]) -> None:
        if record["step"] == 0:
            signal.raise_signal(signal.SIGINT)

    stopped = _trainer(tmp_path, epochs=2, learning_rate=0.02)
    stopped.train(on_step=press_ctrl_c_during_the_first_step)
    assert stopped.stop_signal == signal.SIGINT
    assert (stopped.progress.global_step, stopped.progress.batch_in_epoch) == (1, 1)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back
    resumed = _trainer(tmp_path, epochs=2, learning_rate=0.02)
    resumed.resume(stopped.checkpoint_path)
    rest = [h["loss"] for h in resumed.train()]
    assert rest == pytest.approx(whole[1:], rel=1e-4)


PICODET_ONNX = Path("/work/shared/models/picodet_s_coco/picodet_s_320_coco.onnx")


@pytest.mark.skipif(not PICODET_ONNX.is_file(), reason="needs the reference PicoDet ONNX")
def test_resuming_from_a_file_that_is_no_checkpoint_says_so_in_a_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An .onnx or a JSON given to --resume printed torch's page on `weights_only`,
    advising to load the file as code; weights are named as weights."""
    coco = _write_coco(tmp_path, _write_images(tmp_path, 2, size=64))
    weights = tmp_path / "weights.safetensors"
    save_file({"w": torch.ones(1)}, str(weights))
    for given in (PICODET_ONNX, coco):
        command = ["detect-train", "--coco", str(coco), "--images", str(tmp_path)]
        assert main([*command, "--out", str(tmp_path / "out"), "--resume", str(given)]) == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1] == (
            f"error: --resume {given}: not a readable training checkpoint (expected the "
            "latest.pt a training run writes, or its output directory)"
        )
        assert "weights_only" not in err
    assert main([*command, "--out", str(tmp_path / "out"), "--resume", str(weights)]) == 2
    assert not (tmp_path / "out").exists()
    assert (
        f"error: {weights} is a weights file, not a training checkpoint; --resume takes the "
        "run's latest.pt or its output directory"
    ) in capsys.readouterr().err
    # Without --out, the run goes on in the folder of the file resumed: refused before it
    # takes that folder's run lock, which stayed in it (a models folder, say).
    models = tmp_path / "models"
    models.mkdir()
    onnx = shutil.copy(PICODET_ONNX, models)
    assert main([*command, "--resume", str(onnx)]) == 2
    assert "not a readable training checkpoint" in capsys.readouterr().err
    assert [path.name for path in models.iterdir()] == [PICODET_ONNX.name]
