"""PicoDet detection: decode and NMS against hand-computed boxes, weight import from the
real PicoDet-S ONNX export (parity with onnxruntime), export, checkpoints and the CLI."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from safetensors.torch import save_file

from shitu.cli.main import main as shitu_main
from shitu.data.transforms.ops import UnreadableImageError
from shitu.detection import boxes as numpy_boxes
from shitu.detection import build_picodet, load_detector
from shitu.detection.boxes import multiclass_nms, nms
from shitu.detection.detector import MEAN, STD, OnnxDetector, TorchDetector, preprocess
from shitu.detection.export import _Decoded, export_onnx
from shitu.detection.postprocess import anchor_points, box_iou, decode_boxes
from shitu.detection.weights import load_onnx_weights, paddle_key, save_detector
from shitu.engine.state import Progress, save_training_state
from shitu.errors import CheckpointError, ConfigError
from shitu.onnx_trace import trace_to_onnx
from shitu.pipeline import build_detector, fonts, load_pipeline_config
from tests.font_helpers import font_covering
from tests.onnx_helpers import tiny_model
from tests.terminal_helpers import run_in_terminal

PICODET = Path("/work/shared/models/picodet_s_coco")
ONNX_416 = PICODET / "picodet_s_416_coco.onnx"
GROCERY = Path("/work/shared/datasets/grocery_store")
needs_picodet = pytest.mark.skipif(not ONNX_416.is_file(), reason="picodet_s_coco not available")


def one_hot_bins(offsets: list[float], reg_max: int = 7) -> torch.Tensor:
    """Logits whose softmax puts (almost) all mass on each side's integer offset."""
    logits = torch.full((4, reg_max + 1), -50.0)
    for side, value in enumerate(offsets):
        logits[side, int(value)] = 50.0
    return logits.reshape(-1)


def test_anchor_points_are_cell_centres() -> None:
    points, strides = anchor_points([(2, 3), (1, 2)], [8, 16], 0.5)
    expected = [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12], [8, 8], [24, 8]]
    assert points.tolist() == expected
    assert strides.tolist() == [8] * 6 + [16] * 2


def test_decode_hand_computed() -> None:
    points = torch.tensor([[20.0, 12.0], [8.0, 8.0]])
    strides = torch.tensor([8.0, 16.0])
    reg = torch.stack([one_hot_bins([1, 0, 2, 3]), one_hot_bins([0, 0, 1, 1])])[None]
    boxes = decode_boxes(reg, points, strides)[0]
    # cell (20, 12), stride 8: l=8, t=0, r=16, b=24; cell (8, 8), stride 16: r=b=16.
    torch.testing.assert_close(boxes, torch.tensor([[12.0, 12.0, 36.0, 36.0], [8, 8, 24, 24.0]]))


def test_decode_uses_the_expectation_of_the_bins() -> None:
    logits = torch.zeros(4, 8)
    logits[:, 2] = logits[:, 3] = 30.0  # half the mass on 2, half on 3 -> 2.5
    boxes = decode_boxes(
        logits.reshape(1, 1, -1), torch.tensor([[100.0, 50.0]]), torch.tensor([10.0])
    )
    torch.testing.assert_close(boxes[0, 0], torch.tensor([75.0, 25.0, 125.0, 75.0]))


def test_box_iou_hand_computed() -> None:
    a = torch.tensor([[0.0, 0, 10, 10]])
    b = torch.tensor([[5.0, 5, 15, 15], [10, 10, 20, 20], [0, 0, 10, 10], [2, 2, 1, 1]])
    torch.testing.assert_close(box_iou(a, b)[0], torch.tensor([25 / 175, 0.0, 1.0, 0.0]))


def test_multiclass_nms_hand_computed() -> None:
    boxes = np.array(
        [
            [0.0, 0, 10, 10],  # class 0, 0.9: kept
            [1.0, 0, 11, 10],  # IoU 0.82 with box 0, class 0: suppressed
            [1.0, 0, 11, 10],  # same box, class 1: kept (per-class NMS)
            [20.0, 20, 30, 30],  # class 0, 0.5: kept
            [0.0, 0, 10, 12],  # class 0, 0.01: below the threshold
        ],
        np.float32,
    )
    scores = np.zeros((5, 2), np.float32)
    scores[0, 0], scores[1, 0], scores[2, 1], scores[3, 0], scores[4, 0] = 0.9, 0.8, 0.7, 0.5, 0.01
    dets = multiclass_nms(boxes, scores, score_threshold=0.05, iou_threshold=0.6)
    expected = [
        [0, 0.9, 0, 0, 10, 10],
        [1, 0.7, 1, 0, 11, 10],
        [0, 0.5, 20, 20, 30, 30],
    ]
    np.testing.assert_allclose(dets, expected, rtol=1e-6)
    agnostic = multiclass_nms(boxes, scores, 0.05, 0.6, class_agnostic=True)
    assert agnostic[:, 1].tolist() == pytest.approx([0.9, 0.5])
    assert multiclass_nms(boxes, scores, 0.05, 0.6, keep_top_k=1).shape == (1, 6)


def test_nms_chain_is_greedy() -> None:
    # A suppresses B, B would suppress C, but B is gone, so C survives.
    boxes = np.array([[0.0, 0, 10, 10], [3.0, 0, 13, 10], [6.0, 0, 16, 10]], np.float32)
    scores = np.array([[0.9], [0.8], [0.7]], np.float32)
    dets = multiclass_nms(boxes, scores, 0.1, 0.4)
    assert dets[:, 1].tolist() == pytest.approx([0.9, 0.7])


def torch_nms(
    boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """Textbook greedy NMS per group in torch (the recogniser's and the detectors' NMS ran in
    torch before): best first, equal scores in input order, then all groups by score."""
    kept = []
    for group in groups.unique():
        members = torch.nonzero(groups == group).squeeze(1)
        order = members[scores[members].argsort(descending=True, stable=True)]
        ious = box_iou(boxes[order], boxes[order])
        chosen: list[int] = []
        for i in range(len(order)):
            if not any(bool(ious[i, j] > iou_threshold) for j in chosen):
                chosen.append(i)
        kept.append(order[chosen])
    index = torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long)
    return index[scores[index].argsort(descending=True, stable=True)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_nms_equals_torch_nms_on_random_boxes_with_ties(dtype) -> None:
    """Inference NMS runs in numpy (no torch import): the same boxes, in the same order, as
    greedy NMS in torch, with equal scores, identical and empty boxes among them."""
    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(0, 40))
        corner = rng.integers(0, 20, (n, 2)).astype(dtype)
        size = rng.integers(-2, 12, (n, 2)).astype(dtype)  # some empty, some inverted
        boxes = np.concatenate([corner, corner + size], axis=1)
        if trial % 2:
            boxes += rng.random(boxes.shape).astype(dtype)
        scores = (rng.integers(0, 5, n) / 4).astype(dtype)  # many equal scores
        groups = rng.integers(0, 3, n)
        for threshold in (0.0, 0.3, 0.5, 1 / 3):
            torch_boxes, torch_scores = torch.from_numpy(boxes), torch.from_numpy(scores)
            expected = torch_nms(torch_boxes, torch_scores, torch.from_numpy(groups), threshold)
            assert nms(boxes, scores, groups, threshold).tolist() == expected.tolist()
            np.testing.assert_array_equal(
                numpy_boxes.box_iou(boxes, boxes), box_iou(torch_boxes, torch_boxes).numpy()
            )


