"""Shared plumbing of the pair-based metric losses (triplet, angular triplet, contrastive).

Every pair loss compares a batch of *query* embeddings with a set of *reference*
embeddings. Without an explicit reference the batch is compared with itself and an
embedding is never its own positive; with one (XBM's memory) all reference entries
count. XBM writes the batch before comparing, so an anchor's own detached copy is a
positive at similarity 1: the contrastive loss skips it (s >= 1 - epsilon) and
batch-hard mining picks it only where the memory holds no other positive.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shitu.errors import ConfigError

logger = logging.getLogger(__name__)


def as_embeddings(inputs: torch.Tensor) -> torch.Tensor:
    """[N, D] embeddings. A pooled [N, D, 1, 1] map, the output of a backbone stopped at its
    pooling layer, is flattened, as the heads and BNNeck take it; a map that is not pooled
    is no embedding, and a ConfigError says where to read one instead."""
    if inputs.ndim > 2 and all(size == 1 for size in inputs.shape[2:]):
        return inputs.flatten(1)
    if inputs.ndim != 2:
        raise ConfigError(
            f"metric losses need [N, D] embeddings, got shape {tuple(inputs.shape)}: read a "
            "pooled output (Arch.BackboneStopLayer at or after the backbone's pooling layer, "
            "or the neck's features)"
        )
    return inputs


def resolve_reference(
    inputs: torch.Tensor,
    labels: torch.Tensor,
    ref_inputs: torch.Tensor | None,
    ref_labels: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """(labels, ref_inputs, ref_labels, is_self) with labels flattened and shapes checked;
    `inputs` must be [N, D] (see `as_embeddings`).

    `is_self` says the reference is the batch itself, so self-pairs must be masked.
    """
    labels = labels.reshape(-1)
    if labels.numel() != inputs.shape[0]:
        raise ValueError(f"{labels.numel()} labels for {inputs.shape[0]} embeddings")
    if (ref_inputs is None) != (ref_labels is None):
        raise ValueError("ref_inputs and ref_labels must be given together")
    if ref_inputs is None or ref_labels is None:
        return labels, inputs, labels, True
    ref_labels = ref_labels.reshape(-1)
    if ref_inputs.ndim != 2 or ref_inputs.shape[1] != inputs.shape[1]:
        raise ValueError(
            f"reference embeddings of shape {tuple(ref_inputs.shape)} do not match "
            f"the batch's dimension {inputs.shape[1]}"
        )
    if ref_labels.numel() != ref_inputs.shape[0]:
        raise ValueError(f"{ref_labels.numel()} reference labels for {ref_inputs.shape[0]} rows")
    return labels, ref_inputs, ref_labels, False


def label_masks(
    labels: torch.Tensor, ref_labels: torch.Tensor, is_self: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean [N, M] masks of positive and negative (query, reference) pairs."""
    same = labels[:, None] == ref_labels[None, :].to(labels.device)
    positive = same.clone()
    if is_self:
        positive.fill_diagonal_(False)
    return positive, ~same


def maybe_normalize(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    return F.normalize(x, p=2.0, dim=1) if normalize else x


def euclidean_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise L2 distances; clamped before the sqrt so equal points keep finite gradients."""
    squared = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :] - 2.0 * a @ b.t()
    return squared.clamp(min=1e-12).sqrt()


def hardest(values: torch.Tensor, mask: torch.Tensor, largest: bool) -> torch.Tensor:
    """Per row, the largest (or smallest) of `values` where `mask`; ±inf for empty rows."""
    if largest:
        return values.masked_fill(~mask, float("-inf")).amax(dim=1)
    return values.masked_fill(~mask, float("inf")).amin(dim=1)


def zero_loss(inputs: torch.Tensor) -> torch.Tensor:
    """A 0 connected to `inputs`, so backward() and optimizer steps still work (+ 0.0: a
    negative sum times 0 is -0.0, which the training log would print).

    Every loss gives it for an empty batch (no rows), where a mean over the batch would
    be 0 / 0 = NaN and the step would write NaN into the weights. A zero keeps the step
    (and, under DDP, the gradient all-reduce the other processes wait in) going."""
    return inputs.sum() * 0.0 + 0.0


class PairLoss(nn.Module):
    """Base of the pair losses: resolves the reference set, then calls `compare`.

    Subclasses set `normalize_feature` and implement `compare(query, ref, positive,
    negative)`, where the masks are [N, M] booleans of (query, reference) pairs.
    """

    input_key: ClassVar[str] = "features"
    normalize_feature: bool
    # What the warning of a batch without triplets advises; XBM's says when its memory
    # starts to supply them.
    triplets_advice: str = (
        "batch-hard losses need several classes and several images of each in a batch "
        "(PKSampler, sample_per_id >= 2 and a batch_size of several times it)"
    )
    # False while something else supplies the pairs a batch lacks (XBM's memory, once it
    # has started): a batch without triplets is then no fault of the run.
    warn_without_triplets: bool = True
    _warned_without_triplets: bool = False

    def forward(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        ref_inputs: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        inputs = as_embeddings(inputs)
        labels, ref_inputs, ref_labels, is_self = resolve_reference(
            inputs, labels, ref_inputs, ref_labels
        )
        if inputs.shape[0] == 0:
            return zero_loss(inputs)
        query = maybe_normalize(inputs, self.normalize_feature)
        ref = query if is_self else maybe_normalize(ref_inputs, self.normalize_feature)
        positive, negative = label_masks(labels, ref_labels, is_self)
        return self.compare(query, ref, positive, negative)

    def compare(self, query: Tensor, ref: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
        raise NotImplementedError

    def without_triplets(self, query: Tensor, negative: Tensor) -> Tensor:
        """The zero loss of a batch-hard loss on a batch where no anchor has both a positive
        and a negative, with a warning the first time: batches of one image per class (or
        of one class: a PKSampler's batch_size equal to its sample_per_id, whose advice,
        sample_per_id >= 2, it had already) leave the loss at 0 for the whole run, which
        nothing else shows. `negative`: the batch's negative pairs, to tell which."""
        if self.warn_without_triplets and not self._warned_without_triplets:
            self._warned_without_triplets = True
            lacked = (
                "no image of a training batch had both another image of its class and one "
                "of another class"
                if bool(negative.any())
                else "every image of a training batch was of one class"
            )
            logger.warning(
                "%s: %s, so the loss was 0; %s", type(self).__name__, lacked, self.triplets_advice
            )
        return zero_loss(query)
