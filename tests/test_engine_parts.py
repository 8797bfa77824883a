"""Engine building blocks: LR schedules, optimizer groups, loss combiner, seeding, checkpoints."""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from shitu import registry
from shitu.config.schema import ComponentConfig, DataSplitConfig, LRConfig, OptimizerConfig
from shitu.engine import precision
from shitu.engine.data import build_eval_loader
from shitu.engine.distributed import init_distributed, select_device
from shitu.engine.ema import WeightEMA
from shitu.engine.optim import build_optimizer, parameter_groups, set_learning_rate
from shitu.engine.precision import autocast_for, effective_amp, load_scaler_state
from shitu.engine.seeding import (
    SeededBatchSampler,
    SeededDataset,
    capture_rng_state,
    restore_rng_state,
)
from shitu.engine.state import (
    Progress,
    load_training_state,
    resolve_checkpoint,
    save_training_state,
)
from shitu.errors import CheckpointError, ConfigError
from shitu.losses.combined import CombinedLoss, split_loss_params
from shitu.models.necks.bnneck import BNNeck
from shitu.models.rec_model import RecModel

registry.populate()


def schedule(name: str, **params):
    return registry.LR_SCHEDULES.build_with_runtime(name, params, steps_per_epoch=10, epochs=10)


def test_cosine_with_warmup_values(caplog):
    lr = schedule("Cosine", learning_rate=0.1, warmup_epoch=2)
    assert lr.lr_at(0) == 0.0
    assert lr.lr_at(10) == pytest.approx(0.05)  # half-way through 20 warm-up steps
    assert lr.lr_at(20) == pytest.approx(0.1)
    # 80 decay steps: at step 60 progress is 0.5 -> 0.1 * 0.5 * (1 + cos(pi/2)) = 0.05
    assert lr.lr_at(60) == pytest.approx(0.05)
    assert lr.lr_at(100) == pytest.approx(0.0, abs=1e-12)
    assert lr.lr_at(40) == pytest.approx(0.05 * (1 + math.cos(math.pi * 0.25)))
    with caplog.at_level(logging.WARNING):  # said, not refused
        whole = schedule("Cosine", learning_rate=0.1, warmup_epoch=10)
    assert "a warm-up of 10 epochs is not shorter than the run's 10 (Global.epochs): the" in (
        caplog.text
    )
    assert whole.lr_at(99) == pytest.approx(0.099)
    with caplog.at_level(logging.WARNING):
        registry.LR_SCHEDULES.build_with_runtime(
            "Cosine", {"learning_rate": 0.1, "warmup_epoch": 1}, steps_per_epoch=10, epochs=1
        )
    assert "a warm-up of 1 epoch is not shorter than the run's 1 (Global.epochs): the" in (
        caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        rising = schedule("Cosine", learning_rate=0.001, eta_min=0.01)
    assert "Cosine: eta_min 0.01 is above the learning rate 0.001 (as scaled" in caplog.text
    assert rising.lr_at(99) > rising.lr_at(0)


def test_piecewise_gamma_and_values(caplog):
    lr = schedule("Piecewise", learning_rate=0.1, decay_epochs=[3, 6])
    assert [lr.lr_at(s) for s in (0, 29, 30, 59, 60, 99)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    )
    with caplog.at_level(logging.WARNING):  # a short trial or a probe stage: said, not refused
        schedule("Piecewise", learning_rate=0.1, decay_epochs=[3, 9], warmup_epoch=1)
    assert "decay epoch 9 is not reached in the run (decay epochs count after the 1 warm-up " in (
        caplog.text
    )
    assert "leaving 9 of its 10 (Global.epochs))" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # none reached: each named, and what that means
        schedule("Piecewise", learning_rate=0.1, decay_epochs=[12, 20])
    assert "decay epochs 12, 20 are not reached in the run (decay epochs count after the 0 " in (
        caplog.text
    )
    assert "leaving 10 of its 10 (Global.epochs)): the rate never decays" in caplog.text
    # Decay epochs count from the end of the warm-up (PaddleClas's warm-up wraps the schedule).
    lr = schedule("Piecewise", learning_rate=0.1, decay_epochs=[3], warmup_epoch=1)
    assert [lr.lr_at(s) for s in (5, 10, 39, 40)] == pytest.approx([0.05, 0.1, 0.1, 0.01])
    lr = schedule("Piecewise", learning_rate=0.2, decay_epochs=[5], values=[0.2, 0.02])
    assert (lr.lr_at(49), lr.lr_at(50)) == (0.2, 0.02)
    # A gamma of 10 (for 0.1), or rising values, multiplied the rate up without a word.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        schedule("Piecewise", learning_rate=0.1, decay_epochs=[3, 6], gamma=10)
        schedule("Piecewise", learning_rate=0.1, decay_epochs=[3, 6], values=[0.1, 0.01, 0.1])
    assert caplog.messages == [
        "Piecewise: the rate rises at decay epochs 3, 6, as its gamma 10 has it, instead of "
        "decaying; give a gamma below 1 (or falling values)",
        "Piecewise: the rate rises at decay epoch 6, as its values have it, instead of "
        "decaying; give a gamma below 1 (or falling values)",
    ]
    # A rate scaled for the batch size (base_batch_size) scales every piece.
    lr = schedule("Piecewise", learning_rate=0.4, decay_epochs=[5], values=[0.2, 0.02])
    assert (lr.lr_at(49), lr.lr_at(50)) == pytest.approx((0.4, 0.04))
    with pytest.raises(ValueError, match=r"values must be a list of rates, got 0.1"):
        LRConfig.model_validate(
            {"name": "Piecewise", "learning_rate": 0.1, "decay_epochs": [5], "values": 0.1}
        )
    with pytest.raises(ValueError, match=r"values start at 0.2 but learning_rate is 0.1"):
        LRConfig.model_validate(
            {"name": "Piecewise", "learning_rate": 0.1, "decay_epochs": [5], "values": [0.2, 0.02]}
        )
    with pytest.raises(ConfigError, match="one more entry"):
        schedule("Piecewise", learning_rate=0.1, decay_epochs=[5], values=[0.1])


def test_reduce_on_plateau_and_state_round_trip():
    lr = schedule("ReduceOnPlateau", learning_rate=0.1, patience=1, factor=0.5)
    for metric in (0.5, 0.6, 0.6, 0.6):  # best 0.6, then two evals without gain
        lr.observe(metric)
    assert lr.lr_at(50) == pytest.approx(0.05)
    other = schedule("ReduceOnPlateau", learning_rate=0.1, patience=1, factor=0.5)
    other.load_state_dict(lr.state_dict())
    other.observe(0.6)
    other.observe(0.6)
    assert other.lr_at(50) == pytest.approx(0.025)


def test_a_plateau_schedule_resumed_with_another_rate_keeps_its_reductions_of_it():
    """A resumed run follows the config's learning rate (the resume says so), but a plateau
    schedule's restored state held its current rate, the old one's: a run resumed with a
    tenth of the rate went on at the old one. The reductions so far now apply to the new."""
    lr = schedule("ReduceOnPlateau", learning_rate=0.1, patience=0, factor=0.5, min_lr=0.001)
    for metric in (0.6, 0.6):  # one eval without gain: halved
        lr.observe(metric)
    assert lr.lr_at(50) == pytest.approx(0.05)
    lower = schedule("ReduceOnPlateau", learning_rate=0.02, patience=0, factor=0.5, min_lr=0.001)
    lower.load_state_dict(lr.state_dict())
    assert lower.lr_at(50) == pytest.approx(0.01)
    floor = schedule("ReduceOnPlateau", learning_rate=0.0015, patience=0, factor=0.5, min_lr=0.001)
    floor.load_state_dict(lr.state_dict())
    assert floor.lr_at(50) == pytest.approx(0.001)  # reduced, but not below min_lr
    older = {key: value for key, value in lr.state_dict().items() if key != "learning_rate"}
    lower.load_state_dict(older)  # a checkpoint without the rate: its current rate, as before
    assert lower.lr_at(50) == pytest.approx(0.05)


def test_a_warm_up_start_above_the_rate_is_warned_of(caplog):
    """A warm-up from above the (batch-scaled) rate lowered it, without a word."""
    with caplog.at_level(logging.WARNING):
        lr = schedule("Cosine", learning_rate=0.001, warmup_epoch=1, warmup_start_lr=0.01)
    assert "warmup_start_lr 0.01 is above the learning rate 0.001 (as scaled" in caplog.text
    assert lr.lr_at(5) > lr.lr_at(10)
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # no warm-up: the start rate is never used
        schedule("Cosine", learning_rate=0.001, warmup_start_lr=0.01)
    assert not caplog.text


def test_a_plateau_floor_above_the_rate_is_warned_of(caplog):
    """A min_lr above the (batch-scaled) rate raised the rate at the first plateau, without
    a word, where Cosine's eta_min above it is warned of."""
    with caplog.at_level(logging.WARNING):
        lr = schedule("ReduceOnPlateau", learning_rate=0.001, min_lr=0.01, patience=0)
    assert "ReduceOnPlateau: min_lr 0.01 is above the learning rate 0.001 (as scaled" in (
        caplog.text
    )
    lr.observe(0.5)
    lr.observe(0.5)
    assert lr.lr_at(50) == 0.01


def test_schedule_config_errors():
    with pytest.raises(ConfigError, match="did you mean 'Cosine'"):
        registry.LR_SCHEDULES.validate("Cosin", {"learning_rate": 0.1})
    with pytest.raises(ConfigError, match="eta_mn"):
        registry.LR_SCHEDULES.validate("Cosine", {"learning_rate": 0.1, "eta_mn": 0})


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("ReduceOnPlateau", {"factor": 2.0}, "factor: Input should be less than 1"),
        ("ReduceOnPlateau", {"factor": 0.0}, "factor: Input should be greater than 0"),
        (  # PaddleClas's default, for a loss: the rate fell each time recall rose
            "ReduceOnPlateau",
            {"mode": "min"},
            r"mode: min lowers the rate while Global.eval_metric improves",
        ),
        ("Piecewise", {"decay_epochs": [30, 10]}, r"decay_epochs: \[30, 10\] must be increasing"),
        ("Piecewise", {"decay_epochs": [30, 30]}, r"decay_epochs: \[30, 30\] must be increasing"),
        (
            "Piecewise",
            {"decay_epochs": [10], "values": [0.1]},
            r"values: needs one more entry than decay_epochs \(2\), got 1",
        ),
    ],
)
def test_schedule_settings_are_refused_when_the_config_is_read(name, params, message):
    """These were checked only as the run built its schedule, after its datasets and model,
    and the message named neither the config file nor the key's section."""
    with pytest.raises(ConfigError, match=message):
        registry.LR_SCHEDULES.validate(name, {"learning_rate": 0.1, **params})


