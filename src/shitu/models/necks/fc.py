"""A linear layer, usable as neck (embedding projection) or head (classifier)."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from shitu.registry import HEADS, NECKS, Size


@NECKS.register("FC")
@HEADS.register("FC")
class FC(nn.Module):
    """Linear map from `embedding_size` to `class_num` (PaddleClas's parameter names).

    Args:
        embedding_size: input features.
        class_num: outputs (classes for a head, embedding size for a neck).
        bias: learn an additive bias (PP-ShiTuV2's head has none).
        init_std: normal-init standard deviation; None means Xavier-normal.
    """

    def __init__(
        self,
        embedding_size: Size,
        class_num: Size,
        bias: bool = True,
        init_std: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None,
    ) -> None:
        super().__init__()
        self.fc = nn.Linear(embedding_size, class_num, bias=bias)
        if init_std is None:
            nn.init.xavier_normal_(self.fc.weight)
        else:
            nn.init.normal_(self.fc.weight, std=init_std)
        if bias:
            nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc(x.flatten(1))