def test_multiclass_nms_keeps_equal_scores_in_box_order() -> None:
    boxes = np.array([[0.0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], np.float32)
    scores = np.full((3, 1), 0.5, np.float32)
    assert multiclass_nms(boxes, scores, 0.1, 0.5)[:, 2].tolist() == [0, 20, 40]
    assert multiclass_nms(boxes, scores, 0.1, 0.5, nms_top_k=2)[:, 2].tolist() == [0, 20]


def test_per_class_nms_at_threshold_0_computes_iou_rows_only_for_the_boxes_it_keeps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`shitu detect --per-class --threshold 0`: every box a candidate of every class (80
    classes x NMS_TOP_K), where an IoU matrix of each class's candidates took seconds an
    image; NMS works out the IoU of the boxes it keeps, up to the boxes output per class,
    and keeps the same boxes."""
    rng = np.random.default_rng(0)
    corner = rng.random((1000, 2)).astype(np.float32) * 400
    boxes = np.concatenate([corner, corner + 20 + 40 * rng.random((1000, 2))], axis=1)
    scores = rng.random((1000, 3)).astype(np.float32)
    every_box = multiclass_nms(boxes, scores, 0.0, 0.6, keep_top_k=3000)
    computed = []
    box_iou = numpy_boxes.box_iou

    def counted(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        computed.append(a.shape[0] * b.shape[0])
        return box_iou(a, b)

    monkeypatch.setattr(numpy_boxes, "box_iou", counted)
    np.testing.assert_array_equal(
        multiclass_nms(boxes, scores, 0.0, 0.6, keep_top_k=5), every_box[:5]
    )
    assert 0 < sum(computed) <= 3 * 5 * 1000  # not 3 * 1000 * 1000


def test_numpy_decode_matches_the_models_torch_decode() -> None:
    """PaddleDetection's ONNX outputs are decoded in numpy, the model decodes in torch (from
    the same cell centres): boxes within float32 rounding."""
    shapes, strides = [(52, 52), (26, 26), (13, 13), (7, 7)], [8, 16, 32, 64]
    points, point_strides = numpy_boxes.cell_centres(shapes, strides, 0.5)
    torch_points, torch_strides = anchor_points(shapes, strides, 0.5)
    reg = np.random.default_rng(0).normal(0, 3, (2, len(points), 32)).astype(np.float32)
    expected = decode_boxes(torch.from_numpy(reg), torch_points, torch_strides).numpy()
    decoded = numpy_boxes.decode_distributions(reg, points, point_strides)
    assert decoded.dtype == np.float32
    np.testing.assert_allclose(decoded, expected, rtol=1e-6, atol=1e-4)


def test_model_shapes_and_paddle_names() -> None:
    model = build_picodet("picodet_s_esnet", num_classes=3).eval()
    with torch.no_grad():
        scores, boxes = model.predict(torch.zeros(2, 3, 320, 320))
    assert scores.shape == (2, 1600 + 400 + 100 + 25, 3) and boxes.shape[-1] == 4
    keys = {paddle_key(k, model.arch) for k in model.state_dict()}
    assert "backbone.2_1._conv_dw_1._batch_norm._mean" in keys
    assert "head.conv_feat.cls_conv_pw3.1.norm.weight" in keys
    assert "head.head_cls0.bias" in keys


def _photos() -> list[np.ndarray]:
    paths = sorted((PICODET / "samples").glob("*.jpg"))
    lines = (GROCERY / "val.txt").read_text().splitlines()[::100] if GROCERY.is_dir() else []
    paths += [GROCERY / line.split(",")[0] for line in lines]
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def test_preprocess_is_bicubic_resize_then_imagenet_normalisation_bit_for_bit() -> None:
    """The detector's input is exactly (resized / 255 - MEAN) / STD in float32, CHW, as its
    weights were fed: computed channel by channel, nothing may round differently."""
    for photo in _photos():
        for size in ((416, 416), (320, 480)):
            resized = cv2.resize(photo, size[::-1], interpolation=cv2.INTER_CUBIC)
            expected = ((resized.astype(np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1)
            got = preprocess(photo, size)
            assert got.dtype == np.float32 and got.shape == (3, *size)
            assert np.array_equal(got, expected)


@needs_picodet
def test_onnx_weights_give_identical_outputs_and_boxes() -> None:
    model = load_onnx_weights(ONNX_416)
    assert model.arch.backbone == "ESNet" and model.arch.num_classes == 80
    reference = OnnxDetector(ONNX_416)
    ours = TorchDetector(model)
    photos = _photos()
    batch = np.stack([preprocess(p, (416, 416)) for p in photos])
    outs = [reference.session.run(None, {"image": b[None]}) for b in batch]
    with torch.no_grad():
        scores, reg, _ = model.raw_outputs(torch.from_numpy(batch))
    np.testing.assert_allclose(
        scores, np.stack([np.concatenate(o[:4], 1)[0] for o in outs]), atol=1e-4
    )
    np.testing.assert_allclose(
        reg, np.stack([np.concatenate(o[4:], 1)[0] for o in outs]), atol=1e-4
    )
    for photo in photos:
        a = reference.detect(photo, 0.3, 20, class_agnostic=False)
        b = ours.detect(photo, 0.3, 20, class_agnostic=False)
        assert a.shape == b.shape
        np.testing.assert_array_equal(a[:, 0], b[:, 0])
        np.testing.assert_allclose(a[:, 1:], b[:, 1:], atol=1e-2)
    bus = ours.detect(photos[0], 0.5, 10, class_agnostic=False)
    assert {0, 5} <= set(bus[:, 0].astype(int).tolist())  # people and the bus


@needs_picodet
def test_checkpoint_and_export_round_trip(tmp_path: Path) -> None:
    model = load_onnx_weights(PICODET / "picodet_s_320_coco.onnx", "picodet_s_esnet")
    assert model.arch.input_size == 320  # the export's size, not the architecture's 416
    checkpoint = save_detector(model, tmp_path / "det.pt")
    exported = export_onnx(model, tmp_path / "det.onnx", input_size=320)
    photo = _photos()[1]
    a = load_detector(checkpoint).detect(photo, 0.3, 5)
    for backend in ("torch", "onnxruntime"):  # the same file runs the same either way
        same = load_detector(PICODET / "picodet_s_320_coco.onnx", backend=backend)
        assert same.input_size == (320, 320)
        np.testing.assert_allclose(same.detect(photo, 0.3, 5), a, atol=1e-2)
    b = load_detector(exported).detect_batch([photo, photo[::2, ::2].copy()], 0.3, 5)
    assert len(a) > 0 and a.dtype == np.float32
    np.testing.assert_allclose(a, b[0], atol=1e-2)
    np.testing.assert_allclose(b[1][0, 2:], b[0][0, 2:] / 2, atol=3.0)  # same top box, halved


def test_exporting_a_detectors_model_leaves_its_boxes_as_they_were(tmp_path: Path) -> None:
    """torch's exporter put the model it was given back in training mode: a TorchDetector
    whose model was exported then found other boxes (its batch norms on each photo's own
    statistics), or failed on a level of one cell. A model in training stays so."""
    torch.manual_seed(0)
    model = build_picodet("picodet_s_esnet", num_classes=2, input_size=64)
    detector = TorchDetector(model)
    photo = np.random.default_rng(0).integers(0, 256, (80, 90, 3), dtype=np.uint8)
    before = detector.detect(photo, 0.0, 10)
    export_onnx(detector.model, tmp_path / "det.onnx")
    assert not detector.model.training
    np.testing.assert_array_equal(detector.detect(photo, 0.0, 10), before)
    export_onnx(model.train(), tmp_path / "det.onnx")
    assert model.training


def test_detect_batch_takes_any_sequence_of_images_and_names_one_it_refuses() -> None:
    """One array alone failed on numpy's "truth value ... is ambiguous", a generator's images
    were spent by the stacking ("zip() argument 2 is longer"), and a refused image in a
    batch was not named by its place, as the recogniser and extractor name it."""
    torch.manual_seed(0)
    detector = TorchDetector(build_picodet("picodet_s_esnet", num_classes=2, input_size=64))
    photo = np.random.default_rng(0).integers(0, 256, (80, 90, 3), dtype=np.uint8)
    expected = detector.detect(photo, 0.0, 10)
    found = detector.detect_batch((image for image in [photo, photo]), 0.0, 10)
    assert len(found) == 2
    for boxes in found:
        np.testing.assert_allclose(boxes, expected, rtol=1e-5, atol=1e-3)
    assert detector.detect_batch(iter([])) == []
    with pytest.raises(
        UnreadableImageError, match=r"one image array \(80, 90, 3\): pass \[image\]"
    ):
        detector.detect_batch(photo)
    with pytest.raises(UnreadableImageError, match=r"^image 1 \(from 0\) of 2: expected an RGB"):
        detector.detect_batch([photo, photo.astype(np.float32)])


def test_our_onnx_export_carries_its_class_names_as_our_checkpoints_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = build_picodet("picodet_s_esnet", num_classes=2, class_names=("cup", "box"))
    exported = export_onnx(model, tmp_path / "det.onnx", input_size=64)
    with load_detector(exported) as detector:
        assert detector.class_names == ("cup", "box") and detector.num_classes == 2
    on_torch = load_detector(exported, backend="torch", input_size=96)  # another size
    assert on_torch.class_names == ("cup", "box") and on_torch.input_size == (96, 96)
    photo = tmp_path / "photo.png"
    Image.new("RGB", (80, 60), "white").save(photo)
    names = tmp_path / "coco.names"  # another model's names are refused, as for a .pt file
    names.write_text("person\nbicycle\ncar\n")
    assert (
        shitu_main(["detect", str(photo), "--model", str(exported), "--class-names", str(names)])
        == 2
    )
    assert "3 names, but the detector scores 2 classes" in capsys.readouterr().err


def test_our_onnx_export_of_a_fresh_model_loads_into_torch(tmp_path: Path) -> None:
    """Its many equal tensors (zero biases) are stored once and shared through Identity
    nodes, which the weight reader follows."""
    model = build_picodet("picodet_s_esnet", num_classes=2, input_size=64)
    loaded = load_onnx_weights(export_onnx(model, tmp_path / "det.onnx"))
    photo = np.random.default_rng(0).integers(0, 256, (80, 90, 3), dtype=np.uint8)
    batch = torch.from_numpy(preprocess(photo, (64, 64))[None])
    with torch.no_grad():
        for ours, theirs in zip(model.eval().predict(batch), loaded.predict(batch), strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-3)


def test_an_onnx_export_that_keeps_its_batch_norms_loads_into_torch_with_them(
    tmp_path: Path,
) -> None:
    """An export made without constant folding keeps each BatchNormalization node after
    its bias-less conv: `--runtime torch` (and detect-export) failed on it with an
    AttributeError, and its statistics would have been dropped. They are folded in."""
    torch.manual_seed(0)
    model = build_picodet("picodet_s_esnet", num_classes=2, input_size=64).eval()
    for module in model.modules():  # statistics far from the identity, as trained ones are
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    path = tmp_path / "unfolded.onnx"
    with torch.no_grad():
        trace_to_onnx(
            _Decoded(model).eval(),
            (torch.zeros(1, 3, 64, 64),),
            path,
            input_names=["image"],
            output_names=["scores", "boxes"],
            opset_version=13,
            do_constant_folding=False,
        )
    assert any(node.op_type == "BatchNormalization" for node in onnx.load(str(path)).graph.node)
    loaded = load_onnx_weights(path)
    photo = np.random.default_rng(0).integers(0, 256, (80, 90, 3), dtype=np.uint8)
    batch = torch.from_numpy(preprocess(photo, (64, 64))[None])
    with torch.no_grad():
        for ours, theirs in zip(model.predict(batch), loaded.predict(batch), strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("bias", ["absent", "computed"])
def test_an_onnx_export_whose_head_conv_has_no_stored_bias(tmp_path: Path, bias: str) -> None:
    """The head's last conv given without its bias input (an optimiser dropping it): our
    conv's bias was copied from None, an AttributeError; its output goes on as it is, so
    the conv's bias is zero. A bias the graph computes was taken for none, the model
    loaded with wrong weights: refused, as a computed weight is."""
    model = build_picodet("picodet_s_esnet", num_classes=2, input_size=64).eval()
    exported = onnx.load(str(export_onnx(model, tmp_path / "det.onnx")))
    last = [node for node in exported.graph.node if node.op_type == "Conv"][-1]
    if bias == "absent":
        del last.input[2:]
    else:  # the stored bias, passed through an op the weight reader does not evaluate
        exported.graph.node.insert(0, helper.make_node("Neg", [last.input[2]], ["negated"]))
        exported.graph.node.insert(1, helper.make_node("Neg", ["negated"], ["computed"]))
        last.input[2] = "computed"
    path = tmp_path / "edited.onnx"
    onnx.save(exported, str(path))
    if bias == "computed":
        with pytest.raises(CheckpointError, match=f"conv '{last.name}' has a computed bias"):
            load_onnx_weights(path)
        return
    loaded = load_onnx_weights(path)
    with torch.no_grad():
        model.head.head_cls[-1].bias.zero_()
    photo = np.random.default_rng(0).integers(0, 256, (80, 90, 3), dtype=np.uint8)
    batch = torch.from_numpy(preprocess(photo, (64, 64))[None])
    with torch.no_grad():
        for ours, theirs in zip(model.predict(batch), loaded.predict(batch), strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-3)


@needs_picodet
def test_an_onnx_export_of_another_architecture_than_the_one_named_says_which_was_named() -> None:
    """`--arch` names one architecture, and only that one is tried: the error said "the
    given one", not which, nor that without it every known one is tried."""
    onnx_file = PICODET / "picodet_s_416_coco.onnx"
    with pytest.raises(CheckpointError) as refused:
        load_detector(onnx_file, backend="torch", arch="picodet_lcnet_x2_5_mainbody")
    assert str(refused.value) == (
        f"{onnx_file}: its convolutions do not match the PicoDet architecture "
        "picodet_lcnet_x2_5_mainbody; without an architecture named, each known one is tried "
        "(picodet_s_esnet, picodet_m_esnet, picodet_lcnet_x2_5_mainbody)"
    )


