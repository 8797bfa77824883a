"""Cross-batch memory (XBM, Wang et al., CVPR 2020): mine pairs against past batches too.

Embeddings drift slowly once training has settled, so the embeddings of the last
few thousand images are still good stand-ins for their current values. XBM keeps
them in a FIFO ring and adds a pair loss of the batch against that memory, giving
each anchor far more (and harder) negatives than one batch holds. The ring is
first-in-first-out at any memory size. PaddleClas's writes a batch that does not fit
over its last slots and restarts at slot 0, so each time it wraps it overwrites newer
entries than the oldest: with a size that is a multiple of the batch size, the batch
written just before.
"""

from __future__ import annotations

import inspect
import json
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from shitu.errors import ConfigError
from shitu.losses._pairs import PairLoss, as_embeddings
from shitu.losses.contrastive import ContrastiveLoss, Tolerance
from shitu.losses.triplet import TripletLoss
from shitu.losses.triplet_angular import TripletAngularMarginLoss
from shitu.registry import LOSSES, NonNegative, Size, Variant, each_problem

Iterations = Annotated[int, Field(ge=0)]
# A loss name, or {name: {params}}: any mapping passes the type, so that `_pair_loss_spec`
# words the refusal of another shape, such as PaddleClas's {name: ContrastiveLoss, ...}.
PairLossSpec = str | dict[str, Any]
# The losses that compare a batch with a reference set, which XBM's pair_loss names.
PAIR_LOSSES: tuple[type[PairLoss], ...] = (ContrastiveLoss, TripletLoss, TripletAngularMarginLoss)
# XBM's names of its settings, and PaddleClas's (which its XBM losses below take).
SETTING_NAMES = (
    ("memory_size", "xbm_size"),
    ("memory_weight", "xbm_weight"),
    ("embedding_size", "feat_dim"),
)


def _pair_loss_spec(spec: PairLossSpec) -> tuple[str, dict[str, Any]]:
    """`"ContrastiveLoss"` or `{"ContrastiveLoss": {"margin": 0.5}}` -> (name, validated
    params); a problem is named under `pair_loss`, as the config has it."""
    if isinstance(spec, str):
        name, params = spec, {}
    elif (
        isinstance(spec, dict)
        and len(spec) == 1
        and isinstance(next(iter(spec.values())), dict | None)
    ):
        ((name, params),) = spec.items()
        params = dict(params or {})
    elif isinstance(spec, dict) and isinstance(spec.get("name"), str):
        settings = ", ".join(
            f"{key}: {json.dumps(value)}" for key, value in spec.items() if key != "name"
        )
        raise ValueError(
            f"pair_loss: the loss's name is the key its settings go under, not a `name` "
            f"setting: pair_loss: {{{spec['name']}: {{{settings}}}}}"
        )
    else:
        raise ValueError(
            f"pair_loss: must be a loss name (ContrastiveLoss) or one loss name with its "
            f"settings ({{ContrastiveLoss: {{margin: 0.5}}}}), got {spec!r}"
        )
    try:
        entry = LOSSES.get(name)
    except ConfigError as exc:
        raise ConfigError(f"pair_loss: {exc}") from None
    loss_class = entry.ctor if isinstance(entry, Variant) else entry  # e.g. TripletLossV2
    if not (isinstance(loss_class, type) and issubclass(loss_class, PairLoss)):
        raise ValueError(
            f"pair_loss: XBM needs a pair loss that compares a batch with a reference set "
            f"({', '.join(loss.__name__ for loss in PAIR_LOSSES)}); {name} is not one"
        )
    try:
        return name, LOSSES.validate(name, params)
    except ConfigError as exc:
        message = each_problem(str(exc), lambda problem: f"pair_loss.{name}.{problem}")
        raise ConfigError(message) from None


