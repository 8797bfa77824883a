"""ResNet backbones: sizes, torchvision/timm key layout, strides, vd tweaks, config and weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shitu.checkpoint import load_pretrained, load_weights
from shitu.config import load_config
from shitu.errors import CheckpointError, ConfigError
from shitu.models import build_model
from shitu.models.backbones.resnet import ResNet
from shitu.registry import BACKBONES, populate

populate()

BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics, so eval outputs depend on every buffer being loaded."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=generator) * 0.4 - 0.2)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=generator) * 0.4 - 0.2)


def layer4_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    captured: dict[str, torch.Tensor] = {}
    handle = model.layer4.register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    with torch.no_grad():
        model.eval()(x)
    handle.remove()
    return captured["out"]


def torchvision_resnet50_keys() -> list[str]:
    """torchvision's resnet50 state_dict keys, in order, written out from its layout."""
    keys = ["conv1.weight", *(f"bn1.{k}" for k in BN_KEYS)]
    for stage, depth in enumerate((3, 4, 6, 3), start=1):
        for index in range(depth):
            prefix = f"layer{stage}.{index}."
            for j in (1, 2, 3):
                keys += [f"{prefix}conv{j}.weight", *(f"{prefix}bn{j}.{k}" for k in BN_KEYS)]
            if index == 0:
                keys += [f"{prefix}downsample.0.weight"]
                keys += [f"{prefix}downsample.1.{k}" for k in BN_KEYS]
    return [*keys, "fc.weight", "fc.bias"]


# Published parameter counts of the 1000-class torchvision models.
PARAMS = {
    "ResNet18": 11_689_512,
    "ResNet34": 21_797_672,
    "ResNet50": 25_557_032,
    "ResNet101": 44_549_160,
    "ResNet152": 60_192_808,
}


@pytest.mark.parametrize("name", list(PARAMS))
def test_parameter_counts(name):
    model = BACKBONES.build(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


def test_resnet50_state_dict_matches_torchvision_layout():
    model = BACKBONES.build("ResNet50")
    state = model.state_dict()
    expected = torchvision_resnet50_keys()
    assert len(expected) == 320
    assert list(state) == expected
    shapes = {
        "conv1.weight": (64, 3, 7, 7),
        "layer1.0.conv1.weight": (64, 64, 1, 1),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer2.0.conv2.weight": (128, 128, 3, 3),
        "layer3.5.conv3.weight": (1024, 256, 1, 1),
        "layer4.0.downsample.0.weight": (2048, 1024, 1, 1),
        "layer4.2.bn3.running_var": (2048,),
        "fc.weight": (1000, 2048),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    # ResNet v1.5: the stride is on the 3x3 conv of the first block of a stage
    first = model.layer2[0]
    assert first.conv1.stride == (1, 1) and first.conv2.stride == (2, 2)
    assert first.downsample[0].stride == (2, 2)
    bn = model.layer3[0].bn2
    assert (bn.eps, bn.momentum) == (1e-5, 0.1)


def test_resnet18_has_no_shortcut_projection_in_first_stage():
    state = BACKBONES.build("ResNet18").state_dict()
    assert len(state) == 122
    assert not any(k.startswith("layer1.") and "downsample" in k for k in state)
    assert tuple(state["layer2.0.downsample.0.weight"].shape) == (128, 64, 1, 1)


@pytest.mark.parametrize("name", ["ResNet18", "ResNet50", "ResNet50_vd"])
def test_last_stride_controls_final_resolution(name):
    model = BACKBONES.build(name)
    assert layer4_output(model, torch.randn(2, 3, 64, 64)).shape[-2:] == (2, 2)
    # odd sizes: the shortcut and the main path must round the same way
    assert layer4_output(model, torch.randn(1, 3, 97, 97)).shape[-2:] == (4, 4)
    stride1 = BACKBONES.build(name, last_stride=1)
    assert layer4_output(stride1, torch.randn(2, 3, 64, 64)).shape[-2:] == (4, 4)


def test_stop_after_flatten_gives_pooled_features():
    model = BACKBONES.build("ResNet50", class_num=10)
    model.stop_after("flatten")
    assert isinstance(model.fc, nn.Identity)
    assert not any(k.startswith("fc.") for k in model.state_dict())
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 2048)


def test_stop_after_accepts_paddleclas_names_and_rejects_unknown():
    model = BACKBONES.build("ResNet18")
    model.stop_after("avg_pool")
    assert isinstance(model.flatten, nn.Identity) and isinstance(model.fc, nn.Identity)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 512, 1, 1)
    with pytest.raises(ConfigError, match="not a layer"):
        BACKBONES.build("ResNet18").stop_after("layer5")


