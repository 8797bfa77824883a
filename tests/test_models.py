"""Backbone shapes for every scale, re-parameterisation, necks, heads and RecModel outputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shitu.config.schema import ArchConfig
from shitu.errors import ConfigError
from shitu.models import build_model
from shitu.models.layers import DownscaleInInferDropout, make_divisible
from shitu.registry import BACKBONES, HEADS, NECKS, populate

populate()


def randomise_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=generator) * 0.4 - 0.2)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=generator) * 0.4 - 0.2)


# (scale, classification feature channels, params of the ShiTu backbone)
SCALES = {"small": 768, "base": 1024, "large": 1280}


@pytest.mark.parametrize("scale", list(SCALES))
def test_classification_backbone_shapes(scale):
    model = BACKBONES.build(f"PPLCNetV2_{scale}", class_num=7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 224, 224)).shape == (2, 7)
    assert model.last_conv.in_channels == SCALES[scale]
    assert model.last_conv.bias is None
    assert isinstance(model.act, torch.nn.ReLU)
    assert model.dropout.p == 0.2


@pytest.mark.parametrize("scale", list(SCALES))
def test_shitu_variant_shapes_and_structure(scale):
    backbone = BACKBONES.build(f"PPLCNetV2_{scale}_ShiTu")
    backbone.stop_after("flatten")
    assert isinstance(backbone.fc, torch.nn.Identity)
    assert backbone.last_conv.bias is not None and backbone.last_conv.out_channels == 512
    assert isinstance(backbone.act, torch.nn.Identity)
    last_stage = backbone.stages[3]
    assert all(block.stride == 1 for block in last_stage)
    # stride 1 lets the first block of the last stage keep its 1x1 branch (5, 3 and 1)
    assert [b.conv.kernel_size[0] for b in last_stage[0].dw_conv_list] == [5, 3, 1]
    assert not last_stage[0].use_shortcut and last_stage[1].use_shortcut
    features = {}
    backbone.stages.register_forward_hook(lambda m, i, o: features.setdefault("map", o))
    with torch.no_grad():
        out = backbone.eval()(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 512)
    assert features["map"].shape[-2:] == (14, 14)  # stride 16 instead of 32


def test_make_divisible():
    assert make_divisible(32 * 0.75) == 24
    assert make_divisible(64 * 1.25) == 80
    assert make_divisible(10) == 16  # rounding to 8 would lose more than 10%
    assert make_divisible(3) == 8


@pytest.mark.parametrize(
    "name", ["PPLCNetV2_small_ShiTu", "PPLCNetV2_base_ShiTu", "PPLCNetV2_large"]
)
def test_reparameterize_preserves_outputs(name):
    torch.manual_seed(0)
    model = BACKBONES.build(name)
    randomise_batchnorm(model)
    model.eval()
    x = torch.randn(2, 3, 160, 160)
    from shitu.models.reparam import is_reparameterized, reparameterize

    with torch.no_grad():
        before = model(x)
        rep_blocks = [m for m in model.modules() if getattr(m, "use_rep", False)]
        assert rep_blocks
        reparameterize(model)
        after = model(x)
    assert is_reparameterized(model)
    for block in rep_blocks:
        assert not hasattr(block, "dw_conv_list")
        assert block.dw_conv.bias is not None and block.dw_conv.kernel_size[0] == block.dw_size
    assert (before - after).abs().max() <= 1e-5 * max(1.0, before.abs().max().item())
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < sum(p.numel() for p in BACKBONES.build(name).parameters())


def test_reparameterize_keeps_a_bfloat16_model_in_bfloat16():
    from shitu.models.reparam import reparameterize

    model = BACKBONES.build("PPLCNetV2_small_ShiTu").eval().to(torch.bfloat16)
    with torch.no_grad():
        reparameterize(model)
        out = model(torch.randn(1, 3, 96, 96, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_reparameterize_is_idempotent():
    model = BACKBONES.build("PPLCNetV2_small_ShiTu").eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        from shitu.models.reparam import reparameterize

        reparameterize(model)
        once = model(x)
        reparameterize(model)
        assert torch.equal(once, model(x))


def test_pplcnetv2_last_stride_is_checked_when_the_config_is_read():
    """0 was torch's RuntimeError (a traceback) while the model was built."""
    with pytest.raises(ConfigError, match="last_stride: Input should be 1 or 2"):
        BACKBONES.validate("PPLCNetV2_base_ShiTu", {"last_stride": 0})


