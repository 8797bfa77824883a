"""Losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from shitu.errors import ConfigError
from shitu.registry import LOSSES, populate

populate()


def test_celoss_without_smoothing():
    loss = LOSSES.build("CELoss")
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    expected = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-1)))
    assert loss(logits, torch.tensor([[0]])).item() == pytest.approx(expected, rel=1e-6)


def test_celoss_label_smoothing():
    loss = LOSSES.build("CELoss", epsilon=0.1)
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    log_p = torch.log_softmax(logits, dim=1)[0].tolist()
    target = [0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3]
    expected = -sum(t * lp for t, lp in zip(target, log_p, strict=True))
    assert loss(logits, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("key", ["embedding_size", "feat_dim"])
def test_contrastive_loss_widths_are_positive(key):
    """A width of 0 loaded and stopped the run at its first batch."""
    with pytest.raises(ConfigError, match=f"{key}: Input should be greater than 0"):
        LOSSES.validate("ContrastiveLoss", {key: 0})


def test_celoss_rejects_bad_epsilon():
    with pytest.raises(ConfigError, match="epsilon: Input should be less than 1 .* 'CELoss'"):
        LOSSES.build("CELoss", epsilon=1.5)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("TripletLoss", {"margin": 2.0, "normalize_feature": True}, "margin: 2.0 is never met"),
        ("TripletLossV2", {"margin": 2.5}, "margin: 2.5 is never met"),
        ("TripletAngularMarginLoss", {"margin": 2.0}, "margin: 2.0 is never met"),
        (
            "TripletAngularMarginLoss",
            {"add_absolute": True, "ap_value": 1.2},
            r"ap_value: 1.2 is never met \(cosines are at most 1\)",
        ),
        ("TripletAngularMarginLoss", {"add_absolute": True, "an_value": -1.5}, "an_value: -1.5"),
        ("TripletAngularMarginLoss_XBM", {"margin": 3}, "margin: 3.0 is never met"),
        ("XBM", {"pair_loss": {"TripletLossV2": {"margin": 2}}}, "margin: 2.0 is never met"),
        # every positive pair of similarity 0 or more skipped as met: classes hardly pulled in
        ("ContrastiveLoss", {"epsilon": 1.0}, "epsilon: Input should be less than 1"),
        ("ContrastiveLoss_XBM", {"epsilon": -0.1}, "epsilon: Input should be greater than or"),
    ],
)
def test_thresholds_normalised_features_never_meet_are_config_errors(name, params, message):
    """Cosines lie in [-1, 1] and unit vectors are at most 2 apart: a margin or threshold
    beyond that is never met, and the hinge, which stops at well separated classes, never
    acts; was taken without a word."""
    with pytest.raises(ConfigError, match=message):
        LOSSES.validate(name, params)
    if name == "TripletLoss":  # unnormalised features have no such bound
        LOSSES.validate(name, {**params, "normalize_feature": False})


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("TripletLoss", {"margin": -0.5}, "margin"),
        ("TripletAngularMarginLoss", {"margin": -0.5}, "margin"),
        ("TripletAngularMarginLoss", {"absolute_loss_weight": -0.1}, "absolute_loss_weight"),
        ("XBM", {"memory_weight": -1.0}, "memory_weight"),
        ("XBM", {"batch_weight": -1.0}, "batch_weight"),
        ("XBM", {"start_iter": -1}, "start_iter"),
        ("ContrastiveLoss_XBM", {"xbm_weight": -1.0}, "xbm_weight"),
    ],
)
def test_negative_margins_and_weights_are_config_errors(name, params, message):
    """Refused when a config is read, naming the key as for the model's components: a
    negative weight maximises its term, as the loss sum's own `weight` refuses to, and a
    negative margin leaves most triplets without a loss."""
    with pytest.raises(ConfigError, match=f"{message}: Input should be greater than or equal"):
        LOSSES.validate(name, params)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("TripletLoss", {}),
        ("TripletAngularMarginLoss", {"add_absolute": True}),
        ("ContrastiveLoss", {}),
        ("XBM", {"memory_size": 16, "embedding_size": 8, "start_iter": 0}),
    ],
)
def test_metric_losses_take_a_pooled_backbone_map(name, params):
    """A backbone stopped at its pooling layer gives [N, D, 1, 1], which the heads and BNNeck
    flatten; the metric losses stopped the first training step with a traceback."""
    torch.manual_seed(0)
    features = torch.randn(8, 8)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    flat = LOSSES.build(name, **params).train()(features, labels)
    pooled = LOSSES.build(name, **params).train()(features[:, :, None, None], labels)
    assert pooled.item() == pytest.approx(flat.item())
    spatial = features.reshape(8, 2, 2, 2)
    with pytest.raises(ConfigError, match=r"\[N, D\] embeddings, got shape \(8, 2, 2, 2\)"):
        LOSSES.build(name, **params).train()(spatial, labels)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("ContrastiveLoss", {"margin": 1.0}),
        ("ContrastiveLoss_XBM", {"margin": 1.5}),
        ("XBM", {"pair_loss": {"ContrastiveLoss": {"margin": 1.0}}}),
    ],
)
def test_contrastive_margin_that_leaves_out_every_negative_is_refused(name, params):
    """Cosines never exceed 1: such a margin made the loss pull every embedding together."""
    with pytest.raises(ConfigError, match="leaves out every negative pair"):
        LOSSES.validate(name, params)
    raw = LOSSES.build("ContrastiveLoss", margin=1.0, normalize_feature=False)
    assert raw.margin == 1.0  # dot products of raw features do exceed 1


@pytest.mark.parametrize("name", ["TripletLoss", "TripletAngularMarginLoss"])
def test_batch_hard_loss_without_triplets_warns_once(name, caplog):
    """Batches of one image per class (a PKSampler's sample_per_id 1) gave a loss of 0 at
    every step without a word."""
    loss = LOSSES.build(name)
    features = torch.randn(4, 8, requires_grad=True)
    with caplog.at_level("WARNING", logger="shitu.losses"):
        assert loss(features, torch.tensor([0, 1, 2, 3])).item() == 0.0
        assert loss(features, torch.tensor([5, 5, 5, 5])).item() == 0.0
        loss(features, torch.tensor([0, 0, 1, 1]))
    warnings = [r.getMessage() for r in caplog.records if "loss was 0" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith(f"{name}: no image of a training batch")
    assert "sample_per_id >= 2" in warnings[0]
    # Batches of one class (a PKSampler's batch_size equal to its sample_per_id) are said to
    # be: the advice, sample_per_id >= 2, was one such a run followed already.
    caplog.clear()
    with caplog.at_level("WARNING", logger="shitu.losses"):
        assert LOSSES.build(name)(features, torch.tensor([5, 5, 5, 5])).item() == 0.0
    assert caplog.messages == [
        f"{name}: every image of a training batch was of one class, so the loss was 0; "
        "batch-hard losses need several classes and several images of each in a batch "
        "(PKSampler, sample_per_id >= 2 and a batch_size of several times it)"
    ]


@pytest.mark.parametrize("pair_loss", ["TripletLoss", "TripletAngularMarginLoss"])
def test_xbm_batches_without_triplets_warn_only_before_the_memory_starts(pair_loss, caplog):
    """Inside XBM, a batch of one image per class warned that the loss was 0 and asked for
    sample_per_id >= 2 even once the memory supplied the positives; before the memory
    starts, the warning says when it will."""
    features = torch.randn(4, 8, requires_grad=True)
    distinct = torch.tensor([0, 1, 2, 3])
    started = LOSSES.build("XBM", pair_loss=pair_loss, memory_size=16, embedding_size=8,
                           start_iter=0).train()  # fmt: skip
    with caplog.at_level("WARNING", logger="shitu.losses"):
        for _ in range(2):
            started(features, distinct)
    assert not [r for r in caplog.records if "loss was 0" in r.getMessage()]
    late = LOSSES.build("XBM", pair_loss=pair_loss, memory_size=16, embedding_size=8,
                        start_iter=5).train()  # fmt: skip
    with caplog.at_level("WARNING", logger="shitu.losses"):
        assert late(features, distinct).item() == 0.0
    (warning,) = [r.getMessage() for r in caplog.records if "loss was 0" in r.getMessage()]
    assert "XBM's memory supplies pairs from past batches only after start_iter (5)" in warning


def test_tripletlossv2_is_paddleclas_s_normalised_triplet_loss():
    """PaddleClas configs name it; it was an unknown loss, and the suggested TripletLoss
    has PaddleClas's other defaults (margin 1.0 on raw features)."""
    torch.manual_seed(0)
    features, labels = torch.randn(8, 16), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    v2 = LOSSES.build("TripletLossV2")
    assert (v2.margin, v2.normalize_feature) == (0.5, True)
    same = LOSSES.build("TripletLoss", margin=0.5, normalize_feature=True)
    assert v2(features, labels).item() == same(features, labels).item()
    assert LOSSES.build("TripletLossV2", margin=0.3).margin == 0.3
    xbm = LOSSES.build("XBM", pair_loss="TripletLossV2", embedding_size=16)
    assert (xbm.pair_loss.margin, xbm.pair_loss.normalize_feature) == (0.5, True)


def test_triplet_angular_margin_hand_computed():
    """Unit vectors at 0 and 60 degrees (class 0), 90 and 180 degrees (class 1).

    Cosines: s01=0.5, s02=0, s03=-1, s12=0.866, s13=-0.5, s23=0.
    Hardest (ap, an) per anchor: (0.5, 0), (0.5, 0.866), (0, 0.866), (0, -0.5).
    Ranking relu(an - ap + 0.5): 0, 0.866, 1.366, 0 -> mean 0.5580.
    Absolute: relu(0.8 - ap) mean (0.3+0.3+0.8+0.8)/4 = 0.55;
              relu(an - 0.4) mean (0+0.466+0.466+0)/4 = 0.2330 -> total 0.5580 + 0.1*0.7830.
    """

    loss = LOSSES.build(  # PP-ShiTuV2's settings
        "TripletAngularMarginLoss",
        margin=0.5,
        add_absolute=True,
        absolute_loss_weight=0.1,
        ap_value=0.8,
        an_value=0.4,
    )
    r3 = math.sqrt(3) / 2
    x = torch.tensor([[1.0, 0.0], [0.5, r3], [0.0, 1.0], [-1.0, 0.0]], requires_grad=True)
    value = loss(x, torch.tensor([0, 0, 1, 1]))
    ranking = (r3 + (r3 + 0.5)) / 4
    absolute = 0.55 + 2 * (r3 - 0.4) / 4
    assert value.item() == pytest.approx(ranking + 0.1 * absolute, abs=1e-6)
    value.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # One class only: no negatives, so nothing to learn, but still differentiable.
    zero = loss(x, torch.tensor([0, 0, 0, 0]))
    assert zero.item() == 0.0 and zero.requires_grad


def _unit(*degrees: float) -> torch.Tensor:
    return torch.tensor([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in degrees])


def test_triplet_loss_batch_hard_hand_computed():
    """Points on a line: class 0 at 0 and 1, class 1 at 3 and 7; margin 1.

    Anchor 0: hardest p 1, hardest n 3 -> relu(1 - 3 + 1) = 0
    Anchor 1: p 1, n 2 -> relu(1 - 2 + 1) = 0
    Anchor 3: p 4, n 2 -> relu(4 - 2 + 1) = 3
    Anchor 7: p 4, n 6 -> relu(4 - 6 + 1) = 0            -> mean 0.75
    """
    loss = LOSSES.build("TripletLoss", margin=1.0)
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [7.0, 0.0]], requires_grad=True)
    value = loss(x, torch.tensor([0, 0, 1, 1]))
    assert value.item() == pytest.approx(0.75, abs=1e-5)
    value.backward()
    # Only anchor 3 is active: d/dx of ((7 - a) - (a - 1) + 1) / 4 on a, 7 and 1.
    assert x.grad[:, 0].tolist() == pytest.approx([0.0, 0.25, -0.5, 0.25], abs=1e-6)