def optimizer_config(**values) -> OptimizerConfig:
    return OptimizerConfig.model_validate(
        {"name": "Momentum", "lr": {"name": "Cosine", "learning_rate": 0.1}, **values}
    )


def test_no_decay_on_norm_and_bias_and_frozen_bnneck_bias_left_out():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    neck = BNNeck(num_features=2, bias_frozen=True)
    groups = parameter_groups([model, neck], optimizer_config(regularizer={"coeff": 1e-4}))
    decayed, exempt = groups
    assert decayed["weight_decay"] == 1e-4 and exempt["weight_decay"] == 0.0
    assert {id(p) for p in decayed["params"]} == {id(model[0].weight), id(model[3].weight)}
    exempt_ids = {id(p) for p in exempt["params"]}
    assert id(model[1].weight) in exempt_ids and id(model[3].bias) in exempt_ids
    all_ids = {id(p) for g in groups for p in g["params"]}
    assert id(neck.feat_bn.bias) not in all_ids  # frozen: never optimised, never decayed

    everything = parameter_groups(
        [model], optimizer_config(regularizer={"coeff": 1e-4}, decay_norm_and_bias=True)
    )
    assert len(everything) == 1
    named = parameter_groups([model], optimizer_config(weight_decay=0.1, no_weight_decay_name="3."))
    assert id(model[3].weight) in {id(p) for p in named[1]["params"]}
    # A fragment of no parameter's name exempted nothing, silently.
    typo = optimizer_config(weight_decay=0.1, no_weight_decay_name="3. .b_0")
    with pytest.raises(
        ConfigError,
        match=r"no_weight_decay_name: no parameter name contains '.b_0' \(names are such as "
        r"0.weight, 0.bias, 1.weight\)",
    ):
        parameter_groups([model], typo)