@pytest.mark.parametrize(
    ("backbone", "params", "message"),
    [
        ("PPLCNetV2_base_ShiTu", {"act": "gelu"}, "act: Input should be 'relu', 'relu6', "),
        ("EfficientNetLite0", {"pool": "max"}, "pool: Input should be 'avg' or 'gem'"),
    ],
)
def test_a_backbones_named_choices_are_checked_when_the_config_is_read(backbone, params, message):
    """An unknown activation or pooling was refused only as the model was built, naming
    neither the key nor the config file."""
    with pytest.raises(ConfigError, match=message):
        BACKBONES.validate(backbone, params)


def test_named_choices_are_those_the_layers_build():
    from typing import get_args

    from shitu.models.layers import ACTIVATIONS, GLOBAL_POOLS, ActivationName, PoolName

    assert set(get_args(ActivationName)) == set(ACTIVATIONS)
    assert set(get_args(PoolName)) == set(GLOBAL_POOLS)


@pytest.mark.parametrize("backbone", ["PPLCNetV2_base_ShiTu", "EfficientNetLite0"])
def test_dropout_prob_is_checked_when_the_config_is_read(backbone):
    """PP-LCNetV2's was refused only as the model was built (without the config's file and
    key), and EfficientNet-Lite took 1.0, which drops every unit before its classifier."""
    with pytest.raises(ConfigError, match="dropout_prob: Input should be less than 1"):
        BACKBONES.validate(backbone, {"dropout_prob": 1.0})


def test_stop_after_unknown_layer_lists_choices():
    backbone = BACKBONES.build("PPLCNetV2_small")
    with pytest.raises(ConfigError, match="choose one of: stem, stages, avg_pool"):
        backbone.stop_after("flaten")
    with pytest.raises(ConfigError, match=r", fc \(did you mean 'flatten'\?\)$"):
        backbone.stop_after("flaten")


@pytest.mark.parametrize("backbone", ["PPLCNetV2_small", "ResNet18"])
def test_stop_after_paddleclas_numbered_layer_name_says_shitus_name(backbone):
    """PaddleClas's configs give `BackboneStopLayer: {name: flatten_0}`: refused with the
    choices only, none of which said that it is shitu's `flatten`."""
    arch = {"Backbone": {"name": backbone}, "BackboneStopLayer": {"name": "flatten_0"}}
    with pytest.raises(
        ConfigError, match=r", fc \(PaddleClas's flatten_0: shitu calls it 'flatten'\)$"
    ):
        build_model(ArchConfig.model_validate(arch))


def test_downscale_in_infer_dropout():
    dropout = DownscaleInInferDropout(0.2)
    x = torch.ones(1000, 10)
    assert torch.allclose(dropout.eval()(x), torch.full_like(x, 0.8))
    dropout.train()
    torch.manual_seed(0)
    y = dropout(x)
    assert set(y.unique().tolist()) <= {0.0, 1.0}  # survivors are not rescaled
    assert abs(y.mean().item() - 0.8) < 0.02
    with pytest.raises(ValueError, match="dropout probability"):
        DownscaleInInferDropout(1.0)


def test_bnneck_freezes_bias_and_normalises():
    neck = NECKS.build("BNNeck", num_features=8)
    assert not neck.feat_bn.bias.requires_grad and neck.feat_bn.weight.requires_grad
    assert torch.equal(neck.feat_bn.weight.data, torch.ones(8))
    assert NECKS.build("BNNeck", num_features=8, bias_frozen=False).feat_bn.bias.requires_grad
    x = torch.randn(32, 8) * 3 + 5
    out = neck.train()(x)
    assert out.mean(0).abs().max() < 1e-5
    assert torch.allclose(out.std(0, unbiased=False), torch.ones(8), atol=1e-3)
    assert neck(torch.randn(4, 8, 1, 1)).shape == (4, 8)  # flattens pooled maps