def test_triplet_angular_margin_mines_the_hardest_positive_and_skips_singletons():
    """Unit vectors at 0, 60, 120 degrees (class 0), 180 (class 1) and 270 (class 2).

    Anchors 180 and 270 have no positive: left out (with itself as positive, s = 1,
    anchor 180 would add an absolute term relu(0.5 - 0.4)). For the others:
    anchor 0: positives 0.5, -0.5 -> s_ap -0.5; negatives -1, 0 -> s_an 0; ranking 1.0
    anchor 60: s_ap 0.5; negatives -0.5, -0.866 -> s_an -0.5; ranking 0
    anchor 120: s_ap -0.5; negatives 0.5, -0.866 -> s_an 0.5; ranking 1.5
    Absolute: relu(0.8 - s_ap) = 1.3, 0.3, 1.3; relu(s_an - 0.4) = 0, 0, 0.1.
    """
    params = {"margin": 0.5, "add_absolute": True, "absolute_loss_weight": 0.1}
    params |= {"ap_value": 0.8, "an_value": 0.4}
    x, labels = _unit(0, 60, 120, 180, 270), torch.tensor([0, 0, 0, 1, 2])
    mean = LOSSES.build("TripletAngularMarginLoss", **params)
    assert mean(x, labels).item() == pytest.approx(2.5 / 3 + 0.1 * 3.0 / 3, abs=1e-5)
    summed = LOSSES.build("TripletAngularMarginLoss", reduction="sum", **params)
    assert summed(x, labels).item() == pytest.approx(2.5 + 0.1 * 3.0 / 3, abs=1e-5)