def test_lr_mult_scales_named_modules_steps():
    """Longest name wins; a plain SGD step moves each parameter by its group's lr x mult."""
    model = nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)))
    config = optimizer_config(name="SGD", lr_mult={"1": 0.25, "1.1": 0.5})
    groups = parameter_groups([model], config)
    mult_of = {id(p): g["lr_mult"] for g in groups for p in g["params"]}
    expected = [1.0, 1.0, 0.25, 0.25, 0.5, 0.5]
    assert [mult_of[id(p)] for p in model.parameters()] == expected
    assert [g["weight_decay"] > 0 for g in groups] == [False] * len(groups)  # no decay set

    optimizer = build_optimizer([model], config, 0.1)
    set_learning_rate(optimizer, 0.2)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.ones(4, 3)).square().sum().backward()
    optimizer.step()
    for param, old, mult in zip(model.parameters(), before, expected, strict=True):
        torch.testing.assert_close(param.detach(), old - 0.2 * mult * param.grad)


def test_lr_mult_errors_name_the_problem():
    with pytest.raises(ConfigError, match=r"no trainable parameter under backbone\.blokcs"):
        parameter_groups([nn.Linear(2, 2)], optimizer_config(lr_mult={"backbone.blokcs": 0.1}))
    # A misspelt name is answered with the modules where it would be; a frozen one is not.
    net = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), nn.Linear(2, 2))
    misspelt = r"under 0\.2 \(no such module; modules there: 0\.0, 0\.1\)"
    with pytest.raises(ConfigError, match=misspelt):
        parameter_groups([net], optimizer_config(lr_mult={"0.2": 0.1}))
    net[1].requires_grad_(False)
    with pytest.raises(ConfigError, match=r"under 1 \(frozen modules have none\)"):
        parameter_groups([net], optimizer_config(lr_mult={"1": 0.1}))
    # A module whose parameters all lie under a longer name's is not a name that is wrong.
    inner = nn.Sequential(nn.Sequential(nn.Linear(2, 2)))
    groups = parameter_groups([inner], optimizer_config(lr_mult={"0": 0.1, "0.0": 0.5}))
    assert {group["lr_mult"] for group in groups} == {0.5}
    with pytest.raises(ValueError, match="not a positive multiplier"):
        optimizer_config(lr_mult={"0": 0})
    # Nested names (what a dotted `-o` override builds) read as dotted module names.
    nested = optimizer_config(lr_mult={"backbone": {"blocks": 0.5, "head": 0.25}})
    assert nested.lr_mult == {"backbone.blocks": 0.5, "backbone.head": 0.25}