@LOSSES.register("XBM")
class CrossBatchMemory(nn.Module):
    """batch_weight * L(batch, batch) + memory_weight * L(batch, memory) once started.

    `L` is `pair_loss`. From training iteration `start_iter` + 1 on, every training
    forward first writes the batch's detached embeddings and labels into the ring
    (overwriting the oldest entries once `memory_size` are held), then compares
    the batch with everything the ring holds. Before that, and in eval mode, only
    the in-batch term is computed and nothing is written. The ring, its write
    position and the iteration count are buffers, so checkpoints resume exactly.
    Under DDP each process keeps its own memory of the batches it saw, and a checkpoint
    keeps each process's.
    """

    input_key: ClassVar[str] = "features"
    # Each DDP process's memory is its own: a checkpoint keeps every process's.
    per_process_state: ClassVar[bool] = True
    # How a config names this loss and its embedding width, for the message of a mismatch.
    config_name: ClassVar[str] = "XBM"
    size_key: ClassVar[str] = "embedding_size"
    memory_key: ClassVar[str] = "memory_size"
    # Why it takes no key that another XBM loss or its pair loss does (set below them).
    unknown_key_notes: ClassVar[dict[str, str]] = {}

    def __init__(
        self,
        pair_loss: PairLossSpec = "ContrastiveLoss",
        memory_size: Size = 8192,
        embedding_size: Size = 512,
        start_iter: Iterations = 1000,
        memory_weight: NonNegative = 1.0,
        batch_weight: NonNegative = 1.0,
    ) -> None:
        super().__init__()
        self.pair_loss_name, params = _pair_loss_spec(pair_loss)
        # A PairLoss: `_pair_loss_spec` takes only losses that compare with a reference set.
        self.pair_loss: PairLoss = LOSSES.build(self.pair_loss_name, **params)
        self.pair_loss.triplets_advice = (
            f"XBM's memory supplies pairs from past batches only after start_iter "
            f"({start_iter}) training steps; until then a batch needs several classes "
            "and several images of each (PKSampler, sample_per_id >= 2 and a batch_size of "
            "several times it)"
        )
        self.start_iter = start_iter
        self.memory_weight = memory_weight
        self.batch_weight = batch_weight
        self.register_buffer("memory", torch.zeros(memory_size, embedding_size))
        self.register_buffer("memory_labels", torch.full((memory_size,), -1, dtype=torch.long))
        self.register_buffer("write_position", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))

    @staticmethod
    def check_params(pair_loss: PairLossSpec | None = None, **_others: Any) -> None:
        """The pair loss's name and settings: also checked as a config loads (by the
        registry), so that a mistake there names the file and key as any other does. The
        classes with PaddleClas's arguments have no `pair_loss`: their types check them."""
        if pair_loss is not None:
            _pair_loss_spec(pair_loss)

    @property
    def memory_size(self) -> int:
        return self.memory.shape[0]

    def check_input(self, features: torch.Tensor) -> None:
        """A ConfigError where [N, D] `features` do not fit the memory's width, or the pair
        loss's own (ContrastiveLoss's embedding_size): both before the first step."""
        if features.shape[1] != self.memory.shape[1]:
            raise ConfigError(
                f"{self.config_name}.{self.size_key} is {self.memory.shape[1]} but the "
                f"model output it reads has {features.shape[1]} dimensions; set "
                f"{self.size_key}: {features.shape[1]}"
            )
        pair_check = getattr(self.pair_loss, "check_input", None)
        if pair_check is not None:
            pair_check(features)

    def enqueue(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Write a batch into the ring, oldest entries first to go."""
        self.check_input(features)
        features = features.detach().to(self.memory.dtype)[-self.memory_size :]
        labels = labels.reshape(-1)[-self.memory_size :].to(self.memory_labels.dtype)
        size = features.shape[0]
        slots = (self.write_position + torch.arange(size, device=self.memory.device)) % (
            self.memory_size
        )
        self.memory[slots] = features
        self.memory_labels[slots] = labels
        self.write_position.copy_((self.write_position + size) % self.memory_size)
        self.num_filled.clamp_(max=self.memory_size - size).add_(size)

    def stored(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (embeddings, labels) the ring holds, in slot order."""
        filled = int(self.num_filled)
        return self.memory[:filled], self.memory_labels[:filled]

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        features = as_embeddings(features)
        self.check_input(features)  # from the first step, not only once the memory starts
        if self.training:
            self.iteration += 1
        memory_on = self.training and int(self.iteration) > self.start_iter
        # Once on, the memory holds the positives a batch of one image per class lacks.
        self.pair_loss.warn_without_triplets = not memory_on
        loss = self.batch_weight * self.pair_loss(features, labels)
        if not memory_on:
            return loss
        self.pair_loss.warn_without_triplets = True  # nothing makes up for the memory's lack
        self.enqueue(features, labels)
        memory, memory_labels = self.stored()
        return loss + self.memory_weight * self.pair_loss(
            features, labels, ref_inputs=memory, ref_labels=memory_labels
        )


@LOSSES.register("ContrastiveLoss_XBM")
class ContrastiveLossXBM(CrossBatchMemory):
    """PaddleClas's name and arguments for XBM around ContrastiveLoss (its XBM recipe).

    `xbm_size` is `memory_size` and `xbm_weight` is `memory_weight`.
    """

    config_name: ClassVar[str] = "ContrastiveLoss_XBM"
    memory_key: ClassVar[str] = "xbm_size"

    def __init__(
        self,
        xbm_size: Size = 8192,
        xbm_weight: NonNegative = 1.0,
        start_iter: Iterations = 1000,
        margin: float = 0.5,
        embedding_size: Size = 128,
        epsilon: Tolerance = 1e-5,
        normalize_feature: bool = True,
    ) -> None:
        super().__init__(
            pair_loss={
                "ContrastiveLoss": {
                    "margin": margin,
                    "epsilon": epsilon,
                    "normalize_feature": normalize_feature,
                }
            },
            memory_size=xbm_size,
            embedding_size=embedding_size,
            start_iter=start_iter,
            memory_weight=xbm_weight,
        )

    @staticmethod
    def check_params(margin: float = 0.5, normalize_feature: bool = True, **_others: Any) -> None:
        """The ContrastiveLoss settings it passes on, also checked as a config loads."""
        ContrastiveLoss.check_params(margin=margin, normalize_feature=normalize_feature)


@LOSSES.register("TripletAngularMarginLoss_XBM")
class TripletAngularMarginLossXBM(CrossBatchMemory):
    """PaddleClas's name and arguments for XBM around TripletAngularMarginLoss.

    `xbm_size` is `memory_size`, `xbm_weight` is `memory_weight` and `feat_dim` is
    `embedding_size`; the others are TripletAngularMarginLoss's (with its differences
    from PaddleClas's, which counts an anchor's own pair in the in-batch term).
    """

    config_name: ClassVar[str] = "TripletAngularMarginLoss_XBM"
    size_key: ClassVar[str] = "feat_dim"
    memory_key: ClassVar[str] = "xbm_size"

    def __init__(
        self,
        xbm_size: Size = 8192,
        xbm_weight: NonNegative = 1.0,
        start_iter: Iterations = 1000,
        feat_dim: Size = 512,
        margin: NonNegative = 0.5,
        normalize_feature: bool = True,
        reduction: Literal["mean", "sum"] = "mean",
        add_absolute: bool = False,
        absolute_loss_weight: NonNegative = 1.0,
        ap_value: float = 0.9,
        an_value: float = 0.5,
    ) -> None:
        super().__init__(
            pair_loss={
                "TripletAngularMarginLoss": {
                    "margin": margin,
                    "normalize_feature": normalize_feature,
                    "reduction": reduction,
                    "add_absolute": add_absolute,
                    "absolute_loss_weight": absolute_loss_weight,
                    "ap_value": ap_value,
                    "an_value": an_value,
                }
            },
            memory_size=xbm_size,
            embedding_size=feat_dim,
            start_iter=start_iter,
            memory_weight=xbm_weight,
        )

    @staticmethod
    def check_params(**params: Any) -> None:
        """The TripletAngularMarginLoss settings it passes on, also checked as a config loads."""
        TripletAngularMarginLoss.check_params(**params)


def _parameters(loss: type[nn.Module]) -> set[str]:
    """The keys a config may give `loss` (its constructor's arguments)."""
    return set(inspect.signature(loss.__init__).parameters) - {"self"}


def _renamed_notes(loss: type[CrossBatchMemory]) -> dict[str, str]:
    """Why `loss` takes no `xbm_size` (or `memory_size`, ...): the name another XBM loss
    gives the setting, which `loss` takes under its own."""
    taken, notes = _parameters(loss), {}
    for names in SETTING_NAMES:
        own = [name for name in names if name in taken]
        notes.update(
            (other, f"another XBM loss's name for a setting that {loss.config_name} names {own[0]}")
            for other in names
            if own and other not in taken
        )
    return notes


def _pair_loss_notes() -> dict[str, str]:
    """Why XBM takes no `margin` (or other setting of its pair loss): it goes in pair_loss."""
    notes = {}
    for loss in PAIR_LOSSES:
        for key in sorted(_parameters(loss) - _parameters(CrossBatchMemory)):
            takers = [other.__name__ for other in PAIR_LOSSES if key in _parameters(other)]
            notes.setdefault(
                key,
                f"a setting of XBM's pair loss ({', '.join(takers)}), not of XBM: give it "
                f"inside pair_loss, e.g. pair_loss: {{{takers[0]}: {{{key}: ...}}}}",
            )
    return notes


CrossBatchMemory.unknown_key_notes = {**_pair_loss_notes(), **_renamed_notes(CrossBatchMemory)}
for _preset in (ContrastiveLossXBM, TripletAngularMarginLossXBM):
    _preset.unknown_key_notes = {
        **_renamed_notes(_preset),
        "pair_loss": f"XBM's setting; {_preset.config_name} has its pair loss built in, whose "
        "settings it takes itself (or use XBM, which takes a pair_loss)",
    }