def test_classifier_output_and_backward():
    model = BACKBONES.build("ResNet34", class_num=7)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 7)
    out.sum().backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["ResNet18", "ResNet50"])
def test_zero_init_residual_makes_blocks_identities(name):
    model = BACKBONES.build(name, zero_init_residual=True).eval()
    blocks = [
        b for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for b in stage
    ]
    assert all(torch.all(b.last_bn.weight == 0) for b in blocks)
    block = model.layer2[1]  # no projection: its output is relu(x) = x for x >= 0
    x = torch.rand(1, block.conv1.in_channels, 8, 8)
    with torch.no_grad():
        assert torch.equal(block(x), x)
    plain = BACKBONES.build(name).eval()
    assert all(torch.all(b.last_bn.weight == 1) for b in plain.layer1)


def test_config_builds_resnet50_recmodel(tmp_path):
    path = tmp_path / "resnet.yaml"
    path.write_text(
        "Arch:\n"
        "  name: RecModel\n"
        "  Backbone: {name: ResNet50, last_stride: 1}\n"
        "  BackboneStopLayer: {name: flatten}\n"
        "  Neck: {name: FC, embedding_size: 2048, class_num: 128}\n"
    )
    model = build_model(load_config(path).Arch).eval()
    assert model.backbone.layer4[0].conv2.stride == (1, 1)
    assert isinstance(model.backbone.fc, nn.Identity)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out["backbone"].shape == (2, 2048)
    assert out["features"].shape == (2, 128)


def test_config_rejects_bad_resnet_arguments(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("Arch:\n  Backbone: {name: ResNet50, last_stride: 3}\n")
    with pytest.raises(ConfigError, match="last_stride"):
        load_config(path)
    path.write_text("Arch:\n  Backbone: {name: ResNet50, layers: [1, 1, 1, 1]}\n")
    with pytest.raises(ConfigError, match="layers"):  # fixed by the variant
        load_config(path)


def test_pretrained_state_dict_round_trips(tmp_path):
    torch.manual_seed(0)
    source = BACKBONES.build("ResNet50")
    randomise_batchnorm(source)
    path = tmp_path / "resnet50.pth"
    torch.save(source.state_dict(), path)  # a bare state dict, like torchvision's files

    loaded = BACKBONES.build("ResNet50", pretrained=str(path))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(source.eval()(x), loaded.eval()(x))

    # Every key matches: the strict loaders accept the file too.
    report = load_pretrained(loaded, path)
    assert not (report.missing or report.unexpected or report.shape_mismatch)
    assert len(report.loaded) == 320
    load_weights(loaded, path, strict=True)
    loaded.load_state_dict(torch.load(path, weights_only=True), strict=True)

    # A different classifier size keeps everything but the classifier.
    finetune = BACKBONES.build("ResNet50", class_num=10, pretrained=str(path))
    assert torch.equal(finetune.layer4[2].conv3.weight, source.layer4[2].conv3.weight)
    assert finetune.fc.weight.shape == (10, 2048)


def test_resnet50_vd_structure_and_forward():
    model = BACKBONES.build("ResNet50_vd")
    assert sum(p.numel() for p in model.parameters()) == 25_576_264
    state = model.state_dict()
    assert len(state) == 332  # plain ResNet50 + two more stem conv+BN pairs
    # timm resnet50d layout: deep stem in conv1.{0,3,6}, shortcut conv/BN at downsample.{1,2}
    assert tuple(state["conv1.0.weight"].shape) == (32, 3, 3, 3)
    assert tuple(state["conv1.3.weight"].shape) == (32, 32, 3, 3)
    assert tuple(state["conv1.6.weight"].shape) == (64, 32, 3, 3)
    assert tuple(state["layer2.0.downsample.1.weight"].shape) == (512, 256, 1, 1)
    assert "layer2.0.downsample.2.running_var" in state
    assert isinstance(model.layer1[0].downsample[0], nn.Identity)
    for stage in (model.layer2, model.layer3, model.layer4):
        assert isinstance(stage[0].downsample[0], nn.AvgPool2d)
        assert stage[0].downsample[1].stride == (1, 1)
    stride1 = BACKBONES.build("ResNet50_vd", last_stride=1)
    assert isinstance(stride1.layer4[0].downsample[0], nn.Identity)

    model.stop_after("flatten")
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 2048)
    out.sum().backward()
    assert model.conv1[0].weight.grad.abs().sum() > 0


