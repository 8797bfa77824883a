"""BNNeck (Luo et al., "Bag of Tricks and A Strong Baseline for Deep Person Re-ID")."""

from __future__ import annotations

import torch
from torch import nn

from shitu.registry import NECKS, Size


@NECKS.register("BNNeck")
class BNNeck(nn.Module):
    """BatchNorm over the embedding; the shift is frozen at zero by default.

    A zero, frozen bias keeps the normalised embedding centred, which the
    cosine-based head and triplet losses both rely on (PP-ShiTuV2 does the same).
    """

    def __init__(self, num_features: Size, bias_frozen: bool = True) -> None:
        super().__init__()
        self.flatten = nn.Flatten(1)
        self.feat_bn = nn.BatchNorm1d(num_features, eps=1e-5, momentum=0.1)
        nn.init.ones_(self.feat_bn.weight)
        nn.init.zeros_(self.feat_bn.bias)
        self.feat_bn.bias.requires_grad_(not bias_frozen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feat_bn(self.flatten(x))