def test_triplet_loss_mines_the_farthest_positive():
    """Points on a line: class 0 at 0, 1 and 5, class 1 at 3 and 4; margin 1.

    Anchor 0: p 5, n 3 -> 3;  anchor 1: p 4, n 2 -> 3;  anchor 5: p 5, n 1 -> 5;
    anchor 3: p 1, n 2 -> 0;  anchor 4: p 1, n 1 -> 1            -> mean 12 / 5
    """
    loss = LOSSES.build("TripletLoss", margin=1.0)
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0], [3.0, 0.0], [4.0, 0.0]])
    assert loss(x, torch.tensor([0, 0, 0, 1, 1])).item() == pytest.approx(2.4, abs=1e-5)


def test_triplet_loss_skips_anchors_without_positive():
    loss = LOSSES.build("TripletLoss", margin=1.0)
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    # Label 1 has one sample: only anchors 0 and 1 count: relu(1-3+1)=0, relu(1-2+1)=0.
    assert loss(x, torch.tensor([0, 0, 1])).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(x, torch.tensor([0, 1, 2])).item() == 0.0  # no positives at all


def test_contrastive_loss_hand_computed():
    """Unit vectors at 0, 30 (class 0) and 45, 120 degrees (class 1); margin 0.5.

    Positive pairs (both directions): (0,30) s=0.8660, (45,120) s=0.2588
      -> 2 * (1 - 0.8660) + 2 * (1 - 0.2588)
    Negative pairs above the margin: (0,45) 0.7071, (30,45) 0.9659 (twice each);
      (0,120) -0.5 and (30,120) 0 are easy.                      Divide by 4 queries.
    """
    loss = LOSSES.build("ContrastiveLoss", margin=0.5)
    x = _unit(0, 30, 45, 120)
    c = [math.cos(math.radians(d)) for d in (30, 75, 45, 15)]
    expected = (2 * (1 - c[0]) + 2 * (1 - c[1]) + 2 * c[2] + 2 * c[3]) / 4
    assert loss(x, torch.tensor([0, 0, 1, 1])).item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("name", ["embedding_size", "feat_dim"])  # PaddleClas's, new and old