@pytest.mark.parametrize("name", ["Momentum", "SGD", "Adam", "AdamW"])
def test_optimizers_step(name):
    model = nn.Linear(3, 2)
    optimizer = build_optimizer([model], optimizer_config(name=name, weight_decay=0.01), 0.1)
    before = model.weight.detach().clone()
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    assert not torch.equal(before, model.weight)


def test_settings_of_the_other_optimizer_family_are_warned_of(caplog):
    """`-o Optimizer.name=Adam` on a Momentum config kept its momentum: 0.9, which Adam
    ignored without a word (as SGD ignores betas)."""
    model = nn.Linear(3, 2)
    with caplog.at_level(logging.WARNING):
        build_optimizer([model], optimizer_config(name="Adam", momentum=0.9), 0.1)
        build_optimizer([model], optimizer_config(name="SGD", beta1=0.8, beta2=0.9), 0.1)
        build_optimizer([model], optimizer_config(name="AdamW", beta1=0.8), 0.1)
    assert [r.getMessage() for r in caplog.records] == [
        "Optimizer.momentum: Adam takes no momentum, so it is unused",
        "Optimizer.beta1: SGD takes no beta1 or beta2, so they are unused",
    ]


def test_adam_betas_of_zero_are_kept_and_unset_ones_default():
    model = nn.Linear(3, 2)
    zero = build_optimizer([model], optimizer_config(name="Adam", beta1=0.0, beta2=0.0), 0.1)
    assert zero.param_groups[0]["betas"] == (0.0, 0.0)
    unset = build_optimizer([model], optimizer_config(name="AdamW"), 0.1)
    assert unset.param_groups[0]["betas"] == (0.9, 0.999)