def test_our_onnx_export_loads_into_torch_with_its_architecture_named(tmp_path: Path) -> None:
    """A 2-class export run by torch with --det-arch given, as a .pdparams needs it: the
    named architecture takes the export's class count and names (its 80 COCO classes
    refused every conv of the head)."""
    model = build_picodet("picodet_s_esnet", num_classes=2, class_names=("a", "b"), input_size=64)
    path = export_onnx(model, tmp_path / "det.onnx")
    detector = load_detector(path, backend="torch", arch="picodet_s_esnet")
    assert detector.num_classes == 2 and detector.class_names == ("a", "b")
    image = np.asarray(Image.open(PICODET / "samples" / "dog.jpg").convert("RGB"))
    expected = TorchDetector(model, 64).detect(image, 0.0, 10, class_agnostic=False)
    np.testing.assert_allclose(
        detector.detect(image, 0.0, 10, class_agnostic=False), expected, atol=1e-3
    )


def test_our_onnx_export_declares_its_class_count(tmp_path: Path) -> None:
    """Without class names (a model read from a .pdparams, say), the graph's scores shape
    tells the class count: a names file of another length is then refused by detect."""
    model = build_picodet("picodet_s_esnet", num_classes=3, input_size=64)
    path = export_onnx(model, tmp_path / "det.onnx")
    detector = load_detector(path)
    assert detector.class_names == () and detector.num_classes == 3
    scores, boxes = detector.predict(np.zeros((2, 3, 64, 64), np.float32))
    assert scores.shape == (2, boxes.shape[1], 3)