def test_fc_neck_and_head():
    fc = NECKS.build("FC", embedding_size=16, class_num=4)
    x = torch.randn(3, 16)
    assert torch.allclose(fc(x), x @ fc.fc.weight.t() + fc.fc.bias)
    head = HEADS.build("FC", embedding_size=16, class_num=4, bias=False, init_std=0.001)
    assert head.fc.bias is None and head.fc.weight.std() < 0.01
    assert torch.allclose(head(x, torch.tensor([0, 1, 2])), x @ head.fc.weight.t())


def _cosine(head, x):
    return F.normalize(x, dim=1) @ F.normalize(head.weight, dim=1).t()


MARGIN_HEADS = [
    ("ArcMargin", {}),
    ("CosMargin", {}),
    ("CircleMargin", {"margin": 0.25, "scale": 32.0}),
]


@pytest.mark.parametrize(("name", "params"), MARGIN_HEADS)
def test_margin_heads_return_cosine_in_eval_or_without_label(name, params):
    head = HEADS.build(name, embedding_size=8, class_num=5, **params)
    x = torch.randn(4, 8)
    expected = _cosine(head, x)
    assert torch.allclose(head.eval()(x, torch.tensor([0, 1, 2, 3])), expected, atol=1e-6)
    assert torch.allclose(head.train()(x), expected, atol=1e-6)
    assert expected.abs().max() <= 1.0 + 1e-6


@pytest.mark.parametrize(("name", "params"), MARGIN_HEADS)
def test_margin_heads_compute_in_float32_under_bf16_autocast(name, params):
    """Features at cos 0.999 to their class: bf16 rounds such cosines in steps of 0.004,
    which moved ArcMargin's true-class logit (scale 80) by about 2 under autocast."""
    torch.manual_seed(0)
    head = HEADS.build(name, embedding_size=64, class_num=10, **params).train()
    labels = torch.arange(10)
    unit_weights = F.normalize(head.weight.detach(), dim=1)
    x = 0.999 * unit_weights + 0.045 * F.normalize(torch.randn(10, 64), dim=1)
    expected = head(x, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(x, labels)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)


def test_margin_head_defaults_follow_paddleclas():
    arc = HEADS.build("ArcMargin", embedding_size=4, class_num=3)
    assert (arc.margin, arc.scale, arc.easy_margin) == (0.5, 80.0, False)
    cos = HEADS.build("CosMargin", embedding_size=4, class_num=3)
    assert (cos.margin, cos.scale) == (0.35, 64.0)
    with pytest.raises(ConfigError, match="margin: required key missing"):
        HEADS.build("CircleMargin", embedding_size=4, class_num=3, scale=1.0)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("ArcMargin", {"scale": 0}, "scale: Input should be greater than 0"),
        ("CosMargin", {"scale": -64.0}, "scale: Input should be greater than 0"),
        ("CircleMargin", {"margin": 0.25, "scale": -1}, "scale: Input should be greater than 0"),
        ("ArcMargin", {"margin": -0.5}, "margin: Input should be greater than or equal to 0"),
        ("ArcMargin", {"margin": 2.5}, r"margin: must be below 2.331 radians, got 2.5: from"),
        ("ArcMargin", {"margin": 3.5}, r"margin: must be below 2.331 radians, got 3.5: from"),
        (  # every true-class logit at or below every other: nothing to learn
            "CosMargin",
            {"margin": 2.0},
            r"margin: must be above -2 and below 1.732 \(sqrt\(2 \* class_num / \(class_num - 1\)\)"
            r" for 3 classes\), got 2.0",
        ),
        ("CosMargin", {"margin": -2.0}, "margin: Input should be greater than -2"),
        ("CircleMargin", {"margin": -0.1, "scale": 32}, "margin: Input should be greater than or"),
        ("CircleMargin", {"margin": 0.5, "scale": 32}, "margin: Input should be less than 0.5"),
        ("FC", {"init_std": -0.001}, "init_std: Input should be greater than or equal to 0"),
    ],
)
def test_head_settings_that_break_the_classifier_are_config_errors(name, params, message):
    """A scale of 0 or below gives constant or inverted logits, ArcMargin's angle outside
    [0, 2.331) a logit that is not monotonic in the angle, a CosMargin margin from
    sqrt(2C/(C-1)) on a class that can never win (and from -2 down one that always does),
    CircleMargin's relaxation outside [0, 0.5) reversed thresholds, and a negative init_std
    was torch's RuntimeError (a traceback) while the model was built."""
    with pytest.raises(ConfigError, match=message):
        HEADS.build(name, embedding_size=4, class_num=3, **params)