def test_combined_loss_weights_keys_and_paddleclas_feature_from():
    options, params = split_loss_params({"weight": 0.5, "feature_from": "features", "epsilon": 0.1})
    assert options.model_dump() == {"weight": 0.5, "input_key": "features"}
    assert params == {"epsilon": 0.1}
    loss = CombinedLoss([{"CELoss": {"weight": 2.0, "epsilon": 0.0}}])
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0])
    total, parts = loss({"logits": logits, "features": logits}, labels)
    expected = torch.nn.functional.cross_entropy(logits, labels)
    assert parts["CELoss"] == pytest.approx(float(expected))
    assert total.item() == pytest.approx(2 * float(expected))
    # A model without the output a loss reads is refused before the first step.
    with pytest.raises(
        ConfigError,
        match=r"Loss\.Train: CELoss reads model output 'logits'.*gives backbone, features\); "
        r"add an Arch\.Head",
    ):
        loss.attach(RecModel(torch.nn.Flatten()))
    loss.attach(RecModel(torch.nn.Flatten(), head=torch.nn.Identity()))
    # The neck's output is missing for want of a neck, which a head does not give.
    with pytest.raises(
        ConfigError,
        match=r"reads model output 'neck'.*gives backbone, features, logits\); add "
        r"an Arch\.Neck or set TripletLoss\.input_key",
    ):
        CombinedLoss([{"TripletLoss": {"input_key": "neck"}}]).attach(
            RecModel(torch.nn.Flatten(), head=torch.nn.Identity())
        )

    # Each item weighted and fed its own output; a repeated name gets a numbered key.
    items = [
        {"CELoss": {"weight": 2.0}},
        {"TripletAngularMarginLoss": {"weight": 0.5}},
        {"CELoss": {"weight": 3.0, "epsilon": 0.1}},
    ]
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, -1.0]])
    total, parts = CombinedLoss(items)({"logits": logits, "features": features}, labels)
    ce = torch.nn.functional.cross_entropy(logits, labels)
    smoothed = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
    triplet = registry.LOSSES.build("TripletAngularMarginLoss")(features, labels)
    assert set(parts) == {"CELoss", "TripletAngularMarginLoss", "CELoss_2"}
    assert [parts["CELoss"], parts["TripletAngularMarginLoss"], parts["CELoss_2"]] == [
        pytest.approx(float(v)) for v in (ce, triplet, smoothed)
    ]
    assert total.item() == pytest.approx(float(2 * ce + 0.5 * triplet + 3 * smoothed))