def test_a_failed_checkpoint_write_leaves_the_earlier_file(tmp_path: Path, monkeypatch) -> None:
    model = build_picodet("picodet_s_esnet", num_classes=2, input_size=64)
    path = save_detector(model, tmp_path / "model.pt")
    saved = path.read_bytes()

    def disk_full(payload: object, file: BinaryIO) -> None:
        file.write(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match=f"cannot write {path}: {os.strerror(errno.ENOSPC)}"):
        save_detector(model, path)
    assert path.read_bytes() == saved and [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_a_pdparams_fine_tuned_on_other_classes_loads_with_its_class_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A PaddleDetection PicoDet-S trained on 20 VOC classes, named by its architecture: it
    runs with the 20 classes its head scores (the head's shape refused it). `shitu detect`
    takes the architecture as --det-arch too, as recognize and detect-export do."""
    torch.manual_seed(0)
    model = build_picodet("picodet_s_esnet", num_classes=20, input_size=64).eval()
    state = {
        paddle_key(key, model.arch): value.numpy()
        for key, value in model.state_dict().items()
        if not key.endswith("num_batches_tracked")
    }
    path = tmp_path / "picodet_s_voc.pdparams"
    with path.open("wb") as handle:
        pickle.dump(state, handle, protocol=4)
    detector = load_detector(path, arch="picodet_s_esnet", input_size=64)
    assert detector.num_classes == 20 and detector.class_names == ()
    image = np.asarray(Image.open(PICODET / "samples" / "dog.jpg").convert("RGB"))
    expected = TorchDetector(model, 64).detect(image, 0.0, 10, class_agnostic=False)
    np.testing.assert_array_equal(detector.detect(image, 0.0, 10, class_agnostic=False), expected)
    dog = str(PICODET / "samples" / "dog.jpg")
    command = ["detect", dog, "--model", str(path), "--input-size", "64", "--threshold", "0"]
    assert shitu_main([*command, "--det-arch", "picodet_s_esnet"]) == 0
    assert json.loads(capsys.readouterr().out)["boxes"]


def test_a_recognition_training_checkpoint_given_as_a_detector_is_named_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`shitu train`'s latest.pt, found in an output/ folder beside detect-train's: it was
    refused as having 'no shitu-picodet-1', which said nothing of what it is."""
    latest = tmp_path / "latest.pt"
    state = {"seed": 0, "model": {"w": torch.zeros(2)}, "optimizer": {}}
    save_training_state(latest, state, Progress(epoch=1, global_step=10))
    Image.new("RGB", (64, 48), "red").save(tmp_path / "photo.png")
    assert shitu_main(["detect", str(tmp_path / "photo.png"), "--model", str(latest)]) == 2
    assert (
        f"{latest} is a recognition model's training checkpoint (`shitu train`'s), not a "
        "detector; give a detector: the model.pt or model.onnx `shitu detect-train` writes"
    ) in capsys.readouterr().err


def test_the_training_checkpoint_of_a_run_stopped_early_says_how_to_get_its_model(
    tmp_path: Path,
) -> None:
    """A run stopped early (Ctrl-C, SIGTERM) has written no model.pt: its latest.pt was
    answered 'give the model.pt its run wrote beside it', a file that is not there."""
    latest = tmp_path / "latest.pt"
    what = f"{latest} is a detector training checkpoint (for `shitu detect-train --resume`)"
    save_training_state(latest, {"arch": {}, "model": {}}, Progress(epoch=3, global_step=30))
    with pytest.raises(CheckpointError) as refused:
        load_detector(latest)
    assert str(refused.value) == (
        f"{what} of a run that has not ended: it writes model.pt and model.onnx beside it when "
        "it does; to use what it has learnt, resume it with --epochs 3 (the epochs it has "
        "done), which writes them without training on"
    )
    save_training_state(latest, {"arch": {}, "model": {}}, Progress(global_step=2))
    with pytest.raises(CheckpointError, match=r"beside it when it does$"):
        load_detector(latest)  # no epoch done: --epochs 0 is no setting
    save_detector(build_picodet("picodet_s_esnet", input_size=64), tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="give the model.pt its run wrote beside it instead"):
        load_detector(latest)


def test_a_recognition_export_given_as_the_detector_is_named_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`shitu export`'s folder (or its model.onnx) given to detect or detect-export: the
    folder was said to hold a detector, model.onnx, which was then refused for its
    outputs, leaving the user to find that it is a recognition model."""
    export = tmp_path / "my_model"
    export.mkdir()
    (export / "shitu_model.json").write_text("{}")
    (export / "model.onnx").write_bytes(b"not read")
    Image.new("RGB", (64, 48), "red").save(tmp_path / "photo.png")
    photo = str(tmp_path / "photo.png")
    for given in (export, export / "model.onnx"):
        assert shitu_main(["detect", photo, "--model", str(given)]) == 2
        part = "" if given == export else "a file of "
        assert (
            f"--model {given} is {part}an exported recognition model ({export} holds "
            "shitu_model.json), not a detector; give a detector: the model.pt or model.onnx"
        ) in capsys.readouterr().err
    out = str(tmp_path / "det.onnx")
    assert shitu_main(["detect-export", str(export / "model.onnx"), "--out", out]) == 2
    assert "is a file of an exported recognition model" in capsys.readouterr().err


def test_load_detector_errors(tmp_path: Path, caplog) -> None:
    checkpoint = save_detector(build_picodet("picodet_s_esnet", input_size=64), tmp_path / "d.pt")
    for size in (100, 0, 64.0):  # PicoDet's neck fails on sides that do not halve to 1/32
        with pytest.raises(ConfigError, match=f"a positive multiple of 32, got {size!r}$"):
            load_detector(checkpoint, input_size=size)
        with pytest.raises(ConfigError, match="multiple of 32"):
            export_onnx(build_picodet("picodet_s_esnet"), tmp_path / "d.onnx", input_size=size)
    assert not (tmp_path / "d.onnx").exists()
    # An ONNX export runs at its own size only, and was said to need the torch backend for
    # another, its own written as a string included.
    onnx = export_onnx(build_picodet("picodet_s_esnet", input_size=64), tmp_path / "d64.onnx")
    for size in ("64", 64.0, 100):
        with pytest.raises(ConfigError, match=f"a positive multiple of 32, got {size!r}$"):
            load_detector(onnx, input_size=size)
    with pytest.raises(CheckpointError, match="not found"):
        load_detector(tmp_path / "missing.onnx")
    with pytest.raises(CheckpointError, match=r"is a folder, not a detector file; give our"):
        load_detector(tmp_path)
    fifo = tmp_path / "det.onnx"  # was "detector file not found", as a recogniser's is not
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match=r"det.onnx is a FIFO \(named pipe\), not a det"):
        load_detector(fifo)
    fifo.unlink()
    run = tmp_path / "run"  # detect-train's --out, given as a recognition model's folder is
    run.mkdir()
    save_detector(build_picodet("picodet_s_esnet", input_size=64), run / "model.pt")
    with pytest.raises(CheckpointError, match=rf"\(.onnx\); it holds {run / 'model.pt'}$"):
        load_detector(run)
    paddle_export = tmp_path / "picodet_PPLCNet_x2_5_mainbody_lite_v1.0_infer"
    paddle_export.mkdir()  # PP-ShiTu's mainbody download, as PaddleDetection exports it
    for name in ("inference.pdiparams", "inference.pdmodel"):
        (paddle_export / name).write_bytes(b"\x00" * 64)
    paddle3_export = tmp_path / "paddle3"  # PaddleDetection 3's: the graph as JSON
    paddle3_export.mkdir()
    (paddle3_export / "model.pdiparams").write_bytes(b"\x00" * 64)
    (paddle3_export / "model.json").write_text('{"program": {}}')
    for given in (paddle_export, *paddle_export.iterdir(), *paddle3_export.iterdir()):
        with pytest.raises(
            CheckpointError, match=r"is a Paddle inference model, which shitu does not run; "
        ):
            load_detector(given)
    params = tmp_path / "model.pdparams"
    params.write_bytes(b"x")
    with pytest.raises(
        ConfigError,
        match=r"holds only weights; name its architecture \(--det-arch, the pipeline's "
        r"Global.det_arch\), one of picodet_s_esnet, ",
    ):
        load_detector(params)  # the names to choose from, and where they are given
    # with where it was given (it named neither)
    with pytest.raises(
        ConfigError,
        match=r"^unknown detector architecture 'nope' \(--det-arch, the pipeline's "
        r"Global.det_arch\); known: picodet_s_esnet, ",
    ):
        load_detector(params, arch="nope")
    # named with the way to an .onnx file (it was "the onnxruntime backend needs an .onnx file")
    with pytest.raises(ConfigError) as caught:
        load_detector(checkpoint, "onnxruntime")
    assert f"write this one as one with `shitu detect-export {checkpoint} --out FILE.onnx`" in (
        str(caught.value)
    )
    with caplog.at_level(logging.WARNING, logger="shitu.detection.detector"):
        load_detector(checkpoint, arch="picodet_s_esnet")  # the checkpoint's own arch is used
    assert f"{checkpoint}: the detector architecture given is not used" in caplog.text
    bogus = tmp_path / "bogus.pt"
    torch.save({"a": 1}, bogus)
    with pytest.raises(CheckpointError, match="not a shitu PicoDet checkpoint"):
        load_detector(bogus)
    # a recognition run's weights (a state dict; torch reads a .safetensors as one too)
    # given as the detector: said to be weights alone, not "no 'shitu-picodet-1'"
    weights = tmp_path / "best_model.safetensors"
    save_file({"backbone.conv.weight": torch.zeros(2, 2)}, str(weights))
    with pytest.raises(
        CheckpointError, match=r"best_model\.safetensors holds weights alone \(a state dict"
    ):
        load_detector(weights)
    photo = tmp_path / "photo.jpg"  # a user passing an image as --detector
    photo.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(
        CheckpointError, match=r"photo.jpg is not a readable detector checkpoint \("
    ):
        load_detector(photo)


@pytest.mark.parametrize(
    ("name", "backend", "arch"),
    [
        ("det.onnx", "auto", None),  # was onnxruntime's "No graph was found in the protobuf"
        ("det.onnx", "torch", None),  # was "has no convolutions; it is not a PicoDet export"
        ("det.pt", "auto", None),  # was "not a readable detector checkpoint"
        ("det.pdparams", "auto", "picodet_s_esnet"),  # was "... .pdparams file: Ran out of input"
    ],
)
def test_an_empty_detector_file_is_said_to_be_empty(
    tmp_path: Path, name: str, backend: str, arch: str | None
) -> None:
    """A download or copy that never finished leaves a file of 0 bytes: each reader named
    another cause, or none."""
    empty = tmp_path / name
    empty.touch()
    with pytest.raises(CheckpointError, match=r"is empty \(0 bytes\), not a detector") as refused:
        load_detector(empty, backend, arch)
    assert str(refused.value).startswith(f"{empty} is empty")


@pytest.mark.parametrize(
    ("out_channels", "message"),
    [
        (None, "has no convolutions; it is not a PicoDet export"),
        (8, "its convolutions match no PicoDet architecture"),  # too few for any class
        (33, "its convolutions match no PicoDet architecture"),
    ],
)
def test_an_onnx_file_that_is_no_picodet_is_refused(tmp_path: Path, out_channels, message):
    path = tiny_model(tmp_path, [1, 3, 32, 32], conv_channels=out_channels)
    with pytest.raises(CheckpointError, match=message) as refused:
        load_detector(path, backend="torch")
    assert str(refused.value).startswith(f"{path}: ")


@needs_picodet
def test_detect_class_names_end_only_where_files_end_lines(tmp_path: Path, capsys) -> None:
    """A class name holding U+2028 (or a form feed) was two names for str.splitlines(): every
    later class got the name of the one before it, or the count was refused. A line ends at
    \\n, \\r\\n or \\r only."""
    names = tmp_path / "coco.names"
    names.write_text((PICODET / "coco.names").read_text().replace("person\n", "per\u2028son\n"))
    bus = min(str(p) for p in (PICODET / "samples").glob("*.jpg"))
    assert shitu_main(["detect", bus, "--model", str(ONNX_416), "--class-names", str(names)]) == 0
    labels = {box["label"] for box in json.loads(capsys.readouterr().out)["boxes"]}
    assert "per\u2028son" in labels


@needs_picodet
def test_detect_cli_skips_a_device_naming_it_without_reading_it(capsys) -> None:
    """`shitu detect /dev/zero` read the device until memory ran out: a path that is no
    regular file is skipped, or refused as --class-names, named with what it is, before
    it is read (/dev/null here, which the old reader took for an empty file)."""
    assert shitu_main(["detect", "/dev/null", "--model", str(ONNX_416)]) == 1
    err = capsys.readouterr().err
    assert "skipped /dev/null: a character device, not an image file" in err
    # --class-names /dev/zero was read until memory ran out (/dev/null: "0 names")
    photo = str(PICODET / "samples" / "dog.jpg")
    assert (
        shitu_main(["detect", photo, "--model", str(ONNX_416), "--class-names", "/dev/null"]) == 2
    )
    assert capsys.readouterr().err == (
        "error: --class-names /dev/null: cannot read it (a character device, not a text file)\n"
    )
    # an image given as --class-names was told to be saved as UTF-8
    assert shitu_main(["detect", photo, "--model", str(ONNX_416), "--class-names", photo]) == 2
    said = f"error: --class-names {photo}: an image, not a text file of names\n"
    assert capsys.readouterr().err == said


@needs_picodet
def test_detect_cli_refuses_an_empty_path(tmp_path: Path, monkeypatch, capsys) -> None:
    """`shitu detect "$PHOTO"` with the variable unset searched the working directory, as
    Path("") names it, and ran on every image there; an empty --model is refused too."""
    shutil.copy(PICODET / "samples" / "dog.jpg", tmp_path / "dog.jpg")
    monkeypatch.chdir(tmp_path)
    assert shitu_main(["detect", "", "--model", str(ONNX_416)]) == 2
    out = capsys.readouterr()
    assert out.err == "error: an empty path was given: name image files or folders\n"
    assert out.out == ""
    # an empty --model was "error: . is a folder, not a detector file"
    assert shitu_main(["detect", "dog.jpg", "--model", ""]) == 2
    said = "error: --model: empty; give a detector file (.pt, .pdparams or .onnx)\n"
    assert capsys.readouterr().err == said


@needs_picodet
def test_an_empty_save_vis_is_none_given_not_the_working_directory(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """`--save-vis "$VIS"` with the variable unset wrote the annotated copies into the
    working directory, over any file there of the same name: it is none given, as an empty
    --detector is (and an empty --vis-font, Pillow's own font)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(PICODET / "samples" / "dog.jpg", photos / "dog.jpg")
    work = tmp_path / "work"
    work.mkdir()
    mine = work / "dog.jpg"
    mine.write_bytes(b"the user's own file")
    monkeypatch.chdir(work)
    command = ["detect", str(photos / "dog.jpg"), "--model", str(ONNX_416), "--save-vis", ""]
    assert shitu_main([*command, "--vis-font", ""]) == 0
    assert json.loads(capsys.readouterr().out)["boxes"]
    assert mine.read_bytes() == b"the user's own file" and os.listdir(work) == ["dog.jpg"]


@needs_picodet
def test_detect_cli_writes_json_lines_and_images(tmp_path: Path, monkeypatch, capsys) -> None:
    samples = sorted(str(p) for p in (PICODET / "samples").glob("*.jpg"))
    code = shitu_main(
        [
            "detect",
            *samples,
            "--model",
            str(ONNX_416),
            "--save-vis",
            str(tmp_path),
            "--max-boxes",
            "2",
        ]
    )
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["image"] for line in lines] == samples
    assert all(1 <= len(line["boxes"]) <= 2 for line in lines)
    box = lines[0]["boxes"][0]["box"]
    assert 0 <= box[0] < box[2] <= lines[0]["width"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bus.jpg", "dog.jpg"]
    assert all("label" not in box for line in lines for box in line["boxes"])  # names unknown
    assert shitu_main(["detect", samples[0], "--model", str(tmp_path / "none.onnx")]) == 2

    # A folder, with a broken image in it that is reported and skipped; labels from a file.
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(samples[1], folder / "dog.jpg")
    (folder / "broken.jpg").write_bytes(b"not an image")
    names = ["--class-names", str(PICODET / "coco.names")]
    code = shitu_main(["detect", str(folder), "--model", str(ONNX_416), *names])
    assert code == 0
    out = capsys.readouterr()
    (line,) = [json.loads(line) for line in out.out.splitlines()]
    assert line["image"].endswith("dog.jpg") and "broken.jpg" in out.err
    assert "1 of 2 files could not be read" in out.err  # as recognize counts them
    assert {"dog", "bicycle", "car"} <= {box["label"] for box in line["boxes"]}
    assert shitu_main(["detect", str(folder / "broken.jpg"), "--model", str(ONNX_416)]) == 1
    capsys.readouterr()
    listing = tmp_path / "photos.txt"  # a labelled list given as an image: said to be text
    listing.write_text(f"{folder / 'dog.jpg'}\tdog\n")
    assert shitu_main(["detect", str(listing), "--model", str(ONNX_416)]) == 1
    assert "a text file, not an image (detect takes image files" in capsys.readouterr().err
    bom_names = tmp_path / "bom.names"  # as Notepad saves it: a BOM first, not in "person"
    bom_names.write_text((PICODET / "coco.names").read_text(), encoding="utf-8-sig")
    utf16_names = tmp_path / "utf16.names"  # as PowerShell 5's `>` saves it
    utf16_names.write_text((PICODET / "coco.names").read_text(), encoding="utf-16")
    bus = ["detect", samples[0], "--model", str(ONNX_416), "--class-names", str(utf16_names)]
    assert shitu_main(bus) == 0
    assert "person" in {box["label"] for box in json.loads(capsys.readouterr().out)["boxes"]}
    bus = ["detect", samples[0], "--model", str(ONNX_416), "--class-names", str(bom_names)]
    assert shitu_main(bus) == 0
    assert "person" in {box["label"] for box in json.loads(capsys.readouterr().out)["boxes"]}
    chinese = tmp_path / "zh.names"  # written as recognize writes its labels, not as \u4eba
    chinese.write_text((PICODET / "coco.names").read_text().replace("person\n", "人\n", 1))
    assert shitu_main([*bus[:-1], str(chinese)]) == 0
    assert '"label": "人"' in capsys.readouterr().out
    two_names = tmp_path / "two.names"
    two_names.write_text("product\nshelf\n")  # not the file's 80 classes
    wrong = ["detect", str(folder), "--model", str(ONNX_416), "--class-names", str(two_names)]
    assert shitu_main(wrong) == 2
    assert "2 names, but the detector scores 80 classes" in capsys.readouterr().err
    gap = tmp_path / "gap.names"  # a blank line would shift every later name by one class
    gap.write_text((PICODET / "coco.names").read_text().replace("\nbicycle\n", "\n\nbicycle\n"))
    assert (
        shitu_main(["detect", samples[0], "--model", str(ONNX_416), "--class-names", str(gap)]) == 2
    )
    assert f"--class-names {gap}: line 2 is blank;" in capsys.readouterr().err
    folder_given = ["detect", samples[0], "--model", str(ONNX_416), "--class-names", str(tmp_path)]
    assert shitu_main(folder_given) == 2
    assert f"--class-names {tmp_path} is a folder, not a text file" in capsys.readouterr().err
    # said as the other listing files are (read_listing_text): "not found", and where a
    # relative path was looked for, not "cannot read it (No such file or directory)"
    monkeypatch.chdir(tmp_path)
    missing = ["detect", samples[0], "--model", str(ONNX_416), "--class-names", "coco.names"]
    assert shitu_main(missing) == 2
    assert capsys.readouterr().err == (
        "error: --class-names coco.names not found (relative paths are taken from the "
        f"working directory, {tmp_path})\n"
    )
    resized = ["detect", str(folder), "--model", str(ONNX_416), "--input-size", "320"]
    assert shitu_main(resized) == 2  # onnxruntime runs the file at the size it was made for
    assert "runs at the size it was exported for, 416x416" in capsys.readouterr().err
    # --runtime, as on the other commands (--backend, its name before, is still taken)
    for runtime in ("--runtime", "--backend"):
        assert shitu_main([*resized, runtime, "torch"]) == 0
        assert len(capsys.readouterr().out.splitlines()) == 1
    (tmp_path / "empty").mkdir()
    assert shitu_main(["detect", str(tmp_path / "empty"), "--model", str(ONNX_416)]) == 2
    assert "no images in" in capsys.readouterr().err
    # Same-named photos from two folders get two annotated copies.
    (folder / "again").mkdir()
    shutil.copy(samples[1], folder / "again" / "dog.jpg")
    vis = tmp_path / "vis_two"
    assert (
        shitu_main(["detect", str(folder), "--model", str(ONNX_416), "--save-vis", str(vis)]) == 0
    )
    written = sorted(str(p.relative_to(vis)) for p in vis.rglob("*.jpg"))
    assert written == ["again/dog.jpg", "dog.jpg"]


@needs_picodet
def test_detect_cli_draws_chinese_class_names_in_the_vis_font(
    tmp_path: Path, monkeypatch, caplog, capsys
) -> None:
    """Pillow's font has no Chinese: without a font that has it, each label is warned about
    once and drawn as tofu; with --vis-font naming one, the captions are drawn."""
    monkeypatch.setattr(fonts, "installed_fonts", lambda text: ())  # as on a bare machine
    names = tmp_path / "zh.names"
    names.write_text("".join(f"类别{i}\n" for i in range(80)), encoding="utf-8")
    dog = str(PICODET / "samples" / "dog.jpg")
    command = ["detect", dog, "--model", str(ONNX_416), "--class-names", str(names)]
    assert shitu_main([*command, "--save-vis", str(tmp_path / "tofu")]) == 0
    labels = {box["label"] for box in json.loads(capsys.readouterr().out)["boxes"]}
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(labels) > 1 and sorted(warned) == sorted(
        f"no font found that can draw all of the label {label!r} (missing 类 别): its caption "
        "shows empty boxes instead; give --vis-font FILE, a font that has these characters "
        "(e.g. Noto Sans CJK for Chinese)"
        for label in labels
    )
    font = font_covering("类别0123456789")
    if font is None:
        pytest.skip("no installed font has Chinese characters")
    caplog.clear()
    drawn = ["--save-vis", str(tmp_path / "font"), "--vis-font", font]
    assert shitu_main([*command, *drawn]) == 0
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    tofu, glyphs = (np.asarray(Image.open(tmp_path / vis / "dog.jpg")) for vis in ("tofu", "font"))
    assert (np.abs(tofu.astype(int) - glyphs).max(axis=-1) > 64).sum() > 100


def _onnx_with_nms_inside(tmp_path: Path, inputs: dict[str, int]) -> Path:
    """A graph shaped like PaddleDetection's default export (NMS inside): `inputs` (name ->
    ONNX element type, 4-D image-like first) in, boxes [M, 6] (cls, score, x1..y2) and the
    box count out."""
    graph_inputs = [
        helper.make_tensor_value_info(name, kind, [1, 3, 64, 64] if i == 0 else [1, 2])
        for i, (name, kind) in enumerate(inputs.items())
    ]
    first = next(iter(inputs))
    nodes = [
        helper.make_node("Cast", [first], ["as_float"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["as_float"], ["mean"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Concat", ["mean"] * 6, ["row"], axis=0),
        helper.make_node("Reshape", ["row", "one_by_six"], ["boxes"]),
        helper.make_node("Shape", ["boxes"], ["count"], start=0, end=1),
    ]
    outputs = [
        helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [None, 6]),
        helper.make_tensor_value_info("count", TensorProto.INT64, [1]),
    ]
    shape = numpy_helper.from_array(np.array([1, 6], np.int64), "one_by_six")
    graph = helper.make_graph(nodes, "nms_inside", graph_inputs, outputs, initializer=[shape])
    path = tmp_path / "nms_inside.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), path)
    return path


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (
            {"image": TensorProto.FLOAT, "scale_factor": TensorProto.FLOAT},
            r"the graph takes 2 inputs \['image', 'scale_factor'\]; a detector takes one, the "
            r"image batch \[N, 3, H, W\]; PaddleDetection exports post-processing and NMS in "
            r"the graph unless told not to: use PaddleDetection's export without "
            r"post-processing, -o export.benchmark=True$",
        ),
        (
            {"image": TensorProto.UINT8},
            r"input 'image' is tensor\(uint8\); a detector takes float32",
        ),
        (
            {"image": TensorProto.FLOAT},
            r"outputs \[1, 6\], \[1\] are neither our export's \(scores, boxes\) nor PicoDet's "
            r"per-level scores and box distributions \(PaddleDetection's export without "
            r"post-processing, -o export.benchmark=True\)$",
        ),
    ],
)
def test_an_onnx_detector_that_cannot_take_our_images_is_refused_when_loaded(
    tmp_path: Path, inputs: dict[str, int], message: str
) -> None:
    """Refused up front, naming the file, not at the first image by onnxruntime."""
    path = _onnx_with_nms_inside(tmp_path, inputs)
    with pytest.raises(CheckpointError, match=message) as refused:
        load_detector(path)
    assert str(refused.value).startswith(f"{path}: ")


@pytest.mark.parametrize(
    "shapes",
    [
        ([1, 3, 64, 64], [1, 3, 64, 64]),  # another model's image-shaped outputs
        ([1, 80, 85], [1, 90, 4]),  # 80 boxes scored, 90 boxes given
        ([1, 85, 80], [1, 85]),  # boxes of no side axis
        ([1, 85, 80], [1, 85, 6]),  # boxes of 6 numbers
    ],
)
def test_outputs_named_as_our_exports_but_shaped_otherwise_are_refused_when_loaded(
    tmp_path: Path, shapes: tuple[list[int], list[int]]
) -> None:
    """A graph whose outputs are called `scores` and `boxes` but are not [B, N, C] and
    [B, N, 4] is named when loaded; it failed at the first image with numpy's "operands
    could not be broadcast together"."""
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 64, 64])
    outputs = [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
        for name, shape in zip(("scores", "boxes"), shapes, strict=True)
    ]
    nodes = [
        helper.make_node("ConstantOfShape", [f"{name}_shape"], [name])
        for name in ("scores", "boxes")
    ]
    sizes = [
        numpy_helper.from_array(np.array(shape, np.int64), f"{name}_shape")
        for name, shape in zip(("scores", "boxes"), shapes, strict=True)
    ]
    graph = helper.make_graph(nodes, "named_like_ours", [image], outputs, initializer=sizes)
    path = tmp_path / "named_like_ours.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), path)
    with pytest.raises(CheckpointError, match="are neither our export's") as refused:
        load_detector(path)
    assert str(refused.value).startswith(f"{path}: outputs [")


@pytest.mark.parametrize("boxes_first", [True, False])
def test_a_picodet_export_with_post_processing_but_no_nms_is_named_as_one(
    tmp_path: Path, boxes_first: bool
) -> None:
    """PaddleDetection's 2022 PicoDet models (PicoHeadV2) exported with -o export.nms=False
    give decoded boxes [1, N, 4] and class-major scores [1, C, N]: refused as "neither our
    export's nor PicoDet's", which did not say what they are nor what shitu reads. At 64
    pixels, 4 levels (strides 8 to 64) hold 64 + 16 + 4 + 1 = 85 cells."""
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 64, 64])
    shapes = {"tmp_16": [1, 85, 4], "concat_4.tmp_0": [1, 2, 85]}  # paddle2onnx's names
    if not boxes_first:
        shapes = dict(reversed(shapes.items()))
    outputs = [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
        for name, shape in shapes.items()
    ]
    nodes = [helper.make_node("ConstantOfShape", [f"{name}_shape"], [name]) for name in shapes]
    sizes = [
        numpy_helper.from_array(np.array(shape, np.int64), f"{name}_shape")
        for name, shape in shapes.items()
    ]
    graph = helper.make_graph(nodes, "picodet_without_nms", [image], outputs, initializer=sizes)
    path = tmp_path / "picodet_without_nms.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), path)
    with pytest.raises(CheckpointError) as refused:
        load_detector(path)
    shown = ", ".join(str(shape) for shape in shapes.values())
    assert str(refused.value) == (
        f"{path}: outputs {shown} are a PicoDet's decoded boxes [1, N, 4] and scores [1, "
        "classes, N] (PaddleDetection's export with post-processing but no NMS, -o "
        "export.nms=False, as of its 2022 PicoHeadV2 models), a layout shitu does not read; "
        "it reads our export's (scores, boxes) and a (legacy, PicoHead) PicoDet's per-level "
        "scores and box distributions (PaddleDetection's export without post-processing, -o "
        "export.benchmark=True)"
    )


