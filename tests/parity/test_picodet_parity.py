"""Numerical parity of our PicoDet with the real PaddleDetection package (paddledet).

A reference script in its own venv builds PaddleDetection PicoDets (ESNet PicoDet-S and
PicoDet-M, and the PP-ShiTuV2 LCNet x2.5 mainbody architecture) with random weights and runs them on
real photos; we load its .pdparams without Paddle and must reproduce the raw head
outputs (<= 1e-4) and the boxes after NMS.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shitu.detection.boxes import multiclass_nms
from shitu.detection.detector import preprocess
from shitu.detection.weights import load_pdparams

from .paddledet_env import paddledet_python

pytestmark = pytest.mark.parity

HERE = Path(__file__).resolve().parent
SAMPLES = Path("/work/shared/models/picodet_s_coco/samples")
ARCH_SIZES = {"picodet_s_esnet": 416, "picodet_m_esnet": 416, "picodet_lcnet_x2_5_mainbody": 640}
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    if os.environ.get("SHITU_SKIP_PADDLE_PARITY") == "1":
        pytest.skip("SHITU_SKIP_PADDLE_PARITY=1")
    photos = sorted(SAMPLES.glob("*.jpg"))
    if not photos:
        pytest.skip(f"no sample photos in {SAMPLES}")
    out = tmp_path_factory.mktemp("paddledet_reference")
    for arch, size in ARCH_SIZES.items():
        images = [np.asarray(Image.open(p).convert("RGB")) for p in photos]
        np.save(out / f"inputs_{arch}.npy", np.stack([preprocess(i, (size, size)) for i in images]))
    result = subprocess.run(
        [str(paddledet_python()), str(HERE / "paddledet_reference.py"), str(out)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, f"paddledet reference failed:\n{result.stderr[-4000:]}"
    return out


@pytest.mark.parametrize("arch", list(ARCH_SIZES))
def test_raw_outputs_and_boxes_match_paddledet(reference: Path, arch: str) -> None:
    model = load_pdparams(reference / f"{arch}.pdparams", arch)
    inputs = torch.from_numpy(np.load(reference / f"inputs_{arch}.npy"))
    ref_scores = np.load(reference / f"scores_{arch}.npy")
    ref_reg = np.load(reference / f"reg_{arch}.npy")
    ref_dets = np.load(reference / f"dets_{arch}.npz")
    with torch.no_grad():
        scores, reg, _ = model.raw_outputs(inputs)
        _, boxes = model.predict(inputs)
    np.testing.assert_allclose(scores.numpy(), ref_scores, atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(reg.numpy(), ref_reg, atol=TOLERANCE, rtol=0)
    for i in range(len(inputs)):
        ours = multiclass_nms(boxes[i].numpy(), scores[i].numpy(), 0.3, 0.6, 1000, 1000)
        theirs = ref_dets[f"arr_{i}"]
        assert len(theirs) > 0, "the reference should produce boxes to compare"
        assert ours.shape == theirs.shape
        # Paddle lists boxes by class, we by score (ties are common with random weights):
        # the two sets must match one to one.
        distance = np.abs(ours[:, None, :] - theirs[None, :, :]).max(axis=2)
        match = distance.argmin(axis=1)
        assert sorted(match.tolist()) == list(range(len(theirs)))
        # Pixels: a box side is its anchor plus stride times a distance decoded from the raw
        # outputs, so their tolerance, at the coarsest stride, bounds the boxes' (float32
        # rounding alone reaches 1e-3 px on 600 px coordinates on some CPUs).
        assert distance.min(axis=1).max() < TOLERANCE * max(model.arch.strides)