def test_cosmargin_largest_margin_still_lets_each_class_win():
    """Just below the bound (2 for two classes), with the classes' weights opposite, a
    feature at its class's weight still scores its class first."""
    head = _two_class_head("CosMargin", margin=1.99, scale=1.0)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    logits = head(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    assert logits[0, 0] > logits[0, 1]


def test_cosmargin_takes_a_negative_margin():
    """Negative-margin softmax (Liu et al., ECCV 2020) is a published use of CosFace's form."""
    head = _two_class_head("CosMargin", margin=-0.2, scale=1.0)
    logits = head(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    torch.testing.assert_close(logits, torch.tensor([[1.2, 0.0]]))


def _two_class_head(name, **params):
    """A head whose class weights are the unit x and y axes, so cosines are easy to write down."""
    head = HEADS.build(name, embedding_size=2, class_num=2, **params).train()
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
    return head


def test_arcmargin_hand_computed():
    head = _two_class_head("ArcMargin", margin=0.5, scale=10.0)
    theta = 0.6  # angle to class 0
    x = torch.tensor([[math.cos(theta), math.sin(theta)]])
    logits = head(x, torch.tensor([0]))
    sin_term = math.sqrt(1 - math.cos(theta) ** 2 + 1e-6)
    target = math.cos(theta) * math.cos(0.5) - sin_term * math.sin(0.5)
    assert logits[0, 0].item() == pytest.approx(10 * target, abs=1e-4)
    assert logits[0, 1].item() == pytest.approx(10 * math.sin(theta), abs=1e-5)
    # Past the threshold cos <= -cos(m), the logit becomes cos - m*sin(m).
    far = torch.tensor([[-1.0, 0.05]])
    cos_far = -1 / math.hypot(1, 0.05)
    assert head(far, torch.tensor([0]))[0, 0].item() == pytest.approx(
        10 * (cos_far - 0.5 * math.sin(0.5)), abs=1e-4
    )


@pytest.mark.parametrize("margin", [0.5, 1.5, 2.33])
def test_arcmargin_true_class_logit_falls_as_the_angle_grows(margin):
    """Checked against the definition on a grid of angles over [0, pi]: cos(theta + m) up
    to pi - m, then cos(theta) - m*sin(m), decreasing throughout for the margins the config
    takes (2.5, refused, would rise at pi - m: -(cos m + m*sin m) = -0.69 > -1)."""
    head = _two_class_head("ArcMargin", margin=margin, scale=1.0)
    angles = np.linspace(0.0, math.pi, 2001)
    x = torch.tensor(np.stack([np.cos(angles), np.sin(angles)], 1), dtype=torch.float32)
    logits = head(x, torch.zeros(len(angles), dtype=torch.long))[:, 0].detach().numpy()
    expected = np.where(
        angles < math.pi - margin,
        np.cos(angles + margin),
        np.cos(angles) - margin * math.sin(margin),
    )
    near_threshold = np.abs(angles - (math.pi - margin)) < 1e-3  # float32 may fall either side
    assert np.abs(logits - expected)[~near_threshold].max() < 2e-3  # sin's + 1e-6 under the root
    assert (np.diff(logits) <= 1e-6).all()


def test_arcmargin_easy_margin_only_for_positive_cosine():
    head = _two_class_head("ArcMargin", margin=0.5, scale=1.0, easy_margin=True)
    x = torch.tensor([[-0.8, 0.6]])  # cos to class 0 is negative: no margin
    assert head(x, torch.tensor([0]))[0, 0].item() == pytest.approx(-0.8, abs=1e-6)


def test_arcmargin_survives_a_cosine_rounded_above_one():
    """This feature, equal to its class weight, gets cos = 1 + 2^-23 (float32 rounding)."""
    head = HEADS.build("ArcMargin", embedding_size=3, class_num=2, scale=1.0).train()
    x = torch.tensor([[1.0, 1.0, 4.0]], requires_grad=True)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 1.0, 4.0], [0.0, 0.0, 1.0]]))
    with torch.autocast("cpu", dtype=torch.float16):
        assert head.cosine(x)[0, 0].item() > 1.0
        logits = head(x, torch.tensor([0]))
    # sin = sqrt(0 + 1e-6): the target logit is about cos(m) - 0.001 * sin(m)
    assert logits[0, 0].item() == pytest.approx(math.cos(0.5) - 0.001 * math.sin(0.5), abs=2e-3)
    logits.float().sum().backward()
    assert torch.isfinite(x.grad).all()


