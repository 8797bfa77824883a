"""Base of the margin heads: a classifier on cosine similarity to class weight vectors."""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

# The factor on the margin heads' cosines: 0 makes every logit 0 and a negative one turns
# the classifier round (the true class least likely), so a config giving one is refused.
Scale = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class CosineClassifier(nn.Module):
    """Holds one weight vector per class; `cosine(x)` compares normalised x and weights.

    The weight is stored [class_num, embedding_size] (torch's Linear layout);
    PaddleClas stores it transposed, which the .pdparams importer undoes.
    """

    paddle_transposed_params = ("weight",)

    def __init__(self, embedding_size: int, class_num: int) -> None:
        super().__init__()
        self.class_num = class_num
        self.weight = nn.Parameter(torch.empty(class_num, embedding_size))
        nn.init.xavier_normal_(self.weight)

    def cosine(self, x: torch.Tensor) -> torch.Tensor:
        """float32 whatever the autocast dtype: the margins act on cos near 1, where bf16
        steps by 0.004 (sin by up to 0.09), and the scale (30-80) multiplies the error."""
        with torch.autocast(x.device.type, enabled=False):
            unit = F.normalize(x.flatten(1).float(), dim=1)
            return unit @ F.normalize(self.weight.float(), dim=1).t()

    def one_hot(self, label: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return F.one_hot(label.reshape(-1).long(), self.class_num).to(like.dtype)
