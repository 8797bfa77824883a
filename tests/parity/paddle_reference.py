"""Runs inside the Paddle reference venv: builds PaddleClas models with random weights,
saves them as .pdparams and writes their outputs on given inputs.

Usage: python paddle_reference.py INPUTS.npy OUT_DIR
Writes per model NAME: NAME.pdparams, NAME.features.npy, NAME.features_rep.npy
(after PaddleClas's own re_parameterize), plus head-only reference outputs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import numpy as np

# Import PaddleClas's model code without its package __init__ (which pulls in the
# whole training and deployment stack).
_spec = importlib.util.find_spec("paddleclas")
sys.path.insert(0, _spec.submodule_search_locations[0])

import paddle  # noqa: E402
from ppcls.arch import RecModel  # noqa: E402
from ppcls.arch.backbone.variant_models import pp_lcnetv2_variant  # noqa: E402
from ppcls.arch.gears import ArcMargin, CircleMargin, CosMargin  # noqa: E402

paddle.set_device("cpu")


def shitu_backbone(scale_name: str):
    """PaddleClas's PPLCNetV2_base_ShiTu recipe applied to another scale (small/large)."""
    from ppcls.arch.backbone.legendary_models import pp_lcnet_v2

    base = pp_lcnetv2_variant.PPLCNetV2_base
    pp_lcnetv2_variant.PPLCNetV2_base = getattr(pp_lcnet_v2, f"PPLCNetV2_{scale_name}")
    try:
        return pp_lcnetv2_variant.PPLCNetV2_base_ShiTu(pretrained=False, class_expand=512)
    finally:
        pp_lcnetv2_variant.PPLCNetV2_base = base


def randomise_batchnorm(
    model: paddle.nn.Layer, inputs: paddle.Tensor, rng: np.random.Generator
) -> None:
    """Give every BN layer affine parameters and statistics like a trained network's.

    Gamma and beta are drawn at random (so folding them is really exercised); the
    backbone's running statistics are then measured on `inputs` (momentum 0, one
    training-mode pass), so activations keep a realistic scale, with a variance floor.
    The neck's BN gets the mean of the eval-mode embeddings and a variance set by
    their magnitude.
    """
    norms = [
        layer
        for layer in model.sublayers()
        if isinstance(layer, (paddle.nn.BatchNorm2D, paddle.nn.BatchNorm1D))
    ]
    for layer in norms:
        n = layer._mean.shape[0]
        layer.weight.set_value(rng.uniform(0.6, 1.4, n).astype("float32"))
        if layer.bias is not None:
            layer.bias.set_value(rng.uniform(-0.2, 0.2, n).astype("float32"))
        layer._momentum = 0.0
    model.train()
    with paddle.no_grad():
        model(inputs)
    for layer in norms:
        layer._momentum = 0.9
        # Random networks have near-dead channels whose tiny variance would amplify
        # float32 rounding far beyond what trained weights do; keep them well-conditioned.
        variance = layer._variance.numpy()
        layer._variance.set_value(variance + 0.5 * variance.mean())
    model.eval()
    if model.neck is not None:
        with paddle.no_grad():
            embeddings = model.backbone(inputs).numpy()
        bn = model.neck.feat_bn
        n = embeddings.shape[1]
        bn._mean.set_value(embeddings.mean(0).astype("float32"))
        # Scale by the embeddings' magnitude: a random network maps all images to
        # nearly the same point, and their tiny spread would amplify rounding.
        variance = np.square(embeddings).mean() * rng.uniform(0.5, 1.5, n)
        bn._variance.set_value(variance.astype("float32"))


def rec_model(backbone: str, head: dict) -> RecModel:
    config = {
        "Backbone": {"name": backbone, "pretrained": False, "class_expand": 512},
        "BackboneStopLayer": {"name": "flatten"},
        "Neck": {"name": "BNNeck", "num_features": 512},
        "Head": head,
    }
    return RecModel(**config)