def test_contrastive_loss_checks_the_embedding_size_under_either_name(name):
    loss = LOSSES.build("ContrastiveLoss", margin=0.5, **{name: 2})
    assert loss(_unit(0, 30), torch.tensor([0, 0])).item() >= 0.0
    # a config error (an `error:` line), not a traceback at the first training step
    with pytest.raises(ConfigError, match="embedding_size is 2 but embeddings have 3"):
        loss(torch.ones(2, 3), torch.tensor([0, 0]))
    with pytest.raises(ConfigError, match="differ"):
        LOSSES.build("ContrastiveLoss", embedding_size=2, feat_dim=3)


def test_contrastive_loss_against_a_reference_set():
    loss = LOSSES.build("ContrastiveLoss", margin=0.5)
    query = _unit(0)
    ref = _unit(0, 60, 10)  # an exact copy (skipped), a positive at 60, a negative at 10
    value = loss(query, torch.tensor([0]), ref, torch.tensor([0, 0, 1]))
    assert value.item() == pytest.approx((1 - 0.5) + math.cos(math.radians(10)), abs=1e-5)
    with pytest.raises(ValueError, match="dimension"):
        loss(query, torch.tensor([0]), torch.zeros(2, 3), torch.tensor([0, 1]))


def test_xbm_ring_is_fifo_and_starts_late():
    xbm = LOSSES.build("XBM", memory_size=5, embedding_size=2, start_iter=1)
    xbm.train()
    batches = [(_unit(10 * i, 10 * i + 5), torch.tensor([i, i])) for i in range(4)]
    xbm(*batches[0])  # iteration 1 <= start_iter: nothing stored
    assert xbm.stored()[0].shape[0] == 0
    xbm(*batches[1])
    xbm(*batches[2])
    assert xbm.stored()[1].tolist() == [1, 1, 2, 2]
    xbm(*batches[3])  # 6 written into 5 slots: the oldest (first of batch 1) is gone
    _, labels = xbm.stored()
    assert sorted(labels.tolist()) == [1, 2, 2, 3, 3]
    assert labels[0].item() == 3  # wrapped around into slot 0
    xbm.eval()
    before = xbm.memory.clone()
    xbm(*batches[0])
    assert torch.equal(before, xbm.memory)  # evaluation never writes