PADDLECLAS_DET_PREPROCESS = """\
Global:
  det_inference_model_dir: {detector}
DetPreProcess:
  transform_ops:
    - DetResize:
        interp: 2
        keep_ratio: false
        target_size: {target_size}
    - DetNormalizeImage:
        is_scale: true
        mean: [0.485, 0.456, 0.406]
        std: [0.229, 0.224, 0.225]
    - DetPermute: {{}}
"""


def test_the_pipelines_det_resize_target_size_is_the_detectors_input_size(tmp_path: Path) -> None:
    """PaddleClas's inference_general.yaml sets the detector's input size in DetPreProcess's
    DetResize; the detector runs at it (it ran at its architecture's own, the setting
    ignored), and a resize it cannot do is refused saying what it does."""
    checkpoint = save_detector(build_picodet("picodet_s_esnet", input_size=64), tmp_path / "d.pt")
    config = tmp_path / "inference_general.yaml"

    def detector_at(target_size: str, **resize: str) -> object:
        text = PADDLECLAS_DET_PREPROCESS.format(detector=checkpoint, target_size=target_size)
        for key, value in resize.items():
            text = text.replace(f"{key}: ", f"{key}: {value} #")
        config.write_text(text)
        return build_detector(load_pipeline_config(config))

    assert detector_at("[96, 96]").input_size == (96, 96)
    assert detector_at("128").input_size == (128, 128)
    no_resize = "DetPreProcess:\n  transform_ops: []\n"
    config.write_text(f"Global:\n  det_inference_model_dir: {checkpoint}\n{no_resize}")
    assert build_detector(load_pipeline_config(config)).input_size == (64, 64)  # its own
    refused = {
        (
            "[640, 480]",
            (),
        ): r"DetResize target_size: \[640, 480\]; shitu's detectors take a square input",
        (
            "[100, 100]",
            (),
        ): r"DetResize target_size: a detector input size is a positive multiple of 32",
        ("[96, 96]", ("keep_ratio", "true")): r"DetResize keep_ratio: True; .* give keep_ratio: "
        "false, interp: 2",
        ("[96, 96]", ("interp", "1")): r"DetResize interp: 1; .*bicubic",
    }
    for (target_size, resize), message in refused.items():
        with pytest.raises(ConfigError, match=rf"^{config}: DetPreProcess: {message}"):
            detector_at(target_size, **dict([resize]) if resize else {})