def main() -> None:
    inputs_path, out_dir = sys.argv[1], sys.argv[2]
    paddle.seed(2024)
    rng = np.random.default_rng(2024)
    inputs = paddle.to_tensor(np.load(inputs_path))
    manifest = {}

    models = {
        "shitu_base_fc": rec_model(
            "PPLCNetV2_base_ShiTu",
            {"name": "FC", "embedding_size": 512, "class_num": 100, "bias_attr": False},
        ),
        "shitu_base_arcmargin": rec_model(
            "PPLCNetV2_base_ShiTu", {"name": "ArcMargin", "embedding_size": 512, "class_num": 50}
        ),
    }
    for scale in ("small", "large"):
        model = rec_model(
            "PPLCNetV2_base_ShiTu", {"name": "FC", "embedding_size": 512, "class_num": 1}
        )
        model.backbone = shitu_backbone(scale)
        model.backbone.stop_after("flatten")
        model.neck = None
        model.head = None
        models[f"shitu_{scale}_nohead"] = model
    # `act: prelu`: PReLU weights are named `_weight`, and each block without rep branches
    # builds one it never uses. Of the plain network: the ShiTu variant rebuilds its last two
    # blocks with ReLU, whatever `act` says.
    from ppcls.arch.backbone.legendary_models.pp_lcnet_v2 import PPLCNetV2_small

    model = rec_model("PPLCNetV2_base_ShiTu", {"name": "FC", "embedding_size": 512, "class_num": 1})
    model.backbone = PPLCNetV2_small(pretrained=False, act="prelu")
    model.backbone.stop_after("flatten")
    model.neck = None
    model.head = None
    models["small_prelu_nohead"] = model

    for name, model in models.items():
        for layer in model.sublayers():  # not PReLU's initial 0.25, which torch's is too
            if isinstance(layer, paddle.nn.PReLU):
                shape = layer._weight.shape
                layer._weight.set_value(rng.uniform(0.05, 0.5, shape).astype("float32"))
        randomise_batchnorm(model, inputs, rng)
        model.eval()
        paddle.save(model.state_dict(), os.path.join(out_dir, f"{name}.pdparams"))
        with paddle.no_grad():
            out = model(inputs)
            np.save(os.path.join(out_dir, f"{name}.features.npy"), out["features"].numpy())
            if "logits" in out:
                np.save(os.path.join(out_dir, f"{name}.logits.npy"), out["logits"].numpy())
            for layer in model.sublayers():
                if hasattr(layer, "re_parameterize"):
                    layer.re_parameterize()
            out = model(inputs)
            np.save(os.path.join(out_dir, f"{name}.features_rep.npy"), out["features"].numpy())
        manifest[name] = sorted(out)

    # Margin heads in training mode (with labels), on random features.
    features = rng.normal(size=(16, 64)).astype("float32")
    labels = rng.integers(0, 10, size=(16, 1)).astype("int64")
    np.save(os.path.join(out_dir, "head_inputs.npy"), features)
    np.save(os.path.join(out_dir, "head_labels.npy"), labels)
    heads = {
        "ArcMargin": ArcMargin(64, 10),
        "ArcMargin_easy": ArcMargin(64, 10, margin=0.3, scale=30.0, easy_margin=True),
        "CosMargin": CosMargin(64, 10),
        "CircleMargin": CircleMargin(64, 10, margin=0.25, scale=32.0),
    }
    for name, head in heads.items():
        head.train()
        logits = head(paddle.to_tensor(features), paddle.to_tensor(labels))
        np.save(os.path.join(out_dir, f"head_{name}.weight.npy"), head.weight.numpy())
        np.save(os.path.join(out_dir, f"head_{name}.logits.npy"), logits.numpy())
    with open(os.path.join(out_dir, "manifest.json"), "w") as handle:
        json.dump(manifest, handle)


if __name__ == "__main__":
    main()