def test_xbm_adds_the_memory_term():
    pair = LOSSES.build("ContrastiveLoss", margin=0.5)
    xbm = LOSSES.build(
        "XBM",
        pair_loss={"ContrastiveLoss": {"margin": 0.5}},
        memory_size=8,
        embedding_size=2,
        start_iter=0,
        memory_weight=0.5,
        batch_weight=2.0,
    ).train()
    old, old_labels = _unit(100, 200), torch.tensor([0, 1])
    xbm(old, old_labels)
    x, labels = _unit(0, 30, 45, 120).requires_grad_(), torch.tensor([0, 0, 1, 1])
    value = xbm(x, labels)
    (grad,) = torch.autograd.grad(value, x)
    # The batch is written first, as a constant: gradients reach it as queries only.
    memory = torch.cat([old, x.detach()])
    memory_labels = torch.cat([old_labels, labels])
    expected = 2.0 * pair(x, labels) + 0.5 * pair(x, labels, memory, memory_labels)
    assert value.item() == pytest.approx(expected.item(), abs=1e-6)
    assert torch.allclose(grad, torch.autograd.grad(expected, x)[0], atol=1e-6)
    assert not xbm.memory.requires_grad


def test_triplet_angular_margin_loss_xbm_takes_paddleclas_s_arguments():
    """PaddleClas's name for XBM around the angular triplet loss, with its argument names."""
    settings = {"margin": 0.3, "add_absolute": True, "absolute_loss_weight": 0.1}
    ours = LOSSES.build(
        "TripletAngularMarginLoss_XBM", xbm_size=8, xbm_weight=0.5, start_iter=0, feat_dim=2,
        **settings,
    ).train()  # fmt: skip
    xbm = LOSSES.build(
        "XBM", pair_loss={"TripletAngularMarginLoss": settings}, memory_size=8,
        memory_weight=0.5, embedding_size=2, start_iter=0,
    ).train()  # fmt: skip
    labels = torch.tensor([0, 0, 1, 1])
    for batch in (_unit(0, 40, 90, 150), _unit(10, 60, 100, 200)):
        assert ours(batch, labels).item() == pytest.approx(xbm(batch, labels).item())
    assert ours.stored()[0].shape == (8, 2)
    with pytest.raises(ConfigError, match="TripletAngularMarginLoss_XBM.feat_dim is 2 but"):
        ours(torch.randn(4, 3), labels)
    with pytest.raises(ConfigError, match="feat_dim: Input should be greater than 0"):
        LOSSES.validate("TripletAngularMarginLoss_XBM", {"feat_dim": 0})


def test_xbm_batch_larger_than_its_memory_keeps_the_batchs_last_rows():
    """A batch of 5 into 3 slots holds rows 2-4 (the newest), and compares the batch with
    those alone; the next batch of 2 then replaces rows 2 and 3, the oldest, not row 4."""
    pair = LOSSES.build("ContrastiveLoss", margin=0.1)
    xbm = LOSSES.build(
        "XBM", pair_loss={"ContrastiveLoss": {"margin": 0.1}}, memory_size=3,
        embedding_size=2, start_iter=0, batch_weight=0.0,
    ).train()  # fmt: skip
    x, labels = _unit(0, 20, 40, 60, 80), torch.tensor([0, 1, 0, 1, 0])
    value = xbm(x, labels)
    assert value.item() == pytest.approx(pair(x, labels, x[2:], labels[2:]).item(), abs=1e-6)
    memory, memory_labels = xbm.stored()
    assert torch.equal(memory, x[2:]) and memory_labels.tolist() == [0, 1, 0]
    xbm(_unit(100, 120), torch.tensor([5, 6]))
    assert xbm.stored()[1].tolist() == [5, 6, 0]
    assert torch.equal(xbm.stored()[0][2], x[4])


def test_xbm_state_round_trips_through_state_dict():
    xbm = LOSSES.build("ContrastiveLoss_XBM", xbm_size=4, embedding_size=2, start_iter=0).train()
    xbm(_unit(0, 90), torch.tensor([3, 4]))
    restored = LOSSES.build("ContrastiveLoss_XBM", xbm_size=4, embedding_size=2, start_iter=0)
    restored.load_state_dict(xbm.state_dict())
    assert restored.stored()[1].tolist() == [3, 4]
    assert int(restored.iteration) == 1