@needs_picodet
def test_an_onnx_detector_refuses_another_det_resize_target_size() -> None:
    """An ONNX file runs at the size it was exported for: a pipeline config asking another
    is refused, naming where that size came from and the backend that runs it."""
    overrides = [f"Global.det_inference_model_dir={ONNX_416}"]
    target = "DetPreProcess.transform_ops=[{DetResize: {interp: 2, keep_ratio: false, "
    config = load_pipeline_config(None, [*overrides, target + "target_size: 640}}]"])
    with pytest.raises(ConfigError, match=r"416x416; another input size \(640: .*DetResize "):
        build_detector(config)
    config = load_pipeline_config(None, [*overrides, target + "target_size: 416}}]"])
    assert build_detector(config).input_size == (416, 416)
    torch_config = load_pipeline_config(
        None, [*overrides, "Global.det_backend=torch", target + "target_size: 320}}]"]
    )
    assert build_detector(torch_config).input_size == (320, 320)


@needs_picodet
def test_the_pipelines_cpu_num_threads_limits_the_detector_too() -> None:
    """As PaddleClas's: `Global.cpu_num_threads` (`--threads`) limits the detector as well
    as the recognition model, in onnxruntime and in torch."""
    before = torch.get_num_threads()
    try:
        for backend in ("onnxruntime", "torch"):
            torch.set_num_threads(2)
            config = load_pipeline_config(
                None,
                [
                    f"Global.det_inference_model_dir={ONNX_416}",
                    f"Global.det_backend={backend}",
                    "Global.cpu_num_threads=1",
                ],
            )
            detector = build_detector(config)
            if backend == "onnxruntime":
                assert isinstance(detector, OnnxDetector)
                assert detector.session.get_session_options().intra_op_num_threads == 1
            assert torch.get_num_threads() == (2 if backend == "onnxruntime" else 1)
    finally:
        torch.set_num_threads(before)