def test_combined_loss_computes_in_float32_under_autocast():
    """Called inside autocast, the pair losses' similarity matmul ran in bf16, whose steps
    of 0.004 near cos 1 moved the angular triplet loss by more than 1e-3 here."""
    torch.manual_seed(0)
    items = [{"CELoss": {"epsilon": 0.1}}, {"TripletAngularMarginLoss": {"add_absolute": True}}]
    loss = CombinedLoss(items)
    centres = torch.nn.functional.normalize(torch.randn(4, 64), dim=1)
    features = centres.repeat_interleave(8, 0) + 0.05 * torch.randn(32, 64)
    outputs = {"logits": torch.randn(32, 4), "features": features.bfloat16()}
    labels = torch.arange(4).repeat_interleave(8)
    expected_total, expected = loss(outputs, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, parts = loss(outputs, labels)
    assert parts["TripletAngularMarginLoss"].dtype == torch.float32
    assert total.item() == expected_total.item()
    assert parts == expected


class _Noise:
    """A dataset whose items are random draws: shows exactly how each item was seeded."""

    def __len__(self):
        return 6

    def __getitem__(self, index):
        return torch.rand(1).item(), random.random(), index


def test_seeded_samples_do_not_depend_on_restarts_or_disturb_global_rng():
    batches = [[0, 1], [2, 3], [4, 5]]

    class Sampler(list):
        def set_epoch(self, epoch, start_batch=0):
            self[:] = batches[start_batch:]

    sampler = SeededBatchSampler(Sampler(batches), run_seed=7)
    dataset = SeededDataset(_Noise())
    sampler.set_epoch(1)
    full = [[dataset[key] for key in batch] for batch in sampler]
    sampler.set_epoch(1, start_batch=1)
    resumed = [[dataset[key] for key in batch] for batch in sampler]
    assert resumed == full[1:]
    sampler.set_epoch(2)
    assert [[dataset[key] for key in batch] for batch in sampler] != full

    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    dataset[(0, 123)]
    assert torch.equal(torch.rand(3), expected)


def test_ddp_processes_seed_each_place_in_their_batches_apart():
    """Numbered by each process alone, the images at one place in every process's batch
    would be augmented alike: seeds follow the global batch number instead."""
    seeds = []
    for rank in (0, 1):
        sampler = SeededBatchSampler([[0, 1], [2, 3]], run_seed=7, rank=rank, world_size=2)
        seeds.append([seed for batch in sampler for _, seed in batch])
    assert not set(seeds[0]) & set(seeds[1])
    # One process numbers its batches as before.
    alone = SeededBatchSampler([[0, 1], [2, 3], [4, 5], [6, 7]], run_seed=7)
    interleaved = [
        seed for b in (0, 1) for rank in (0, 1) for seed in seeds[rank][2 * b : 2 * b + 2]
    ]
    assert [seed for batch in alone for _, seed in batch] == interleaved


def test_rng_capture_and_restore():
    state = capture_rng_state()
    draws = (random.random(), np.random.rand(), torch.rand(2))
    restore_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert draws[:2] == again[:2] and torch.equal(draws[2], again[2])


def test_rng_restore_sets_only_the_gpus_visible_now(monkeypatch):
    """A checkpoint of a 2-GPU run resumed where one GPU is visible (CUDA_VISIBLE_DEVICES)
    failed with an IndexError from torch.cuda.set_rng_state_all; the GPUs there get their
    states, those no longer seen are left out. (The CUDA calls are stood in for: CI has
    no GPU.)"""
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)

    def set_rng_state(state: torch.Tensor, device: int = 0) -> None:
        if device >= 1:
            raise IndexError("device index out of range")
        restored[device] = state

    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.ones(2), torch.zeros(2)])
    state = capture_rng_state()
    restore_rng_state(state)
    assert list(restored) == [0] and torch.equal(restored[0], torch.ones(2))


def test_training_checkpoint_round_trip_and_errors(tmp_path, monkeypatch):
    path = save_training_state(
        tmp_path / "latest.pt",
        {"model": {"w": torch.ones(2)}, "rng": [capture_rng_state()], "seed": 0},
        Progress(epoch=2, batch_in_epoch=3, global_step=23),
    )
    for form in (path, tmp_path / "latest", tmp_path):
        payload, progress = load_training_state(form)
        assert progress.global_step == 23 and torch.equal(payload["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"]  # no temp files left
    with pytest.raises(CheckpointError, match="no training checkpoint"):
        resolve_checkpoint(tmp_path / "nope")
    monkeypatch.chdir(tmp_path.parent)  # a relative path: where it was looked for
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint(Path(tmp_path.name) / "nope")
    assert str(info.value).endswith(
        f"(relative paths are taken from the working directory, {tmp_path.parent})"
    )
    torch.save({"w": torch.ones(1)}, tmp_path / "weights.pt")
    with pytest.raises(CheckpointError, match="weights file, not a training checkpoint"):
        load_training_state(tmp_path / "weights.pt")
    other = save_training_state(tmp_path / "other.pt", {"model": {}}, Progress())
    with pytest.raises(CheckpointError, match="an unrecognised training checkpoint, not a rec"):
        load_training_state(other)
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable training checkpoint"):
        load_training_state(tmp_path / "broken.pt")


def test_effective_amp_falls_back_to_float32_with_a_reason(monkeypatch, caplog):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert effective_amp("off", cpu) == "off"
    assert effective_amp("fp16", cuda) == "fp16" and effective_amp("bf16", cuda) == "bf16"
    with caplog.at_level("WARNING", logger="shitu.engine.precision"):
        assert effective_amp("fp16", cpu) == "off"
    assert "fp16 needs a CUDA device" in caplog.text
    caplog.clear()
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level("WARNING", logger="shitu.engine.precision"):
        assert effective_amp("bf16", cpu) == "off"
    assert "no native bfloat16" in caplog.text
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert effective_amp("bf16", cpu) == "bf16"
    with autocast_for(cpu, "bf16"):
        assert nn.Linear(4, 4)(torch.ones(2, 4)).dtype == torch.bfloat16
    with autocast_for(cpu, "off"):
        assert nn.Linear(4, 4)(torch.ones(2, 4)).dtype == torch.float32


def test_fp16_loss_scaling_resumes_from_a_checkpoint_that_ran_without_it(caplog):
    """A run started without fp16 (or on a CPU, where fp16 falls back to float32) saved an
    empty scaler state; resumed with fp16 on a GPU it starts scaling afresh, not a crash."""
    saved = torch.amp.GradScaler("cpu", enabled=False).state_dict()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)  # enabled, as fp16 on CUDA
    with caplog.at_level("WARNING", logger="shitu.engine.precision"):
        load_scaler_state(scaler, saved)
    assert "the checkpoint ran without fp16 loss scaling" in caplog.text
    assert scaler.is_enabled() and scaler.get_scale() == 1024.0
    scaler.scale(torch.ones(()))  # as a step does, before it sets the scale
    scaler.update(512.0)
    resumed = torch.amp.GradScaler("cpu")
    load_scaler_state(resumed, scaler.state_dict())
    assert resumed.get_scale() == 512.0
    load_scaler_state(torch.amp.GradScaler("cpu", enabled=False), scaler.state_dict())