def test_xbm_rejects_bad_settings():
    with pytest.raises(ConfigError, match="pair_loss: XBM needs a pair loss .* in loss 'XBM'"):
        LOSSES.build("XBM", pair_loss="CELoss", embedding_size=2)
    xbm = LOSSES.build("XBM", memory_size=4, embedding_size=3, start_iter=1000).train()
    with pytest.raises(ConfigError, match="embedding_size"):  # at the first step already
        xbm(_unit(0, 90), torch.tensor([0, 1]))


@pytest.mark.parametrize(
    ("pair_loss", "message"),
    [
        ({"ContrastiveLoss": {"margn": 0.5}}, r"^pair_loss\.ContrastiveLoss\.margn: unknown key"),
        ({"TripletLoss": {"margin": -1}}, r"^pair_loss\.TripletLoss\.margin: Input should be"),
        ("TripletLos", r"^pair_loss: unknown loss 'TripletLos' \(did you mean 'TripletLoss'"),
        ("CELoss", "^pair_loss: XBM needs a pair loss"),
        # PaddleClas's shape for a component, named by a `name` key: the rewrite is given
        (
            {"name": "ContrastiveLoss", "margin": 0.5},
            r"^pair_loss: the loss's name is the key its settings go under, not a `name` "
            r"setting: pair_loss: \{ContrastiveLoss: \{margin: 0\.5\}\} in loss 'XBM'$",
        ),
        ({"ContrastiveLoss": 0.5}, r"^pair_loss: must be a loss name \(ContrastiveLoss\) or one"),
    ],
)
def test_xbm_pair_loss_is_checked_with_the_config(pair_loss, message):
    """Checked when a config is read, under the key it sits at (the config loader puts the
    section before it), not only when training builds the loss, without file or key."""
    with pytest.raises(ConfigError, match=message):
        LOSSES.validate("XBM", {"pair_loss": pair_loss})


@pytest.mark.parametrize(
    ("loss", "params", "message"),
    [
        ("XBM", {"margin": 0.3}, "margin: a setting of XBM's pair loss (ContrastiveLoss, "
         "TripletLoss, TripletAngularMarginLoss), not of XBM: give it inside pair_loss, e.g. "
         "pair_loss: {ContrastiveLoss: {margin: ...}} in loss 'XBM'"),
        ("XBM", {"ap_value": 0.8}, "ap_value: a setting of XBM's pair loss "
         "(TripletAngularMarginLoss), not of XBM: give it inside pair_loss, e.g. pair_loss: "
         "{TripletAngularMarginLoss: {ap_value: ...}} in loss 'XBM'"),
        ("XBM", {"xbm_size": 64}, "xbm_size: another XBM loss's name for a setting that XBM "
         "names memory_size in loss 'XBM'"),
        ("ContrastiveLoss_XBM", {"memory_size": 64}, "memory_size: another XBM loss's name "
         "for a setting that ContrastiveLoss_XBM names xbm_size in loss 'ContrastiveLoss_XBM'"),
        ("TripletAngularMarginLoss_XBM", {"embedding_size": 8}, "embedding_size: another XBM "
         "loss's name for a setting that TripletAngularMarginLoss_XBM names feat_dim in loss "
         "'TripletAngularMarginLoss_XBM'"),
        ("ContrastiveLoss_XBM", {"pair_loss": "TripletLoss"}, "pair_loss: XBM's setting; "
         "ContrastiveLoss_XBM has its pair loss built in, whose settings it takes itself (or "
         "use XBM, which takes a pair_loss) in loss 'ContrastiveLoss_XBM'"),
    ],
)  # fmt: skip
def test_xbm_keys_of_its_pair_loss_or_another_xbm_loss_say_where_they_belong(loss, params, message):
    """`XBM: {margin: 0.3}` (a setting of the pair loss inside it) or PaddleClas's xbm_size
    in XBM were each an 'unknown key', which did not say where the key goes."""
    with pytest.raises(ConfigError) as refused:
        LOSSES.validate(loss, params)
    assert str(refused.value) == message


def _lite0_model(
    drop_connect_rate: float,
    frozen_layers: tuple[str, ...] = ("backbone.stem", "backbone.blocks.0"),
):
    from shitu.config.schema import ArchConfig
    from shitu.models import build_model

    arch = {
        "name": "RecModel",
        "Backbone": {
            "name": "EfficientNetLite0",
            "class_num": 16,
            "drop_connect_rate": drop_connect_rate,
        },
        "BackboneStopLayer": {"name": "fc"},
        "frozen_layers": list(frozen_layers),
    }
    return build_model(ArchConfig.model_validate(arch))