def test_cosmargin_hand_computed():
    head = _two_class_head("CosMargin", margin=0.35, scale=64.0)
    x = torch.tensor([[0.6, 0.8]])
    logits = head(x, torch.tensor([[1]]))  # labels as [N, 1] like PaddleClas
    assert logits.tolist()[0] == pytest.approx([64 * 0.6, 64 * (0.8 - 0.35)], abs=1e-4)


def test_circlemargin_hand_computed():
    head = _two_class_head("CircleMargin", margin=0.25, scale=2.0)
    x = torch.tensor([[0.6, 0.8]], requires_grad=True)
    logits = head(x, torch.tensor([1]))
    positive = max(0.0, 1.25 - 0.8) * (0.8 - 0.75)
    negative = max(0.0, 0.6 + 0.25) * (0.6 - 0.25)
    assert logits.tolist()[0] == pytest.approx([2 * negative, 2 * positive], abs=1e-5)
    # The alphas are constants: d logit_c / dx = s * alpha * d cos_c / dx, where
    # d cos_c / dx = e_c - cos_c * x: (0.64, -0.48) for class 0, (-0.48, 0.36) for class 1.
    logits.sum().backward()
    expected = [2 * (0.85 * 0.64 + 0.45 * -0.48), 2 * (0.85 * -0.48 + 0.45 * 0.36)]
    assert x.grad[0].tolist() == pytest.approx(expected, abs=1e-5)


def test_rec_model_outputs_and_head_source():
    arch = ArchConfig.model_validate(
        {
            "Backbone": {"name": "PPLCNetV2_small_ShiTu", "class_expand": 64},
            "BackboneStopLayer": {"name": "flatten"},
            "Neck": {"name": "FC", "embedding_size": 64, "class_num": 32},
            "Head": {"name": "CosMargin", "embedding_size": 32, "class_num": 5},
        }
    )
    model = build_model(arch).train()
    out = model(torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3]))
    assert set(out) == {"backbone", "neck", "features", "logits"}
    assert out["backbone"].shape == (4, 64) and out["features"].shape == (4, 32)
    assert out["features"] is out["neck"] and out["logits"].shape == (4, 5)

    arch = arch.model_copy(update={"Neck": None, "head_feature_from": "backbone"})
    arch.Head.__pydantic_extra__["embedding_size"] = 64
    out = build_model(arch).eval()(torch.randn(2, 3, 64, 64))
    assert set(out) == {"backbone", "features", "logits"}
    assert out["features"] is out["backbone"]


def test_backbone_stopped_at_its_pooling_layer_gives_an_embedding_vector():
    """PaddleClas's `avg_pool` stop gave [N, C, 1, 1] features, which evaluation refused
    only once both sets were embedded; a feature map that is not pooled is refused when the
    model is built."""
    pooled = {"Backbone": {"name": "ResNet18"}, "BackboneStopLayer": {"name": "avg_pool"}}
    model = build_model(ArchConfig.model_validate(pooled)).eval()
    out = model(torch.randn(2, 3, 64, 64))
    assert out["backbone"].shape == out["features"].shape == (2, 512)
    flat = {**pooled, "BackboneStopLayer": {"name": "flatten"}}
    reference = build_model(ArchConfig.model_validate(flat)).eval()
    reference.load_state_dict(model.state_dict())
    images = torch.randn(2, 3, 96, 96)
    assert torch.equal(model(images)["features"], reference(images)["features"])
    spatial = {**pooled, "BackboneStopLayer": {"name": "layer4"}}
    with pytest.raises(ConfigError, match=r"features are a 512 x 2 x 2 map .* not an embedding"):
        build_model(ArchConfig.model_validate(spatial))


def test_rec_model_without_head_has_no_logits():
    model = build_model(ArchConfig.model_validate({"Backbone": {"name": "PPLCNetV2_small"}}))
    assert set(model.eval()(torch.randn(1, 3, 64, 64))) == {"backbone", "features"}


