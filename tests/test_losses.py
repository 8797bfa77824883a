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