def test_vd_shortcut_sees_every_pixel_plain_shortcut_skips_odd_ones():
    """The reason for vd: a strided 1x1 conv ignores 3/4 of its input, the pooled one does not."""
    torch.manual_seed(0)
    x = torch.randn(1, 256, 8, 8)
    bumped = x.clone()
    bumped[..., 1, 1] += 1.0  # a pixel a stride-2 1x1 conv never samples
    plain = BACKBONES.build("ResNet50").layer2[0].downsample.eval()
    vd = BACKBONES.build("ResNet50_vd").layer2[0].downsample.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), plain(bumped))
        assert not torch.equal(vd(x), vd(bumped))


def test_invalid_constructor_arguments():
    with pytest.raises(ValueError, match="block"):
        ResNet("wide", (2, 2, 2, 2))
    with pytest.raises(ValueError, match="layers"):
        ResNet("basic", (2, 2, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="last_stride"):
        ResNet("basic", (2, 2, 2, 2), last_stride=4)  # type: ignore[arg-type]


def test_all_variants_registered():
    names = set(BACKBONES.names())
    for depth in (18, 34, 50, 101, 152):
        assert {f"ResNet{depth}", f"ResNet{depth}_vd"} <= names
    model = BACKBONES.build("ResNet50_last_stage_stride1")
    assert model.layer4[0].conv2.stride == (1, 1)


def test_a_paddleclas_resnet_pdparams_is_refused_naming_why(tmp_path):
    """PaddleClas's ResNet .pdparams name their layers otherwise: as a backbone's
    `pretrained` file only its classifier fit, and training went on from random weights
    after a warning; as a whole model's weights, the error asked whether the config
    matched. Either way the file is refused, saying which weights these ResNets take."""
    import pickle

    import numpy as np

    path = tmp_path / "ResNet18_pretrained.pdparams"
    paddle_state = {  # PaddleClas's names; its fc weight is [in, out], as Paddle lays it out
        "stem.0.conv.weight": np.zeros((32, 3, 3, 3), np.float32),
        "blocks.0.conv0.conv.weight": np.zeros((64, 64, 3, 3), np.float32),
        "fc.weight": np.zeros((512, 1000), np.float32),
        "fc.bias": np.zeros(1000, np.float32),
    }
    path.write_bytes(pickle.dumps(paddle_state))
    refused = r"PaddleClas's ResNet \.pdparams name their layers otherwise"
    with pytest.raises(CheckpointError, match=refused):
        load_pretrained(BACKBONES.build("ResNet18"), path)
    config = load_config("xbm_resnet50", ["Arch.Backbone.name=ResNet18", "Arch.Neck=null"])
    with pytest.raises(CheckpointError, match=refused):
        load_weights(build_model(config.Arch), path, ignore_prefixes=("head.",))