@needs_picodet
def test_detect_cli_threads_limit_the_detector(capsys) -> None:
    """`shitu detect --threads`, as `recognize --threads`: on a shared host the detector
    need not take every core (onnxruntime's default ignores OMP_NUM_THREADS)."""
    before = torch.get_num_threads()
    dog = str(PICODET / "samples" / "dog.jpg")
    try:
        torch.set_num_threads(2)
        command = ["detect", dog, "--model", str(ONNX_416), "--runtime", "torch", "--threads", "1"]
        assert shitu_main(command) == 0
        assert torch.get_num_threads() == 1  # torch's setting is process-wide
    finally:
        torch.set_num_threads(before)
    assert json.loads(capsys.readouterr().out)["boxes"]


@needs_picodet
def test_the_onnx_detectors_idle_threads_sleep_and_its_boxes_stay_the_same() -> None:
    """The detector runs between the recognition model's runs and Python work on the same
    cores, so its threads must not spin while idle; onnxruntime's default session (which
    spins) finds the same boxes."""
    import onnxruntime as ort

    detector = OnnxDetector(ONNX_416)
    options = detector.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    spinning = OnnxDetector(ONNX_416)
    spinning._resource = ort.InferenceSession(str(ONNX_416), providers=["CPUExecutionProvider"])
    for photo in _photos():
        np.testing.assert_array_equal(detector.detect(photo), spinning.detect(photo))


@needs_picodet
def test_a_closed_onnx_detector_releases_its_session_and_refuses_calls() -> None:
    photo = _photos()[0]
    with load_detector(ONNX_416) as detector:
        assert isinstance(detector, OnnxDetector) and len(detector.detect(photo))
    assert detector._resource is None and repr(detector) == "OnnxDetector(closed)"
    with pytest.raises(
        ValueError, match=r"^the OnnxDetector is closed \(close\(\) released its session\)$"
    ):
        detector.detect(photo)
    detector.close()  # again: nothing left to release


def test_a_torch_detector_takes_a_with_block_and_refuses_calls_once_closed(tmp_path) -> None:
    """Only an ONNX detector had close() and `with`: `with load_detector(path)` failed on a
    TypeError for our checkpoint or a .pdparams, which load_detector gives a TorchDetector."""
    torch.manual_seed(0)
    path = save_detector(
        build_picodet("picodet_s_esnet", num_classes=2, input_size=64), tmp_path / "det.pt"
    )
    photo = np.full((48, 40, 3), 128, np.uint8)
    with load_detector(path) as detector:
        assert isinstance(detector, TorchDetector) and len(detector.detect(photo, 0.0, 3)) == 3
    assert repr(detector) == "TorchDetector(closed)"
    with pytest.raises(
        ValueError, match=r"^the TorchDetector is closed \(close\(\) released its model\)$"
    ):
        detector.detect(photo)
    detector.close()  # again: nothing left to release


@pytest.mark.parametrize(
    ("score_threshold", "max_boxes", "message"),
    [
        (0.3, -1, r"max_boxes: expected a whole number >= 0, got -1$"),
        (0.3, 2.5, r"max_boxes: expected a whole number >= 0, got 2.5$"),
        (float("nan"), 5, r"score_threshold: expected a score from 0 to 1, got nan$"),
        (1.5, 5, r"score_threshold: expected a score from 0 to 1, got 1.5$"),
        # text failed in a bare comparison's TypeError; True passed as a threshold of 1
        ("0.5", 5, r"score_threshold: expected a score from 0 to 1, got '0.5'$"),
        (True, 5, r"score_threshold: expected a score from 0 to 1, got True$"),
    ],
)
def test_detect_refuses_arguments_that_would_quietly_give_the_wrong_boxes(
    score_threshold: float, max_boxes: int, message: str
) -> None:
    """max_boxes=-1 kept every box but the last; a NaN threshold kept none; a threshold
    given as text failed on a TypeError."""
    detector = TorchDetector(build_picodet("picodet_s_esnet", num_classes=2, input_size=64))
    image = np.full((48, 40, 3), 128, np.uint8)
    assert detector.detect(image, 0.0, 3).shape == (3, 6)
    assert detector.detect(image, 0.0, 0).shape == (0, 6)
    with pytest.raises(ConfigError, match=message):
        detector.detect(image, score_threshold, max_boxes)


def test_the_score_threshold_is_a_minimum_score() -> None:
    """`--threshold` is the lowest score kept (PaddleClas drops only scores below its
    threshold): a box scoring exactly the threshold stays, even at 1.0 (a saturated sigmoid)."""
    boxes = np.array([[0.0, 0, 10, 10], [20.0, 20, 30, 30], [40.0, 40, 50, 50]], np.float32)
    scores = np.array([[0.5], [1.0], [0.25]], np.float32)
    assert multiclass_nms(boxes, scores, 0.5, 0.6)[:, 1].tolist() == [1.0, 0.5]
    assert multiclass_nms(boxes, scores, 1.0, 0.6)[:, 1].tolist() == [1.0]