def test_weight_ema_is_the_bias_corrected_weighted_mean_of_the_steps():
    """Step t's average weighs the weights after step s by decay ** (t - s), normalised:
    the initial weights get no share, BatchNorm statistics are averaged, counters copied."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = WeightEMA(model, decay=0.9)
    history = []
    for _ in range(5):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter))
        model.train()(torch.randn(4, 3))  # moves the running statistics
        history.append({k: v.clone() for k, v in model.state_dict().items()})
        ema.update()
    weights = torch.tensor([0.9 ** (4 - s) for s in range(5)])
    weights /= weights.sum()
    averaged = ema.module.state_dict()
    for name in ("0.weight", "0.bias", "1.running_mean", "1.running_var"):
        expected = sum(w * step[name] for w, step in zip(weights, history, strict=True))
        assert torch.allclose(averaged[name], expected, atol=1e-6), name
        assert not torch.allclose(averaged[name], model.state_dict()[name]), name
    assert int(averaged["1.num_batches_tracked"]) == 5
    assert not ema.module.training
    assert not any(p.requires_grad for p in ema.module.parameters())

    restored = WeightEMA(model, decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 5
    assert all(torch.equal(restored.module.state_dict()[k], v) for k, v in averaged.items())
    with pytest.raises(ValueError, match="decay"):
        WeightEMA(model, decay=1.0)


def test_an_evaluation_that_would_drop_images_is_refused():
    split = DataSplitConfig.model_validate(
        {
            "dataset": {"name": "ImageNetDataset", "image_root": ".", "cls_label_path": "x"},
            "sampler": {"name": "DistributedBatchSampler", "batch_size": 8, "drop_last": True},
        }
    )
    with pytest.raises(
        ConfigError, match=r"DataLoader\.Eval\.Gallery: sampler drop_last: true would leave"
    ):
        build_eval_loader(split, init_distributed("cpu"), seed=0, where="DataLoader.Eval.Gallery")
    # A training sampler copied over: it drew a random share of the images, silently.
    split.sampler = ComponentConfig(name="PKSampler", batch_size=8, sample_per_id=4)
    with pytest.raises(
        ConfigError, match=r"DataLoader\.Eval\.Query: sampler PKSampler draws random batches"
    ):
        build_eval_loader(split, init_distributed("cpu"), seed=0, where="DataLoader.Eval.Query")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without a CUDA GPU")
def test_a_gpu_asked_for_on_a_host_without_one_says_what_to_set():
    """PaddleClas's configs ship `device: gpu`: the message gives the setting that runs."""
    with pytest.raises(ConfigError) as info:
        select_device("gpu")
    assert str(info.value) == (
        "Global.device: 'gpu' asked for, but no CUDA GPU is visible; set auto (a GPU where "
        "there is one) or cpu (-o Global.device=auto)"
    )
