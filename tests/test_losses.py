"""Losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

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


def test_celoss_rejects_bad_epsilon():
    with pytest.raises(ValueError, match="epsilon"):
        LOSSES.build("CELoss", epsilon=1.5)


def test_triplet_angular_margin_hand_computed():
    """Unit vectors at 0 and 60 degrees (class 0), 90 and 180 degrees (class 1).

    Cosines: s01=0.5, s02=0, s03=-1, s12=0.866, s13=-0.5, s23=0.
    Hardest (ap, an) per anchor: (0.5, 0), (0.5, 0.866), (0, 0.866), (0, -0.5).
    Ranking relu(an - ap + 0.5): 0, 0.866, 1.366, 0 -> mean 0.5580.
    Absolute: relu(0.8 - ap) mean (0.3+0.3+0.8+0.8)/4 = 0.55;
              relu(an - 0.4) mean (0+0.466+0.466+0)/4 = 0.2330 -> total 0.5580 + 0.1*0.7830.
    """

    loss = LOSSES.build("TripletAngularMarginLoss")
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