@pytest.mark.parametrize(
    ("frozen_layers", "trained"),
    [
        (("backbone.stem", "backbone.blocks.0"), "head"),  # frozen prefix: outputs replayed
        (("backbone.blocks.2",), "stem"),  # frozen after a trained layer: computed anew
    ],
)
def test_feature_distillation_starts_at_zero_and_pulls_towards_the_frozen_start(
    frozen_layers, trained
):
    torch.manual_seed(0)
    model = _lite0_model(drop_connect_rate=0.0, frozen_layers=frozen_layers).train()
    loss = LOSSES.build("FeatureDistillLoss", layer="flatten")
    loss.attach(model)
    start = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    images = torch.randn(4, 3, 64, 64)
    assert loss(model(images)["backbone"], None).item() == 0.0  # the same network, same batch

    with torch.no_grad():
        getattr(model.backbone, trained).conv.weight.mul_(1.5).add_(0.01)
    value = loss(model(images)["backbone"], None)

    # The target by hand: the starting backbone, frozen parts as the run keeps them (eval),
    # BatchNorm elsewhere on the batch's statistics.
    reference = _lite0_model(drop_connect_rate=0.0, frozen_layers=frozen_layers)
    reference.backbone.load_state_dict(start)
    reference.train()
    pooled = {}
    reference.backbone.flatten.register_forward_hook(lambda m, i, o: pooled.update(t=o))
    model.backbone.flatten.register_forward_hook(lambda m, i, o: pooled.update(s=o))
    with torch.no_grad():
        reference(images)
        model(images)
    cos = torch.nn.functional.cosine_similarity(pooled["s"], pooled["t"], dim=1)
    assert value.item() == pytest.approx((2 - 2 * cos).mean().item(), abs=1e-6)
    assert value.item() > 1e-3

    value.backward()
    assert getattr(model.backbone, trained).conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.teacher.parameters())
    frozen = [p for module in model.frozen_modules for p in module.parameters()]
    assert frozen and all(p.grad is None for p in frozen)  # frozen stays frozen
    teacher_state = loss.teacher.state_dict()
    assert all(torch.equal(teacher_state[k], start[k]) for k in start if "num_batches" not in k)

    with torch.no_grad():  # evaluation passes leave nothing for the loss
        model.eval()(images)
    with pytest.raises(RuntimeError, match="no training batch"):
        loss(torch.zeros(4, 16), None)
    with pytest.raises(ConfigError, match="no module 'pooled' .its top-level modules: stem, bl"):
        LOSSES.build("FeatureDistillLoss", layer="pooled").attach(model)


def test_feature_distillation_takes_frozen_prefix_outputs_from_the_trained_backbone():
    torch.manual_seed(0)
    model = _lite0_model(drop_connect_rate=0.0).train()  # stem and blocks.0 frozen
    loss = LOSSES.build("FeatureDistillLoss", layer="flatten")
    loss.attach(model)
    computed: list[str] = []
    for name in ("stem.conv", "blocks.0.depthwise.conv", "blocks.1.depthwise.conv"):
        module = dict(loss.teacher.named_modules())[name]
        module.register_forward_hook(lambda *_, name=name: computed.append(name))
    images = torch.randn(4, 3, 64, 64)
    assert loss(model(images)["backbone"], None).item() == 0.0
    assert computed == ["blocks.1.depthwise.conv"]  # the frozen stem and block 0 are reused
    with torch.no_grad():  # called on other input, a frozen layer of the copy computes
        loss.teacher(images)
    assert computed[1:] == ["stem.conv", "blocks.0.depthwise.conv", "blocks.1.depthwise.conv"]
    assert set(loss.teacher.state_dict()) == set(model.backbone.state_dict())


