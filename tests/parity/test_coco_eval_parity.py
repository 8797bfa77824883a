"""Our COCO box AP against pycocotools' own (the package PaddleDetection evaluates COCO data
with), on random ground truth, crowd regions and jittered, duplicated and stray detections:
`detect-train` says its mAP is computed as pycocotools computes it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from shitu.detection.coco_eval import evaluate_boxes

from .paddledet_env import paddledet_python

pytestmark = pytest.mark.parity

PYCOCOTOOLS_AP = """
import contextlib, io, sys
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
with contextlib.redirect_stdout(io.StringIO()):
    truth = COCO(sys.argv[1])
    evaluation = COCOeval(truth, truth.loadRes(sys.argv[2]), "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
print(evaluation.stats[0], evaluation.stats[1])
"""


def _random_set(seed: int) -> tuple[dict, list[dict]]:
    """A COCO instances file's content and a results list: 30 images of 0-4 objects of 3
    classes (a tenth of them crowds), each found 0-2 times with jitter (a fifth of those
    under another class), plus 0-2 boxes on nothing."""
    rng = np.random.default_rng(seed)
    images, annotations, results = [], [], []
    for image_id in range(1, 31):
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": 200, "height": 200})
        for _ in range(rng.integers(0, 5)):
            x, y, w, h = *rng.uniform(0, 150, 2), *rng.uniform(5, 50, 2)
            category = int(rng.integers(1, 4))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "bbox": [x, y, w, h],
                    "category_id": category,
                    "iscrowd": int(rng.random() < 0.1),
                    "area": w * h,
                }
            )
            for _ in range(rng.integers(0, 3)):
                dx, dy, dw, dh = rng.normal(0, 3, 4)
                found = category if rng.random() < 0.8 else int(rng.integers(1, 4))
                box = [x + dx, y + dy, max(1.0, w + dw), max(1.0, h + dh)]
                results.append({"image_id": image_id, "category_id": found, "bbox": box})
        for _ in range(rng.integers(0, 3)):
            box = [*rng.uniform(0, 150, 2), *rng.uniform(5, 50, 2)]
            results.append(
                {"image_id": image_id, "category_id": int(rng.integers(1, 4)), "bbox": box}
            )
    for result in results:
        result["score"] = float(rng.random())
    categories = [{"id": c, "name": str(c)} for c in (1, 2, 3)]
    return {"images": images, "annotations": annotations, "categories": categories}, results


def _ours(truth: dict, results: list[dict]) -> dict[str, float]:
    def corners(bbox: list[float]) -> list[float]:
        x, y, w, h = bbox
        return [x, y, x + w, y + h]

    def boxes_and_labels(annotations: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        boxes = np.array([corners(a["bbox"]) for a in annotations], np.float64).reshape(-1, 4)
        return boxes, np.array([a["category_id"] for a in annotations])

    ground_truths, crowds, detections = [], [], []
    for image in truth["images"]:
        of_image = [a for a in truth["annotations"] if a["image_id"] == image["id"]]
        ground_truths.append(boxes_and_labels([a for a in of_image if not a["iscrowd"]]))
        crowds.append(boxes_and_labels([a for a in of_image if a["iscrowd"]]))
        found = [r for r in results if r["image_id"] == image["id"]]
        rows = [[r["category_id"], r["score"], *corners(r["bbox"])] for r in found]
        detections.append(np.array(rows, np.float64).reshape(-1, 6))
    return evaluate_boxes(detections, ground_truths, crowds=crowds)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_box_ap_matches_pycocotools(tmp_path: Path, seed: int) -> None:
    if os.environ.get("SHITU_SKIP_PADDLE_PARITY") == "1":
        pytest.skip("SHITU_SKIP_PADDLE_PARITY=1")
    truth, results = _random_set(seed)
    (tmp_path / "truth.json").write_text(json.dumps(truth))
    (tmp_path / "results.json").write_text(json.dumps(results))
    command = [str(paddledet_python()), "-c", PYCOCOTOOLS_AP, "truth.json", "results.json"]
    reference = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert reference.returncode == 0, f"pycocotools failed:\n{reference.stderr[-4000:]}"
    expected_map, expected_ap50 = map(float, reference.stdout.split())
    assert expected_map > 0  # the set exercises matching, not only misses
    ours = _ours(truth, results)
    assert ours["mAP"] == pytest.approx(expected_map, abs=1e-9)
    assert ours["AP50"] == pytest.approx(expected_ap50, abs=1e-9)