def test_detect_on_a_terminal_draws_a_progress_bar_that_counts_the_skipped(
    tmp_path: Path,
) -> None:
    """A folder of photos takes a while, as with recognize: a bar on the terminal, each JSON
    line and warning on a line of its own; none with --no-progress."""
    for sample in PICODET.glob("samples/*.jpg"):
        shutil.copy(sample, tmp_path)
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    command = [sys.executable, "-m", "shitu", "detect", str(tmp_path), "--model"]
    command.append(str(PICODET / "picodet_s_320_coco.onnx"))
    status, lines = run_in_terminal(command)
    assert status == 0, lines
    (bar,) = [line for line in lines if line.startswith("detecting: ")]
    assert "3/3" in bar and "skipped=1" in bar
    results = [line for line in lines if '{"image": ' in line or "broken.jpg" in line]
    assert len(results) == 3
    assert all(line.startswith(('{"image": ', "warning: skipped")) for line in results)
    status, lines = run_in_terminal([*command, "--no-progress"])
    assert status == 0 and not any(line.startswith("detecting") for line in lines), lines


def test_detect_given_recognizes_plain_background_detector_says_it_is_no_model_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`recognize --detector plain-background` takes it; detect said only that no such
    detector file exists. A file of that name is still a detector file."""
    Image.new("RGB", (64, 48), "red").save(tmp_path / "photo.png")
    monkeypatch.chdir(tmp_path)
    assert shitu_main(["detect", "photo.png", "--model", "plain-background"]) == 2
    err = capsys.readouterr().err
    assert "--model plain-background: detect runs a detector model file" in err
    assert "--detector plain-background --save-vis DIR` draws" in err
    save_detector(build_picodet("picodet_s_esnet", input_size=64), tmp_path / "plain-background")
    assert shitu_main(["detect", "photo.png", "--model", "plain-background"]) == 0
    assert json.loads(capsys.readouterr().out)["image"] == "photo.png"


def test_detect_cli_leaves_no_save_vis_folder_when_no_image_is_read(tmp_path: Path, capsys):
    """The --save-vis folder, made before the first image to check it can be written in,
    was left behind, empty, by a run that read no image; as `shitu recognize`, it goes."""
    model = save_detector(build_picodet("picodet_s_esnet", input_size=64), tmp_path / "d.pt")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a JPEG")
    vis = tmp_path / "out" / "vis"
    assert shitu_main(["detect", str(broken), "--model", str(model), "--save-vis", str(vis)]) == 1
    assert f"warning: skipped {broken}: " in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@needs_picodet
def test_detect_export_writes_pdparams_and_our_checkpoints_as_onnx_with_torchs_boxes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """PaddleDetection weights (with --det-arch) and detect-train's model.pt, written as the
    ONNX file onnxruntime runs (the faster CPU path), at the size asked for."""
    model = load_onnx_weights(PICODET / "picodet_s_320_coco.onnx", "picodet_s_esnet")
    pdparams = tmp_path / "picodet_s_320_coco.pdparams"
    state = {
        paddle_key(key, model.arch): value.numpy()
        for key, value in model.state_dict().items()
        if not key.endswith("num_batches_tracked")
    }
    with pdparams.open("wb") as handle:
        pickle.dump(state, handle, protocol=4)
    checkpoint = save_detector(model, tmp_path / "model.pt")
    image = np.asarray(Image.open(PICODET / "samples" / "dog.jpg").convert("RGB"))
    for weights, arch, size in (
        (pdparams, ["--det-arch", "picodet_s_esnet"], 320),
        (checkpoint, [], 416),
        (PICODET / "picodet_s_320_coco.onnx", [], 416),  # an ONNX file, at another size
    ):
        out = tmp_path / f"{weights.stem}_{size}.onnx"
        command = ["detect-export", str(weights), *arch, "--input-size", str(size)]
        assert shitu_main([*command, "--out", str(out)]) == 0
        assert json.loads(capsys.readouterr().out) == {"onnx": str(out), "input_size": size}
        expected = TorchDetector(model, size).detect(image, 0.3, 10)
        with load_detector(out) as exported:
            assert isinstance(exported, OnnxDetector) and exported.input_size == (size, size)
            found = exported.detect(image, 0.3, 10)
        assert len(found) == len(expected) >= 3  # the dog, the bicycle and the car
        np.testing.assert_allclose(found, expected, rtol=1e-3, atol=1e-3)
    # Without --input-size, the size the model runs at, as the help says: the checkpoint's
    # (320 here, PicoDet-S's architecture 416), a .pdparams's architecture's.
    for weights, arch, size in (
        (checkpoint, [], 320),
        (pdparams, ["--arch", "picodet_s_esnet"], 416),
    ):
        out = tmp_path / f"{weights.stem}_default.onnx"
        assert shitu_main(["detect-export", str(weights), *arch, "--out", str(out)]) == 0
        assert json.loads(capsys.readouterr().out) == {"onnx": str(out), "input_size": size}
    assert shitu_main(["detect-export", str(pdparams), "--out", str(tmp_path / "a.onnx")]) == 2
    assert "a .pdparams file holds only weights; name its architecture" in capsys.readouterr().err
    assert shitu_main(["detect-export", str(checkpoint), "--out", str(tmp_path / "det")]) == 2
    assert f"--out {tmp_path / 'det'}: give a file name ending in .onnx" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "a.onnx").exists() and not (tmp_path / "det").exists()
    (tmp_path / "folder.onnx").mkdir()  # said before the weights are read, not 'File exists'
    for out, expected in (
        (tmp_path / "folder.onnx", "is a folder; give the .onnx file to write"),
        (checkpoint / "det.onnx", f"{checkpoint} is a file, not a folder"),
    ):
        assert shitu_main(["detect-export", str(checkpoint), "--out", str(out)]) == 2
        assert f"--out {out}: {expected}" in capsys.readouterr().err


def test_a_detector_file_whose_path_is_not_utf8_is_refused_by_detect_naming_it(
    tmp_path: Path, latin1_folder: Path
) -> None:
    """onnxruntime takes file paths only as UTF-8: `shitu detect --model` of an ONNX file
    in a folder named in Latin-1 said only that onnxruntime's constructor took no such
    arguments, over three lines."""
    model = build_picodet("picodet_s_esnet", num_classes=2, input_size=64)
    moved = shutil.copy(export_onnx(model, tmp_path / "det.onnx"), latin1_folder / "det.onnx")
    photo = tmp_path / "photo.png"
    Image.new("RGB", (80, 60), "white").save(photo)
    command = [sys.executable, "-m", "shitu", "detect", str(photo), "--model", str(moved)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: "), result.stderr
    assert result.stderr.count("\n") == 1
    assert "det.onnx: the detector file's path is not UTF-8 text" in result.stderr
    assert "rename the folder or file named in another encoding" in result.stderr


def test_detect_export_to_a_path_that_is_not_utf8_is_refused_naming_it(
    tmp_path: Path, latin1_folder: Path
) -> None:
    """torch's ONNX exporter takes file paths only as UTF-8: `shitu detect-export --out`
    into a folder named in Latin-1 stopped with its traceback (exit 1)."""
    model = build_picodet("picodet_s_esnet", num_classes=2, input_size=64)
    checkpoint = save_detector(model, tmp_path / "model.pt")
    out = latin1_folder / "det.onnx"
    command = [sys.executable, "-m", "shitu", "detect-export", str(checkpoint), "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: "), result.stderr
    assert "det.onnx: the ONNX file's path is not UTF-8 text" in result.stderr
    assert not any(latin1_folder.iterdir())  # nor a temporary file
    # Through a link, the file is traced beside the file it points to: torch's TypeError
    (tmp_path / "link.onnx").symlink_to(out)
    command[-1] = str(tmp_path / "link.onnx")
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: "), result.stderr
    assert "/det.onnx: the ONNX file's path is not UTF-8 text" in result.stderr  # where it goes
    assert "link.onnx" not in result.stderr and not any(latin1_folder.iterdir())


def test_an_export_whose_outputs_are_not_torchs_is_refused_and_the_earlier_file_kept(
    tmp_path: Path,
) -> None:
    """The check detect-export makes: a model of NaN weights (a diverged run's) gives NaN
    boxes, which match nothing; the file at the path stays as it was."""
    model = build_picodet("picodet_s_esnet", num_classes=2, input_size=64)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    path = tmp_path / "det.onnx"
    path.write_bytes(b"the earlier export")
    with pytest.raises(CheckpointError, match=r"det.onnx: not written, onnxruntime's output "):
        export_onnx(model, path, check_with_onnxruntime=True)
    assert path.read_bytes() == b"the earlier export"
    assert [p.name for p in tmp_path.iterdir()] == ["det.onnx"]  # no temporary file left