def test_feature_distillation_target_runs_in_the_steps_autocast():
    torch.manual_seed(0)
    model = _lite0_model(drop_connect_rate=0.0).train()
    loss = LOSSES.build("FeatureDistillLoss", layer="flatten")
    loss.attach(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(torch.randn(4, 3, 64, 64))
    assert outputs["backbone"].dtype == torch.bfloat16
    # outside the autocast, as the Trainer computes losses: the same bfloat16 network
    assert loss(outputs["backbone"], None).item() == 0.0


def test_feature_distillation_target_has_no_stochastic_depth():
    torch.manual_seed(0)
    model = _lite0_model(drop_connect_rate=0.5).train()
    loss = LOSSES.build("FeatureDistillLoss")  # the backbone's output (here the 16-d fc)
    loss.attach(model)
    images = torch.randn(4, 3, 64, 64)
    targets = []
    for _ in range(2):
        loss(model(images)["backbone"], None)
        with torch.no_grad():
            targets.append(loss.teacher(images))
    assert torch.equal(targets[0], targets[1])  # deterministic, unlike the student
    model.train()
    loss.train()  # the run switching modes does not switch the target's
    assert not loss.teacher.training
    norms = [m for m in loss.teacher.blocks[3].modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.training and m.momentum == 0.0 for m in norms)
    assert not loss.teacher.stem.bn.training  # frozen in the run: running statistics


def test_a_batch_with_no_pair_gives_a_plain_zero_loss():
    """One sample has no pair: the loss is 0 (logged as 0.0000, not -0.0000) and still
    backpropagates."""
    features = torch.tensor([[-1.0, -2.0, -3.0, -4.0]], requires_grad=True)
    loss = LOSSES.build("TripletLoss")(features, torch.tensor([0]))
    assert loss.item() == 0.0 and str(loss.item()) == "0.0"
    loss.backward()
    assert torch.equal(features.grad, torch.zeros_like(features))


# Settings that let each loss take 8-d features and use its memory from the first step.
_EMPTY_BATCH_PARAMS = {
    "XBM": {"embedding_size": 8, "memory_size": 16, "start_iter": 0},
    "ContrastiveLoss_XBM": {"embedding_size": 8, "xbm_size": 16, "start_iter": 0},
    "TripletAngularMarginLoss_XBM": {"feat_dim": 8, "xbm_size": 16, "start_iter": 0},
}


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_gives_a_connected_zero_on_an_empty_batch(name, caplog):
    """A batch of no rows made the mean-reduced losses 0 / 0 = NaN, which a step would
    have written into the weights; the batch-hard losses warned of a batch composition."""
    torch.manual_seed(0)
    loss = LOSSES.build(name, **_EMPTY_BATCH_PARAMS.get(name, {})).train()
    labels = torch.tensor([0, 0, 1, 1])
    if loss.input_key == "backbone":  # distils the backbone of a model it is attached to
        model = _lite0_model(drop_connect_rate=0.0).train()
        loss.attach(model)
        inputs = model(torch.randn(0, 3, 32, 32))["backbone"]
    else:
        width = 5 if loss.input_key == "logits" else 8
        loss(torch.randn(4, width), labels)  # a memory holds this batch
        inputs = torch.randn(0, width, requires_grad=True)
    with caplog.at_level("WARNING", logger="shitu.losses"):
        value = loss(inputs, labels[:0])
    assert value.item() == 0.0 and str(value.item()) == "0.0"
    assert not caplog.records
    value.backward()
    grads = [inputs.grad] if inputs.is_leaf else [p.grad for p in model.parameters()]
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)
    assert any(g is not None for g in grads)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (  # it named no value to set (nor the output read: logits, maybe)
            {"XBM": {"embedding_size": 8}},
            "XBM.embedding_size is 8 but the model output it reads has 16 dimensions; set "
            "embedding_size: 16$",
        ),
        (
            {"ContrastiveLoss_XBM": {}},
            "ContrastiveLoss_XBM.embedding_size is 128 but the model output it reads has 16 "
            "dimensions; set embedding_size: 16$",
        ),
        (
            {"ContrastiveLoss": {"embedding_size": 8}},
            "embedding_size is 8 but embeddings have 16 dimensions; set embedding_size: 16, or "
            r"leave it out \(it is only checked\)$",
        ),
        (  # the pair loss inside XBM too
            {
                "XBM": {
                    "embedding_size": 16,
                    "pair_loss": {"ContrastiveLoss": {"embedding_size": 8}},
                }
            },
            "ContrastiveLoss.embedding_size is 8 but embeddings have 16",
        ),
    ],
)
def test_a_loss_sized_for_other_features_is_refused_before_the_first_step(item, message):
    """The width a loss takes was checked only at the first training step, after the
    datasets (and evaluation sets) were read and checked."""
    from shitu.losses.combined import CombinedLoss

    model = _lite0_model(drop_connect_rate=0.0)  # 16-d features
    with pytest.raises(ConfigError, match=f"Loss.Train: .*{message}"):
        CombinedLoss([item]).attach(model)
    CombinedLoss([{"XBM": {"embedding_size": 16}}]).attach(model)