def test_unknown_component_names_list_what_exists():
    with pytest.raises(
        ConfigError, match=r"unknown backbone 'PPLCNetV2_bas' \(did you mean 'PPLCNetV2_base'\?\)"
    ):
        BACKBONES.get("PPLCNetV2_bas")


def test_variant_presets_can_be_overridden_but_fixed_args_cannot():
    model = BACKBONES.build("PPLCNetV2_base_ShiTu", class_expand=256, dropout_prob=0.0)
    assert model.last_conv.out_channels == 256 and model.dropout.p == 0.0
    with pytest.raises(ConfigError, match="scale: fixed at 1.0 by this preset"):
        BACKBONES.build("PPLCNetV2_base_ShiTu", scale=2.0)


def test_frozen_layers_keep_weights_and_batchnorm_statistics():
    from shitu.config.schema import ArchConfig
    from shitu.errors import ConfigError
    from shitu.models import build_model

    arch = {
        "Backbone": {"name": "PPLCNetV2_small_ShiTu"},
        "BackboneStopLayer": {"name": "flatten"},
        "Neck": {"name": "BNNeck", "num_features": 512},
        "frozen_layers": ["backbone.stem"],
    }
    model = build_model(ArchConfig.model_validate(arch)).train()
    stem = model.backbone.stem
    assert not stem.training and model.neck.training
    before = {k: v.clone() for k, v in stem.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(2, 3, 64, 64))["features"].sum().backward()
    optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in stem.state_dict().items())
    # A misspelt name is answered with the modules where it would be (the hint listed the
    # first 8 modules under its parent, depth first: not backbone.stages, nor the top level).
    for wrong, there in [
        ("backbone.stme", "backbone.stem, backbone.stages, backbone.avg_pool, backbone.last_c"),
        ("nek", "backbone, neck\\)"),
        ("backbone.stages.9", "backbone.stages.0, backbone.stages.1, backbone.stages.2, backb"),
    ]:
        arch["frozen_layers"] = [wrong]
        with pytest.raises(ConfigError, match=f"no module '{wrong}' .modules there: {there}"):
            build_model(ArchConfig.model_validate(arch))


@pytest.mark.parametrize(
    ("section", "wrong"),
    [
        ("Neck", {"name": "BNNeck", "num_features": 128}),  # the backbone gives 512
        ("Head", {"name": "FC", "embedding_size": 256, "class_num": 3}),
    ],
)
def test_stage_sizes_that_do_not_fit_are_named_when_the_model_is_built(section, wrong):
    """They failed as a bare shape error inside training or export."""
    arch = {
        "Backbone": {"name": "PPLCNetV2_small_ShiTu"},
        "BackboneStopLayer": {"name": "flatten"},
        "Neck": {"name": "BNNeck", "num_features": 512},
        "Head": {"name": "FC", "embedding_size": 512, "class_num": 3},
    }
    model = build_model(ArchConfig.model_validate(arch))
    assert model.training and model.neck.feat_bn.num_batches_tracked == 0  # nothing changed
    arch[section] = wrong
    with pytest.raises(
        ConfigError,
        match=r"^Arch: the model fails on a 1 x 3 x 64 x 64 image \(.*Neck.num_features",
    ):
        build_model(ArchConfig.model_validate(arch))


def test_a_head_too_large_to_allocate_is_a_config_error_naming_its_sizes():
    """A class_num of the largest of 13-digit product codes (the listed ids themselves):
    torch's allocator traceback, naming no setting. Larger than any address space, so
    the allocation fails at once wherever the test runs."""
    arch = {
        "Backbone": {"name": "PPLCNetV2_small_ShiTu", "class_expand": 32},
        "BackboneStopLayer": {"name": "flatten"},
        "Head": {"name": "FC", "embedding_size": 32, "class_num": 10**15},
    }
    with pytest.raises(ConfigError) as caught:
        build_model(ArchConfig.model_validate(arch))
    assert str(caught.value).startswith(
        f"Arch.Head: FC (embedding_size 32, class_num {10**15}) needs more memory than there is ("
    )
    assert str(caught.value).endswith("); check its sizes")
