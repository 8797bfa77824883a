"""Numerical parity with the real PaddleClas package (random weights, real images).

A reference script runs in its own venv (paddlepaddle + paddleclas), builds
PaddleClas models with random weights, saves .pdparams and their outputs. We load
the .pdparams without Paddle and must reproduce the outputs.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from shitu.checkpoint import load_weights
from shitu.cli.main import main as shitu_main
from shitu.config.schema import ArchConfig
from shitu.models import build_model
from shitu.registry import HEADS, populate

from .paddle_env import paddle_python

HERE = Path(__file__).resolve().parent
TOLERANCE = 1e-4

SHITU_NECK = {
    "BackboneStopLayer": {"name": "flatten"},
    "Neck": {"name": "BNNeck", "num_features": 512},
}
MODELS = {
    "shitu_base_fc": {
        "Backbone": {"name": "PPLCNetV2_base_ShiTu"},
        **SHITU_NECK,
        "Head": {"name": "FC", "embedding_size": 512, "class_num": 100, "bias": False},
    },
    "shitu_base_arcmargin": {
        "Backbone": {"name": "PPLCNetV2_base_ShiTu"},
        **SHITU_NECK,
        "Head": {"name": "ArcMargin", "embedding_size": 512, "class_num": 50},
    },
    "shitu_small_nohead": {
        "Backbone": {"name": "PPLCNetV2_small_ShiTu"},
        "BackboneStopLayer": {"name": "flatten"},
    },
    "shitu_large_nohead": {
        "Backbone": {"name": "PPLCNetV2_large_ShiTu"},
        "BackboneStopLayer": {"name": "flatten"},
    },
    "small_prelu_nohead": {
        "Backbone": {"name": "PPLCNetV2_small", "act": "prelu"},
        "BackboneStopLayer": {"name": "flatten"},
    },
}
HEAD_SPECS = {
    "ArcMargin": ("ArcMargin", {}),
    "ArcMargin_easy": ("ArcMargin", {"margin": 0.3, "scale": 30.0, "easy_margin": True}),
    "CosMargin": ("CosMargin", {}),
    "CircleMargin": ("CircleMargin", {"margin": 0.25, "scale": 32.0}),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, real_images) -> Path:
    if os.environ.get("SHITU_SKIP_PADDLE_PARITY") == "1":
        pytest.skip("SHITU_SKIP_PADDLE_PARITY=1")
    out = tmp_path_factory.mktemp("paddle_reference")
    np.save(out / "inputs.npy", real_images)
    result = subprocess.run(
        [
            str(paddle_python()),
            str(HERE / "paddle_reference.py"),
            str(out / "inputs.npy"),
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, f"Paddle reference failed:\n{result.stderr[-4000:]}"
    return out


def _max_diff(ours: torch.Tensor, reference: Path) -> float:
    return float(np.abs(ours.detach().numpy() - np.load(reference)).max())


@pytest.mark.parity
@pytest.mark.parametrize("name", list(MODELS))
def test_features_match_paddleclas_before_and_after_reparameterisation(
    name, reference, real_images
):
    model = build_model(ArchConfig.model_validate(MODELS[name])).eval()
    load_weights(model, reference / f"{name}.pdparams")
    inputs = torch.from_numpy(real_images)
    with torch.no_grad():
        out = model(inputs)
        assert out["features"].abs().max() > 0.05  # a meaningful, non-degenerate output
        assert _max_diff(out["features"], reference / f"{name}.features.npy") <= TOLERANCE
        if "logits" in out:
            assert _max_diff(out["logits"], reference / f"{name}.logits.npy") <= TOLERANCE
        model.reparameterize()
        folded = model(inputs)["features"]
    assert _max_diff(folded, reference / f"{name}.features_rep.npy") <= TOLERANCE


@pytest.mark.parity
@pytest.mark.parametrize("reparameterize", [False, True])
def test_convert_cli_checkpoint_gives_paddle_features(
    reference, real_images, tmp_path, reparameterize
):
    name = "shitu_base_fc"
    out_file = tmp_path / "model.safetensors"
    args = [
        "convert",
        str(reference / f"{name}.pdparams"),
        "--out",
        str(out_file),
        "--no-head",
    ]
    assert shitu_main(args + (["--reparameterize"] if reparameterize else [])) == 0
    spec = {k: v for k, v in MODELS[name].items() if k != "Head"}
    model = build_model(ArchConfig.model_validate(spec)).eval()
    load_weights(model, out_file)
    assert model.head is None
    with torch.no_grad():
        features = model(torch.from_numpy(real_images))["features"]
    expected = reference / f"{name}.features{'_rep' if reparameterize else ''}.npy"
    assert _max_diff(features, expected) <= TOLERANCE


@pytest.mark.parity
@pytest.mark.parametrize("name", list(HEAD_SPECS))
def test_margin_heads_match_paddleclas_in_training_mode(name, reference):
    populate()
    registered, params = HEAD_SPECS[name]
    head = HEADS.build(registered, embedding_size=64, class_num=10, **params).train()
    weight = np.load(reference / f"head_{name}.weight.npy")  # Paddle layout [embedding, classes]
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight).t())
    features = torch.from_numpy(np.load(reference / "head_inputs.npy"))
    labels = torch.from_numpy(np.load(reference / "head_labels.npy"))
    logits = head(features, labels)
    assert _max_diff(logits, reference / f"head_{name}.logits.npy") <= TOLERANCE
